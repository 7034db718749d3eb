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
//! - restarts (BENCH_FLEET_RESTARTS, default 2): the controller forgets every WireGuard
//!   peer (the original controller's entrypoint does not add them back); t1 then. Per
//!   node: t1 -> its first `/join` after t1 (the re-join), and t1 -> the controller's
//!   handshake with it again (back). Target: the last node back within 45 s. The agents
//!   run with WG_STALE_AFTER=20 (BENCH_FLEET_STALE_AFTER) and JOIN_REFRESH_INTERVAL=300,
//!   so only the dead tunnel brings them back. Between restarts the fleet idles
//!   BENCH_FLEET_IDLE_S again, so the second restart meets other handshake ages.
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

/// One restart: the controller forgets every peer; (re-join, back) times in ms per node.
fn restart(fleet: &Fleet, agents: &mut FleetAgents, n: usize) -> (Vec<f64>, Vec<f64>) {
    fleet.forget_all_peers();
    let t1 = Instant::now();
    let back = agents.wait_all_handshaking(fleet, t1, Duration::from_secs(120));
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
    (rejoin, back.iter().map(|d| ms(*d)).collect())
}

#[test]
#[ignore = "benchmark: run by scripts/bench.sh (BENCH_ONLY=l)"]
fn fleet_join_restart_and_memory() {
    let n: usize = env_or("BENCH_FLEET_NODES", 20);
    let restarts: usize = env_or("BENCH_FLEET_RESTARTS", 2);
    let idle = Duration::from_secs(env_or("BENCH_FLEET_IDLE_S", 5));
    let stale_after: u64 = env_or("BENCH_FLEET_STALE_AFTER", 20);
    eprintln!("agent binary: {}", support::agent::agent_bin());
    let fleet = Fleet::new(n);
    let stale = stale_after.to_string();
    let settings = [
        ("WG_STALE_AFTER", stale.as_str()),
        ("JOIN_REFRESH_INTERVAL", "300"),
    ];
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

    let (mut rejoin_all, mut back_all) = (Vec::new(), Vec::new());
    let mut per_restart = Vec::new();
    for r in 0..restarts {
        if r > 0 {
            std::thread::sleep(idle);
        }
        let (rejoin, back) = restart(&fleet, &mut agents, n);
        eprintln!("restart {r}: forgotten -> re-join (ms): {}", list(&rejoin));
        eprintln!("restart {r}: forgotten -> back (ms): {}", list(&back));
        per_restart.push(format!(
            "{:.0}/{:.0}/{}",
            pct(&sorted(back.clone()), 100.0),
            pct(&sorted(rejoin.clone()), 100.0) - pct(&sorted(rejoin.clone()), 0.0),
            peak_within(&rejoin, 1000.0)
        ));
        rejoin_all.push(rejoin);
        back_all.push(back);
    }
    let killed = agents.stop_all(Duration::from_secs(3));
    let rejoin: Vec<f64> = rejoin_all.concat();
    let back: Vec<f64> = back_all.concat();
    let peak = rejoin_all
        .iter()
        .map(|r| peak_within(r, 1000.0))
        .max()
        .unwrap_or(0);
    let rss_list: Vec<String> = rss.iter().map(|k| format!("{k:.0}")).collect();
    println!(
        "BENCH fleet nodes={n} restarts={restarts} stale_after_s={stale_after} {} {} {} rejoin_peak_1s={peak} per_restart_backmax_spread_peak={} {} rss_kib={} rejoin_ms={} sigterm_ignored={killed}",
        stats("start_handshake", "ms", &start),
        stats("restart_back", "ms", &back),
        stats("rejoin", "ms", &rejoin),
        per_restart.join(","),
        stats("rss", "kib", &rss),
        rss_list.join(","),
        rejoin_all
            .iter()
            .map(|r| list(r))
            .collect::<Vec<_>>()
            .join(";"),
    );
}
