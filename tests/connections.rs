//! The connection budget, against the real agent binary in the test topology: idle
//! connections beyond the descriptor limit do not lock the API out, and slow headers,
//! slow bodies and idle kept-alive connections are closed after their timeouts.
//!
//! Timings decide only where the timeout is the behaviour under test: a connection must
//! be closed no earlier than (nearly) its timeout and within a generous bound after it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::client::parse_response;
use support::netns::in_netns;
use support::*;

/// More connections than a soft limit of 1,024 descriptors allows.
const HELD: usize = 1100;
/// How long after its timeout a connection may still be open (a busy 2-core machine).
const SLACK: Duration = Duration::from_secs(4);
/// How much earlier than its timeout a connection may be closed (timer granularity).
const EARLY: Duration = Duration::from_millis(100);

/// The test process itself holds more than 1,024 sockets.
fn raise_own_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        soft as usize > HELD + 200,
        "the test needs a descriptor limit above {}; it has {soft}",
        HELD + 200
    );
}

/// A raw TCP connection to the API from the client namespace.
fn connect(topo: &Topology) -> TcpStream {
    connect_many(topo, 1).pop().unwrap()
}

fn connect_many(topo: &Topology, n: usize) -> Vec<TcpStream> {
    let addr = sa(NODE_IP, API_PORT);
    in_netns(topo.client.name(), || {
        (0..n)
            .map(|i| {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connection {i} of {n}: {e}"))
            })
            .collect()
    })
}

