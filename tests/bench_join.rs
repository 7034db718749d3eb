//! Benchmark (f) of docs/benchmarks.md: the time from process start to the first
//! completed WireGuard handshake with a local controller (target <= 1 s), and the
//! agent's resident memory once joined and idle (target <= 20 MiB).
//!
//! `#[ignore]`d, so the normal suite does not run it; scripts/bench.sh runs it as
//!
//! ```sh
//! NVA_AGENT_BIN=$PWD/target/release/node-vm-agent \
//!   cargo test --release --test bench_join -- --ignored --nocapture
//! ```
//!
//! and reads the one `BENCH join ...` line it prints. Everything runs inside the
//! namespaces of a test [`Topology`] plus the test controller's namespace
//! (tests/support/controller.rs: the original `/join` over HTTP and a userspace
//! WireGuard interface); nothing is created in the root namespace.
//!
//! Per start: t0 = just before the agent process is spawned. Then, every 5 ms (bounded
//! by 15 s): `/health` from the client namespace (until it answers 200 and until `join`
//! is `joined`) and the controller's own view of the node's peer (`handshake_with`,
//! through the controller's UAPI socket). The handshake time is when that poll first
//! saw a session with the node's key.
//!
//! - fresh starts: a new DATA_DIR each time, so key generation, the first `/join`, the
//!   userspace device and the first handshake are all included; the controller forgets
//!   the node's peer after each run.
//! - restarts: the same DATA_DIR (key and cached join kept), SIGTERM then start again;
//!   before each start the controller drops and re-adds the node's peer so that its
//!   session is gone and the next one seen is the new handshake.
//!
//! Memory: VmRSS/VmHWM from /proc/<pid>/status after the last fresh start and after the
//! last restart, each joined and then idle for 5 s (BENCH_JOIN_IDLE_S).
//!
//! Stops between starts are SIGTERM, then SIGKILL after 3 s; the line counts the stops
//! that needed the SIGKILL (`sigterm_ignored`): with the userspace device, boringtun
//! reads SIGTERM from its own signalfd and the agent may never see it (see
//! docs/benchmarks.md, (f)).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::controller::{Controller, unique_ifname};
use support::measure::{env_or, ms, pct, sorted, status_field};
use support::*;

const POLL: Duration = Duration::from_millis(5);
const BOUND: Duration = Duration::from_secs(15);
/// How long the joined agent idles before its memory is read (BENCH_JOIN_IDLE_S).
fn idle() -> Duration {
    Duration::from_secs(env_or("BENCH_JOIN_IDLE_S", 5))
}

/// Milliseconds from t0 to each milestone of one start.
#[derive(Debug, Clone, Copy)]
struct Sample {
    health_ms: f64,
    joined_ms: f64,
    handshake_ms: f64,
}

/// Polls until `/health` answered, `join` is `joined` and the controller has a session
/// with the node's key. `pubkey` is known on restarts; on fresh starts it is read from
/// what the controller received in `/join` (reset to None before the start).
fn watch_start(agent: &mut Agent, ctl: &Controller, pubkey: Option<&str>, t0: Instant) -> Sample {
    let mut health = None;
    let mut joined = None;
    let mut handshake = None;
    let mut key = pubkey.map(str::to_owned);
    while t0.elapsed() < BOUND {
        if let Some(status) = agent.exited() {
            panic!("agent exited ({status}); log:\n{}", agent.log());
        }
        if key.is_none() {
            key = ctl.state.lock().unwrap().node_pubkey.clone();
        }
        if handshake.is_none()
            && let Some(k) = key.as_deref()
            && ctl.handshake_with(k).is_some()
        {
            handshake = Some(t0.elapsed());
        }
        if joined.is_none()
            && let Ok(r) = agent.api.request("GET", "/health", None, None)
            && r.status == 200
        {
            let now = t0.elapsed();
            health.get_or_insert(now);
            if r.json
                .as_ref()
                .is_some_and(|h| h["join"] == json!("joined"))
            {
                joined = Some(now);
            }
        }
        if let (Some(h), Some(j), Some(s)) = (health, joined, handshake) {
            return Sample {
                health_ms: ms(h),
                joined_ms: ms(j),
                handshake_ms: ms(s),
            };
        }
        std::thread::sleep(POLL);
    }
    panic!(
        "bounded wait of {BOUND:?} over: health {health:?}, joined {joined:?}, handshake {handshake:?}; log:\n{}",
        agent.log()
    );
}

/// `prefix_p50_ms=.. prefix_p90_ms=.. prefix_max_ms=..` of one milestone.
fn stats(prefix: &str, samples: &[Sample], f: impl Fn(&Sample) -> f64) -> String {
    let v = sorted(samples.iter().map(f).collect());
    format!(
        "{prefix}_p50_ms={:.1} {prefix}_p90_ms={:.1} {prefix}_max_ms={:.1}",
        pct(&v, 50.0),
        pct(&v, 90.0),
        pct(&v, 100.0)
    )
}

fn runs_line(samples: &[Sample]) -> String {
    samples
        .iter()
        .map(|s| format!("{:.0}", s.handshake_ms))
        .collect::<Vec<_>>()
        .join(",")
}

