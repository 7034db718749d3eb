//! What an operator watching a node sees: `GET /metrics` checked by `promtool` and
//! against known state, and `GET /events` held open while a VM and a port map live
//! their lives, on real parts (libvirtd and a tiny guest in the node namespace, the
//! kernel's nftables, real traffic through a map).
//!
//! libvirtd's control socket is machine-wide, so the libvirt tests take turns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::client::series_value as value;
use support::events::EventStream;
use support::libvirt::{env, tiny_vm, virsh};
use support::*;

/// How long after its request answered an event may take to reach the stream.
const SOON: Duration = Duration::from_secs(1);

/// METRICS_LISTEN of these tests: the node's address on the client side.
const METRICS_PORT: u16 = 9101;

/// A scrape through METRICS_LISTEN (no token), checked by `promtool check metrics`.
fn scrape(node_ip: std::net::Ipv4Addr, ns: &str) -> String {
    let r = Api::new(ns, sa(node_ip, METRICS_PORT), "")
        .request("GET", "/metrics", None, None)
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let text = r.body.clone();
    promtool_check(&text);
    text
}

/// Scrapes until `ok` holds (for up to a minute; libvirt's statistics are sampled at
/// most every 2 s), returning that scrape.
fn scrape_until(ns: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = scrape(NODE_IP, ns);
        if ok(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not seen in a minute:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/install-deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is(e: &Value, kind: &str, subject: &str) -> bool {
    e["kind"] == kind && e["subject"] == subject
}

#[test]
fn a_vm_and_a_port_map_seen_through_events_and_metrics() {
    let _turn = support::libvirt::turn();
    let metrics_listen = format!("{NODE_IP}:{METRICS_PORT}");
    // The VM reconcile's interval is an hour: only an event can make it run.
    let mut e = env(&[
        ("RECONCILE_INTERVAL", "3600"),
        ("METRICS_LISTEN", &metrics_listen),
    ]);
    let client = e.topo.client.name().to_owned();
    let (kernel, initrd) = e.scratch.guest();
    let mut events =
        EventStream::open(&client, sa(NODE_IP, API_PORT), &e.agent.token, None).unwrap();
    assert_eq!(events.status(), 200, "{}", events.head);
    assert!(events.head.contains("text/event-stream"), "{}", events.head);

    // /metrics on the API port needs the token; METRICS_LISTEN serves it (only it)
    // without.
    let r = e.agent.api.request("GET", "/metrics", None, None).unwrap();
    assert_eq!(r.status, 401);
    let plain = Api::new(&client, sa(NODE_IP, METRICS_PORT), "");
    assert_eq!(
        plain.request("GET", "/ports", None, None).unwrap().status,
        404
    );

    assert_eq!(e.upload_image("tiny", &vec![0u8; 4 << 20]).status, 200);
    events.until(SOON, |ev| is(ev, "image.ready", "tiny"));
    let r = e.agent.api.post("/vms", &tiny_vm("obs1", &kernel, &initrd));
    assert_eq!(r.status, 200, "{r:?}");
    let seen = events.until(SOON, |ev| is(ev, "vm.started", "obs1"));
    assert!(
        seen.iter().any(|ev| is(ev, "vm.defined", "obs1")),
        "defined before started: {seen:#?}"
    );
    let r = e.agent.api.post(
        "/ports",
        &json!({"listen_port": 18090, "target_vm": "obs1", "target_port": 80}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let added = events.until(SOON, |ev| is(ev, "portmap.added", "18090"));
    assert_eq!(added.last().unwrap()["detail"]["target_vm"], "obs1");

    // Traffic through the map shows in its series; the VM's in its own.
    assert_eq!(e.via_node_port(18090, "/hostname").trim(), "obs1");
    let text = scrape_until(&client, "the map's and the VM's series", |text| {
        value(
            text,
            r#"node_vm_agent_port_map_bytes_total{listen_port="18090",proto="tcp"}"#,
        )
        .is_some_and(|b| b > 0.0)
            && value(text, r#"node_vm_agent_vm_state{vm="obs1"}"#) == Some(1.0)
    });
    assert_eq!(
        value(&text, r#"node_vm_agent_port_maps{proto="tcp"}"#),
        Some(1.0)
    );
    assert!(
        value(
            &text,
            r#"node_vm_agent_port_map_connections_total{listen_port="18090",proto="tcp"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"node_vm_agent_vm_memory_bytes{vm="obs1"}"#),
        Some(256.0 * 1024.0 * 1024.0),
        "{text}"
    );
    assert!(
        value(&text, r#"node_vm_agent_vm_cpu_seconds_total{vm="obs1"}"#).is_some_and(|s| s > 0.0)
    );
    assert!(
        value(
            &text,
            r#"node_vm_agent_vm_block_read_bytes_total{vm="obs1"}"#
        )
        .is_some_and(|b| b > 0.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            r#"node_vm_agent_vm_network_receive_bytes_total{vm="obs1"}"#
        )
        .is_some_and(|b| b > 0.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"node_vm_agent_mesh_join_state{state="standalone"}"#
        ),
        Some(1.0)
    );
    assert_eq!(value(&text, "node_vm_agent_images"), Some(1.0));
    assert!(value(&text, "node_vm_agent_database_bytes").is_some_and(|b| b > 0.0));
    assert!(
        value(
            &text,
            r#"node_vm_agent_http_requests_total{method="POST",route="/vms",status="200"}"#
        ) == Some(1.0),
        "{text}"
    );
    assert!(
        text.contains(r#"node_vm_agent_build_info{version=""#),
        "{text}"
    );

    // A destroy outside the agent reaches the stream within a second.
    let t = Instant::now();
    virsh(&["destroy", "obs1"]);
    let destroyed = Instant::now();
    let seen = events.until(Duration::from_secs(5), |ev| is(ev, "vm.stopped", "obs1"));
    let latency = destroyed.elapsed();
    eprintln!(
        "outside virsh destroy -> vm.stopped on the stream: {:.1} ms after virsh returned ({:.1} ms after it started)",
        latency.as_secs_f64() * 1000.0,
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    assert_eq!(seen.last().unwrap()["detail"]["reason"], "destroyed");
    scrape_until(&client, "vm_state 5 (shut off)", |text| {
        value(text, r#"node_vm_agent_vm_state{vm="obs1"}"#) == Some(5.0)
    });

    // Undefined outside: the reconcile reacts to the event at once (its interval is an
    // hour) and defines the VM again.
    virsh(&["undefine", "obs1"]);
    let t = Instant::now();
    let seen = events.until(Duration::from_secs(60), |ev| {
        ev["kind"] == "reconcile.repaired" && ev["detail"]["repaired"].to_string().contains("obs1")
    });
    eprintln!(
        "outside virsh undefine -> reconcile.repaired: {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let kinds: Vec<&str> = seen
        .iter()
        .filter(|ev| ev["subject"] == "obs1")
        .map(|ev| ev["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"vm.undefined"), "{seen:#?}");
    assert!(kinds.contains(&"vm.defined"), "{seen:#?}");
    assert!(e.domains().contains(&"obs1".to_owned()));

    // Deletes: the map, then the VM (its end shows as undefined).
    assert_eq!(e.agent.api.delete("/ports/18090").status, 200);
    events.until(SOON, |ev| is(ev, "portmap.removed", "18090"));
    assert_eq!(e.agent.api.delete("/vms/obs1").status, 200);
    events.until(SOON, |ev| is(ev, "vm.undefined", "obs1"));
    // The VM's whole life, in order, as the stream told it.
    let life: Vec<&str> = events
        .log
        .iter()
        .filter(|ev| ev["subject"] == "obs1")
        .map(|ev| ev["kind"].as_str().unwrap())
        .collect();
    let mut want = [
        "vm.defined",
        "vm.started",
        "vm.stopped",
        "vm.undefined",
        "vm.defined",
        "vm.undefined",
    ]
    .into_iter()
    .peekable();
    for kind in &life {
        if want.peek() == Some(kind) {
            want.next();
        }
    }
    assert!(want.peek().is_none(), "out of order or missing: {life:?}");
    let ids: Vec<u64> = events
        .log
        .iter()
        .map(|ev| ev["id"].as_u64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "ids one by one: {ids:?}"
    );
    let text = scrape(NODE_IP, &client);
    assert_eq!(
        value(&text, r#"node_vm_agent_port_maps{proto="tcp"}"#),
        Some(0.0)
    );
    assert!(
        value(&text, "node_vm_agent_reconcile_repairs_total{kind=\"vms\"}")
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );

    // A stopping agent ends the open stream instead of waiting for it.
    assert!(
        e.agent.stop_within(Duration::from_secs(10)),
        "{}",
        e.agent.log()
    );
    assert!(events.ended_within(Duration::from_secs(2)));
}

/// Without libvirt: a reader that stops reading is dropped, never slows the agent; a
/// client that comes back resumes with Last-Event-ID.
#[test]
fn a_reader_that_stops_reading_is_dropped_and_a_resume_fills_the_gap() {
    let topo = Topology::new();
    let agent = Agent::start(&topo);
    let client = topo.client.name().to_owned();
    let api = &agent.api;
    // A receive buffer of a few KiB, so the agent's writes back up after a few dozen
    // events instead of filling megabytes of autotuned buffers first.
    let mut stalled =
        EventStream::open_small_window(&client, sa(NODE_IP, API_PORT), &agent.token).unwrap();
    assert_eq!(stalled.status(), 200);
    let mut reader = EventStream::open(&client, sa(NODE_IP, API_PORT), &agent.token, None).unwrap();
    // The stalled client never reads: its socket fills, then the agent's queue for it.
    let started = Instant::now();
    let mut last_id = None;
    for i in 0..400u16 {
        let port = 20000 + i % 50;
        let body = json!({"listen_port": port, "target_ip": VM_IP.to_string(), "target_port": 80, "replace": true});
        assert_eq!(api.post("/ports", &body).status, 200);
        assert_eq!(api.delete(&format!("/ports/{port}")).status, 200);
        if i == 10 {
            last_id = reader
                .next(Duration::from_secs(5))
                .map(|e| e["id"].as_u64().unwrap());
        }
    }
    eprintln!("800 changes with a stalled reader: {:?}", started.elapsed());
    // The live reader resumes after the id it had and gets every later change.
    let last = last_id.unwrap();
    drop(reader);
    let mut resumed = EventStream::open(
        &client,
        sa(NODE_IP, API_PORT),
        &agent.token,
        Some(&last.to_string()),
    )
    .unwrap();
    let mut ids = Vec::new();
    while let Some(ev) = resumed.next(Duration::from_millis(500)) {
        ids.push(ev["id"].as_u64().unwrap());
    }
    assert_eq!(ids.first(), Some(&(last + 1)));
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "no gap: {ids:?}");
    assert!(ids.len() >= 700, "{}", ids.len());
    // The stalled client's stream was ended: reading it now reaches its end.
    let mut got = 0;
    while stalled.next(Duration::from_secs(2)).is_some() {
        got += 1;
    }
    assert!(
        got < 800,
        "the stalled reader was cut off before the end ({got} delivered)"
    );
    assert!(
        agent.log().contains("an event stream fell behind"),
        "{}",
        agent.log()
    );
}