/// Whether the agent has closed this connection (EOF or reset), without waiting.
fn closed_by_agent(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let closed = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Reads until the agent closes the connection, writing `dribble` one byte every 100 ms
/// meanwhile; returns what was read and when the close was seen, or panics after
/// `bound`.
fn until_closed(s: &mut TcpStream, dribble: &[u8], bound: Duration) -> (Vec<u8>, Instant) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut next = dribble.iter().cycle();
    let mut buf = [0u8; 4096];
    while start.elapsed() < bound {
        if !dribble.is_empty() {
            let byte = [*next.next().unwrap()];
            if s.write_all(&byte).is_err() {
                return (got, Instant::now());
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return (got, Instant::now()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (got, Instant::now()),
        }
    }
    panic!(
        "the agent kept the connection open for {bound:?}; read so far: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Asserts that a close seen at `closed` after `since` came from a `timeout`: not
/// before it, and not much after it.
fn closed_after(what: &str, since: Instant, closed: Instant, timeout: Duration) {
    let took = closed - since;
    assert!(
        took + EARLY >= timeout && took <= timeout + SLACK,
        "{what}: closed after {took:?}, timeout {timeout:?}"
    );
}

/// One `GET /health` on a kept-alive connection; returns the status.
fn keepalive_get(s: &mut TcpStream) -> u16 {
    s.write_all(b"GET /health HTTP/1.1\r\nHost: node\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the answer");
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if raw.len() >= end + 4 + len {
                return parse_response(&raw).unwrap().status;
            }
        }
    }
}

#[test]
fn idle_connections_beyond_the_descriptor_limit_do_not_lock_out_the_api() {
    raise_own_fd_limit();
    let topo = Topology::new();
    // Long timeouts: what frees the API here is the cap and its shedding, not a timeout.
    let mut agent = Agent::start_via(
        &topo,
        &["prlimit", "--nofile=1024:1024"],
        &[("HEADER_READ_TIMEOUT", "300"), ("KEEPALIVE_TIMEOUT", "300")],
    );
    // The kernel queues as many connections as strangers re-open while the agent sheds
    // (its SYN-drop would cost a fresh client a second).
    let listening = topo.node.exec_ok(&["ss", "-Hltn", "sport", "=", ":8000"]);
    assert_eq!(
        listening.split_whitespace().nth(2),
        Some("4096"),
        "listen backlog: {listening}"
    );

    let held = connect_many(&topo, HELD);
    // Fresh clients, a stranger's and an authenticated one, are answered.
    for i in 0..6 {
        let r = agent
            .api
            .request("GET", "/health", None, None)
            .unwrap_or_else(|e| {
                panic!("fresh GET /health {i} with {HELD} idle connections open: {e}")
            });
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = agent
        .api
        .request("GET", "/ports", Some(&agent.token), None)
        .unwrap_or_else(|e| panic!("authenticated GET /ports: {e}"));
    assert_eq!(r.status, 200, "{r:?}");

    // The room came from shedding the connections idle longest, not from refusing.
    let shed = held.iter().filter(|s| closed_by_agent(s)).count();
    assert!(
        shed >= HELD - 896,
        "only {shed} of {HELD} idle connections were shed"
    );
    assert!(
        held[..100].iter().all(closed_by_agent),
        "the oldest were shed first"
    );
    assert!(
        !held[HELD - 100..].iter().any(closed_by_agent),
        "the newest are still open"
    );
    let log = agent.log();
    assert!(
        log.contains("cap=896") && log.contains("MAX_CONNECTIONS"),
        "the cap derived from the limit is logged: {log}"
    );
    assert!(
        !log.contains("cannot accept API connections"),
        "accept never failed: {log}"
    );

    // Strangers' idle connections do not hold up a SIGTERM.
    assert!(
        agent.stop(),
        "the agent exits on SIGTERM with idle connections open"
    );
    drop(held);
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_one_and_the_cap_fits_it() {
    let topo = Topology::new();
    let agent = Agent::start_via(
        &topo,
        &["prlimit", "--nofile=1024:2048"],
        &[("MAX_CONNECTIONS", "5000")],
    );
    let pid = agent.pid().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
        ["2048", "2048"],
        "{line}"
    );
    let log = agent.log();
    assert!(
        log.contains("RLIMIT_NOFILE") && log.contains("soft=2048"),
        "{log}"
    );
    // 2,048 - 128 descriptors kept for the agent itself.
    assert!(
        log.contains("cap=1920") && log.contains("configured=5000"),
        "{log}"
    );
}

#[test]
fn a_slowloris_client_is_disconnected_after_the_header_timeout() {
    let topo = Topology::new();
    let agent = Agent::start_with(
        &topo,
        &[("HEADER_READ_TIMEOUT", "1"), ("KEEPALIVE_TIMEOUT", "30")],
    );
    let timeout = Duration::from_secs(1);

    // Connects and sends nothing.
    let mut silent = connect(&topo);
    let t0 = Instant::now();
    let (_, closed) = until_closed(&mut silent, b"", timeout + SLACK);
    closed_after("a silent connection", t0, closed, timeout);

    // Sends its headers a byte at a time, forever: the timeout is for all of them.
    let mut slow = connect(&topo);
    let t0 = Instant::now();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: node\r\n")
        .unwrap();
    let (_, closed) = until_closed(&mut slow, b"X-Slow: aaaa\r\n", timeout + SLACK);
    closed_after("a dribbling client", t0, closed, timeout);

    // A kept-alive connection's next request gets the same timeout from its first byte.
    let mut kept = connect(&topo);
    assert_eq!(keepalive_get(&mut kept), 200);
    let t0 = Instant::now();
    kept.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let (_, closed) = until_closed(&mut kept, b"X-Slow: aaaa\r\n", timeout + SLACK);
    closed_after("a dribbled second request", t0, closed, timeout);

    // Meanwhile ordinary clients are served.
    assert_eq!(agent.api.get("/health").status, 200);
}

#[test]
fn a_body_that_never_comes_is_cut_after_the_body_timeout() {
    let topo = Topology::new();
    let agent = Agent::start_with(
        &topo,
        &[("BODY_READ_TIMEOUT", "1"), ("HEADER_READ_TIMEOUT", "30")],
    );
    let timeout = Duration::from_secs(1);
    let mut s = connect(&topo);
    let head = format!(
        "POST /ports HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"listen_port\":",
        agent.token
    );
    s.write_all(head.as_bytes()).unwrap();
    let t0 = Instant::now();
    let (answer, closed) = until_closed(&mut s, b"", timeout + SLACK);
    closed_after("a body promised and not sent", t0, closed, timeout);
    let r = parse_response(&answer).unwrap();
    r.assert_error(|s| s == 408);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("BODY_READ_TIMEOUT"),
        "{r:?}"
    );
    // Nothing was created, and the refusal is in the audit log.
    assert!(api_maps(agent.api.get("/ports").json()).is_empty());
    assert!(
        agent
            .sql("select status from audit_log where action = 'POST /ports'")
            .contains("408")
    );
}

#[test]
fn an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout() {
    let topo = Topology::new();
    let _agent = Agent::start_with(
        &topo,
        &[("KEEPALIVE_TIMEOUT", "1"), ("HEADER_READ_TIMEOUT", "30")],
    );
    let timeout = Duration::from_secs(1);
    let mut s = connect(&topo);
    assert_eq!(keepalive_get(&mut s), 200);
    // Within the timeout the connection is reused.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(keepalive_get(&mut s), 200);
    let t0 = Instant::now();
    let (_, closed) = until_closed(&mut s, b"", timeout + SLACK);
    closed_after("an idle kept-alive connection", t0, closed, timeout);
}

#[test]
fn bad_connection_settings_stop_the_agent_naming_the_variable() {
    let topo = Topology::new();
    for (variable, value) in [
        ("HEADER_READ_TIMEOUT", "0"),
        ("BODY_READ_TIMEOUT", "ten"),
        ("KEEPALIVE_TIMEOUT", "100000"),
        ("MAX_CONNECTIONS", "0"),
        ("UPLOAD_MIN_BYTES", "0"),
        ("UPLOAD_WINDOW", "-1"),
    ] {
        let agent = Agent::unstarted(&topo, &[(variable, value)]);
        let (code, out) = agent.serve_expecting_exit();
        assert_eq!(code, 2, "{variable}={value}: {out}");
        assert!(
            out.contains(variable) && out.contains(value),
            "{variable}={value}: {out}"
        );
    }
}
