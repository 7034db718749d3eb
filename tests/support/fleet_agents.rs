//! The agents of a [`Fleet`]: all started at once, watched from the controller's side
//! (its WireGuard peers and their handshakes) and stopped together. Shared by the fleet
//! test (tests/mesh_fleet.rs) and its benchmark (tests/bench_fleet.rs).

use std::time::{Duration, Instant};

use super::agent::Agent;
use super::controller::unique_ifname;
use super::fleet::Fleet;

/// How often the controller's peers are read while waiting.
pub const POLL: Duration = Duration::from_millis(50);

pub struct FleetAgents {
    pub agents: Vec<Agent>,
    /// Each agent's WG_IFACE (its control socket is /var/run/wireguard/<name>.sock).
    pub ifaces: Vec<String>,
    /// Just before the first agent was spawned.
    pub started: Instant,
}

impl FleetAgents {
    /// One agent per node namespace of `fleet`, spawned back to back without waiting
    /// for any of them, with the fleet's join settings plus `extra`.
    pub fn start(fleet: &Fleet, extra: &[(&str, &str)]) -> FleetAgents {
        let ifaces: Vec<String> = (0..fleet.nodes.len())
            .map(|_| unique_ifname("wgf"))
            .collect();
        let started = Instant::now();
        let agents = fleet
            .nodes
            .iter()
            .zip(&ifaces)
            .enumerate()
            .map(|(i, (ns, iface))| {
                let mut env = Fleet::agent_env(i, iface);
                env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                let refs: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Agent::spawn_in(ns, &refs)
            })
            .collect();
        FleetAgents {
            agents,
            ifaces,
            started,
        }
    }

    /// Waits (bounded) until the controller has a peer with a completed handshake for
    /// every node's current key; returns, per node, when that was first seen after
    /// `since`. Panics naming the nodes still missing, with one of their logs.
    pub fn wait_all_handshaking(
        &mut self,
        fleet: &Fleet,
        since: Instant,
        bound: Duration,
    ) -> Vec<Duration> {
        let n = self.agents.len();
        let mut seen: Vec<Option<Duration>> = vec![None; n];
        while since.elapsed() < bound {
            for (i, a) in self.agents.iter_mut().enumerate() {
                if let Some(status) = a.exited() {
                    panic!("agent {i} exited ({status}); log:\n{}", a.log());
                }
            }
            let handshakes = fleet.handshakes();
            let now = since.elapsed();
            for (i, s) in seen.iter_mut().enumerate() {
                if s.is_none()
                    && let Some(m) = fleet.member(i)
                    && handshakes.get(&m.pubkey).is_some_and(Option::is_some)
                {
                    *s = Some(now);
                }
            }
            if seen.iter().all(Option::is_some) {
                return seen.into_iter().flatten().collect();
            }
            std::thread::sleep(POLL);
        }
        let missing: Vec<usize> = (0..n).filter(|&i| seen[i].is_none()).collect();
        panic!(
            "bounded wait of {bound:?} over: no handshake from nodes {missing:?}; log of node {}:\n{}",
            missing[0],
            tail(&self.agents[missing[0]].log(), 40)
        );
    }

    /// Each agent's VmRSS in KiB.
    pub fn rss_kib(&self) -> Vec<u64> {
        self.agents
            .iter()
            .map(|a| super::measure::status_field(a.pid().unwrap(), "VmRSS:"))
            .collect()
    }

    /// Stops every agent at once: SIGTERM, SIGKILL after `bound` (boringtun may swallow
    /// SIGTERM, docs/benchmarks.md (f)); a killed agent's control socket is removed.
    /// Returns how many needed the SIGKILL.
    pub fn stop_all(&mut self, bound: Duration) -> usize {
        let killed = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .agents
                .iter_mut()
                .map(|a| s.spawn(move || !a.stop_within(bound)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<bool>>()
        });
        for (iface, k) in self.ifaces.iter().zip(&killed) {
            if *k {
                let _ = std::fs::remove_file(format!("/var/run/wireguard/{iface}.sock"));
            }
        }
        killed.into_iter().filter(|k| *k).count()
    }
}

impl Drop for FleetAgents {
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(3));
    }
}

pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
