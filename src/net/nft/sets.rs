//! The table's sets besides the DNAT maps: allow-lists, and the per-element counters.
//!
//! ```text
//! map tcp_ports      { type inet_service : ipv4_addr . inet_service; counter; }  (connections)
//! set tcp_flows      { type inet_service; counter; }        (packets, bytes: forward chain)
//! set tcp_restricted { type inet_service; flags dynamic; }  (ports with an allow-list)
//! set tcp_allow      { type inet_service . ipv4_addr; flags interval; }
//! set tcp_drops      { type inet_service; counter; }        (first packets refused)
//! ```
//!
//! (and the same five for udp). Every set is keyed by the listen port first, so each rule
//! does one hash lookup whatever the number of maps; only a restricted port pays the
//! interval lookup of its source. Counters live on the elements: a lookup that matches an
//! element updates it, so no rule per map is needed to count per map.

use ipnetwork::Ipv4Network;
use nlink::netlink::MessageBuilder;
use nlink::netlink::nftables::{
    NFT_MSG_NEWSETELEM, NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS, NFTA_DATA_VALUE, NFTA_EXPR_DATA,
    NFTA_EXPR_NAME, NFTA_LIST_ELEM, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE, RawMessage, Set,
    SetElement, SetFlags, SetKeyType,
};

use crate::model::{MapCounters, PortRule, Proto};

use super::table::{self, FAMILY, TABLE, attrs_of};

/// What a set of the table is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `listen_port : target_ip . target_port`, the DNAT map; counts connections.
    Ports,
    /// Every mapped port; looked up for each forwarded packet of a DNAT'd flow.
    Flows,
    /// Ports that have an allow-list.
    Restricted,
    /// `listen_port . source network`, one interval element per allowed network.
    Allow,
    /// Ports that have an allow-list; looked up only on the drop path, so it counts drops.
    Drops,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Ports,
        Kind::Flows,
        Kind::Restricted,
        Kind::Allow,
        Kind::Drops,
    ];

    pub fn counted(self) -> bool {
        matches!(self, Kind::Ports | Kind::Flows | Kind::Drops)
    }
}

pub fn name(kind: Kind, proto: Proto) -> &'static str {
    match (kind, proto) {
        (Kind::Ports, p) => table::map_name(p),
        (Kind::Flows, Proto::Tcp) => "tcp_flows",
        (Kind::Flows, Proto::Udp) => "udp_flows",
        (Kind::Restricted, Proto::Tcp) => "tcp_restricted",
        (Kind::Restricted, Proto::Udp) => "udp_restricted",
        (Kind::Allow, Proto::Tcp) => "tcp_allow",
        (Kind::Allow, Proto::Udp) => "udp_allow",
        (Kind::Drops, Proto::Tcp) => "tcp_drops",
        (Kind::Drops, Proto::Udp) => "udp_drops",
    }
}

/// Every set name of the table.
pub fn all_names() -> impl Iterator<Item = &'static str> {
    Proto::ALL
        .into_iter()
        .flat_map(|p| Kind::ALL.into_iter().map(move |k| name(k, p)))
}

pub fn allow_key_type() -> SetKeyType {
    SetKeyType::Concat(vec![SetKeyType::InetService, SetKeyType::Ipv4Addr])
}

/// The set's declaration.
pub fn set(kind: Kind, proto: Proto) -> Set {
    let base = |key| {
        Set::new(TABLE, name(kind, proto))
            .family(FAMILY)
            .key_type(key)
    };
    match kind {
        Kind::Ports => table::map(proto).counter(),
        Kind::Flows | Kind::Drops => base(SetKeyType::InetService).counter(),
        // `flags dynamic` only to keep the kernel off its bitmap backend, which it
        // picks for a plain 2-byte key and whose insert scans every element: 10,000
        // ports took 630 ms to add, 23 ms in the hash (docs/benchmarks.md (a)).
        Kind::Restricted => base(SetKeyType::InetService).dynamic(),
        Kind::Allow => base(allow_key_type()).interval(),
    }
}

/// The flags the read-back compares: the ones that change what a set is.
pub fn significant_flags(flags: SetFlags) -> u32 {
    flags.bits() & (SetFlags::MAP.bits() | SetFlags::INTERVAL.bits() | SetFlags::CONCAT.bits())
}

