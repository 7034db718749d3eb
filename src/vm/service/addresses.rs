//! Pinned addresses: which IPv4 address of a network's DHCP range a VM gets. Pure
//! decisions over what the agent knows (docs/decisions/27-the-address-is-the-agents.md):
//! the network as libvirt last showed it, the VMs' pinned addresses in SQLite, the
//! addresses of creates in flight and of failed creates' entries. The driver only writes
//! and removes the entries (`pinning.rs` says when).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::model::{MacAddr, VmName};
use crate::vm::driver::{Network, Subnet};

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
        ranges: Ranges,
    },
    /// The requested address is held (409).
    #[error("ip {ip} is taken on network {network}: {by}")]
    Taken {
        ip: Ipv4Addr,
        network: String,
        by: Holder,
    },
    /// Every address of the range is held (409).
    #[error(
        "network {network}'s DHCP range ({ranges}) has no free address left; delete a VM \
         or widen the range"
    )]
    Full { network: String, ranges: Ranges },
}

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The address pinned for a VM of the agent's (its row in SQLite).
    Vm(VmName),
    /// The address chosen for a VM whose create is in flight.
    Creating(VmName),
    /// A failed create's host entry, which libvirt may still hold (`stray_pins.rs`).
    Stray(MacAddr),
    /// Another MAC's host entry in the network (its name, else its MAC).
    Entry(String),
    /// Leased to another MAC.
    Lease(MacAddr),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Vm(vm) => write!(f, "pinned for VM {vm}"),
            Holder::Creating(vm) => write!(f, "chosen for VM {vm}, being created"),
            Holder::Stray(mac) => write!(f, "a failed create's DHCP host entry ({mac})"),
            Holder::Entry(who) => write!(f, "DHCP host entry {who}"),
            Holder::Lease(mac) => write!(f, "leased to {mac}"),
        }
    }
}

/// A subnet's DHCP ranges, for messages (`a-b, c-d`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranges(Vec<(Ipv4Addr, Ipv4Addr)>);

impl std::fmt::Display for Ranges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (s, e)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{s}-{e}")?;
        }
        Ok(())
    }
}

fn ranges(subnet: &Subnet) -> Ranges {
    Ranges(subnet.ranges.clone())
}

/// The addresses held on a network, each with who holds it (for the 409's message).
pub type Taken = BTreeMap<Ipv4Addr, Holder>;

/// The DHCP subnet of a network: its first IPv4 `<ip>` with a range.
pub fn dhcp_subnet<'a>(network: &str, subnets: &'a [Subnet]) -> Result<&'a Subnet, AddrError> {
    subnets
        .iter()
        .find(|s| !s.ranges.is_empty())
        .ok_or_else(|| AddrError::NoRange(network.to_string()))
}

/// Whether `ip` can be handed out at all: inside a range, and neither the subnet's
/// network address, its broadcast address nor the host's own address.
pub fn assignable(subnet: &Subnet, ip: Ipv4Addr) -> bool {
    let in_range = subnet.ranges.iter().any(|(s, e)| (*s..=*e).contains(&ip));
    let mask = u32::MAX
        .checked_shl(32 - u32::from(subnet.prefix))
        .unwrap_or(0);
    let (bits, host_bits) = (u32::from(ip), !mask);
    let network_or_broadcast =
        subnet.prefix < 31 && (bits & host_bits == 0 || bits & host_bits == host_bits);
    in_range && !network_or_broadcast && subnet.address != Some(ip)
}

/// What the network itself holds against `mac`: other MACs' host entries and leases.
pub fn held_in(net: &Network, mac: &MacAddr) -> Taken {
    let mut taken = Taken::new();
    let entries = net.subnets.iter().flat_map(|s| &s.hosts);
    for h in entries.filter(|h| h.mac.as_ref() != Some(mac)) {
        if let Some(ip) = h.ip {
            let who = h
                .name
                .clone()
                .or_else(|| h.mac.as_ref().map(ToString::to_string));
            taken
                .entry(ip)
                .or_insert_with(|| Holder::Entry(who.unwrap_or_else(|| "?".into())));
        }
    }
    for l in net.leases.iter().filter(|l| &l.mac != mac) {
        if let std::net::IpAddr::V4(ip) = l.ip {
            taken
                .entry(ip)
                .or_insert_with(|| Holder::Lease(l.mac.clone()));
        }
    }
    taken
}

/// The address a VM gets: `requested` exactly (refused when out of range or taken),
/// else `preferred` when it is free (the address a recreated VM had), else the lowest
/// free one.
pub fn choose(
    network: &str,
    subnet: &Subnet,
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

/// Why an address chosen from what the agent knew is no longer free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    NoRange,
    OutOfRange(Ranges),
    Held(Holder),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::NoRange => f.write_str("the network has no IPv4 DHCP range any more"),
            Lost::OutOfRange(r) => write!(f, "outside its DHCP range ({r})"),
            Lost::Held(by) => write!(f, "{by}"),
        }
    }
}

