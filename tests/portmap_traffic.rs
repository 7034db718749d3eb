//! Port maps through the real agent binary, in a namespace topology (see
//! tests/support/topology.rs): real packets from a client namespace to the node's
//! address, DNAT'd by the agent's nftables table to hosts behind the node's bridge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const LISTEN: u16 = 8080;
const ULISTEN: u16 = 5300;

/// Which HTTP statuses a refused request may get.
type StatusCheck = Box<dyn Fn(u16) -> bool>;

fn map_body(proto: &str, listen: u16, ip: std::net::Ipv4Addr, port: u16, replace: bool) -> Value {
    json!({"listen_port": listen, "target_ip": ip.to_string(), "target_port": port,
           "proto": proto, "replace": replace})
}

/// POST /ports, asserting 200 {"ok":true,"rule_id":...}.
fn map_ok(api: &Api, proto: &str, listen: u16, ip: std::net::Ipv4Addr, port: u16) -> Value {
    let r = api.post("/ports", &map_body(proto, listen, ip, port, false));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ok"], json!(true), "{r:?}");
    assert!(r.json()["rule_id"].is_string(), "rule_id missing: {r:?}");
    r.json().clone()
}

fn ports(api: &Api) -> Value {
    let r = api.get("/ports");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ok"], json!(true), "{r:?}");
    r.json().clone()
}

/// GET /ports and the kernel's maps agree; returns them.
fn assert_in_sync(topo: &Topology, agent: &Agent) -> BTreeSet<MapEntry> {
    let api_side = api_maps(&ports(&agent.api));
    let kernel = nft_maps(&topo.node);
    assert_eq!(api_side, kernel, "GET /ports vs kernel maps");
    kernel
}

/// Bounded poll: `tries` checks, `every` apart.
fn poll_until(what: &str, tries: usize, every: Duration, mut ok: impl FnMut() -> bool) {
    for _ in 0..tries {
        if ok() {
            return;
        }
        std::thread::sleep(every);
    }
    panic!("gave up waiting for: {what}");
}

fn client(topo: &Topology) -> &str {
    topo.client.name()
}

#[test]
fn mapped_tcp_and_udp_reach_the_vm_and_unmapped_ports_do_not() {
    let topo = Topology::new();
    let http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let echo = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let agent = Agent::start(&topo);

    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);
    map_ok(&agent.api, "udp", ULISTEN, VM_IP, 5353);

    let body = tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap();
    assert_eq!(who(&body), "vm", "{body}");
    let reply = udp_roundtrip(client(&topo), sa(NODE_IP, ULISTEN), "hello").unwrap();
    assert_eq!(who(&reply), "vm", "{reply}");
    assert!(reply.ends_with(" hello"), "{reply}");

    // Unmapped ports, and each proto's port under the other proto, reach nothing.
    assert!(tcp_get(client(&topo), sa(NODE_IP, LISTEN + 1)).is_err());
    assert!(tcp_get(client(&topo), sa(NODE_IP, ULISTEN)).is_err());
    assert!(udp_roundtrip(client(&topo), sa(NODE_IP, ULISTEN + 1), "x").is_err());
    assert!(udp_roundtrip(client(&topo), sa(NODE_IP, LISTEN), "x").is_err());
    assert_eq!(http.hits(), 1);
    assert_eq!(echo.hits(), 1);

    // The compatible GET /ports shape (a superset of the original's): tcp under the
    // bare port, udp under "port/udp".
    let p = ports(&agent.api);
    let want = [
        (
            "8080",
            json!({"listen_port": 8080, "target_ip": "10.77.2.2", "target_port": 80, "proto": "tcp"}),
        ),
        (
            "5300/udp",
            json!({"listen_port": 5300, "target_ip": "10.77.2.2", "target_port": 5353, "proto": "udp"}),
        ),
    ];
    for (key, fields) in want {
        for (k, v) in fields.as_object().unwrap() {
            assert_eq!(&p["rules"][key][k], v, "rules[{key}][{k}] in {p}");
        }
    }
    let expected: BTreeSet<_> = [
        entry("tcp", LISTEN, VM_IP, 80),
        entry("udp", ULISTEN, VM_IP, 5353),
    ]
    .into();
    assert_eq!(assert_in_sync(&topo, &agent), expected);
}

