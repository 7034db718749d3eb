//! Settings of the port maps and the node's NAT: the VMs' bridge and subnet, the egress
//! interface, which targets and listen ports a map may use, and the table's fate on exit.

use clap::Args;
use ipnetwork::Ipv4Network;

use super::parse_ifname;
use super::values::parse_port;

/// The port maps' and the NAT rules' settings.
#[derive(Args, Clone, Debug)]
pub struct PortMapSettings {
    /// Bridge the VMs sit on.
    ///
    /// DNAT'd connections leaving through it are masqueraded. It may appear after the
    /// agent starts, when libvirt starts its network.
    #[arg(long, env = "VMS_BRIDGE", value_name = "VMS_BRIDGE", default_value = "virbr0", value_parser = parse_ifname)]
    pub vms_bridge: String,

    /// The VMs' subnet: port-map targets must be hosts of it.
    ///
    /// A network address: 10.0.0.0/8, not 10.0.0.5/8 (host bits set are refused), and
    /// not 0.0.0.0/0. Its internet egress is masqueraded.
    #[arg(
        long,
        env = "VM_SUBNET",
        value_name = "VM_SUBNET",
        default_value = "192.168.122.0/24"
    )]
    pub vm_subnet: Ipv4Network,

    /// Interface for the VMs' internet egress NAT.
    ///
    /// It must exist when the agent starts. Unset: the interface of the IPv4 default
    /// route, read over netlink at startup; without one, any interface but VMS_BRIDGE.
    #[arg(long, env = "EXTERNAL_IFACE", value_name = "EXTERNAL_IFACE", value_parser = parse_ifname)]
    pub external_iface: Option<String>,

    /// Extra networks that port maps may target besides VM_SUBNET.
    ///
    /// Comma-separated CIDRs without host bits; 0.0.0.0/0 is refused (an open relay).
    #[arg(
        long,
        env = "ALLOWED_TARGETS",
        value_name = "ALLOWED_TARGETS",
        value_delimiter = ','
    )]
    pub allowed_targets: Vec<Ipv4Network>,

    /// Listen ports refused for port maps, besides 22, NODE_API_PORT and WG_LISTEN_PORT.
    ///
    /// Comma-separated port numbers (1..65535).
    #[arg(
        long,
        env = "RESERVED_PORTS",
        value_name = "RESERVED_PORTS",
        value_delimiter = ',',
        value_parser = parse_port
    )]
    pub reserved_ports: Vec<u16>,

    /// Delete the agent's nftables table and accept rule when it stops.
    ///
    /// On SIGTERM or SIGINT, the table and the accept rule in libvirt's chain are
    /// deleted. By default they stay, so mapped traffic survives an agent restart.
    #[arg(long, env = "CLEANUP_ON_EXIT", value_name = "CLEANUP_ON_EXIT", default_value_t = false, action = clap::ArgAction::Set)]
    pub cleanup_on_exit: bool,
}
