//! The port-map test network, built entirely inside namespaces this test created:
//!
//! ```text
//!  client 10.77.1.2 --- ext0 10.77.1.1 [node] far0 10.77.3.1 --- 10.77.3.2 far
//!                                      bridge nvabrN 10.77.2.1
//!                                        |             |
//!                                   vm 10.77.2.2   vm2 10.77.2.3
//! ```
//!
//! The client routes 10.77.3.0/24 via the node, so traffic *through* the node to the far
//! host on a mapped port shows whether the agent hijacks forwarded traffic. Every
//! topology lives in its own namespaces, so they all reuse the same addresses.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::netns::{Netns, unique_id};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
/// The node's address on the client side: where port maps are reached.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);
pub const VM2_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 3);
pub const FAR_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 1);
pub const FAR_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 2);
pub const VM_SUBNET: &str = "10.77.2.0/24";
/// The node's interface towards the client (its "uplink").
pub const EXTERNAL_IFACE: &str = "ext0";
pub const API_PORT: u16 = 8000;

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    pub vm: Netns,
    pub vm2: Netns,
    pub far: Netns,
    /// Named like VMS_BRIDGE, inside the node namespace only.
    pub bridge: String,
}

impl Topology {
    pub fn new() -> Topology {
        let bridge = format!("nvabr{}", unique_id() % 100_000);
        let topo = Topology {
            client: Netns::new("client"),
            node: Netns::new("node"),
            vm: Netns::new("vm"),
            vm2: Netns::new("vm2"),
            far: Netns::new("far"),
            bridge,
        };
        topo.wire();
        topo
    }

    fn wire(&self) {
        let node = &self.node;
        // Every link is created from inside the node namespace with its peer placed
        // straight into the other test namespace: nothing ever exists in the root one.
        self.veth_pair("ext0", &self.client, "10.77.1.1/24", "10.77.1.2/24");
        self.veth_pair("far0", &self.far, "10.77.3.1/24", "10.77.3.2/24");

        node.exec_ok(&["ip", "link", "add", &self.bridge, "type", "bridge"]);
        node.exec_ok(&["ip", "addr", "add", "10.77.2.1/24", "dev", &self.bridge]);
        node.exec_ok(&["ip", "link", "set", &self.bridge, "up"]);
        for (port, ns, addr) in [
            ("vmp0", &self.vm, "10.77.2.2/24"),
            ("vmp1", &self.vm2, "10.77.2.3/24"),
        ] {
            self.veth_to(port, ns);
            node.exec_ok(&["ip", "link", "set", port, "master", &self.bridge]);
            node.exec_ok(&["ip", "link", "set", port, "up"]);
            ns.exec_ok(&["ip", "addr", "add", addr, "dev", "eth0"]);
            ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
            ns.exec_ok(&["ip", "route", "add", "default", "via", "10.77.2.1"]);
        }

        node.exec_ok(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        // A default route so that EXTERNAL_IFACE=auto finds ext0; it leads only into
        // the client namespace, which does not forward.
        node.exec_ok(&["ip", "route", "add", "default", "via", "10.77.1.2"]);
        self.client
            .exec_ok(&["ip", "route", "add", "10.77.3.0/24", "via", "10.77.1.1"]);
        self.far
            .exec_ok(&["ip", "route", "add", "default", "via", "10.77.3.1"]);
    }

    /// A veth from the node (`node_if`) to `peer` (`eth0` there), made from inside the
    /// node namespace with its peer end placed straight into `peer`.
    fn veth_to(&self, node_if: &str, peer: &Netns) {
        self.node.exec_ok(&[
            "ip",
            "link",
            "add",
            node_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            peer.name(),
        ]);
    }

    /// A routed link between the node and `peer`, both ends addressed and up.
    pub fn veth_pair(&self, node_if: &str, peer: &Netns, node_addr: &str, peer_addr: &str) {
        self.veth_to(node_if, peer);
        self.node
            .exec_ok(&["ip", "addr", "add", node_addr, "dev", node_if]);
        self.node.exec_ok(&["ip", "link", "set", node_if, "up"]);
        peer.exec_ok(&["ip", "addr", "add", peer_addr, "dev", "eth0"]);
        peer.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    }

    /// Names of all namespaces, to check they are gone after Drop.
    pub fn ns_names(&self) -> Vec<String> {
        [&self.client, &self.node, &self.vm, &self.vm2, &self.far]
            .iter()
            .map(|n| n.name().to_owned())
            .collect()
    }
}