#[test]
fn dnat_traffic_is_masqueraded_towards_the_bridge() {
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let _echo = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let agent = Agent::start(&topo);
    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);
    map_ok(&agent.api, "udp", ULISTEN, VM_IP, 5353);

    // The vm sees the bridge address, not the client: its replies go back through
    // the node whatever the vm's own routes say.
    let body = tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap();
    assert_eq!(peer_ip(&body), BRIDGE_IP.to_string(), "{body}");
    let reply = udp_roundtrip(client(&topo), sa(NODE_IP, ULISTEN), "m").unwrap();
    assert_eq!(peer_ip(&reply), BRIDGE_IP.to_string(), "{reply}");

    // Proof that the masquerade is what carries the replies: without a default route
    // in the vm, mapped traffic still works.
    topo.vm.exec_ok(&["ip", "route", "del", "default"]);
    let body = tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap();
    assert_eq!(who(&body), "vm");
}

#[test]
fn traffic_routed_through_the_node_is_not_hijacked() {
    let topo = Topology::new();
    let vm_http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let vm_echo = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let far_http = HttpServer::start(&topo.far, sa(FAR_IP, LISTEN), "far");
    let _far_echo = UdpEcho::start(&topo.far, sa(FAR_IP, ULISTEN), "far");
    let agent = Agent::start(&topo);
    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);
    map_ok(&agent.api, "udp", ULISTEN, VM_IP, 5353);

    // Same destination port, but addressed to a host behind the node: the node only
    // routes it (the original agent DNAT'd it to the vm).
    let body = tcp_get(client(&topo), sa(FAR_IP, LISTEN)).unwrap();
    assert_eq!(who(&body), "far", "{body}");
    assert_eq!(
        peer_ip(&body),
        CLIENT_IP.to_string(),
        "routed, not NAT'd: {body}"
    );
    let reply = udp_roundtrip(client(&topo), sa(FAR_IP, ULISTEN), "f").unwrap();
    assert_eq!(who(&reply), "far", "{reply}");
    assert_eq!(far_http.hits(), 1);
    assert_eq!(vm_http.hits(), 0);
    assert_eq!(vm_echo.hits(), 0);
}

#[test]
fn hairpin_from_the_node_itself_reaches_the_vm() {
    let topo = Topology::new();
    let http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    // Also the EXTERNAL_IFACE=auto path: the node's default route leaves through ext0.
    let agent = Agent::start_with(&topo, &[("EXTERNAL_IFACE", "")]);
    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);

    let body = tcp_get(topo.node.name(), sa(NODE_IP, LISTEN)).unwrap();
    assert_eq!(who(&body), "vm", "{body}");
    assert_eq!(http.hits(), 1);
}

#[test]
fn hairpin_from_another_vm_on_the_bridge_reaches_the_vm() {
    let topo = Topology::new();
    let http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let agent = Agent::start(&topo);
    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);

    // vm2 uses the node's public address, as a neighbour that only knows the port map.
    let body = tcp_get(topo.vm2.name(), sa(NODE_IP, LISTEN)).unwrap();
    assert_eq!(who(&body), "vm", "{body}");
    assert_eq!(http.hits(), 1);
}

#[test]
fn deleting_a_map_stops_the_traffic() {
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let _echo = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let agent = Agent::start(&topo);
    let created = map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);
    map_ok(&agent.api, "udp", LISTEN, VM_IP, 5353);
    assert!(tcp_get(client(&topo), sa(NODE_IP, LISTEN)).is_ok());
    assert!(udp_roundtrip(client(&topo), sa(NODE_IP, LISTEN), "u").is_ok());

    // proto defaults to tcp: the udp map on the same port stays.
    let r = agent.api.delete(&format!("/ports/{LISTEN}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ok"], json!(true));
    assert_eq!(r.json()["deleted"], json!(true), "{r:?}");
    assert_eq!(r.json()["rule_id"], created["rule_id"], "{r:?}");
    assert!(tcp_get(client(&topo), sa(NODE_IP, LISTEN)).is_err());
    assert!(udp_roundtrip(client(&topo), sa(NODE_IP, LISTEN), "u").is_ok());
    assert_eq!(
        assert_in_sync(&topo, &agent),
        [entry("udp", LISTEN, VM_IP, 5353)].into()
    );

    let r = agent.api.delete(&format!("/ports/{LISTEN}?proto=udp"));
    assert_eq!(r.json()["deleted"], json!(true), "{r:?}");
    assert!(udp_roundtrip(client(&topo), sa(NODE_IP, LISTEN), "u").is_err());

    // Deleting again is not an error, it just reports nothing was there.
    let r = agent.api.delete(&format!("/ports/{LISTEN}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ok"], json!(true));
    assert_eq!(r.json()["deleted"], json!(false), "{r:?}");
    assert!(assert_in_sync(&topo, &agent).is_empty());
}

