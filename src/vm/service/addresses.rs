//! Pinned addresses: which IPv4 address of a network's DHCP range a VM gets. Pure
//! decisions over what libvirt and the database hold; `vm::dhcp_hosts` asks libvirt and
//! writes the reservation.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::VmError;
use super::xml::NetIpv4;

/// Why no address could be pinned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The network has no IPv4 `<dhcp><range>`: nothing to pin from (409).
    #[error(
        "network {0} has no IPv4 DHCP range; the agent pins each VM's address inside it \
         (add <dhcp><range start= end=/> to the network's <ip>)"
    )]
    NoRange(String),
    /// The requested address is not in the DHCP range, or is the network's own (400).
    #[error("ip {ip} is not a free address of network {network}'s DHCP range ({ranges})")]
    OutOfRange {
        ip: Ipv4Addr,
        network: String,
        ranges: String,
    },
    /// The requested address is held (409).
    #[error("ip {ip} is taken on network {network}: {by}")]
    Taken {
        ip: Ipv4Addr,
        network: String,
        by: String,
    },
    /// Every address of the range is held (409).
    #[error(
        "network {network}'s DHCP range ({ranges}) has no free address left; delete a VM \
         or widen the range"
    )]
    Full { network: String, ranges: String },
}

impl From<AddrError> for VmError {
    fn from(e: AddrError) -> Self {
        match e {
            AddrError::OutOfRange { .. } => VmError::Invalid(e.to_string()),
            _ => VmError::Conflict(e.to_string()),
        }
    }
}

/// The addresses held on a network, each with who holds it (for the 409's message).
pub type Taken = BTreeMap<Ipv4Addr, String>;

/// The DHCP subnet of a network: its first IPv4 `<ip>` with a range.
pub fn dhcp_subnet<'a>(network: &str, ips: &'a [NetIpv4]) -> Result<&'a NetIpv4, AddrError> {
    ips.iter()
        .find(|ip| !ip.ranges.is_empty())
        .ok_or_else(|| AddrError::NoRange(network.to_string()))
}

/// Whether `ip` can be handed out at all: inside a range, and neither the subnet's
/// network address, its broadcast address nor the host's own address.
pub fn assignable(subnet: &NetIpv4, ip: Ipv4Addr) -> bool {
    let in_range = subnet.ranges.iter().any(|(s, e)| (*s..=*e).contains(&ip));
    let mask = u32::MAX
        .checked_shl(32 - u32::from(subnet.prefix))
        .unwrap_or(0);
    let (bits, host_bits) = (u32::from(ip), !mask);
    let network_or_broadcast =
        subnet.prefix < 31 && (bits & host_bits == 0 || bits & host_bits == host_bits);
    in_range && !network_or_broadcast && subnet.address != Some(ip)
}

/// The address a VM gets: `requested` exactly (refused when out of range or taken),
/// else `preferred` when it is free (the address a recreated VM had), else the lowest
/// free one.
pub fn choose(
    network: &str,
    subnet: &NetIpv4,
    taken: &Taken,
    requested: Option<Ipv4Addr>,
    preferred: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, AddrError> {
    if let Some(ip) = requested {
        if !assignable(subnet, ip) {
            return Err(AddrError::OutOfRange {
                ip,
                network: network.into(),
                ranges: ranges(subnet),
            });
        }
        if let Some(by) = taken.get(&ip) {
            return Err(AddrError::Taken {
                ip,
                network: network.into(),
                by: by.clone(),
            });
        }
        return Ok(ip);
    }
    let free = |ip: &Ipv4Addr| assignable(subnet, *ip) && !taken.contains_key(ip);
    if let Some(ip) = preferred.filter(free) {
        return Ok(ip);
    }
    subnet
        .ranges
        .iter()
        .flat_map(|(s, e)| (u32::from(*s)..=u32::from(*e)).map(Ipv4Addr::from))
        .find(free)
        .ok_or_else(|| AddrError::Full {
            network: network.into(),
            ranges: ranges(subnet),
        })
}

/// `a-b, c-d`, for messages.
fn ranges(subnet: &NetIpv4) -> String {
    subnet
        .ranges
        .iter()
        .map(|(s, e)| format!("{s}-{e}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn subnet(start: u8, end: u8) -> NetIpv4 {
        NetIpv4 {
            address: Some(ip(1)),
            prefix: 24,
            ranges: vec![(ip(start), ip(end))],
            hosts: vec![],
        }
    }

    fn taken(ips: &[u8]) -> Taken {
        ips.iter().map(|i| (ip(*i), format!("vm{i}"))).collect()
    }

    #[test]
    fn the_lowest_free_address_of_the_range_is_chosen() {
        let s = subnet(10, 20);
        assert_eq!(choose("n", &s, &taken(&[]), None, None), Ok(ip(10)));
        assert_eq!(
            choose("n", &s, &taken(&[10, 11, 13]), None, None),
            Ok(ip(12))
        );
    }

    #[test]
    fn the_network_broadcast_and_own_addresses_are_never_chosen() {
        let s = subnet(0, 255);
        assert_eq!(choose("n", &s, &taken(&[]), None, None), Ok(ip(2)));
        for own in [0, 1, 255] {
            assert!(!assignable(&s, ip(own)), "{own}");
            let e = choose("n", &s, &taken(&[]), Some(ip(own)), None).unwrap_err();
            assert!(matches!(e, AddrError::OutOfRange { .. }), "{e}");
        }
    }

    #[test]
    fn a_requested_address_must_be_in_the_range_and_free() {
        let s = subnet(10, 20);
        assert_eq!(
            choose("n", &s, &taken(&[10]), Some(ip(15)), None),
            Ok(ip(15))
        );
        let out = choose("n", &s, &taken(&[]), Some(ip(21)), None).unwrap_err();
        assert!(matches!(out, AddrError::OutOfRange { .. }));
        assert!(matches!(VmError::from(out), VmError::Invalid(_)));
        let held = choose("n", &s, &taken(&[15]), Some(ip(15)), None).unwrap_err();
        assert!(held.to_string().contains("vm15"), "{held}");
        assert!(matches!(VmError::from(held), VmError::Conflict(_)));
    }

    #[test]
    fn a_preferred_address_is_kept_when_free_and_skipped_when_not() {
        let s = subnet(10, 20);
        assert_eq!(choose("n", &s, &taken(&[]), None, Some(ip(17))), Ok(ip(17)));
        assert_eq!(
            choose("n", &s, &taken(&[17]), None, Some(ip(17))),
            Ok(ip(10))
        );
        assert_eq!(choose("n", &s, &taken(&[]), None, Some(ip(99))), Ok(ip(10)));
    }

    #[test]
    fn a_full_range_and_a_network_without_one_are_conflicts() {
        let s = subnet(10, 12);
        let e = choose("n", &s, &taken(&[10, 11, 12]), None, None).unwrap_err();
        assert!(matches!(e, AddrError::Full { .. }));
        assert!(e.to_string().contains("10.0.0.10-10.0.0.12"), "{e}");
        let none = dhcp_subnet("n", &[NetIpv4::default()]).unwrap_err();
        assert!(matches!(VmError::from(none), VmError::Conflict(_)));
    }

    #[test]
    fn several_ranges_are_walked_in_order() {
        let mut s = subnet(10, 11);
        s.ranges.push((ip(50), ip(51)));
        assert_eq!(choose("n", &s, &taken(&[10, 11]), None, None), Ok(ip(50)));
        assert!(choose("n", &s, &taken(&[]), Some(ip(30)), None).is_err());
    }
}
