//! Reading what the agent wrote into the kernel, with the `nft` CLI (tests only).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde_json::Value;

use super::netns::Netns;

pub const TABLE: &str = "node_vm_agent";

/// (proto, listen_port, target_ip, target_port)
pub type MapEntry = (String, u16, Ipv4Addr, u16);

pub fn entry(proto: &str, listen: u16, ip: Ipv4Addr, port: u16) -> MapEntry {
    (proto.to_owned(), listen, ip, port)
}

/// `nft -j list table ip NAME` in `ns`, or None if the table does not exist.
pub fn nft_table_json(ns: &Netns, family: &str, name: &str) -> Option<Value> {
    let out = ns.exec(&["nft", "-j", "list", "table", family, name]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nft -j output not JSON: {e}"));
    Some(v)
}

pub fn table_exists(ns: &Netns, family: &str, name: &str) -> bool {
    nft_table_json(ns, family, name).is_some()
}

/// The elements of maps `tcp_ports` / `udp_ports` of `ip node_vm_agent` in `ns`
/// (`inet_service : ipv4_addr . inet_service`); empty when the table is absent.
pub fn nft_maps(ns: &Netns) -> BTreeSet<MapEntry> {
    match nft_table_json(ns, "ip", TABLE) {
        Some(v) => parse_maps(&v),
        None => BTreeSet::new(),
    }
}

pub fn parse_maps(v: &Value) -> BTreeSet<MapEntry> {
    let mut out = BTreeSet::new();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(map) = item.get("map") else { continue };
        let proto = match map["name"].as_str() {
            Some("tcp_ports") => "tcp",
            Some("udp_ports") => "udp",
            _ => continue,
        };
        for el in map["elem"].as_array().cloned().unwrap_or_default() {
            let key = unwrap_elem(&el[0]);
            let listen = key
                .as_u64()
                .unwrap_or_else(|| panic!("map key {key} not a port"));
            let concat = el[1]["concat"]
                .as_array()
                .unwrap_or_else(|| panic!("map value {} not ip . port", el[1]));
            let ip: Ipv4Addr = concat[0]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad ip in {}", el[1]));
            let port = concat[1]
                .as_u64()
                .unwrap_or_else(|| panic!("bad port in {}", el[1]));
            out.insert((proto.to_owned(), listen as u16, ip, port as u16));
        }
    }
    out
}

/// Keys with flags (timeouts, comments) come as `{"elem": {"val": K, ...}}`.
fn unwrap_elem(v: &Value) -> &Value {
    match v.get("elem") {
        Some(e) => &e["val"],
        None => v,
    }
}

/// The rules of GET /ports as the same set, to compare with the kernel.
pub fn api_maps(ports_json: &Value) -> BTreeSet<MapEntry> {
    let mut out = BTreeSet::new();
    let rules = ports_json["rules"]
        .as_object()
        .unwrap_or_else(|| panic!("GET /ports without rules: {ports_json}"));
    for (key, r) in rules {
        let proto = r["proto"].as_str().unwrap_or("tcp").to_owned();
        let listen = r["listen_port"]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {r}")) as u16;
        let expected_key = if proto == "tcp" {
            listen.to_string()
        } else {
            format!("{listen}/{proto}")
        };
        assert_eq!(key, &expected_key, "GET /ports key of {r}");
        let ip = r["target_ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{key}: {r}"));
        let port = r["target_port"]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {r}")) as u16;
        out.insert((proto, listen, ip, port));
    }
    out
}
