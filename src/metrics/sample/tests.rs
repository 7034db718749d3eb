use super::*;
use crate::metrics::global;

fn node(maps: usize) -> NodeSample {
    let per = |i: usize| MapCounters {
        packets: 10 + i as u64,
        bytes: 1000,
        connections: 2,
        drops: 0,
    };
    NodeSample {
        version: "0.1.0",
        commit: "abc123",
        start_time_seconds: 1.7e9,
        mesh: MeshSample {
            state: "joined",
            last_handshake_age_seconds: Some(3.5),
            rx_bytes: 42,
            tx_bytes: 7,
            ..Default::default()
        },
        maps: MapsSample {
            tcp: maps,
            udp: 0,
            totals: MapCounters {
                packets: 99,
                bytes: 4242,
                connections: 3,
                drops: 1,
            },
            per_map: (maps <= MAX_MAP_SERIES).then(|| {
                (0..maps)
                    .map(|i| (Proto::Tcp, 8000 + i as u16, per(i)))
                    .collect()
            }),
        },
        vms: Some(VmsSample {
            age_seconds: 0.25,
            domains: vec![DomainSample {
                name: "web1".into(),
                state: 5,
                cpu_seconds: 1.5,
                memory_bytes: 256 << 20,
                ..Default::default()
            }],
        }),
        images: 1,
        image_bytes: 5 << 20,
        database_bytes: 65536,
    }
}

fn lines(text: &str, prefix: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_scrape_names_its_series_by_convention_and_carries_the_values() {
    global()
        .http_requests
        .get_or_create(&crate::metrics::HttpLabels {
            method: "GET".into(),
            route: "/health".into(),
            status: 200,
        })
        .inc();
    let text = global().render(node(2));
    for want in [
        r#"node_vm_agent_build_info{version="0.1.0",commit="abc123"} 1.0"#,
        r#"node_vm_agent_mesh_join_state{state="joined"} 1.0"#,
        r#"node_vm_agent_mesh_join_state{state="joining"} 0.0"#,
        "node_vm_agent_mesh_last_handshake_age_seconds 3.5",
        "node_vm_agent_mesh_tunnel_receive_bytes_total 42",
        r#"node_vm_agent_port_maps{proto="tcp"} 2.0"#,
        "node_vm_agent_port_maps_bytes_total 4242",
        "node_vm_agent_port_maps_dropped_packets_total 1",
        r#"node_vm_agent_port_map_packets_total{listen_port="8001",proto="tcp"} 11"#,
        r#"node_vm_agent_vm_state{vm="web1"} 5.0"#,
        r#"node_vm_agent_vm_cpu_seconds_total{vm="web1"} 1.5"#,
        r#"node_vm_agent_vm_memory_bytes{vm="web1"} 268435456.0"#,
        "node_vm_agent_database_bytes 65536.0",
        "# TYPE node_vm_agent_http_requests_total counter",
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "{want} missing from\n{text}"
        );
    }
}

#[test]
fn above_the_limit_only_totals_remain() {
    let text = global().render(node(MAX_MAP_SERIES + 1));
    assert!(lines(&text, "node_vm_agent_port_map_").is_empty());
    assert_eq!(
        lines(&text, "node_vm_agent_port_maps_packets_total"),
        ["node_vm_agent_port_maps_packets_total 99"]
    );
    let at_limit = global().render(node(MAX_MAP_SERIES));
    assert_eq!(
        lines(&at_limit, "node_vm_agent_port_map_packets_total").len(),
        MAX_MAP_SERIES
    );
}

#[test]
fn a_node_without_a_handshake_or_libvirt_leaves_those_series_out() {
    let mut n = node(0);
    n.mesh.last_handshake_age_seconds = None;
    n.vms = None;
    let text = global().render(n);
    assert!(lines(&text, "node_vm_agent_mesh_last_handshake_age_seconds ").is_empty());
    assert!(lines(&text, "node_vm_agent_vm_").is_empty());
}

#[test]
fn a_foreign_domains_name_cannot_break_the_format() {
    let mut n = node(0);
    if let Some(vms) = &mut n.vms {
        vms.domains[0].name = "odd\"} 1\nfake_metric{x=\"\\".into();
    }
    let text = global().render(n);
    assert!(
        text.lines()
            .any(|l| l == r#"node_vm_agent_vm_state{vm="odd\"} 1\nfake_metric{x=\"\\"} 5.0"#),
        "{text}"
    );
    assert!(!text.lines().any(|l| l.starts_with("fake_metric")));
}