/// (VmRSS, VmHWM) in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    (status_field(pid, "VmRSS:"), status_field(pid, "VmHWM:"))
}

fn idle_memory(agent: &mut Agent) -> (u64, u64) {
    std::thread::sleep(idle());
    assert!(agent.exited().is_none(), "agent exited while idle");
    let h = agent.api.request("GET", "/health", None, None).unwrap();
    assert_eq!(h.json()["join"], json!("joined"), "{h:?}");
    memory_kib(agent.pid().unwrap())
}

/// How long a stop waits for the agent to exit on SIGTERM before it SIGKILLs it.
const STOP_BOUND: Duration = Duration::from_secs(3);

/// Stops with SIGTERM (SIGKILL after [`STOP_BOUND`]); counts the stops that needed the
/// SIGKILL. A SIGKILLed userspace device leaves its control socket behind: remove it.
fn stop(agent: &mut Agent, ifname: &str, stops: &mut usize, killed: &mut usize) {
    *stops += 1;
    if !agent.stop_within(STOP_BOUND) {
        *killed += 1;
        eprintln!(
            "agent did not exit within {STOP_BOUND:?} of SIGTERM (killed); log tail:\n{}",
            tail(&agent.log(), 6)
        );
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[test]
#[ignore = "benchmark: run by scripts/bench.sh (BENCH_ONLY=f)"]
fn join_time_and_idle_memory() {
    let runs: usize = env_or("BENCH_JOIN_RUNS", 10);
    assert!(runs > 0, "BENCH_JOIN_RUNS must be > 0");
    let topo = Topology::new();
    let mut ctl = Controller::new(&topo);
    ctl.serve();
    eprintln!("agent binary: {}", support::agent::agent_bin());
    // The agent is started through `ip netns exec` (fork, exec, setns, remount /sys),
    // which is inside t0..t1 but not the agent's own time: measured alone for reference.
    let mut netns_exec: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            topo.node.exec_ok(&["true"]);
            ms(t.elapsed())
        })
        .collect();
    netns_exec.sort_by(f64::total_cmp);

    // Fresh starts: new DATA_DIR (new key), new interface name each time.
    let (mut stops, mut killed) = (0, 0);
    let mut fresh = Vec::new();
    let mut agent: Option<Agent> = None;
    let mut ifname = String::new();
    for i in 0..runs {
        if let Some(mut prev) = agent.take() {
            stop(&mut prev, &ifname, &mut stops, &mut killed);
            let key = ctl.state.lock().unwrap().node_pubkey.take().unwrap();
            ctl.remove_peer(&key);
        }
        ifname = unique_ifname("wgb");
        let env = Controller::agent_env(&ifname);
        let t0 = Instant::now();
        let mut a = Agent::spawn_with(&topo, &env_refs(&env));
        let s = watch_start(&mut a, &ctl, None, t0);
        eprintln!("fresh   {i}: {s:?}");
        fresh.push(s);
        agent = Some(a);
    }
    let mut agent = agent.unwrap();
    let (rss_fresh, hwm_fresh) = idle_memory(&mut agent);
    eprintln!(
        "after a fresh start, joined, idle {:?}: VmRSS {rss_fresh} KiB, VmHWM {hwm_fresh} KiB",
        idle()
    );

    // Restarts on the same DATA_DIR: the key and the cached join are there.
    let key = ctl.state.lock().unwrap().node_pubkey.clone().unwrap();
    let mut restarts = Vec::new();
    for i in 0..runs {
        stop(&mut agent, &ifname, &mut stops, &mut killed);
        ctl.reset_peer(&key);
        assert!(ctl.handshake_with(&key).is_none());
        let t0 = Instant::now();
        agent.spawn_again();
        let s = watch_start(&mut agent, &ctl, Some(&key), t0);
        eprintln!("restart {i}: {s:?}");
        restarts.push(s);
    }
    let (rss_restart, hwm_restart) = idle_memory(&mut agent);
    eprintln!(
        "after a restart, joined, idle {:?}: VmRSS {rss_restart} KiB, VmHWM {hwm_restart} KiB",
        idle()
    );

    stop(&mut agent, &ifname, &mut stops, &mut killed);
    println!(
        "BENCH join runs={runs} {} {} {} fresh_handshake_runs_ms={} {} {} {} restart_handshake_runs_ms={} rss_fresh_kib={rss_fresh} hwm_fresh_kib={hwm_fresh} rss_restart_kib={rss_restart} hwm_restart_kib={hwm_restart} poll_ms={} netns_exec_true_p50_ms={:.1} stops={stops} sigterm_ignored={killed}",
        stats("fresh_handshake", &fresh, |s| s.handshake_ms),
        stats("fresh_health", &fresh, |s| s.health_ms),
        stats("fresh_joined", &fresh, |s| s.joined_ms),
        runs_line(&fresh),
        stats("restart_handshake", &restarts, |s| s.handshake_ms),
        stats("restart_health", &restarts, |s| s.health_ms),
        stats("restart_joined", &restarts, |s| s.joined_ms),
        runs_line(&restarts),
        POLL.as_millis(),
        pct(&netns_exec, 50.0),
    );
}
