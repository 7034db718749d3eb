//! A network's DHCP host entries (`<dhcp><host mac name ip/>`), through libvirt's
//! `virNetworkUpdate`: the reservation that pins a VM's address. Blocking; run inside
//! `Libvirt::call`. The choice itself is `vm::addresses`.
//!
//! Every change affects the running network (dnsmasq is told at once) when it is
//! active, and its persistent definition when it has one (`VIR_NETWORK_UPDATE_AFFECT_*`:
//! LIVE on an inactive network, or CONFIG on a transient one, is refused by libvirt).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::network::Network;
use virt::sys;

use super::addresses::{self, Taken};
use super::xml::{self, NetIpv4};
use super::{VmError, leases};

/// What to pin: one VM's NIC on one network.
pub struct Pin<'a> {
    pub network: &'a str,
    pub mac: &'a str,
    /// The VM's name, written as the entry's `name` (dnsmasq's name for the host).
    pub name: &'a str,
    /// The address the request asked for: exactly this, or refused.
    pub requested: Option<Ipv4Addr>,
    /// The address to keep when it is free (a recreated VM's).
    pub preferred: Option<Ipv4Addr>,
    /// Other VMs' pinned addresses from the database.
    pub others: Taken,
    /// The MAC of every VM in the database.
    pub known_macs: BTreeSet<String>,
}

/// A pinned address, and the address the MAC's entry had before (to put back when the
/// create fails).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub ip: Ipv4Addr,
    pub previous: Option<Ipv4Addr>,
}

/// The network `name`; 404 when libvirt has none.
pub fn network(conn: &Connect, name: &str) -> Result<Network, VmError> {
    conn.lookup_network_by_name(name).map_err(|e| {
        let e = VmError::libvirt(format!("network {name}"), e);
        if e.is_not_found() {
            VmError::NotFound(format!("no network named {name}"))
        } else {
            e
        }
    })
}

/// The network's IPv4 subnets as libvirt runs them now.
pub fn subnets(net: &Network) -> Result<Vec<NetIpv4>, VmError> {
    let doc = net
        .xml_desc(0)
        .map_err(|e| VmError::libvirt("network XML", e))?;
    xml::parse_network(&doc).map_err(|e| VmError::Internal(e.to_string()))
}

/// Chooses the VM's address and writes its host entry. The caller holds the agent's
/// pinning lock, so no other create of this agent chooses between this read and the
/// write; libvirt itself refuses a second entry with the same MAC, name or address.
pub fn reserve(conn: &Connect, pin: &Pin<'_>) -> Result<Reservation, VmError> {
    let net = network(conn, pin.network)?;
    let leases = current_leases(&net)?;
    remove_leftover(&net, pin, &leases)?;
    let subnets = subnets(&net)?;
    let subnet = addresses::dhcp_subnet(pin.network, &subnets)?;
    let taken = taken_on(subnet, &leases, pin);
    let previous = entry_of(&subnets, pin.mac).and_then(|h| h.ip);
    let ip = addresses::choose(pin.network, subnet, &taken, pin.requested, pin.preferred)?;
    if previous != Some(ip) {
        remove(&net, pin.mac)?;
        if let Err(e) = add(&net, pin.mac, pin.name, ip) {
            // The MAC's old entry was taken away for this one: put back.
            if let Some(p) = previous {
                let _ = add(&net, pin.mac, pin.name, p);
            }
            return Err(e);
        }
    }
    Ok(Reservation { ip, previous })
}

/// The addresses `pin` must avoid on `subnet`: other VMs' pins, other MACs' host entries
/// and leases, each with its holder (the 409 names it).
fn taken_on(subnet: &NetIpv4, leases: &[leases::Lease], pin: &Pin<'_>) -> Taken {
    let mut taken = pin.others.clone();
    let others = subnet
        .hosts
        .iter()
        .filter(|h| !same_mac(h.mac.as_deref(), pin.mac));
    for h in others {
        if let Some(ip) = h.ip {
            let who = h.name.as_deref().or(h.mac.as_deref()).unwrap_or("?");
            taken
                .entry(ip)
                .or_insert_with(|| format!("DHCP host entry {who}"));
        }
    }
    for l in leases.iter().filter(|l| !same_mac(Some(&l.mac), pin.mac)) {
        if let Ok(ip) = l.ip.parse() {
            taken
                .entry(ip)
                .or_insert_with(|| format!("leased to {}", l.mac));
        }
    }
    taken
}

