//! The API port faces strangers: what a client without the token, or with the token and
//! hostile input, can make the agent store or log. The real agent binary in the test
//! topology's node namespace, reached from the client namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use support::netns::in_netns;
use support::*;

/// Bytes of agent.db and its WAL: where anything the agent stored would be.
fn database_bytes(agent: &Agent) -> Vec<u8> {
    let mut all = Vec::new();
    for f in ["agent.db", "agent.db-wal"] {
        if let Ok(b) = std::fs::read(agent.data_dir().join(f)) {
            all.extend(b);
        }
    }
    all
}

fn database_size(agent: &Agent) -> u64 {
    ["agent.db", "agent.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(agent.data_dir().join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Sends `head` (request line and headers) and no body; returns the status line of the
/// answer, if one comes within 5 s.
fn answer_without_body(topo: &Topology, head: &str) -> std::io::Result<String> {
    let mut s = in_netns(topo.client.name(), || {
        TcpStream::connect_timeout(&sa(NODE_IP, API_PORT), Duration::from_secs(2))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(head.as_bytes())?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

#[test]
fn a_strangers_requests_are_answered_from_their_headers_and_only_counted() {
    let topo = Topology::new();
    let mut agent = Agent::start(&topo);

    // A body announced but never sent: the refusal does not wait for it.
    let status = answer_without_body(
        &topo,
        "POST /ports HTTP/1.1\r\nHost: n\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000\r\n\r\n",
    )
    .expect("a 401 without reading the body");
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");

    // A flood of refused changes with 4 KiB bodies: no row each, no body stored.
    let before = database_size(&agent);
    let body = json!({"listen_port": 8080, "target_ip": VM_IP.to_string(), "target_port": 80,
                      "pad": "x".repeat(4000)})
    .to_string();
    const FLOOD: usize = 2000;
    for i in 0..FLOOD {
        let token = if i % 2 == 0 {
            None
        } else {
            Some("wrong-token-0123456789")
        };
        let r = agent
            .api
            .request("POST", "/ports", token, Some(&body))
            .unwrap();
        assert_eq!(r.status, 401, "{r:?}");
    }
    let grown = database_size(&agent).saturating_sub(before);
    assert!(grown < 64 * 1024, "agent.db grew by {grown} bytes");
    assert_eq!(
        agent
            .sql("select count(*) from audit_log where identity = 'none'")
            .trim(),
        "0"
    );
    assert!(!contains(&database_bytes(&agent), "xxxxxxxxxxxxxxxx"));

    // The tokened client is served as before, and audited as before.
    let r = agent.api.post(
        "/ports",
        &json!({"listen_port": 8080, "target_ip": VM_IP.to_string(), "target_port": 80}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        agent
            .sql("select identity, action, outcome from audit_log where action = 'POST /ports'")
            .trim(),
        "token|POST /ports|ok"
    );

    // The counts become one row per source address (here at shutdown; else each minute).
    assert!(agent.stop(), "the agent exits on SIGTERM");
    assert_eq!(
        agent
            .sql("select client_addr, requests, routes from refused_requests")
            .trim(),
        format!("{CLIENT_IP}|{}|POST /ports x{}", FLOOD + 1, FLOOD + 1)
    );
}

#[test]
fn secrets_reach_neither_the_audit_trail_nor_the_log_whatever_the_body() {
    let topo = Topology::new();
    let mut agent = Agent::start(&topo);
    const SECRET: &str = "hunter2-0f9e8d7c";
    let bodies = [
        // Valid JSON, refused later (no such image).
        format!(
            r##"{{"name": "vm1", "image": "nope", "user_data": "#cloud-config\npassword: {SECRET}"}}"##
        ),
        // Malformed: missing brace, trailing garbage, an array, wrong types, truncated.
        format!(r#"{{"name": "vm1", "user_data": "{SECRET}""#),
        format!(r#"{{"name": "vm1", "user_data": "{SECRET}"}} trailing"#),
        format!(r#"[{{"name": "vm1", "user_data": "{SECRET}"}}]"#),
        format!(r#"{{"name": "vm1", "network_config": {{"psk": "{SECRET}"}}}}"#),
        format!(r#"{{"name": "vm1", "user_data": ["{SECRET}"]}}"#),
        format!(r#"{{"name": "vm1", "user_data": "{}"#, &SECRET[..12]),
        format!("user_data={SECRET}"),
    ];
    for b in &bodies {
        let r = agent.api.call("POST", "/vms", Some(b));
        assert!((400..500).contains(&r.status), "{b}: {r:?}");
        assert!(!r.body.contains(SECRET), "{r:?}");
    }
    assert!(agent.stop());
    assert_eq!(
        agent
            .sql("select count(*) from audit_log where action = 'POST /vms'")
            .trim(),
        bodies.len().to_string()
    );
    let db = database_bytes(&agent);
    assert!(!contains(&db, &SECRET[..12]), "a secret is in agent.db");
    let log = agent.log();
    assert!(
        !log.contains(&SECRET[..12]),
        "a secret is in the log:\n{log}"
    );
}

#[test]
fn control_characters_never_reach_the_log_or_the_audit_trail_raw() {
    let topo = Topology::new();
    let mut agent = Agent::start(&topo);
    let sha = "0".repeat(64);
    for url in [
        "http://10.77.2.2/x.img\r\n2026-11-28T00:00:00.000Z  INFO FORGED: token accepted",
        "http://10.77.2.2/x.img\n FORGED",
        "http://10.77.2.2/\u{1b}[2Jx.img",
    ] {
        let r = agent.api.post(
            "/images",
            &json!({"name": "img1", "url": url, "sha256": sha}),
        );
        r.assert_error(|s| s == 400);
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("control characters"),
            "{r:?}"
        );
    }
    // Names with control characters too (the path is percent-encoded on the wire).
    let r = agent.api.delete("/vms/a%0D%0AFORGED");
    r.assert_error(|s| s == 400);
    assert!(agent.stop());
    assert_eq!(
        agent.sql("select count(*) from images").trim(),
        "0",
        "nothing was stored"
    );
    let log = agent.log();
    for line in log.lines() {
        assert!(!line.trim_start().starts_with("FORGED"), "{line:?}");
        assert!(!line.contains("2026-11-28T00:00:00.000Z"), "{line:?}");
        assert!(!line.contains('\u{1b}') && !line.contains('\r'), "{line:?}");
    }
    let rows = agent.sql("select parameters || ' ' || coalesce(error, '') from audit_log");
    assert!(!rows.contains('\r') && !rows.contains('\u{1b}'), "{rows:?}");
    // Four refused calls, four rows, each on a line of its own.
    assert_eq!(rows.lines().count(), 4, "{rows}");
    assert!(rows.lines().all(|l| l.starts_with(r#"{"body""#)), "{rows}");
}

#[test]
fn bodies_are_limited_per_route_and_a_declared_length_is_refused_before_the_body() {
    let topo = Topology::new();
    let agent = Agent::start(&topo);
    // The token is right, the announced body is too large for the route: 413 at once,
    // without waiting for a body that never comes.
    let status = answer_without_body(
        &topo,
        &format!(
            "POST /ports HTTP/1.1\r\nHost: n\r\nAuthorization: Bearer {}\r\n\
             Content-Length: 1000000\r\n\r\n",
            agent.token
        ),
    )
    .expect("a 413 without reading the body");
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");

    // 5 KiB: too much for a port map, fine for a VM (refused there for its content).
    let pad = "x".repeat(5 * 1024);
    let r = agent.api.post(
        "/ports",
        &json!({"listen_port": 8080, "target_ip": VM_IP.to_string(), "target_port": 80, "pad": pad}),
    );
    r.assert_error(|s| s == 413);
    assert!(
        r.json()["error"].as_str().unwrap().contains("POST /ports"),
        "{r:?}"
    );
    let r = agent
        .api
        .post("/vms", &json!({"name": "bad name", "user_data": pad}));
    r.assert_error(|s| s == 400);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        support::netns::run_ok(std::process::Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0755"),
            "tmpfs",
            &dir.path().to_string_lossy(),
        ]));
        Tmpfs { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> std::path::PathBuf {
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

fn map_body(port: u16) -> serde_json::Value {
    json!({"listen_port": port, "target_ip": VM_IP.to_string(), "target_port": 80})
}

#[test]
fn a_full_disk_refuses_changes_with_507_and_leaves_database_kernel_and_libvirt_agreeing() {
    let topo = Topology::new();
    let fs = Tmpfs::new("6m");
    let data = fs.path().join("data");
    let mut agent = Agent::start_with(&topo, &[("DATA_DIR", &data.to_string_lossy())]);
    let api = agent.api.clone();
    assert_eq!(api.post("/ports", &map_body(8080)).status, 200);

    let filler = fs.fill();
    // SQLite may still have room in pages it holds; changes go through until it has
    // none. Every answer is a success or a 507, never anything half done.
    let mut accepted = vec![8080u16];
    let mut refused = None;
    for port in 9000..9600u16 {
        let r = api.post("/ports", &map_body(port));
        match r.status {
            200 => accepted.push(port),
            507 => {
                r.assert_error(|_| true);
                assert!(
                    r.json()["error"].as_str().unwrap().contains("disk is full"),
                    "{r:?}"
                );
                refused = Some(port);
                break;
            }
            other => panic!("POST /ports {port}: {other} {r:?}"),
        }
    }
    let refused = refused.expect("no 507 although the disk is full");
    // A delete and a VM change are refused before they act, too.
    let r = api.delete("/ports/8080");
    assert_eq!(r.status, 507, "{r:?}");
    let r = api.call("POST", "/vms/test/stop?force=true", Some("{}"));
    assert_eq!(r.status, 507, "{r:?}");

    // What a client, the kernel and libvirt see agrees: exactly the accepted maps.
    let listed: Vec<u16> = api_maps(&api.get("/ports").json().clone())
        .iter()
        .map(|m| m.1)
        .collect();
    let mut want = accepted.clone();
    want.sort();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, want, "GET /ports");
    let mut kernel: Vec<u16> = nft_maps(&topo.node).iter().map(|m| m.1).collect();
    kernel.sort();
    assert_eq!(kernel, want, "the kernel's map");
    assert!(!kernel.contains(&refused));
    // The test driver connects in the background: until then reads answer 503.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut vms = api.get("/vms");
    while vms.status == 503 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        vms = api.get("/vms");
    }
    assert_eq!(vms.status, 200, "{vms:?}");
    let test_vm = vms.json()["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "test")
        .cloned()
        .unwrap();
    assert_eq!(
        test_vm["state"], "running",
        "the refused stop did not happen"
    );

    // Space again: the refused change goes through, with its audit row.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(api.post("/ports", &map_body(refused)).status, 200);
    assert!(nft_maps(&topo.node).iter().any(|m| m.1 == refused));
    assert!(agent.stop());
    let db = data.join("agent.db");
    let rows = support::netns::run_ok(
        std::process::Command::new("sqlite3")
            .arg(&db)
            .arg("select count(*) from audit_log where action = 'POST /ports' and outcome = 'ok'"),
    );
    assert_eq!(rows.trim(), (accepted.len() + 1).to_string());
    // The full disk was said in the log, not once per refused call.
    let log = agent.log();
    assert!(log.matches("disk full").count() <= 2, "{log}");
}

#[test]
fn the_audit_trail_is_pruned_to_its_row_cap() {
    let topo = Topology::new();
    let mut agent = Agent::start_with(&topo, &[("AUDIT_MAX_ROWS", "100")]);
    for _ in 0..150 {
        // Refused for its content (not its token): one audit row each.
        let r = agent.api.post("/ports", &json!({"listen_port": 0}));
        assert_eq!(r.status, 400, "{r:?}");
    }
    assert_eq!(agent.sql("select count(*) from audit_log").trim(), "150");
    // Pruning runs every minute and at startup.
    agent.restart();
    let mut n = String::new();
    for _ in 0..50 {
        n = agent.sql("select count(*) from audit_log");
        if n.trim() == "100" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(n.trim(), "100");
    assert_eq!(
        agent.sql("select min(id) from audit_log").trim(),
        "51",
        "the oldest rows went"
    );
}

/// Sends `request` as raw bytes and reads the whole answer until the agent closes the
/// connection (at most 5 s).
fn raw_exchange(topo: &Topology, request: &[u8]) -> String {
    let mut s = in_netns(topo.client.name(), || {
        TcpStream::connect_timeout(&sa(NODE_IP, API_PORT), Duration::from_secs(2))
    })
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The agent may answer and close before it has read everything.
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Requests the HTTP parser (hyper) refuses before the application sees them are
/// answered by hyper itself: a status line, `content-length: 0`, no JSON body, and the
/// connection closed. hyper has no hook for that body; docs/api.md ("Errors") lists these
/// cases, and this test keeps the list true.
#[test]
fn what_the_http_parser_refuses_is_answered_as_the_readme_says() {
    let topo = Topology::new();
    let mut agent = Agent::start(&topo);
    let many_headers: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed request line", b"GARBAGE\r\n\r\n".to_vec(), "400"),
        (
            "malformed header",
            b"GET /health HTTP/1.1\r\nHost: n\r\nno colon here\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "invalid Content-Length",
            b"POST /ports HTTP/1.1\r\nHost: n\r\nContent-Length: ten\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "unsupported HTTP version",
            b"GET /health HTTP/3.0\r\nHost: n\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "a path that makes the head over 16 KiB",
            format!("GET /{} HTTP/1.1\r\nHost: n\r\n\r\n", "a".repeat(17_000)).into_bytes(),
            "431",
        ),
        (
            "more than 100 header fields",
            format!("GET /health HTTP/1.1\r\nHost: n\r\n{many_headers}\r\n").into_bytes(),
            "431",
        ),
        (
            "a head over 16 KiB",
            format!(
                "GET /health HTTP/1.1\r\nHost: n\r\nX-Big: {}\r\n\r\n",
                "b".repeat(17_000)
            )
            .into_bytes(),
            "431",
        ),
    ];
    for (what, request, status) in cases {
        let answer = raw_exchange(&topo, &request);
        eprintln!("{what}: {answer:?}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {answer:?}"
        );
        assert!(
            head.to_ascii_lowercase().contains("content-length: 0"),
            "{what}: {head}"
        );
        assert_eq!(body, "", "{what}");
    }
    // An HTTP/2 client without an upgrade (prior knowledge) gets no answer: the
    // connection is closed.
    let answer = raw_exchange(&topo, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert_eq!(answer, "", "HTTP/2 preface");
    // A head just under the limit is served.
    let answer = raw_exchange(
        &topo,
        format!(
            "GET /health HTTP/1.1\r\nHost: n\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "b".repeat(15_000)
        )
        .as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    // None of these reached the application: neither the refused-request counter (none
    // carried a token) nor the audit trail saw them.
    assert!(agent.stop(), "the agent exits on SIGTERM");
    assert_eq!(
        agent.sql("select count(*) from refused_requests").trim(),
        "0"
    );
    assert_eq!(agent.sql("select count(*) from audit_log").trim(), "0");
}
