//! Source allow-lists and live counters of port maps (issue 13.3, 13.4) through the real
//! agent binary, in the namespace topology of tests/support/topology.rs: the client
//! (10.77.1.2) and the far host (10.77.3.2, routed through the node) are two sources.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::nft::TABLE;
use support::*;

const LISTEN: u16 = 8080;
const ULISTEN: u16 = 5300;

fn create(api: &Api, body: Value) -> Value {
    let r = api.post("/ports", &body);
    assert_eq!(r.status, 200, "{r:?}");
    r.json().clone()
}

/// `GET /ports/{listen_port}?proto=..`: the map's object, counters read now.
fn one(api: &Api, proto: &str, listen: u16) -> Value {
    let r = api.get(&format!("/ports/{listen}?proto={proto}"));
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["rule"].clone()
}

fn counters(rule: &Value) -> [u64; 4] {
    ["packets", "bytes", "connections", "drops"].map(|k| {
        rule[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing: {rule}"))
    })
}

/// `nft list set ip node_vm_agent <set>` in the node namespace, as text.
fn nft_set(topo: &Topology, set: &str) -> String {
    let out = topo.node.exec(&["nft", "list", "set", "ip", TABLE, set]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn allow_from_admits_listed_sources_drops_and_counts_the_others() {
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let echo = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let agent = Agent::start(&topo);
    let api = &agent.api;

    // Bad lists are 400s in the original's error shape; nothing is stored.
    for bad in [
        json!(["10.77.1.0/33"]),
        json!(["10.77.1.1/24"]),
        json!("10.77.1.0/24"),
        json!([1]),
    ] {
        let r = api.post(
            "/ports",
            &json!({"listen_port": LISTEN, "target_ip": VM_IP.to_string(),
                    "target_port": 80, "allow_from": bad}),
        );
        r.assert_error(|s| s == 400);
    }
    assert_eq!(api.get("/ports").json()["rules"], json!({}));

    let v = create(
        api,
        json!({"listen_port": LISTEN, "target_ip": VM_IP.to_string(), "target_port": 80,
               "allow_from": ["10.77.1.0/24"]}),
    );
    assert_eq!(v["rule"]["allow_from"], json!(["10.77.1.0/24"]));
    create(
        api,
        json!({"listen_port": ULISTEN, "target_ip": VM_IP.to_string(), "target_port": 5353,
               "proto": "udp", "allow_from": ["10.77.1.2"]}),
    );

    // The listed client connects; the far host is dropped before the DNAT.
    assert_eq!(
        who(&tcp_get(topo.client.name(), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );
    assert!(tcp_get(topo.far.name(), sa(NODE_IP, LISTEN)).is_err());
    let reply = udp_roundtrip(topo.client.name(), sa(NODE_IP, ULISTEN), "hi").unwrap();
    assert_eq!(who(&reply), "vm");
    let hits = echo.hits();
    // udp_roundtrip sends 3 datagrams when no reply comes: each one is a first packet
    // (the dropped one never became a connection) and each is counted.
    assert!(udp_roundtrip(topo.far.name(), sa(NODE_IP, ULISTEN), "hi").is_err());
    assert_eq!(echo.hits(), hits, "the VM saw the refused datagrams");

    let [_, _, conns, drops] = counters(&one(api, "udp", ULISTEN));
    assert_eq!((conns, drops), (1, 3));
    let [_, _, conns, drops] = counters(&one(api, "tcp", LISTEN));
    assert_eq!(conns, 1);
    // connect() gives up after 2 s: the SYN and at least its first retransmission.
    assert!(drops >= 1, "{drops}");

    // The listing shows the list too.
    let listed = api.get("/ports").json()["rules"]["5300/udp"].clone();
    assert_eq!(listed["allow_from"], json!(["10.77.1.2/32"]));

    // Switching the list to the far host: one replace, one kernel batch. The set shows
    // the new network and not the old one in one listing, and the sources swap.
    create(
        api,
        json!({"listen_port": LISTEN, "target_ip": VM_IP.to_string(), "target_port": 80,
               "allow_from": ["10.77.3.0/24"], "replace": true}),
    );
    let allow = nft_set(&topo, "tcp_allow");
    assert!(allow.contains("8080 . 10.77.3.0/24"), "{allow}");
    assert!(!allow.contains("10.77.1.0/24"), "{allow}");
    assert_eq!(
        who(&tcp_get(topo.far.name(), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );
    assert!(tcp_get(topo.client.name(), sa(NODE_IP, LISTEN)).is_err());

    // An element deleted behind the agent's back is drift, and restore repairs it.
    topo.node.exec_ok(&[
        "nft",
        "delete",
        "element",
        "ip",
        TABLE,
        "tcp_allow",
        "{ 8080 . 10.77.3.0/24 }",
    ]);
    let (code, out) = agent.diff();
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("allow-list of tcp 8080"), "{out}");
    let r = api.post("/ports/restore", &json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(nft_set(&topo, "tcp_allow").contains("8080 . 10.77.3.0/24"));
    let (code, out) = agent.diff();
    assert_eq!(code, 0, "{out}");

    // An empty list opens the map again.
    create(
        api,
        json!({"listen_port": LISTEN, "target_ip": VM_IP.to_string(), "target_port": 80,
               "allow_from": [], "replace": true}),
    );
    assert_eq!(
        who(&tcp_get(topo.client.name(), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );
    let restricted = nft_set(&topo, "tcp_restricted");
    assert!(!restricted.contains("8080"));
    // Kept off the kernel's bitmap backend, whose insert scans every element (decisions §24).
    assert!(restricted.contains("flags dynamic"), "{restricted}");
}

#[test]
fn counters_count_connections_packets_and_bytes_and_survive_everything_but_a_replace() {
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let _http2 = HttpServer::start(&topo.vm2, sa(VM2_IP, 80), "vm2");
    let _echo = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let mut agent = Agent::start(&topo);

    create(
        &agent.api,
        json!({"listen_port": LISTEN, "target_ip": VM_IP.to_string(), "target_port": 80}),
    );
    create(
        &agent.api,
        json!({"listen_port": ULISTEN, "target_ip": VM_IP.to_string(), "target_port": 5353,
               "proto": "udp"}),
    );
    assert_eq!(counters(&one(&agent.api, "tcp", LISTEN)), [0; 4]);

    // UDP: every round trip is a new connection (a fresh source port) of exactly two
    // packets, whose IP lengths are 20 + 8 + payload.
    let n = 4u64;
    let mut bytes = 0u64;
    for i in 0..n {
        let payload = format!("ping {i}");
        let reply = udp_roundtrip(topo.client.name(), sa(NODE_IP, ULISTEN), &payload).unwrap();
        bytes += (28 + payload.len() + 28 + reply.len()) as u64;
    }
    assert_eq!(
        counters(&one(&agent.api, "udp", ULISTEN)),
        [2 * n, bytes, n, 0]
    );

    // TCP: N connections, each at least the handshake, request, reply and the closes;
    // bytes at least the reply bodies.
    let mut body_bytes = 0u64;
    for _ in 0..n {
        body_bytes += tcp_get(topo.client.name(), sa(NODE_IP, LISTEN))
            .unwrap()
            .len() as u64;
    }
    let tcp = counters(&one(&agent.api, "tcp", LISTEN));
    assert_eq!(tcp[2], n, "{tcp:?}");
    assert!(
        tcp[0] >= 6 * n && tcp[1] >= body_bytes + 40 * tcp[0],
        "{tcp:?}"
    );
    assert_eq!(tcp[3], 0);

    // The listing (cached for at most a second) shows the same counts.
    std::thread::sleep(Duration::from_millis(1100));
    let listed = agent.api.get("/ports").json()["rules"]["8080"].clone();
    assert_eq!(counters(&listed), tcp);

    // Another map, a restore (the whole table rebuilt) and an agent restart keep them.
    create(
        &agent.api,
        json!({"listen_port": 9090, "target_ip": VM2_IP.to_string(), "target_port": 80,
               "allow_from": ["10.0.0.0/8"]}),
    );
    assert_eq!(counters(&one(&agent.api, "tcp", LISTEN)), tcp);
    let r = agent.api.post("/ports/restore", &json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(counters(&one(&agent.api, "tcp", LISTEN)), tcp);
    agent.restart();
    assert_eq!(counters(&one(&agent.api, "tcp", LISTEN)), tcp);
    assert_eq!(counters(&one(&agent.api, "udp", ULISTEN))[2], n);
    // A map missing from the kernel (deleted behind the agent's back) comes back at zero;
    // the others keep theirs through the rebuild.
    topo.node.exec_ok(&[
        "nft",
        "delete",
        "element",
        "ip",
        TABLE,
        "udp_ports",
        "{ 5300 }",
    ]);
    let r = agent.api.post("/ports/restore", &json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(counters(&one(&agent.api, "udp", ULISTEN))[2], 0);
    assert_eq!(counters(&one(&agent.api, "tcp", LISTEN)), tcp);

    // Replacing the map (another target) starts its counters again.
    create(
        &agent.api,
        json!({"listen_port": LISTEN, "target_ip": VM2_IP.to_string(), "target_port": 80,
               "replace": true}),
    );
    assert_eq!(counters(&one(&agent.api, "tcp", LISTEN)), [0; 4]);
    assert_eq!(
        who(&tcp_get(topo.client.name(), sa(NODE_IP, LISTEN)).unwrap()),
        "vm2"
    );
    assert_eq!(counters(&one(&agent.api, "tcp", LISTEN))[2], 1);

    // Unknown maps are 404s; bad ports and protocols 400s.
    assert_eq!(agent.api.get("/ports/1234").status, 404);
    assert_eq!(agent.api.get("/ports/8080?proto=udp").status, 404);
    assert_eq!(agent.api.get("/ports/0").status, 400);
    assert_eq!(agent.api.get("/ports/8080?proto=sctp").status, 400);
}
