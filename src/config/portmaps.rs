//! Settings of the port maps and the node's NAT: the VMs' bridge and subnet, the egress
//! interface, which targets and listen ports a map may use, and the table's fate on exit.

use std::collections::BTreeMap;

use clap::Args;
use ipnetwork::Ipv4Network;

use super::check::parse_port;
use super::parse_ifname;
use crate::net::nft::NatSettings;
use crate::portmap::Policy;

/// The port maps' and the NAT rules' settings.
#[derive(Args, Clone, Debug)]
pub struct PortMapSettings {
    /// Bridge the VMs sit on: DNAT'd connections leaving through it are masqueraded.
    #[arg(long, env = "VMS_BRIDGE", value_name = "VMS_BRIDGE", default_value = "virbr0", value_parser = parse_ifname)]
    pub vms_bridge: String,

    /// The VMs' subnet, as a network address (10.0.0.0/8, not 10.0.0.5/8): port-map targets
    /// must lie in it; its internet egress is masqueraded.
    #[arg(
        long,
        env = "VM_SUBNET",
        value_name = "VM_SUBNET",
        default_value = "192.168.122.0/24"
    )]
    pub vm_subnet: Ipv4Network,

    /// Interface for VM internet egress NAT; it must exist when the agent starts. Default:
    /// the interface of the IPv4 default route; without one, any interface but VMS_BRIDGE.
    #[arg(long, env = "EXTERNAL_IFACE", value_name = "EXTERNAL_IFACE", value_parser = parse_ifname)]
    pub external_iface: Option<String>,

    /// Extra networks (comma-separated CIDRs) that port maps may target besides VM_SUBNET.
    #[arg(
        long,
        env = "ALLOWED_TARGETS",
        value_name = "ALLOWED_TARGETS",
        value_delimiter = ','
    )]
    pub allowed_targets: Vec<Ipv4Network>,

    /// Listen ports (comma-separated) refused for port maps, in addition to 22,
    /// NODE_API_PORT and WG_LISTEN_PORT.
    #[arg(
        long,
        env = "RESERVED_PORTS",
        value_name = "RESERVED_PORTS",
        value_delimiter = ',',
        value_parser = parse_port
    )]
    pub reserved_ports: Vec<u16>,

    /// On shutdown, delete the agent's nftables table and its accept rule in libvirt's
    /// chains (default: keep them, so mapped traffic survives an agent restart).
    #[arg(long, env = "CLEANUP_ON_EXIT", value_name = "CLEANUP_ON_EXIT", default_value_t = false, action = clap::ArgAction::Set)]
    pub cleanup_on_exit: bool,
}

impl PortMapSettings {
    /// What the NAT rules need. `external_iface` is EXTERNAL_IFACE as set: when unset,
    /// the firewall looks up the default route's interface itself.
    pub fn nat(&self, wg_iface: &str) -> NatSettings {
        NatSettings {
            vms_bridge: self.vms_bridge.clone(),
            vm_subnet: self.vm_subnet,
            wg_iface: Some(wg_iface.to_string()),
            external_iface: self.external_iface.clone(),
            tunnel_sources: vec![],
        }
    }

    /// The port-map policy: targets in VM_SUBNET and ALLOWED_TARGETS; listen ports other
    /// than RESERVED_PORTS, SSH and the node's own (the API's, WireGuard's when set).
    pub fn policy(&self, api_port: u16, wg_listen_port: Option<u16>) -> Policy {
        let mut allowed = vec![self.vm_subnet];
        allowed.extend(self.allowed_targets.iter().copied());
        let mut reserved = BTreeMap::new();
        for port in &self.reserved_ports {
            reserved.insert(*port, "listed in RESERVED_PORTS".to_string());
        }
        if let Some(port) = wg_listen_port {
            reserved.insert(
                port,
                "the WireGuard listen port (WG_LISTEN_PORT)".to_string(),
            );
        }
        reserved.insert(22, "SSH of the node".to_string());
        reserved.insert(api_port, "the node's own API (NODE_API_PORT)".to_string());
        Policy::new(allowed, reserved)
    }
}
