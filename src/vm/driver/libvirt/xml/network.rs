//! What the agent reads from a libvirt network's XML: its IPv4 subnets, their DHCP
//! ranges and host entries (`<ip address netmask|prefix><dhcp><range/><host/>`).

use std::net::Ipv4Addr;

use super::read::{Step, Walk, XmlError, attr};
use crate::vm::driver::{DhcpHost, Subnet};

/// The IPv4 subnets of a network's XML (`<ip family='ipv6'>` is skipped).
pub fn parse_network(xml: &str) -> Result<Vec<Subnet>, XmlError> {
    let mut walk = Walk::new(xml);
    let mut out: Vec<Subnet> = Vec::new();
    let mut in_v4 = false;
    loop {
        match walk.next()? {
            Step::Eof => break,
            Step::Open(start) => {
                if walk.path_is(&["network", "ip"]) {
                    in_v4 = attr(&start, "family")?.is_none_or(|f| f == "ipv4");
                    if in_v4 {
                        out.push(subnet(&start)?);
                    }
                } else if in_v4 && let Some(ip) = out.last_mut() {
                    if walk.path_is(&["network", "ip", "dhcp", "range"]) {
                        let start_at = address(&start, "start")?;
                        let end_at = address(&start, "end")?;
                        if let (Some(s), Some(e)) = (start_at, end_at) {
                            ip.ranges.push((s, e));
                        }
                    } else if walk.path_is(&["network", "ip", "dhcp", "host"]) {
                        ip.hosts.push(DhcpHost {
                            mac: mac(&start)?,
                            name: attr(&start, "name")?,
                            ip: address(&start, "ip")?,
                        });
                    }
                }
            }
            Step::Close { .. } => walk.pop(),
        }
    }
    Ok(out)
}

/// The address and prefix of an `<ip>` element (`prefix`, else `netmask`, else 24 as
/// libvirt assumes for a class C address).
fn subnet(start: &quick_xml::events::BytesStart<'_>) -> Result<Subnet, XmlError> {
    let prefix = match (attr(start, "prefix")?, address(start, "netmask")?) {
        (Some(p), _) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or(XmlError::Value {
                key: "prefix",
                value: p,
                expected: "a prefix length (0 to 32)",
            })?,
        (None, Some(mask)) => u32::from(mask).count_ones() as u8,
        (None, None) => 24,
    };
    Ok(Subnet {
        address: address(start, "address")?,
        prefix,
        ..Subnet::default()
    })
}

fn address(
    start: &quick_xml::events::BytesStart<'_>,
    key: &'static str,
) -> Result<Option<Ipv4Addr>, XmlError> {
    match attr(start, key)? {
        None => Ok(None),
        Some(v) => match v.parse() {
            Ok(ip) => Ok(Some(ip)),
            Err(_) => Err(XmlError::Value {
                key,
                value: v,
                expected: "an IPv4 address",
            }),
        },
    }
}

/// A host entry's `mac`.
fn mac(
    start: &quick_xml::events::BytesStart<'_>,
) -> Result<Option<crate::model::MacAddr>, XmlError> {
    match attr(start, "mac")? {
        None => Ok(None),
        Some(v) => match v.parse() {
            Ok(mac) => Ok(Some(mac)),
            Err(_) => Err(XmlError::Value {
                key: "mac",
                value: v,
                expected: "a MAC address",
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = "<network>\n  <name>default</name>\n  <forward mode='nat'/>\n  \
        <ip family='ipv6' address='fd00::1' prefix='64'><dhcp><range start='fd00::10' end='fd00::ff'/></dhcp></ip>\n  \
        <ip address='192.168.122.1' netmask='255.255.255.0'>\n    <dhcp>\n      \
        <range start='192.168.122.2' end='192.168.122.254'>\n        <lease expiry='1' unit='hours'/>\n      </range>\n      \
        <host mac='52:54:00:00:00:01' name='a' ip='192.168.122.10'/>\n      \
        <host name='b' ip='192.168.122.11'/>\n    </dhcp>\n  </ip>\n</network>\n";

    #[test]
    fn reads_the_ipv4_subnet_its_range_and_hosts() {
        let ips = parse_network(DEFAULT).unwrap();
        assert_eq!(ips.len(), 1, "the IPv6 element is skipped");
        let ip = &ips[0];
        assert_eq!(ip.address, Some(Ipv4Addr::new(192, 168, 122, 1)));
        assert_eq!(ip.prefix, 24);
        assert_eq!(
            ip.ranges,
            [(
                Ipv4Addr::new(192, 168, 122, 2),
                Ipv4Addr::new(192, 168, 122, 254)
            )]
        );
        assert_eq!(ip.hosts.len(), 2);
        assert_eq!(
            ip.hosts[0].mac.as_ref().map(|m| m.as_str()),
            Some("52:54:00:00:00:01")
        );
        assert_eq!(ip.hosts[1].mac, None);
        assert_eq!(ip.hosts[1].ip, Some(Ipv4Addr::new(192, 168, 122, 11)));
    }

    #[test]
    fn a_network_without_dhcp_has_no_range_and_prefix_wins_over_netmask() {
        let xml = "<network><name>n</name><ip address='10.1.0.1' prefix='16'/></network>";
        let ips = parse_network(xml).unwrap();
        assert_eq!(ips[0].prefix, 16);
        assert!(ips[0].ranges.is_empty());
        assert!(
            parse_network("<network><name>x</name></network>")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_host_entry_is_escaped_and_reads_back() {
        let xml = super::super::dhcp_host(
            "52:54:00:aa:bb:cc",
            Some("a'b"),
            Some(Ipv4Addr::new(10, 0, 0, 5)),
        );
        let wrapped = format!(
            "<network><ip address='10.0.0.1' prefix='24'><dhcp>{xml}</dhcp></ip></network>"
        );
        let ips = parse_network(&wrapped).unwrap();
        assert_eq!(ips[0].hosts[0].name.as_deref(), Some("a'b"));
        assert_eq!(ips[0].hosts[0].ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
    }
}