#[test]
fn replace_switches_the_target_and_conflicts_change_nothing() {
    let topo = Topology::new();
    let vm1 = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let vm2 = HttpServer::start(&topo.vm2, sa(VM2_IP, 80), "vm2");
    let vm1_udp = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let _vm2_udp = UdpEcho::start(&topo.vm2, sa(VM2_IP, 5353), "vm2");
    let agent = Agent::start(&topo);
    let api = &agent.api;
    map_ok(api, "tcp", LISTEN, VM_IP, 80);
    map_ok(api, "udp", ULISTEN, VM_IP, 5353);

    // The same target again is idempotent.
    let r = api.post("/ports", &map_body("tcp", LISTEN, VM_IP, 80, false));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ok"], json!(true));

    // A different target without replace: 409, nothing changes.
    let before = assert_in_sync(&topo, &agent);
    let r = api.post("/ports", &map_body("tcp", LISTEN, VM2_IP, 80, false));
    r.assert_error(|s| s == 409);
    let r = api.post("/ports", &map_body("udp", ULISTEN, VM2_IP, 5353, false));
    r.assert_error(|s| s == 409);
    assert_eq!(assert_in_sync(&topo, &agent), before);
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );

    // With replace: the new target gets every new connection, the old one none.
    map_replace(api, "tcp", LISTEN, VM2_IP, 80);
    map_replace(api, "udp", ULISTEN, VM2_IP, 5353);
    let (old_tcp, old_udp) = (vm1.hits(), vm1_udp.hits());
    for i in 0..5 {
        let body = tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap();
        assert_eq!(who(&body), "vm2", "{body}");
        let reply = udp_roundtrip(client(&topo), sa(NODE_IP, ULISTEN), &i.to_string()).unwrap();
        assert_eq!(who(&reply), "vm2", "{reply}");
    }
    assert_eq!(vm1.hits(), old_tcp, "old tcp target still got traffic");
    assert_eq!(vm1_udp.hits(), old_udp, "old udp target still got traffic");
    assert_eq!(vm2.hits(), 5);
    assert_eq!(
        assert_in_sync(&topo, &agent),
        [
            entry("tcp", LISTEN, VM2_IP, 80),
            entry("udp", ULISTEN, VM2_IP, 5353)
        ]
        .into()
    );

    // A different port on the same host is a different target too.
    map_replace(api, "tcp", LISTEN, VM2_IP, 81);
    assert!(
        tcp_get(client(&topo), sa(NODE_IP, LISTEN)).is_err(),
        "nothing on :81"
    );
}

fn map_replace(api: &Api, proto: &str, listen: u16, ip: std::net::Ipv4Addr, port: u16) {
    let r = api.post("/ports", &map_body(proto, listen, ip, port, true));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ok"], json!(true), "{r:?}");
}

#[test]
fn kill9_and_restart_keep_every_map_and_the_traffic() {
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let _http2 = HttpServer::start(&topo.vm2, sa(VM2_IP, 8081), "vm2");
    let _echo = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let mut agent = Agent::start(&topo);
    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);
    map_ok(&agent.api, "tcp", 9090, VM2_IP, 8081);
    map_ok(&agent.api, "udp", ULISTEN, VM_IP, 5353);
    let before = assert_in_sync(&topo, &agent);
    let listed = ports(&agent.api)["rules"].clone();

    agent.kill9();
    agent.start_again();

    assert_eq!(ports(&agent.api)["rules"], listed);
    assert_eq!(assert_in_sync(&topo, &agent), before);
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, 9090)).unwrap()),
        "vm2"
    );
    assert_eq!(
        who(&udp_roundtrip(client(&topo), sa(NODE_IP, ULISTEN), "r").unwrap()),
        "vm"
    );
    // And the restarted agent still takes changes.
    map_ok(&agent.api, "tcp", 9091, VM_IP, 80);
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, 9091)).unwrap()),
        "vm"
    );
}