/// Whether `ip`, chosen for `mac` from what the agent knew, is still its to take in the
/// network as libvirt shows it now.
pub fn still_free(network: &Network, ip: Ipv4Addr, mac: &MacAddr) -> Result<(), Lost> {
    let Some(subnet) = network.subnets.iter().find(|s| !s.ranges.is_empty()) else {
        return Err(Lost::NoRange);
    };
    if !assignable(subnet, ip) {
        return Err(Lost::OutOfRange(ranges(subnet)));
    }
    match held_in(network, mac).remove(&ip) {
        Some(by) => Err(Lost::Held(by)),
        None => Ok(()),
    }
}

/// An entry of VM `name` whose MAC no VM of the agent has (`known`) and nothing leases:
/// what an earlier create of the name left when it was cut off inside libvirt (its MAC
/// was new, and died with it). libvirt refuses a second entry of one name, so it would
/// keep the name from ever being created again. Its MAC, to remove.
pub fn leftover(
    network: &Network,
    name: &str,
    mac: &MacAddr,
    known: &BTreeSet<MacAddr>,
) -> Option<MacAddr> {
    network
        .subnets
        .iter()
        .flat_map(|s| &s.hosts)
        .filter(|h| h.name.as_deref() == Some(name))
        .filter_map(|h| h.mac.clone())
        .find(|m| m != mac && !known.contains(m) && !network.leases.iter().any(|l| &l.mac == m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmError;
    use crate::vm::driver::{DhcpHost, Lease};

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn subnet(start: u8, end: u8) -> Subnet {
        Subnet {
            address: Some(ip(1)),
            prefix: 24,
            ranges: vec![(ip(start), ip(end))],
            hosts: vec![],
        }
    }

    fn taken(ips: &[u8]) -> Taken {
        ips.iter()
            .map(|i| (ip(*i), Holder::Vm(format!("vm{i}").parse().unwrap())))
            .collect()
    }

    fn mac(last: u8) -> MacAddr {
        MacAddr::qemu([0, 0, last])
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
        assert!(held.to_string().contains("pinned for VM vm15"), "{held}");
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
        let none = dhcp_subnet("n", &[Subnet::default()]).unwrap_err();
        assert!(matches!(VmError::from(none), VmError::Conflict(_)));
    }

    #[test]
    fn several_ranges_are_walked_in_order() {
        let mut s = subnet(10, 11);
        s.ranges.push((ip(50), ip(51)));
        assert_eq!(choose("n", &s, &taken(&[10, 11]), None, None), Ok(ip(50)));
        assert!(choose("n", &s, &taken(&[]), Some(ip(30)), None).is_err());
    }

    /// Other MACs' entries and leases hold their addresses; the VM's own MAC does not
    /// (a recreate keeps its entry); a leftover of the name with an unknown, unleased MAC
    /// is found, one a VM has or a lease holds is not.
    #[test]
    fn the_network_holds_other_macs_addresses_and_leftovers_are_recognised() {
        let mut s = subnet(10, 20);
        s.hosts = vec![
            DhcpHost {
                mac: Some(mac(1)),
                name: Some("a".into()),
                ip: Some(ip(10)),
            },
            DhcpHost {
                mac: Some(mac(2)),
                name: Some("me".into()),
                ip: Some(ip(11)),
            },
        ];
        let lease = Lease {
            mac: mac(3),
            ip: ip(12).into(),
            expiry: 1,
        };
        let net = Network {
            subnets: vec![s],
            leases: vec![lease],
        };
        let held = held_in(&net, &mac(2));
        assert_eq!(held.keys().copied().collect::<Vec<_>>(), [ip(10), ip(12)]);
        assert_eq!(held[&ip(12)].to_string(), format!("leased to {}", mac(3)));
        assert_eq!(still_free(&net, ip(11), &mac(2)), Ok(()));
        let held = still_free(&net, ip(10), &mac(2)).unwrap_err();
        assert_eq!(held.to_string(), "DHCP host entry a");
        let out = still_free(&net, ip(30), &mac(2)).unwrap_err();
        assert!(matches!(out, Lost::OutOfRange(_)), "{out}");
        let none = BTreeSet::new();
        assert_eq!(leftover(&net, "me", &mac(9), &none), Some(mac(2)));
        assert_eq!(leftover(&net, "me", &mac(2), &none), None, "its own entry");
        let known = BTreeSet::from([mac(2)]);
        assert_eq!(leftover(&net, "me", &mac(9), &known), None, "a VM's MAC");
    }
}
