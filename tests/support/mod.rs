//! Integration-test harness: namespaces, the test topology, servers, clients, the agent
//! process, nftables read-back and the benchmarks' measurements. Used by the tests
//! through `mod support;` and by `benches/portmap.rs` through
//! `#[path = "../tests/support/mod.rs"] mod support;`; each binary uses a different part
//! of it.
#![allow(dead_code, unused_imports)]

pub mod agent;
pub mod client;
pub mod controller;
pub mod events;
pub mod fleet;
pub mod fleet_agents;
pub mod libvirt;
pub mod measure;
pub mod netns;
pub mod nft;
pub mod servers;
pub mod topology;

pub use agent::Agent;
pub use client::{Api, Response, http_get, tcp_get, udp_roundtrip};
pub use netns::Netns;
pub use nft::{MapEntry, api_maps, entry, nft_maps, table_exists};
pub use servers::{HttpServer, UdpEcho, peer_ip, who};
pub use topology::*;

/// The fields of every `TINY-GUEST-READY ...` marker in a console log, oldest first.
/// Only complete lines count: the log is read while the guest writes it, and a marker
/// caught half-written would have lost its last fields.
pub fn ready_markers(console: &str) -> Vec<Vec<String>> {
    let complete = match console.rfind('\n') {
        Some(end) => &console[..end],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TINY-GUEST-READY "))
        .map(|m| m.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// Says what a test is waiting for, as it starts waiting, on the real stderr: libtest
/// captures `eprintln!` of a passing test, and a suite silent for minutes tells nobody
/// whether it is stuck. Prefixed with the test's name (scripts/run-tests.sh adds the
/// binary's).
pub fn say(what: impl std::fmt::Display) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("-");
    let _ = writeln!(std::io::stderr(), "{test}: {what}");
}
