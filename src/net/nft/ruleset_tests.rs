//! Unit tests of the table's values (no kernel).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;

use super::*;
use crate::model::PortMap;

fn settings() -> NatSettings {
    NatSettings {
        vms_bridge: "vmbr0".into(),
        vm_subnet: "10.10.0.0/24".parse().unwrap(),
        wg_iface: Some("wg0".into()),
        external_iface: None,
        tunnel_sources: vec![],
    }
}

#[test]
fn element_round_trips() {
    let m = PortMap {
        proto: Proto::Udp,
        listen_port: 40000,
        target_ip: Ipv4Addr::new(10, 10, 0, 7),
        target_port: 53,
    };
    let e = element(&m);
    assert_eq!(e.key(), &40000u16.to_be_bytes());
    let Some(nlink::netlink::nftables::SetElementData::Value(v)) = e.data() else {
        panic!("element carries no value: {e:?}");
    };
    assert_eq!(v, &[10, 10, 0, 7, 0, 53, 0, 0]);
    assert_eq!(decode_element(Proto::Udp, e.key(), v), Some(m));
    assert_eq!(decode_element(Proto::Udp, &[1], v), None);
    assert_eq!(decode_element(Proto::Udp, e.key(), &v[..6]), None);
}

#[test]
fn one_dnat_rule_per_protocol_and_optional_wg_rule() {
    let c = chains(&settings());
    let names: Vec<_> = c.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            CHAIN_PREROUTING,
            CHAIN_OUTPUT,
            CHAIN_FORWARD,
            CHAIN_POSTROUTING,
            CHAIN_ANTISPOOF
        ]
    );
    assert!(c[4].rules.is_empty());
    assert_eq!(c[0].rules.len(), 4);
    assert!(
        c[0].rules[0]
            .nft
            .contains("tcp dport . ip saddr != @tcp_allow tcp dport @tcp_drops drop"),
        "{}",
        c[0].rules[0].nft
    );
    assert_eq!(
        c[0].rules[1].nft,
        "fib daddr type local meta l4proto tcp dnat ip to tcp dport map @tcp_ports"
    );
    let forward: Vec<_> = c[2].rules.iter().map(|r| r.nft.as_str()).collect();
    assert_eq!(
        forward,
        [
            "ct status dnat meta l4proto tcp ct original proto-dst @tcp_flows",
            "ct status dnat meta l4proto udp ct original proto-dst @udp_flows",
            "ct status dnat accept",
        ]
    );
    let post: Vec<_> = c[3].rules.iter().map(|r| r.nft.as_str()).collect();
    assert_eq!(
        post,
        [
            "ct status dnat oifname \"vmbr0\" masquerade",
            "oifname \"wg0\" masquerade",
            "ip saddr 10.10.0.0/24 ip daddr != 10.10.0.0/24 oifname != \"vmbr0\" masquerade",
        ]
    );

    let mut s = settings();
    s.wg_iface = None;
    s.external_iface = Some("eth0".into());
    let post: Vec<_> = chains(&s)[3].rules.iter().map(|r| r.nft.clone()).collect();
    assert_eq!(post.len(), 2);
    assert!(post[1].ends_with("oifname \"eth0\" masquerade"));
}

#[test]
fn antispoof_drops_controller_sources_from_other_interfaces() {
    let mut s = settings();
    s.tunnel_sources = vec!["10.50.0.1/32".parse().unwrap()];
    let c = chains(&s);
    let rules: Vec<_> = c[4].rules.iter().map(|r| r.nft.as_str()).collect();
    assert_eq!(rules, ["iifname != \"wg0\" ip saddr 10.50.0.1/32 drop"]);
    s.wg_iface = None;
    assert!(chains(&s)[4].rules.is_empty());
}

#[test]
fn host_subnet_has_no_mask() {
    let net: Ipv4Network = "10.1.2.3/32".parse().unwrap();
    assert_eq!(ip_addr_in(IPV4_SADDR_OFFSET, CmpOp::Eq, net).len(), 2);
    let net: Ipv4Network = "10.1.2.0/24".parse().unwrap();
    assert_eq!(ip_addr_in(IPV4_SADDR_OFFSET, CmpOp::Eq, net).len(), 3);
}

/// The allow-list rule: three lookups of the listen port (and source), the last only
/// reached by a refused packet, and one per protocol in both NAT chains.
#[test]
fn allow_rule_looks_up_restricted_allow_and_drops() {
    let rule = allow_drop_rule(Proto::Udp, true);
    let lookups: Vec<(String, bool)> = decoded(&rule.exprs)
        .iter()
        .filter_map(|e| match e {
            RuleExpr::Lookup { set, invert, .. } => Some((set.clone(), *invert)),
            _ => None,
        })
        .collect();
    assert_eq!(
        lookups,
        [
            ("udp_restricted".to_string(), false),
            ("udp_allow".to_string(), true),
            ("udp_drops".to_string(), false),
        ]
    );
    assert!(
        rule.nft
            .starts_with("ip daddr != 127.0.0.0/8 meta l4proto udp")
    );
    assert!(matches!(
        rule.exprs.last(),
        Some(Expr::Verdict(Verdict::Drop))
    ));
    let flows = decoded(&flow_count_rule(Proto::Tcp).exprs);
    assert!(
        flows
            .iter()
            .any(|e| matches!(e, RuleExpr::Lookup { set, .. } if set == "tcp_flows"))
    );
}

#[test]
fn raw_nat_decodes_as_register_dnat() {
    let d = decoded(&[dnat_from_registers(Register::R0, Register::Reg32_01)]);
    assert_eq!(d.len(), 1);
    assert!(matches!(d[0], RuleExpr::Nat { .. }), "{d:?}");
}
