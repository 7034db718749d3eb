//! Benchmark (l) of docs/benchmarks.md: a fleet under one controller (issue 12 point 5).
//! BENCH_FLEET_NODES agents (default 20), each in its own namespace with the userspace
//! WireGuard, and one test controller speaking the original protocol
//! (tests/support/fleet.rs), all inside namespaces the test made.
//!
//! `#[ignore]`d, so the normal suite does not run it; scripts/bench.sh runs it as
//!
//! ```sh
//! NVA_AGENT_BIN=$PWD/target/release/node-vm-agent \
//!   cargo test --release --test bench_fleet -- --ignored --nocapture
//! ```
//!
//! and reads the one `BENCH fleet ...` line it prints. Measured, from the controller's
//! side (its WireGuard peers, polled every 50 ms):
//!
//! - start: t0 just before the first of the agents is spawned (all spawned back to back,
//!   none waited for); per node, t0 -> the controller's first completed handshake with
//!   its key. p50 and max (the last node).
//! - memory: each agent's VmRSS once the fleet is joined and idle BENCH_FLEET_IDLE_S (5).
//! - restarts (BENCH_FLEET_DOWN_S, default `2,60`: one per value): the controller's API
//!   stops (connections refused) and it forgets every WireGuard peer (the original
//!   controller's entrypoint does not add them back); t1 then. After the value's seconds
//!   it answers again; t2 then. Per node: t1 -> its first `/join` after t1 (the
//!   re-join), t1 -> the controller's handshake with it again (back after the restart)
//!   and t2 -> that handshake (back after answering). Targets: the last node back within
//!   45 s of the restart (a quick one) and within 30 s of answering again (also after an
//!   outage longer than WG_STALE_AFTER, during which every node backs off). The agents
//!   run with the default WG_STALE_AFTER (BENCH_FLEET_STALE_AFTER sets it) and
//!   JOIN_REFRESH_INTERVAL=300, so only the dead tunnel brings them back. Before each
//!   restart the fleet idles BENCH_FLEET_IDLE_S, so each restart meets other handshake
//!   ages.
//! - the re-joins' spread: min/p50/max of t1 -> re-join over all nodes, and the most
//!   re-joins the controller received within any 1 s (a thundering herd would be all
//!   of them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::fleet::Fleet;
use support::fleet_agents::FleetAgents;
use support::measure::{env_or, ms, pct, sorted};

/// `prefix_min_unit=.. prefix_p50_unit=.. prefix_max_unit=..`
fn stats(prefix: &str, unit: &str, v: &[f64]) -> String {
    let s = sorted(v.to_vec());
    format!(
        "{prefix}_min_{unit}={:.0} {prefix}_p50_{unit}={:.0} {prefix}_max_{unit}={:.0}",
        pct(&s, 0.0),
        pct(&s, 50.0),
        pct(&s, 100.0)
    )
}

