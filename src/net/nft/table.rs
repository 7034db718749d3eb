//! The table's names and its port maps' encoding: what the ruleset (`ruleset.rs`) and
//! the sets (`sets.rs`) both build on.

use std::net::Ipv4Addr;

use nlink::netlink::MessageBuilder;
use nlink::netlink::nftables::{Family, Set, SetDataType, SetElement, SetKeyType};

use crate::model::{PortMap, Proto};

/// The one table the agent owns; everything else on the node is someone else's.
pub const TABLE: &str = "node_vm_agent";
/// `ip`, not `inet`: port maps target IPv4 guests only, and an `ip` table keeps the
/// DNAT family implicit.
pub const FAMILY: Family = Family::Ip;

pub const TCP_MAP: &str = "tcp_ports";
pub const UDP_MAP: &str = "udp_ports";

/// Tag stored as the rule comment on every rule the agent writes, also outside its
/// own table, so its rules can be told apart from everyone else's.
pub const RULE_TAG: &str = "node-vm-agent";

/// Elements per NEWSETELEM message. The element list is one netlink attribute
/// nest whose length is a u16; at ~40 bytes an element, 1024 stays far below 64 KiB.
pub const ELEMENTS_PER_MESSAGE: usize = 1024;

/// `IFNAMSIZ`: interface names are compared as 16 zero-padded bytes, as nft does.
pub const IFNAMSIZ: usize = 16;
pub fn map_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => TCP_MAP,
        Proto::Udp => UDP_MAP,
    }
}

/// `map <name> { type inet_service : ipv4_addr . inet_service; }`
pub fn map(proto: Proto) -> Set {
    Set::new(TABLE, map_name(proto))
        .family(FAMILY)
        .key_type(SetKeyType::InetService)
        .map(SetDataType::Value(map_value_type()))
}

pub fn map_value_type() -> SetKeyType {
    SetKeyType::Concat(vec![SetKeyType::Ipv4Addr, SetKeyType::InetService])
}

/// `listen_port : target_ip . target_port`
pub fn element(m: &PortMap) -> SetElement {
    SetElement::port(m.listen_port).value(SetElement::concat([
        SetElement::ipv4(m.target_ip),
        SetElement::port(m.target_port),
    ]))
}

/// The inverse of [`element`]: `None` for bytes that are not one of our elements.
pub fn decode_element(proto: Proto, key: &[u8], value: &[u8]) -> Option<PortMap> {
    let listen_port = u16::from_be_bytes(key.try_into().ok()?);
    // ipv4_addr . inet_service: 4 address bytes, then the port padded to 4.
    if value.len() != 8 {
        return None;
    }
    let target_ip = Ipv4Addr::new(value[0], value[1], value[2], value[3]);
    let target_port = u16::from_be_bytes([value[4], value[5]]);
    Some(PortMap {
        proto,
        listen_port,
        target_ip,
        target_port,
    })
}

/// The attribute bytes of a builder, without the netlink header it starts with.
pub fn attrs_of(b: MessageBuilder) -> Vec<u8> {
    b.finish().split_off(NLMSG_HDRLEN)
}

const NLMSG_HDRLEN: usize = 16;
