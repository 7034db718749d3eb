//! Under systemd (`Type=notify`, packaging/node-vm-agent.service) the agent says READY=1
//! only once the port maps are in the kernel and the API answers, pings the watchdog
//! while it runs and says STOPPING=1 on SIGTERM: the real agent binary in the test
//! topology's node namespace, with a unix datagram socket standing in for systemd's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// systemd's side of NOTIFY_SOCKET: a datagram socket in a temporary directory (a path
/// socket: the agent runs in another network namespace, which abstract names are not
/// shared across).
struct Systemd {
    _dir: tempfile::TempDir,
    path: String,
    socket: UnixDatagram,
}

impl Systemd {
    fn new() -> Systemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify").to_string_lossy().into_owned();
        let socket = UnixDatagram::bind(&path).unwrap();
        Systemd {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The next message, waiting at most `within`.
    fn next(&self, within: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one contains `key`, waiting at most `within` in all; panics if none.
    fn until(&self, key: &str, within: Duration) -> (String, Vec<String>) {
        let start = Instant::now();
        let mut before = Vec::new();
        while let Some(left) = within.checked_sub(start.elapsed()) {
            match self.next(left) {
                Some(m) if m.lines().any(|l| l == key) => return (m, before),
                Some(m) => before.push(m),
                None => break,
            }
        }
        panic!("no {key} within {within:?}; got {before:?}");
    }
}

#[test]
fn ready_comes_after_the_kernel_state_and_the_api_then_watchdog_and_stopping() {
    let topo = Topology::new();
    // A map made by an earlier run: READY must wait until it is back in the kernel.
    let mut agent = Agent::start(&topo);
    let r = agent.api.post(
        "/ports",
        &json!({"listen_port": 8080, "target_ip": VM_IP.to_string(), "target_port": 80}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(agent.stop());
    topo.node.exec_ok(&["nft", "flush", "ruleset"]);

    let systemd = Systemd::new();
    agent.set_env("NOTIFY_SOCKET", &systemd.path);
    // 400 ms: the agent pings every 200 ms.
    agent.set_env("WATCHDOG_USEC", "400000");
    agent.spawn_again();
    let (ready, before) = systemd.until("READY=1", Duration::from_secs(30));
    // Checked at once, before the agent can catch up: both are already true.
    assert_eq!(
        nft_maps(&topo.node),
        [entry("tcp", 8080, VM_IP, 80)].into(),
        "READY before the port maps were restored"
    );
    let health = agent.api.get("/health");
    assert_eq!(
        health.status, 200,
        "READY before the API answered: {health:?}"
    );
    assert!(
        ready.contains("STATUS=API on 0.0.0.0:8000; 1 port maps applied"),
        "{ready:?}"
    );
    assert!(
        before.iter().all(|m| m == "WATCHDOG=1"),
        "only pings may come before READY: {before:?}"
    );

    // Pings keep coming while it runs: about 10 in 2 s; at least 5 whatever the load.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if systemd.next(Duration::from_millis(500)).as_deref() == Some("WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(
        pings >= 5,
        "{pings} watchdog pings in 2 s at a 200 ms interval"
    );

    assert!(agent.stop(), "the agent exits on SIGTERM");
    let (stopping, _) = systemd.until("STOPPING=1", Duration::from_secs(5));
    assert!(stopping.contains("STATUS=stopping"), "{stopping:?}");
    let log = agent.log();
    assert!(log.contains("systemd watchdog on"), "{log}");
    assert!(!log.contains("cannot notify systemd"), "{log}");
}

#[test]
fn without_a_watchdog_for_this_process_there_are_no_pings() {
    let topo = Topology::new();
    let systemd = Systemd::new();
    // WATCHDOG_PID names another process (set for a parent that exec'd no agent).
    let mut agent = Agent::start_with(
        &topo,
        &[
            ("NOTIFY_SOCKET", systemd.path.as_str()),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    let (ready, before) = systemd.until("READY=1", Duration::from_secs(10));
    assert!(before.is_empty(), "{before:?}");
    assert!(ready.contains("0 port maps applied"), "{ready:?}");
    assert_eq!(systemd.next(Duration::from_secs(1)), None, "a ping");
    assert!(agent.stop());
    assert!(!agent.log().contains("systemd watchdog on"));
}

#[test]
fn a_notify_socket_nobody_listens_on_changes_nothing_but_a_warning() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("nobody").to_string_lossy().into_owned();
    let mut agent = Agent::start_with(&topo, &[("NOTIFY_SOCKET", gone.as_str())]);
    assert_eq!(agent.api.get("/ports").status, 200);
    assert!(agent.stop());
    let log = agent.log();
    assert!(log.contains("cannot notify systemd"), "{log}");
}
