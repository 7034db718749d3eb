//! Proves the harness itself works, without the agent: if these fail, the port-map
//! tests' failures say nothing about the agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use support::*;

#[test]
fn topology_routes_tcp_and_udp_between_namespaces() {
    let topo = Topology::new();
    let vm_http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let vm_udp = UdpEcho::start(&topo.vm, sa(VM_IP, 5353), "vm");
    let far_http = HttpServer::start(&topo.far, sa(FAR_IP, 8080), "far");

    // The far host is reached through the node by plain routing.
    let body = tcp_get(topo.client.name(), sa(FAR_IP, 8080)).unwrap();
    assert_eq!(who(&body), "far");
    assert_eq!(
        peer_ip(&body),
        CLIENT_IP.to_string(),
        "no NAT without the agent"
    );

    // The vm is not routed from the client ...
    assert!(tcp_get(topo.client.name(), sa(VM_IP, 80)).is_err());
    // ... until a temporary route says so.
    topo.client
        .exec_ok(&["ip", "route", "add", "10.77.2.0/24", "via", "10.77.1.1"]);
    let body = tcp_get(topo.client.name(), sa(VM_IP, 80)).unwrap();
    assert_eq!(who(&body), "vm");
    assert_eq!(peer_ip(&body), CLIENT_IP.to_string());
    let reply = udp_roundtrip(topo.client.name(), sa(VM_IP, 5353), "ping").unwrap();
    assert!(reply.starts_with("vm "), "{reply}");
    assert!(reply.ends_with(" ping"), "{reply}");
    topo.client
        .exec_ok(&["ip", "route", "del", "10.77.2.0/24", "via", "10.77.1.1"]);

    // The node reaches its bridge's hosts directly.
    assert_eq!(
        who(&tcp_get(topo.node.name(), sa(VM_IP, 80)).unwrap()),
        "vm"
    );
    assert_eq!(vm_http.hits(), 2);
    assert_eq!(vm_udp.hits(), 1);
    assert_eq!(far_http.hits(), 1);
    // Nothing listens on the node itself: refused, not hanging.
    assert!(tcp_get(topo.client.name(), sa(NODE_IP, 8080)).is_err());
}

#[test]
fn namespaces_are_deleted_on_drop_even_after_a_panic() {
    let names = {
        let topo = Topology::new();
        let names = topo.ns_names();
        assert!(names.iter().all(|n| Netns::exists(n)));
        names
    };
    assert!(names.iter().all(|n| !Netns::exists(n)), "{names:?}");

    let mut created = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = Netns::new("panicky");
        created = ns.name().to_owned();
        panic!("test failure inside a namespace-owning scope");
    }));
    assert!(result.is_err());
    assert!(!created.is_empty());
    assert!(!Netns::exists(&created));
}

#[test]
fn nft_maps_reads_the_agent_table_shape() {
    let ns = Netns::new("nft");
    assert!(nft_maps(&ns).is_empty(), "no table yet");
    ns.nft_apply(
        "table ip node_vm_agent {
           map tcp_ports { type inet_service : ipv4_addr . inet_service; elements = { 8080 : 10.77.2.2 . 80, 9000 : 10.77.2.3 . 9001 } }
           map udp_ports { type inet_service : ipv4_addr . inet_service; elements = { 5353 : 10.77.2.2 . 53 } }
           map other { type inet_service : ipv4_addr . inet_service; elements = { 1 : 10.77.2.9 . 1 } }
         }",
    );
    let expected = [
        entry("tcp", 8080, VM_IP, 80),
        entry("tcp", 9000, VM2_IP, 9001),
        entry("udp", 5353, VM_IP, 53),
    ]
    .into_iter()
    .collect();
    assert_eq!(nft_maps(&ns), expected);

    let ports = json!({"ok": true, "rules": {
        "8080": {"listen_port": 8080, "target_ip": "10.77.2.2", "target_port": 80, "proto": "tcp"},
        "9000": {"listen_port": 9000, "target_ip": "10.77.2.3", "target_port": 9001, "proto": "tcp"},
        "5353/udp": {"listen_port": 5353, "target_ip": "10.77.2.2", "target_port": 53, "proto": "udp"}
    }});
    assert_eq!(api_maps(&ports), expected);
}

#[test]
fn api_client_parses_plain_and_chunked_responses() {
    let plain = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 30\r\n\r\n{\"ok\":false,\"error\":\"nothing\"}";
    let r = client_parse(plain);
    assert_eq!(r.status, 404);
    r.assert_error(|s| s == 404);

    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"ok\"\r\n6\r\n:true}\r\n0\r\n\r\n";
    let r = client_parse(chunked);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), &json!({"ok": true}));
}

fn client_parse(raw: &[u8]) -> Response {
    support::client::parse_response(raw).unwrap()
}