/// The flags the kernel reports for `set(kind, proto)`.
pub fn expected_flags(kind: Kind) -> u32 {
    match kind {
        Kind::Ports => SetFlags::MAP.bits(),
        Kind::Allow => SetFlags::INTERVAL.bits() | SetFlags::CONCAT.bits(),
        _ => 0,
    }
}

/// A listen port's key: 2 bytes, network order.
pub fn port_key(port: u16) -> Vec<u8> {
    port.to_be_bytes().to_vec()
}

/// `listen_port . net`: the start and inclusive end of the range, each field padded to
/// 4 bytes as the kernel's registers hold them.
pub fn allow_element(port: u16, net: Ipv4Network) -> SetElement {
    let key = |addr: std::net::Ipv4Addr| {
        let mut k = vec![0u8; 8];
        k[..2].copy_from_slice(&port.to_be_bytes());
        k[4..].copy_from_slice(&addr.octets());
        k
    };
    SetElement::range(key(net.network()), key(net.broadcast()))
}

/// The inverse of [`allow_element`]; `None` for a range that is not one port and one
/// CIDR network.
pub fn decode_allow(key: &[u8], key_end: Option<&[u8]>) -> Option<(u16, Ipv4Network)> {
    let end = key_end.unwrap_or(key);
    if key.len() != 8 || end.len() != 8 || key[..4] != end[..4] || key[2..4] != [0, 0] {
        return None;
    }
    let port = u16::from_be_bytes([key[0], key[1]]);
    let start = u32::from_be_bytes([key[4], key[5], key[6], key[7]]);
    let last = u32::from_be_bytes([end[4], end[5], end[6], end[7]]);
    let size = u64::from(last.checked_sub(start)?) + 1;
    if !size.is_power_of_two() || u64::from(start) % size != 0 {
        return None;
    }
    let prefix = 32 - size.trailing_zeros() as u8;
    let net = Ipv4Network::new(std::net::Ipv4Addr::from(start), prefix).ok()?;
    Some((port, net))
}

/// The packets and bytes of a map's three counted elements, as the kernel holds them:
/// what is carried over into a rebuilt table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ElementCounters {
    /// The DNAT map element: one packet per new connection.
    pub ports: (u64, u64),
    pub flows: (u64, u64),
    pub drops: (u64, u64),
}

impl ElementCounters {
    pub fn get(&self, kind: Kind) -> (u64, u64) {
        match kind {
            Kind::Ports => self.ports,
            Kind::Flows => self.flows,
            Kind::Drops => self.drops,
            Kind::Restricted | Kind::Allow => (0, 0),
        }
    }

    pub fn set(&mut self, kind: Kind, value: (u64, u64)) {
        match kind {
            Kind::Ports => self.ports = value,
            Kind::Flows => self.flows = value,
            Kind::Drops => self.drops = value,
            Kind::Restricted | Kind::Allow => {}
        }
    }

    pub fn to_map(self) -> MapCounters {
        MapCounters {
            packets: self.flows.0,
            bytes: self.flows.1,
            connections: self.ports.0,
            drops: self.drops.0,
        }
    }
}

/// Whether `rule` has an element in a set of `kind` (a DNAT map element or a flow
/// counter for every map; the allow-list sets only for a restricted one).
pub fn holds(kind: Kind, rule: &PortRule) -> bool {
    match kind {
        Kind::Ports | Kind::Flows => true,
        Kind::Restricted | Kind::Allow | Kind::Drops => !rule.allow_from.is_empty(),
    }
}

/// The elements of a set of `kind` for `rules` (all of one protocol), without counts
/// of their own: a counted set gives each a fresh copy of its counter.
pub fn elements(kind: Kind, rules: &[&PortRule]) -> Vec<SetElement> {
    match kind {
        Kind::Ports => rules.iter().map(|r| table::element(&r.map)).collect(),
        Kind::Allow => rules
            .iter()
            .flat_map(|r| {
                r.allow_from
                    .networks()
                    .iter()
                    .map(|n| allow_element(r.map.listen_port, *n))
            })
            .collect(),
        Kind::Flows | Kind::Restricted | Kind::Drops => rules
            .iter()
            .filter(|r| holds(kind, r))
            .map(|r| SetElement::port(r.map.listen_port))
            .collect(),
    }
}

