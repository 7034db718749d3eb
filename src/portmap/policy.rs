//! Which port maps the node accepts: targets only inside the VM networks (never an open
//! relay), and never a listen port the node itself needs.

use std::collections::BTreeMap;

use ipnetwork::Ipv4Network;

use crate::config::Settings;
use crate::model::PortMap;

/// Why a port map is refused by policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// listen_port {port} is reserved: {reason}
    #[error("listen_port {port} is reserved: {reason}")]
    ReservedPort { port: u16, reason: String },
    /// target_ip outside every allowed network.
    #[error("target_ip {ip} is outside the allowed target networks ({allowed})")]
    TargetNotAllowed { ip: String, allowed: String },
    /// One of the node's own addresses.
    #[error("target_ip {ip} is an address of the node itself, not a VM")]
    TargetIsNode { ip: String },
    /// The network or broadcast address of a VM network.
    #[error("target_ip {ip} is the network or broadcast address of {net}")]
    TargetNotHost { ip: String, net: String },
}

#[derive(Clone, Debug)]
pub struct Policy {
    allowed: Vec<Ipv4Network>,
    reserved: BTreeMap<u16, String>,
}

impl Policy {
    /// `allowed`: the networks targets must lie in; `reserved`: listen ports refused,
    /// with the reason the client is told (from the settings: [`Policy::from_settings`]).
    pub fn new(allowed: Vec<Ipv4Network>, reserved: BTreeMap<u16, String>) -> Self {
        Self { allowed, reserved }
    }

    /// The policy of the settings: targets in VM_SUBNET and ALLOWED_TARGETS; listen
    /// ports other than RESERVED_PORTS, SSH and the node's own (NODE_API_PORT, and
    /// WG_LISTEN_PORT when set).
    pub fn from_settings(s: &Settings) -> Self {
        let pm = &s.portmaps;
        let mut allowed = vec![pm.vm_subnet];
        allowed.extend(pm.allowed_targets.iter().copied());
        let mut reserved = BTreeMap::new();
        for port in &pm.reserved_ports {
            reserved.insert(*port, "listed in RESERVED_PORTS".to_string());
        }
        if let Some(port) = s.mesh.wg_listen_port {
            reserved.insert(
                port,
                "the WireGuard listen port (WG_LISTEN_PORT)".to_string(),
            );
        }
        reserved.insert(22, "SSH of the node".to_string());
        reserved.insert(
            s.api.node_api_port,
            "the node's own API (NODE_API_PORT)".to_string(),
        );
        Self::new(allowed, reserved)
    }

    pub fn check(&self, map: &PortMap) -> Result<(), PolicyError> {
        if let Some(reason) = self.reserved.get(&map.listen_port) {
            return Err(PolicyError::ReservedPort {
                port: map.listen_port,
                reason: reason.clone(),
            });
        }
        let ip = map.target_ip;
        let Some(net) = self.allowed.iter().find(|n| n.contains(ip)) else {
            return Err(PolicyError::TargetNotAllowed {
                ip: ip.to_string(),
                allowed: self
                    .allowed
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        // A /31 or /32 has no network or broadcast address to avoid.
        if net.prefix() < 31 && (ip == net.network() || ip == net.broadcast()) {
            return Err(PolicyError::TargetNotHost {
                ip: ip.to_string(),
                net: net.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;
    use std::net::Ipv4Addr;

    fn policy() -> Policy {
        let mut reserved = BTreeMap::new();
        reserved.insert(22, "SSH of the node".to_string());
        reserved.insert(8000, "the node's own API (NODE_API_PORT)".to_string());
        reserved.insert(51820, "the WireGuard listen port".to_string());
        Policy::new(
            vec![
                "192.168.122.0/24".parse().unwrap(),
                "10.9.9.9/32".parse().unwrap(),
            ],
            reserved,
        )
    }

    fn map(port: u16, ip: [u8; 4]) -> PortMap {
        PortMap {
            proto: Proto::Tcp,
            listen_port: port,
            target_ip: Ipv4Addr::from(ip),
            target_port: 80,
        }
    }

    #[test]
    fn accepts_vm_hosts() {
        policy().check(&map(8080, [192, 168, 122, 50])).unwrap();
        policy().check(&map(8080, [10, 9, 9, 9])).unwrap();
    }

    #[test]
    fn refuses_the_nodes_own_ports_with_the_reason() {
        for (port, word) in [(22, "SSH"), (8000, "API"), (51820, "WireGuard")] {
            let e = policy()
                .check(&map(port, [192, 168, 122, 50]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&port.to_string()) && e.contains(word), "{e}");
        }
    }

    #[test]
    fn refuses_an_open_relay() {
        for ip in [
            [8, 8, 8, 8],
            [127, 0, 0, 1],
            [192, 168, 123, 5],
            [10, 9, 9, 8],
        ] {
            let e = policy().check(&map(8080, ip)).unwrap_err();
            assert!(matches!(e, PolicyError::TargetNotAllowed { .. }), "{e}");
        }
        for ip in [[192, 168, 122, 0], [192, 168, 122, 255]] {
            let e = policy().check(&map(8080, ip)).unwrap_err();
            assert!(matches!(e, PolicyError::TargetNotHost { .. }), "{e}");
        }
    }
}