#[test]
fn drift_is_reported_by_diff_and_repaired_by_reconcile() {
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let _echo = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let mut agent = Agent::start_with(&topo, &[("RECONCILE_INTERVAL", "1")]);
    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);
    map_ok(&agent.api, "udp", ULISTEN, VM_IP, 5353);
    let expected = assert_in_sync(&topo, &agent);

    // diff, race-free: with the agent stopped nothing repairs behind the test's back.
    assert!(agent.stop(), "agent did not exit on SIGTERM");
    assert_eq!(
        nft_maps(&topo.node),
        expected,
        "CLEANUP_ON_EXIT defaults to false"
    );
    let (code, out) = agent.diff();
    assert_eq!(code, 0, "in sync, but diff said: {out}");
    topo.node
        .exec_ok(&["nft", "delete", "table", "ip", "node_vm_agent"]);
    let (code, out) = agent.diff();
    assert_eq!(code, 1, "table deleted, but diff said: {out}");
    assert!(
        !out.trim().is_empty(),
        "diff reported drift without saying what"
    );

    // Startup reconcile rebuilds the table from SQLite.
    agent.start_again();
    poll_until("startup reconcile", 50, Duration::from_millis(200), || {
        nft_maps(&topo.node) == expected
    });
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );

    // The periodic loop repairs the table deleted while the agent runs ...
    topo.node
        .exec_ok(&["nft", "delete", "table", "ip", "node_vm_agent"]);
    poll_until(
        "reconcile after table delete",
        100,
        Duration::from_millis(200),
        || nft_maps(&topo.node) == expected,
    );
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );
    assert_eq!(
        who(&udp_roundtrip(client(&topo), sa(NODE_IP, ULISTEN), "d").unwrap()),
        "vm"
    );

    // ... and elements changed behind its back: a removed one comes back, a foreign
    // one goes.
    topo.node.exec_ok(&[
        "nft",
        "delete",
        "element",
        "ip",
        "node_vm_agent",
        "tcp_ports",
        "{ 8080 }",
    ]);
    topo.node.exec_ok(&[
        "nft",
        "add",
        "element",
        "ip",
        "node_vm_agent",
        "tcp_ports",
        "{ 7777 : 10.77.2.2 . 80 }",
    ]);
    poll_until(
        "reconcile after element drift",
        100,
        Duration::from_millis(200),
        || nft_maps(&topo.node) == expected,
    );
    let (code, out) = agent.diff();
    assert_eq!(code, 0, "repaired, but diff said: {out}");
}

/// A change after someone deleted the agent's table (ENOENT from the kernel) repairs the
/// table from SQLite and goes through, instead of a 500 until the next reconcile; the
/// repair is in the audit log as a reconcile.
#[test]
fn a_change_after_the_table_was_deleted_repairs_it_and_the_traffic_flows() {
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let _echo = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    // No periodic reconcile during the test: only the change itself can repair.
    let agent = Agent::start_with(&topo, &[("RECONCILE_INTERVAL", "86400")]);
    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);
    let repairs = || {
        agent
            .sql("select count(*) from audit_log where action = 'reconcile'")
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let before = repairs();
    let delete_table = || {
        topo.node
            .exec_ok(&["nft", "delete", "table", "ip", "node_vm_agent"]);
        assert!(tcp_get(client(&topo), sa(NODE_IP, LISTEN)).is_err());
    };

    delete_table();
    map_ok(&agent.api, "udp", ULISTEN, VM_IP, 5353);
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );
    assert_eq!(
        who(&udp_roundtrip(client(&topo), sa(NODE_IP, ULISTEN), "d").unwrap()),
        "vm"
    );
    assert_eq!(assert_in_sync(&topo, &agent).len(), 2);

    delete_table();
    let r = agent.api.delete(&format!("/ports/{ULISTEN}?proto=udp"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["deleted"], json!(true), "{r:?}");
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );
    assert_eq!(
        assert_in_sync(&topo, &agent),
        [entry("tcp", LISTEN, VM_IP, 80)].into()
    );
    assert_eq!(repairs(), before + 2);
}