/// One NEWSETELEM for a counted set whose elements start at given counts.
///
/// nlink writes no element expressions; the kernel takes an element's `counter` with its
/// packets and bytes (`NFTA_SET_ELEM_EXPR`) in place of a fresh copy of the set's, which
/// is how a rebuilt table keeps the counts of the table it replaces.
pub fn counted_elements(kind: Kind, proto: Proto, items: &[(&PortRule, (u64, u64))]) -> RawMessage {
    let mut b = MessageBuilder::new(0, 0);
    b.append_attr_str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
    b.append_attr_str(NFTA_SET_ELEM_LIST_SET, name(kind, proto));
    let list = b.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
    for (rule, (packets, bytes)) in items {
        let elem = b.nest_start(NFTA_LIST_ELEM | NLA_F_NESTED);
        let key = b.nest_start(NFTA_SET_ELEM_KEY | NLA_F_NESTED);
        b.append_attr(NFTA_DATA_VALUE, &port_key(rule.map.listen_port));
        b.nest_end(key);
        if kind == Kind::Ports {
            let data = b.nest_start(NFTA_SET_ELEM_DATA | NLA_F_NESTED);
            let mut value = rule.map.target_ip.octets().to_vec();
            value.extend_from_slice(&rule.map.target_port.to_be_bytes());
            value.extend_from_slice(&[0, 0]);
            b.append_attr(NFTA_DATA_VALUE, &value);
            b.nest_end(data);
        }
        let expr = b.nest_start(NFTA_SET_ELEM_EXPR | NLA_F_NESTED);
        b.append_attr_str(NFTA_EXPR_NAME, "counter");
        let counter = b.nest_start(NFTA_EXPR_DATA | NLA_F_NESTED);
        b.append_attr_u64_be(NFTA_COUNTER_BYTES, *bytes);
        b.append_attr_u64_be(NFTA_COUNTER_PACKETS, *packets);
        b.nest_end(counter);
        b.nest_end(expr);
        b.nest_end(elem);
    }
    b.nest_end(list);
    RawMessage::new(NFT_MSG_NEWSETELEM, FAMILY)
        .flags(NLM_F_CREATE)
        .attrs(attrs_of(b))
}

const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_CREATE: u16 = 0x400;

/// Counted elements per NEWSETELEM: ~80 bytes each with the counter, so 512 stay well
/// below the u16 length of the list nest.
pub const COUNTED_PER_MESSAGE: usize = 512;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn allow_elements_round_trip() {
        for (port, net) in [
            (15000u16, "10.0.0.0/8"),
            (1, "192.0.2.7/32"),
            (65535, "0.0.0.0/0"),
        ] {
            let net: Ipv4Network = net.parse().unwrap();
            let e = allow_element(port, net);
            assert_eq!(e.key().len(), 8);
            assert_eq!(decode_allow(e.key(), e.key_end()), Some((port, net)));
        }
        // A single address reads back without an end.
        let e = allow_element(80, "192.0.2.7/32".parse().unwrap());
        assert_eq!(
            decode_allow(e.key(), None),
            Some((80, "192.0.2.7/32".parse().unwrap()))
        );
        // Not a CIDR: 10.0.0.1 - 10.0.0.2; two ports.
        let k = [0, 80, 0, 0, 10, 0, 0, 1];
        assert_eq!(decode_allow(&k, Some(&[0, 80, 0, 0, 10, 0, 0, 2])), None);
        assert_eq!(decode_allow(&k, Some(&[0, 81, 0, 0, 10, 0, 0, 1])), None);
    }

    #[test]
    fn every_set_has_its_own_name() {
        let names: std::collections::BTreeSet<_> = all_names().collect();
        assert_eq!(names.len(), 10);
        assert!(names.contains("tcp_ports") && names.contains("udp_drops"));
    }

    #[test]
    fn counted_elements_carry_their_counts() {
        let rule = PortRule::from(crate::model::PortMap {
            proto: Proto::Tcp,
            listen_port: 8080,
            target_ip: "10.0.0.2".parse().unwrap(),
            target_port: 80,
        });
        let m = counted_elements(Kind::Ports, Proto::Tcp, &[(&rule, (7, 420))]);
        let find = |needle: &[u8]| m.attrs.windows(needle.len()).any(|w| w == needle);
        assert!(find(&7u64.to_be_bytes()) && find(&420u64.to_be_bytes()));
        assert!(find(b"counter\0") && find(b"tcp_ports\0"));
        assert!(find(&[10, 0, 0, 2, 0, 80, 0, 0]));
    }
}
