//! A network's DHCP host entries (`<dhcp><host mac name ip/>`), through libvirt's
//! `virNetworkUpdate`: the reservation that pins a VM's address. Which address that is,
//! is the VM service's choice (`vm::service::addresses`); this only reads, writes and
//! removes entries. Blocking.
//!
//! Every change affects the running network (dnsmasq is told at once) when it is
//! active, and its persistent definition when it has one (`VIR_NETWORK_UPDATE_AFFECT_*`:
//! LIVE on an inactive network, or CONFIG on a transient one, is refused by libvirt).

use std::net::Ipv4Addr;

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::network::Network;
use virt::sys;

use super::{leases, xml};
use crate::model::MacAddr;
use crate::vm::driver::error::OrLibvirt;
use crate::vm::driver::{Cause, DhcpHost, HostEntry, Lease, LibvirtFailure, Op, Subnet};

/// The network `name` (a not-found failure when libvirt has none).
pub fn network(conn: &Connect, name: &str) -> Result<Network, LibvirtFailure> {
    conn.lookup_network_by_name(name)
        .or_libvirt(|| Op::of("network", name))
}

/// The network's IPv4 subnets as libvirt runs them now.
pub fn subnets(net: &Network) -> Result<Vec<Subnet>, LibvirtFailure> {
    let doc = net.xml_desc(0).or_libvirt(|| Op::new("network XML"))?;
    xml::parse_network(&doc)
        .map_err(|e| LibvirtFailure::failed(Op::new("network XML"), Cause::Document(e)))
}

/// Makes the network hold `entry`, replacing its MAC's entry if it has one; returns the
/// address that entry had. If the new entry is refused, the old one is put back.
pub fn put(
    conn: &Connect,
    network_name: &str,
    entry: &HostEntry,
) -> Result<Option<Ipv4Addr>, LibvirtFailure> {
    let net = network(conn, network_name)?;
    let previous = entry_of(&subnets(&net)?, &entry.mac).cloned();
    let was = previous.as_ref().and_then(|h| h.ip);
    if was == Some(entry.ip) {
        return Ok(was);
    }
    if let Some(old) = &previous {
        delete(&net, old, &entry.mac)?;
    }
    if let Err(e) = add(&net, &entry.mac, Some(entry.name.as_str()), entry.ip) {
        if let Some(p) = &previous
            && let Some(ip) = p.ip
        {
            let _ = add(&net, &entry.mac, p.name.as_deref(), ip);
        }
        return Err(e);
    }
    Ok(was)
}

/// Deletes the entry of `mac`, if any (libvirt matches a delete on every attribute
/// given, so it is sent as the network shows it). True when there was one.
pub fn remove(net: &Network, mac: &MacAddr) -> Result<bool, LibvirtFailure> {
    let subnets = subnets(net)?;
    let Some(h) = entry_of(&subnets, mac) else {
        return Ok(false);
    };
    delete(net, h, mac)?;
    Ok(true)
}

fn delete(net: &Network, h: &DhcpHost, mac: &MacAddr) -> Result<(), LibvirtFailure> {
    let doc = xml::dhcp_host(h.mac.as_ref().unwrap_or(mac), h.name.as_deref(), h.ip);
    update(
        net,
        sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
        &doc,
        "deleting DHCP host entry",
    )
}

fn add(
    net: &Network,
    mac: &MacAddr,
    name: Option<&str>,
    ip: Ipv4Addr,
) -> Result<(), LibvirtFailure> {
    let doc = xml::dhcp_host(mac, name, Some(ip));
    update(
        net,
        sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
        &doc,
        "adding DHCP host entry",
    )
}

fn update(
    net: &Network,
    cmd: sys::virNetworkUpdateCommand,
    doc: &str,
    what: &'static str,
) -> Result<(), LibvirtFailure> {
    let mut flags = 0;
    if net.is_active().or_libvirt(|| Op::new("network state"))? {
        flags |= sys::VIR_NETWORK_UPDATE_AFFECT_LIVE;
    }
    if net
        .is_persistent()
        .or_libvirt(|| Op::new("network state"))?
    {
        flags |= sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG;
    }
    net.update(cmd, sys::VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, doc, flags)
        .or_libvirt(|| Op::of(what, doc.trim()))
}

/// The host entry of `mac` in any IPv4 subnet.
fn entry_of<'a>(subnets: &'a [Subnet], mac: &MacAddr) -> Option<&'a DhcpHost> {
    subnets
        .iter()
        .flat_map(|s| &s.hosts)
        .find(|h| h.mac.as_ref() == Some(mac))
}

/// The network's leases (only `mac`'s when given); none from a driver that keeps none
/// (libvirt's test driver), unless a MAC was asked for: then its "not supported" is the
/// answer (a limit of that libvirt).
pub fn current_leases(net: &Network, mac: Option<&MacAddr>) -> Result<Vec<Lease>, LibvirtFailure> {
    match leases::leases(net, mac) {
        Err(f) if mac.is_none() && f.code() == Some(ErrorNumber::NoSupport) => Ok(Vec::new()),
        other => other,
    }
}