/// What libvirt 9 installs through iptables-nft for a NAT network on `bridge`.
fn libvirt_filter(bridge: &str) -> String {
    format!(
        "table ip filter {{
           chain LIBVIRT_FWX {{
             iifname \"{bridge}\" oifname \"{bridge}\" counter accept
           }}
           chain LIBVIRT_FWI {{
             oifname \"{bridge}\" ip daddr {VM_SUBNET} ct state related,established counter accept
             oifname \"{bridge}\" counter reject
           }}
           chain LIBVIRT_FWO {{
             iifname \"{bridge}\" ip saddr {VM_SUBNET} counter accept
             iifname \"{bridge}\" counter reject
           }}
           chain FORWARD {{
             type filter hook forward priority 0; policy accept;
             counter jump LIBVIRT_FWX
             counter jump LIBVIRT_FWI
             counter jump LIBVIRT_FWO
           }}
         }}"
    )
}

#[test]
fn mapped_traffic_passes_libvirt_reject_rules_and_survives_their_reinstall() {
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    topo.node.nft_apply(&libvirt_filter(&topo.bridge));

    // The imitation really rejects new connections forwarded to the bridge.
    topo.client
        .exec_ok(&["ip", "route", "add", "10.77.2.0/24", "via", "10.77.1.1"]);
    assert!(tcp_get(client(&topo), sa(VM_IP, 80)).is_err());
    topo.client
        .exec_ok(&["ip", "route", "del", "10.77.2.0/24", "via", "10.77.1.1"]);

    let mut agent = Agent::start_with(&topo, &[("RECONCILE_INTERVAL", "1")]);
    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );
    let (code, out) = agent.diff();
    assert_eq!(code, 0, "in sync, but diff said: {out}");

    // diff, race-free with the agent stopped, sees the accept rule gone.
    assert!(agent.stop(), "agent did not exit on SIGTERM");
    topo.node
        .exec_ok(&["nft", "delete", "table", "ip", "filter"]);
    topo.node.nft_apply(&libvirt_filter(&topo.bridge));
    let (code, out) = agent.diff();
    assert_eq!(
        code, 1,
        "libvirt's chain lost our accept, but diff said: {out}"
    );
    agent.start_again();
    poll_until(
        "startup reconcile of the forward accept",
        50,
        Duration::from_millis(200),
        || tcp_get(client(&topo), sa(NODE_IP, LISTEN)).is_ok_and(|b| who(&b) == "vm"),
    );

    // libvirtd restarting re-creates its chains, dropping whatever the agent added.
    topo.node
        .exec_ok(&["nft", "delete", "table", "ip", "filter"]);
    topo.node.nft_apply(&libvirt_filter(&topo.bridge));
    poll_until(
        "reconcile after libvirt reinstall",
        100,
        Duration::from_millis(200),
        || tcp_get(client(&topo), sa(NODE_IP, LISTEN)).is_ok_and(|b| who(&b) == "vm"),
    );
    // The libvirt chains are still there: the agent worked with them, not around them.
    let filter = topo.node.exec_ok(&["nft", "list", "table", "ip", "filter"]);
    assert!(
        filter.contains("LIBVIRT_FWI") && filter.contains("reject"),
        "{filter}"
    );
}