/// Removes an entry of this VM's name whose MAC no VM of the agent has and nothing
/// leases: what an earlier create of the name left when it was cut off inside libvirt
/// (its MAC was new, and died with it). libvirt refuses a second entry of one name, so
/// it would keep the name from ever being created again.
fn remove_leftover(net: &Network, pin: &Pin<'_>, leases: &[leases::Lease]) -> Result<(), VmError> {
    let subnets = subnets(net)?;
    let leftover = subnets.iter().flat_map(|s| &s.hosts).find(|h| {
        h.name.as_deref() == Some(pin.name)
            && h.mac.as_deref().is_some_and(|m| {
                !same_mac(Some(m), pin.mac)
                    && !pin.known_macs.iter().any(|k| same_mac(Some(k), m))
                    && !leases.iter().any(|l| same_mac(Some(&l.mac), m))
            })
    });
    if let Some(mac) = leftover.and_then(|h| h.mac.clone()) {
        tracing::warn!(vm = pin.name, mac = %mac, "removing the DHCP host entry a cut-off create of this name left");
        remove(net, &mac)?;
    }
    Ok(())
}

/// Undoes [`reserve`]: the MAC's entry as it was before.
pub fn release(conn: &Connect, pin: &Pin<'_>, r: &Reservation) -> Result<(), VmError> {
    match r.previous {
        Some(p) if p == r.ip => Ok(()),
        Some(p) => ensure(conn, pin.network, pin.mac, pin.name, p).map(drop),
        None => remove(&network(conn, pin.network)?, pin.mac).map(drop),
    }
}

/// Makes the network hold `<host mac name ip>` (the reconcile: someone deleted it, or
/// the network was defined anew). True when it had to write it.
pub fn ensure(
    conn: &Connect,
    network_name: &str,
    mac: &str,
    name: &str,
    ip: Ipv4Addr,
) -> Result<bool, VmError> {
    let net = network(conn, network_name)?;
    if entry_of(&subnets(&net)?, mac).is_some_and(|h| h.ip == Some(ip)) {
        return Ok(false);
    }
    remove(&net, mac)?;
    add(&net, mac, name, ip)?;
    Ok(true)
}

/// Deletes the entry of `mac`, if any (libvirt matches a delete on every attribute
/// given, so it is sent as the network shows it). True when there was one.
pub fn remove(net: &Network, mac: &str) -> Result<bool, VmError> {
    let subnets = subnets(net)?;
    let Some(h) = entry_of(&subnets, mac) else {
        return Ok(false);
    };
    let doc = xml::dhcp_host(h.mac.as_deref().unwrap_or(mac), h.name.as_deref(), h.ip);
    update(
        net,
        sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
        &doc,
        "deleting",
    )?;
    Ok(true)
}

fn add(net: &Network, mac: &str, name: &str, ip: Ipv4Addr) -> Result<(), VmError> {
    let doc = xml::dhcp_host(mac, Some(name), Some(ip));
    update(
        net,
        sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
        &doc,
        "adding",
    )
}

fn update(
    net: &Network,
    cmd: sys::virNetworkUpdateCommand,
    doc: &str,
    what: &str,
) -> Result<(), VmError> {
    let mut flags = 0;
    if net
        .is_active()
        .map_err(|e| VmError::libvirt("network state", e))?
    {
        flags |= sys::VIR_NETWORK_UPDATE_AFFECT_LIVE;
    }
    if net
        .is_persistent()
        .map_err(|e| VmError::libvirt("network state", e))?
    {
        flags |= sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG;
    }
    net.update(cmd, sys::VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, doc, flags)
        .map_err(|e| VmError::libvirt(format!("{what} DHCP host entry {}", doc.trim()), e))
}

/// The host entry of `mac` in any IPv4 subnet.
fn entry_of<'a>(subnets: &'a [NetIpv4], mac: &str) -> Option<&'a xml::DhcpHost> {
    subnets
        .iter()
        .flat_map(|s| &s.hosts)
        .find(|h| same_mac(h.mac.as_deref(), mac))
}

fn same_mac(a: Option<&str>, b: &str) -> bool {
    a.is_some_and(|a| a.eq_ignore_ascii_case(b))
}

/// The network's leases; none from a driver that keeps none (libvirt's test driver).
fn current_leases(net: &Network) -> Result<Vec<leases::Lease>, VmError> {
    match leases::leases(net, None) {
        Err(VmError::Libvirt(f)) if f.code() == Some(ErrorNumber::NoSupport) => Ok(Vec::new()),
        other => other,
    }
}
