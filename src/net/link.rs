//! Link-level facts and settings the NAT rules depend on: the default route's
//! interface (the natural `external_iface`) and IPv4 forwarding.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use nlink::netlink::types::route::RouteType;
use nlink::netlink::{Connection, Route};

use crate::model::IfaceName;

/// `RT_TABLE_MAIN`: the table `ip route` shows and default routes live in.
const RT_TABLE_MAIN: u32 = 254;
/// Per network namespace, so a test in its own namespace sees its own.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// rtnetlink refused or failed; the text carries the kernel's reason.
    #[error("{op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: nlink::Error,
    },
    /// Reading or writing a sysctl under /proc/sys failed.
    #[error("{path}: {source}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The interface of the IPv4 default route in the main table, `None` without one.
/// With several, the one with the lowest metric wins, as the kernel would choose.
pub async fn default_route_iface() -> Result<Option<String>, LinkError> {
    let conn = Connection::<Route>::new().map_err(|source| LinkError::Netlink {
        op: "open rtnetlink socket",
        source,
    })?;
    let routes = conn
        .get_routes_for_table(RT_TABLE_MAIN)
        .await
        .map_err(|source| LinkError::Netlink {
            op: "list routes",
            source,
        })?;
    let best = routes
        .iter()
        .filter(|r| r.is_ipv4() && r.dst_len() == 0 && matches!(r.route_type(), RouteType::Unicast))
        .filter_map(|r| {
            // A multipath default has no RTA_OIF; its first hop's device stands for it.
            let oif = r.oif().or_else(|| {
                r.multipath()
                    .and_then(|hops| hops.first())
                    .map(|h| h.ifindex)
            })?;
            Some((r.priority().unwrap_or(0), oif))
        })
        .min();
    let Some((_, ifindex)) = best else {
        return Ok(None);
    };
    let link = conn
        .get_link_by_index(ifindex)
        .await
        .map_err(|source| LinkError::Netlink {
            op: "look up default route interface",
            source,
        })?;
    Ok(link.and_then(|l| l.name().map(str::to_owned)))
}

/// Whether `ip` is an address of one of this namespace's interfaces. A port map to the
/// node's own address (say the bridge's 192.168.122.1) would expose the node's local
/// services under another port.
pub async fn is_local_address(conn: &Connection<Route>, ip: Ipv4Addr) -> Result<bool, LinkError> {
    let addresses = conn
        .get_addresses()
        .await
        .map_err(|source| LinkError::Netlink {
            op: "list addresses",
            source,
        })?;
    let ip = IpAddr::V4(ip);
    Ok(addresses
        .iter()
        .any(|a| a.address() == Some(&ip) || a.local() == Some(&ip)))
}

/// Turns on IPv4 forwarding in the current network namespace; returns whether it
/// was off. Without it, DNAT'd packets to VMs are dropped instead of routed.
pub fn enable_ip_forward() -> Result<bool, LinkError> {
    set_sysctl_flag(Path::new(IP_FORWARD), IP_FORWARD)
}

fn set_sysctl_flag(path: &Path, name: &'static str) -> Result<bool, LinkError> {
    let err = |source| LinkError::Sysctl { path: name, source };
    let current = std::fs::read_to_string(path).map_err(err)?;
    if current.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, "1\n").map_err(err)?;
    Ok(true)
}

/// Turns on hairpin mode of bridge port `ifname` (a VM's tap), so that a VM's packet
/// DNAT'd at bridge level (br_netfilter) may leave through the port it came in by: what
/// a VM reaching a node port mapped back to a VM on the same bridge needs (docs/
/// decisions/04-bridge-hairpin-limit.md). `Ok(None)` when there is no such bridge port in this namespace (a
/// remote libvirt host, or no bridge); otherwise whether it was off.
pub fn enable_hairpin(ifname: &IfaceName) -> Result<Option<bool>, LinkError> {
    // An `IfaceName` is safe inside the path: no '/', no "..".
    let path = format!("/sys/class/net/{ifname}/brport/hairpin_mode");
    let path = Path::new(&path);
    if !path.exists() {
        return Ok(None);
    }
    set_sysctl_flag(path, "brport/hairpin_mode").map(Some)
}