#[test]
fn refused_inputs_change_nothing() {
    let topo = Topology::new();
    let agent = Agent::start(&topo);
    let api = &agent.api;
    map_ok(api, "tcp", LISTEN, VM_IP, 80);
    let rules_before = ports(api)["rules"].clone();
    let kernel_before = nft_maps(&topo.node);

    let bad = |listen: Value, ip: &str, port: Value, proto: &str| {
        json!({"listen_port": listen, "target_ip": ip, "target_port": port, "proto": proto})
            .to_string()
    };
    let invalid_input = |s: u16| s == 400 || s == 422;
    let cases: Vec<(&str, String, StatusCheck)> = vec![
        (
            "invalid JSON",
            "{\"listen_port\": 81".into(),
            Box::new(invalid_input),
        ),
        ("not an object", "[1,2]".into(), Box::new(invalid_input)),
        (
            "unknown field",
            json!({"listen_port": 8081, "target_ip": "10.77.2.2", "target_port": 80, "bogus": 1})
                .to_string(),
            Box::new(invalid_input),
        ),
        (
            "missing target",
            json!({"listen_port": 8081}).to_string(),
            Box::new(invalid_input),
        ),
        (
            "listen port 0",
            bad(json!(0), "10.77.2.2", json!(80), "tcp"),
            Box::new(invalid_input),
        ),
        (
            "listen port 70000",
            bad(json!(70000), "10.77.2.2", json!(80), "tcp"),
            Box::new(invalid_input),
        ),
        (
            "listen port string",
            bad(json!("http"), "10.77.2.2", json!(80), "tcp"),
            Box::new(invalid_input),
        ),
        (
            "target port 0",
            bad(json!(8081), "10.77.2.2", json!(0), "tcp"),
            Box::new(invalid_input),
        ),
        (
            "target port 70000",
            bad(json!(8081), "10.77.2.2", json!(70000), "tcp"),
            Box::new(invalid_input),
        ),
        (
            "bad proto",
            bad(json!(8081), "10.77.2.2", json!(80), "sctp"),
            Box::new(invalid_input),
        ),
        (
            "bad ip",
            bad(json!(8081), "10.77.2.999", json!(80), "tcp"),
            Box::new(invalid_input),
        ),
        (
            "target outside VM_SUBNET",
            bad(json!(8081), "10.77.3.2", json!(80), "tcp"),
            Box::new(|s| s == 400 || s == 403 || s == 422),
        ),
        (
            "target far outside VM_SUBNET",
            bad(json!(8081), "198.18.0.1", json!(80), "tcp"),
            Box::new(|s| s == 400 || s == 403 || s == 422),
        ),
        (
            // Inside VM_SUBNET, but the node's own bridge address: its local services.
            "target is the node's bridge address",
            bad(json!(8081), &BRIDGE_IP.to_string(), json!(22), "tcp"),
            Box::new(|s| s == 403),
        ),
        (
            "target is the VM subnet's broadcast address",
            bad(json!(8081), "10.77.2.255", json!(80), "tcp"),
            Box::new(|s| s == 403),
        ),
        (
            "listen on the API port",
            bad(json!(API_PORT), "10.77.2.2", json!(80), "tcp"),
            Box::new(|s| (400..500).contains(&s)),
        ),
        (
            "listen on ssh",
            bad(json!(22), "10.77.2.2", json!(80), "tcp"),
            Box::new(|s| (400..500).contains(&s)),
        ),
    ];
    for (what, body, status_ok) in &cases {
        let r = api
            .request("POST", "/ports", Some(&agent.token), Some(body))
            .unwrap();
        assert!(status_ok(r.status), "{what}: unexpected status {r:?}");
        r.assert_error(|_| true);
        assert_eq!(
            ports(api)["rules"],
            rules_before,
            "{what} changed GET /ports"
        );
        assert_eq!(
            nft_maps(&topo.node),
            kernel_before,
            "{what} changed the kernel"
        );
    }

    // Authentication: everything but /health needs the token.
    let create = map_body("tcp", 8082, VM_IP, 80, false).to_string();
    for (token, label) in [(None, "no token"), (Some("wrong-token"), "wrong token")] {
        for (method, path, body) in [
            ("GET", "/ports", None),
            ("POST", "/ports", Some(create.as_str())),
            ("DELETE", "/ports/8080", None),
            ("POST", "/ports/restore", None),
        ] {
            let r = api.request(method, path, token, body).unwrap();
            assert_eq!(r.status, 401, "{label} {method} {path}: {r:?}");
            r.assert_error(|_| true);
        }
    }
    let r = api.request("GET", "/health", None, None).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ok"], json!(true));

    // An oversized body is refused before it is parsed.
    let mut huge = String::from(
        "{\"listen_port\": 8083, \"target_ip\": \"10.77.2.2\", \"target_port\": 80, \"pad\": \"",
    );
    huge.push_str(&"x".repeat(4 * 1024 * 1024));
    huge.push_str("\"}");
    let r = api
        .request("POST", "/ports", Some(&agent.token), Some(&huge))
        .unwrap();
    r.assert_error(|s| s == 413);

    let r = api.delete("/ports/notaport");
    r.assert_error(|s| s == 400 || s == 404 || s == 422);
    let r = api.delete("/ports/8080?proto=sctp");
    r.assert_error(|s| s == 400 || s == 422);

    assert_eq!(
        ports(api)["rules"],
        rules_before,
        "refused requests changed GET /ports"
    );
    assert_eq!(
        nft_maps(&topo.node),
        kernel_before,
        "refused requests changed the kernel"
    );
}

