//! A fleet under one controller (issue 12 point 5): 20 agents, each in its own
//! namespace with the userspace WireGuard, and one test controller speaking the original
//! protocol (tests/support/fleet.rs), all with the default WG_STALE_AFTER. All started at
//! once, all join and handshake; an idle fleet whose controller drops its ICMP (only
//! WireGuard's passive keepalive answers the probes) stays joined without a re-join; the
//! controller restarts (its API down for a few seconds) and forgets its WireGuard peers,
//! and every node notices the dead tunnel and joins again on its own. The times are
//! printed (the re-joins' spread: no thundering herd), not asserted;
//! tests/bench_fleet.rs records them in docs/benchmarks.md.
//!
//! FLEET_NODES sets the fleet's size (default 20: about two minutes on 2 cores, debug).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::fleet::Fleet;
use support::fleet_agents::FleetAgents;
use support::measure::{env_or, ms, pct, sorted};

/// Only the dead tunnel brings a node back: the periodic re-join is 5 minutes away.
/// WG_STALE_AFTER is the default (20 s).
const SETTINGS: &[(&str, &str)] = &[("JOIN_REFRESH_INTERVAL", "300")];
/// Longer than WG_STALE_AFTER, its 5 s look and a late passive keepalive.
const IDLE: Duration = Duration::from_secs(32);

fn spread(label: &str, v: &[Duration]) -> String {
    let s = sorted(v.iter().map(|d| ms(*d)).collect());
    format!(
        "{label}: min {:.0} ms, p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms; all (ms): {:?}",
        pct(&s, 0.0),
        pct(&s, 50.0),
        pct(&s, 90.0),
        pct(&s, 100.0),
        s.iter().map(|x| x.round() as u64).collect::<Vec<_>>()
    )
}

/// What the controller sees through the tunnel: every node's API answers there.
fn controller_reaches_every_node(fleet: &Fleet, agents: &FleetAgents) {
    for (i, a) in agents.agents.iter().enumerate() {
        let r = fleet
            .tunnel_api(i, &a.token)
            .unwrap()
            .request("GET", "/health", None, None)
            .unwrap_or_else(|e| panic!("node {i} over the tunnel: {e}"));
        assert_eq!(r.status, 200, "node {i}: {r:?}");
    }
}

#[test]
fn a_fleet_joins_at_once_and_comes_back_after_the_controller_forgets_it() {
    let n: usize = env_or("FLEET_NODES", 20);
    let mut fleet = Fleet::new(n);
    let mut agents = FleetAgents::start(&fleet, SETTINGS);
    let t0 = agents.started;
    let first = agents.wait_all_handshaking(&fleet, t0, Duration::from_secs(60));
    eprintln!("{}", spread("start -> handshake", &first));

    // Every node joined (its own /health says so, with its own tunnel address), and
    // the controller reaches each one through the tunnel.
    let mut ips = Vec::new();
    for (i, a) in agents.agents.iter().enumerate() {
        let h = a.api.request("GET", "/health", None, None).unwrap();
        assert_eq!(h.status, 200, "node {i}: {h:?}");
        assert_eq!(h.json()["join"], json!("joined"), "node {i}: {h:?}");
        let m = fleet.member(i).unwrap();
        assert_eq!(h.json()["node_ip"], json!(m.tunnel_ip.to_string()), "{h:?}");
        ips.push(m.tunnel_ip);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), n, "one tunnel address per node");
    controller_reaches_every_node(&fleet, &agents);

    // Idle, with the controller's ICMP dropped: each probe is answered only by the
    // controller's passive keepalive (10 s later). No node takes that for a dead tunnel.
    fleet.drop_outgoing_icmp();
    let joins = fleet.requests();
    std::thread::sleep(IDLE);
    assert_eq!(fleet.requests(), joins, "no re-join of a live tunnel");
    for (i, a) in agents.agents.iter().enumerate() {
        assert!(
            !a.log().contains("the tunnel is dead"),
            "node {i}: {}",
            a.log()
        );
    }

    // The controller restarts: its API is down for a moment, and it forgets every peer.
    // No node is reachable until it joins again, which only a dead tunnel makes it do.
    let forgotten = Instant::now();
    let answering = fleet.restart(Duration::from_secs(5));
    assert!(fleet.handshakes().is_empty());
    let back = agents.wait_all_handshaking(&fleet, answering, Duration::from_secs(90));
    // Each node is back by joining again (only /join adds a peer), once or more.
    let rejoins: Vec<Duration> = (0..n)
        .map(|i| {
            let m = fleet.member(i).unwrap();
            let after: Vec<&Instant> = m.joins.iter().filter(|t| **t > forgotten).collect();
            assert!(!after.is_empty(), "node {i} is back without a re-join");
            after[0].duration_since(forgotten)
        })
        .collect();
    controller_reaches_every_node(&fleet, &agents);
    eprintln!("{}", spread("forgotten -> first re-join", &rejoins));
    eprintln!("{}", spread("answering again -> handshake again", &back));
    assert!(
        agents
            .agents
            .iter()
            .all(|a| a.log().contains("the tunnel is dead")),
        "every node said why it re-joined"
    );
}