fn list(v: &[f64]) -> String {
    sorted(v.to_vec())
        .iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The most values (ms) that fall within any window of `width` ms.
fn peak_within(v: &[f64], width: f64) -> usize {
    let s = sorted(v.to_vec());
    (0..s.len())
        .map(|i| s[i..].iter().take_while(|x| **x < s[i] + width).count())
        .max()
        .unwrap_or(0)
}

/// Per node, ms: t1 -> re-join, t1 -> back, t2 -> back.
struct Restart {
    rejoin: Vec<f64>,
    back: Vec<f64>,
    back_answering: Vec<f64>,
}

/// One restart: the API down for `down`, every peer forgotten.
fn restart(fleet: &mut Fleet, agents: &mut FleetAgents, n: usize, down: Duration) -> Restart {
    let t1 = Instant::now();
    let t2 = fleet.restart(down);
    let back = agents.wait_all_handshaking(fleet, t1, down + Duration::from_secs(120));
    let rejoin = (0..n)
        .map(|i| {
            let m = fleet.member(i).unwrap();
            let first = m
                .joins
                .iter()
                .find(|t| **t > t1)
                .expect("back without a re-join");
            ms(first.duration_since(t1))
        })
        .collect();
    let since_answering = t2.duration_since(t1);
    Restart {
        rejoin,
        back: back.iter().map(|d| ms(*d)).collect(),
        back_answering: back
            .iter()
            .map(|d| ms(d.saturating_sub(since_answering)))
            .collect(),
    }
}

#[test]
#[ignore = "benchmark: run by scripts/bench.sh (BENCH_ONLY=l)"]
fn fleet_join_restart_and_memory() {
    let n: usize = env_or("BENCH_FLEET_NODES", 20);
    let downs: Vec<u64> = std::env::var("BENCH_FLEET_DOWN_S")
        .unwrap_or_else(|_| "2,60".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .expect("BENCH_FLEET_DOWN_S: seconds, comma-separated")
        })
        .collect();
    let idle = Duration::from_secs(env_or("BENCH_FLEET_IDLE_S", 5));
    let stale_after = std::env::var("BENCH_FLEET_STALE_AFTER").ok();
    eprintln!("agent binary: {}", support::agent::agent_bin());
    let mut fleet = Fleet::new(n);
    let mut settings = vec![("JOIN_REFRESH_INTERVAL", "300")];
    if let Some(s) = &stale_after {
        settings.push(("WG_STALE_AFTER", s.as_str()));
    }
    let mut agents = FleetAgents::start(&fleet, &settings);
    let t0 = agents.started;
    let start: Vec<f64> = agents
        .wait_all_handshaking(&fleet, t0, Duration::from_secs(120))
        .iter()
        .map(|d| ms(*d))
        .collect();
    eprintln!("start -> handshake (ms): {}", list(&start));
    std::thread::sleep(idle);
    let rss: Vec<f64> = agents.rss_kib().iter().map(|k| *k as f64).collect();
    eprintln!("VmRSS (KiB), node 0..{n}: {rss:?}");

    let mut rejoin_all = Vec::new();
    let mut per_restart = Vec::new();
    for (r, down) in downs.iter().enumerate() {
        if r > 0 {
            std::thread::sleep(idle);
        }
        let rs = restart(&mut fleet, &mut agents, n, Duration::from_secs(*down));
        eprintln!(
            "restart {r} (down {down} s): restart -> re-join (ms): {}",
            list(&rs.rejoin)
        );
        eprintln!("restart {r}: restart -> back (ms): {}", list(&rs.back));
        eprintln!(
            "restart {r}: answering -> back (ms): {}",
            list(&rs.back_answering)
        );
        let (back, answering) = (sorted(rs.back.clone()), sorted(rs.back_answering.clone()));
        let rejoin = sorted(rs.rejoin.clone());
        per_restart.push(format!(
            "r{r}_down_s={down} r{r}_back_max_ms={:.0} r{r}_answering_p50_ms={:.0} r{r}_answering_max_ms={:.0} r{r}_rejoin_min_ms={:.0} r{r}_rejoin_p50_ms={:.0} r{r}_rejoin_max_ms={:.0} r{r}_rejoin_peak_1s={}",
            pct(&back, 100.0),
            pct(&answering, 50.0),
            pct(&answering, 100.0),
            pct(&rejoin, 0.0),
            pct(&rejoin, 50.0),
            pct(&rejoin, 100.0),
            peak_within(&rs.rejoin, 1000.0)
        ));
        rejoin_all.push(rs.rejoin);
    }
    let killed = agents.stop_all(Duration::from_secs(3));
    let peak = rejoin_all
        .iter()
        .map(|r| peak_within(r, 1000.0))
        .max()
        .unwrap_or(0);
    let rss_list: Vec<String> = rss.iter().map(|k| format!("{k:.0}")).collect();
    println!(
        "BENCH fleet nodes={n} restarts={} stale_after_s={} {} rejoin_peak_1s={peak} {} {} rss_kib={} rejoin_ms={} sigterm_ignored={killed}",
        downs.len(),
        stale_after.as_deref().unwrap_or("default"),
        stats("start_handshake", "ms", &start),
        per_restart.join(" "),
        stats("rss", "kib", &rss),
        rss_list.join(","),
        rejoin_all
            .iter()
            .map(|r| list(r))
            .collect::<Vec<_>>()
            .join(";"),
    );
}