#[test]
fn concurrent_mutations_leave_api_and_kernel_identical() {
    const THREADS: usize = 12;
    const PER_THREAD: usize = 25;
    const PORTS: u16 = 50;
    let topo = Topology::new();
    let agent = Agent::start(&topo);

    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let api = agent.api.clone();
                s.spawn(move || {
                    use rand::Rng;
                    let mut rng = rand::rng();
                    let mut bad = Vec::new();
                    for _ in 0..PER_THREAD {
                        let listen = 20000 + rng.random_range(0..PORTS);
                        let proto = if rng.random_bool(0.3) { "udp" } else { "tcp" };
                        let r = if rng.random_bool(0.35) {
                            api.delete(&format!("/ports/{listen}?proto={proto}"))
                        } else {
                            let ip = std::net::Ipv4Addr::new(10, 77, 2, rng.random_range(2..=254));
                            let port = rng.random_range(1..=65535);
                            api.post(
                                "/ports",
                                &map_body(proto, listen, ip, port, rng.random_bool(0.5)),
                            )
                        };
                        // 409: a no-replace POST lost the race to another target.
                        if !(r.status == 200 || r.status == 409) {
                            bad.push(format!("{r:?}"));
                        }
                    }
                    bad
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "unexpected answers: {failures:#?}");

    let maps = assert_in_sync(&topo, &agent);
    assert!(
        maps.iter()
            .all(|(_, l, _, _)| (20000..20000 + PORTS).contains(l))
    );
    let (code, out) = agent.diff();
    assert_eq!(code, 0, "SQLite vs kernel after the storm: {out}");
}

#[test]
fn generated_token_restore_and_cleanup_on_exit() {
    use std::os::unix::fs::PermissionsExt;
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let mut agent = Agent::start_with(&topo, &[("API_TOKEN", ""), ("CLEANUP_ON_EXIT", "true")]);

    // No token configured: one is generated into DATA_DIR, readable by root only.
    let meta = std::fs::metadata(agent.data_dir().join("api.token")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(agent.token.len() >= 16, "weak generated token");
    map_ok(&agent.api, "tcp", LISTEN, VM_IP, 80);
    map_ok(&agent.api, "tcp", 9090, VM_IP, 80);

    // POST /ports/restore rewrites the kernel from the database on demand.
    topo.node
        .exec_ok(&["nft", "delete", "table", "ip", "node_vm_agent"]);
    let r = agent.api.call("POST", "/ports/restore", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ok"], json!(true));
    assert_eq!(r.json()["restored"], json!(2), "{r:?}");
    assert_eq!(assert_in_sync(&topo, &agent).len(), 2);
    assert_eq!(
        who(&tcp_get(client(&topo), sa(NODE_IP, LISTEN)).unwrap()),
        "vm"
    );

    // The same token survives a restart (it is read back from the file).
    let token = agent.token.clone();
    agent.restart();
    assert_eq!(
        agent.api.get("/ports").status,
        200,
        "token changed on restart"
    );
    assert_eq!(agent.token, token);

    // CLEANUP_ON_EXIT: a clean stop removes the agent's table; the maps stay in SQLite.
    assert!(agent.stop(), "agent did not exit on SIGTERM");
    assert!(
        !table_exists(&topo.node, "ip", "node_vm_agent"),
        "table left after a clean stop with CLEANUP_ON_EXIT"
    );
    assert!(tcp_get(client(&topo), sa(NODE_IP, LISTEN)).is_err());
    agent.start_again();
    assert_eq!(assert_in_sync(&topo, &agent).len(), 2);
}

#[test]
fn portmap_token_is_an_alias_of_api_token() {
    let topo = Topology::new();
    let agent = Agent::start_with(
        &topo,
        &[
            ("API_TOKEN", ""),
            ("PORTMAP_TOKEN", "alias-token-0123456789"),
        ],
    );
    assert_eq!(agent.token, "alias-token-0123456789");
    assert_eq!(agent.api.get("/ports").status, 200);
    let r = agent
        .api
        .request("GET", "/ports", Some("wrong-token-0123456789"), None)
        .unwrap();
    assert_eq!(r.status, 401, "{r:?}");
}

#[test]
fn vm_egress_is_masqueraded_without_any_port_map() {
    let topo = Topology::new();
    // The client stands in for "the internet": it has no route back to the VM subnet.
    let outside = HttpServer::start(&topo.client, sa(CLIENT_IP, 8088), "outside");
    assert!(
        tcp_get(topo.vm.name(), sa(CLIENT_IP, 8088)).is_err(),
        "without the agent the vm's traffic has no way back"
    );
    // EXTERNAL_IFACE=auto: found from the node's default route (ext0).
    let _agent = Agent::start_with(&topo, &[("EXTERNAL_IFACE", "")]);

    // The original agent only had egress NAT while some port map existed.
    let body = tcp_get(topo.vm.name(), sa(CLIENT_IP, 8088)).unwrap();
    assert_eq!(who(&body), "outside", "{body}");
    assert_eq!(
        peer_ip(&body),
        NODE_IP.to_string(),
        "egress not masqueraded: {body}"
    );
    assert_eq!(outside.hits(), 1);
}

#[test]
fn the_database_is_the_audit_trail_and_forwarding_headers_change_nothing() {
    let topo = Topology::new();
    let mut agent = Agent::start(&topo);
    let forged: &[(&str, &str)] = &[
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9"),
        ("X-Real-IP", "203.0.113.9"),
    ];
    let body = map_body("tcp", 8088, VM_IP, 80, false).to_string();
    let ok = agent
        .api
        .request_with_headers(
            "POST",
            "/ports",
            Some(&agent.token),
            forged,
            Some(body.as_bytes()),
        )
        .unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    // Forwarding headers never stand in for the token.
    let refused = agent
        .api
        .request_with_headers("DELETE", "/ports/8088", None, forged, None)
        .unwrap();
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(api_maps(&ports(&agent.api)).len(), 1);

    // What an operator reads with sqlite3: the map, and who asked for what.
    let maps =
        agent.sql("select proto, listen_port, target_ip, target_port, created_by from port_maps");
    assert_eq!(maps.trim(), format!("tcp|8088|{VM_IP}|80|token"));
    let rows = agent.sql(
        "select client_addr, identity, action, outcome, status, coalesce(error, '') \
         from audit_log where action like '% /ports%' order by id",
    );
    let rows: Vec<Vec<&str>> = rows.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0][0].starts_with(&format!("{CLIENT_IP}:")), "{rows:?}");
    assert_eq!(rows[0][1..5], ["token", "POST /ports", "ok", "200"]);
    let at = agent.sql("select at from audit_log order by id limit 1");
    assert!(
        at.trim().ends_with('Z') && at.contains('T'),
        "ISO-8601 UTC: {at}"
    );
    // The refused call is counted under the socket's peer, not the forged address
    // (written each minute, and at shutdown).
    assert!(agent.stop());
    assert_eq!(
        agent
            .sql("select client_addr, requests, routes from refused_requests")
            .trim(),
        format!("{CLIENT_IP}|1|DELETE /ports/{{listen_port}} x1")
    );
}

#[test]
fn an_original_nodes_portmap_json_is_imported_once() {
    let topo = Topology::new();
    let _http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let mut agent = Agent::start(&topo);
    // Make the data dir look like an original agent's: no database, a portmap.json.
    agent.stop();
    for f in ["agent.db", "agent.db-wal", "agent.db-shm"] {
        let _ = std::fs::remove_file(agent.data_dir().join(f));
    }
    std::fs::write(
        agent.data_dir().join("portmap.json"),
        format!(
            r#"{{"rules": {{
                "8090": {{"listen_port": 8090, "target_ip": "{VM_IP}", "target_port": 80, "proto": "tcp"}},
                "22": {{"listen_port": 22, "target_ip": "{VM_IP}", "target_port": 22, "proto": "tcp"}}
            }}}}"#
        ),
    )
    .unwrap();
    agent.start_again();

    // The valid rule is in force at once; the one that would hijack SSH was skipped.
    let maps = api_maps(&ports(&agent.api));
    assert_eq!(maps.len(), 1, "{maps:?}");
    assert!(
        tcp_get(client(&topo), sa(NODE_IP, 8090))
            .unwrap()
            .starts_with("vm ")
    );
    assert_eq!(
        agent.sql("select created_by from port_maps").trim(),
        "import:portmap.json"
    );
    let audit = agent.sql("select parameters from audit_log where action = 'import portmap.json'");
    assert!(
        audit.contains("\"imported\":1") && audit.contains("22"),
        "{audit}"
    );

    // Once only: deleting the map and restarting does not bring it back.
    assert_eq!(
        agent.api.delete("/ports/8090").json()["deleted"],
        json!(true)
    );
    agent.restart();
    assert!(api_maps(&ports(&agent.api)).is_empty());
}
