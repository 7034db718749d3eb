//! A port map's source allow-list: the IPv4 networks a connection may come from. Empty
//! means open to everyone (every map before allow-lists existed).

use std::fmt;

use ipnetwork::Ipv4Network;
use serde::{Serialize, Serializer};

/// At most this many networks per map: each is one element of the kernel's allow set
/// and one row in SQLite, and a longer list is a sign the caller wants a firewall, not a
/// port map.
pub const MAX_ALLOW_FROM: usize = 64;

/// Sorted networks, none inside another (so no two kernel interval elements overlap,
/// which the kernel's interval set refuses).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowList(Vec<Ipv4Network>);

/// Why a list of networks is not an allow-list.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllowListError {
    #[error("allow_from holds {0} networks; at most {MAX_ALLOW_FROM} are allowed")]
    TooMany(usize),
    #[error(
        "allow_from[{index}]: {given:?} is not an IPv4 network like \"192.0.2.0/24\" or an \
         address like \"192.0.2.7\""
    )]
    NotANetwork { index: usize, given: String },
    #[error("allow_from[{index}]: {given:?} has host bits set; the network is {network}")]
    HostBits {
        index: usize,
        given: String,
        network: Ipv4Network,
    },
}

impl AllowList {
    /// Parses what a client sent: `a.b.c.d/len` or a bare address (a /32). Host bits set
    /// are refused rather than silently cleared, so the stored list says what the client
    /// meant. Duplicates and networks inside another entry are dropped.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, AllowListError> {
        if items.len() > MAX_ALLOW_FROM {
            return Err(AllowListError::TooMany(items.len()));
        }
        let mut nets = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let given = item.as_ref();
            let bad = || AllowListError::NotANetwork {
                index,
                given: given.to_string(),
            };
            // As written: no whitespace trimmed, no leading zeros guessed at.
            let net: Ipv4Network = if let Some((_, len)) = given.split_once('/') {
                // The prefix as the document's pattern has it: digits, no leading zero.
                if len.is_empty() || (len.len() > 1 && len.starts_with('0')) {
                    return Err(bad());
                }
                given.parse().map_err(|_| bad())?
            } else {
                Ipv4Network::from(given.parse::<std::net::Ipv4Addr>().map_err(|_| bad())?)
            };
            if net.network() != net.ip() {
                return Err(AllowListError::HostBits {
                    index,
                    given: given.to_string(),
                    network: Ipv4Network::new(net.network(), net.prefix()).map_err(|_| bad())?,
                });
            }
            nets.push(net);
        }
        Ok(Self::normalized(nets))
    }

    /// Networks already known to be valid (from SQLite), normalised the same way.
    pub fn from_networks(nets: Vec<Ipv4Network>) -> Self {
        Self::normalized(nets)
    }

    fn normalized(mut nets: Vec<Ipv4Network>) -> Self {
        // Wider first, so a network is dropped when an earlier one already covers it.
        nets.sort_by_key(|n| (n.prefix(), n.network()));
        let mut kept: Vec<Ipv4Network> = Vec::with_capacity(nets.len());
        for n in nets {
            if !kept.iter().any(|k| k.contains(n.network())) {
                kept.push(n);
            }
        }
        kept.sort_by_key(|n| (n.network(), n.prefix()));
        Self(kept)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn networks(&self) -> &[Ipv4Network] {
        &self.0
    }

    pub fn allows(&self, ip: std::net::Ipv4Addr) -> bool {
        self.0.is_empty() || self.0.iter().any(|n| n.contains(ip))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

/// A list of strings (`["10.0.0.0/8", "192.0.2.7/32"]`).
impl Serialize for AllowList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(ToString::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_networks_and_addresses_and_drops_covered_ones() {
        let l =
            AllowList::parse(&["10.1.0.0/16", "192.0.2.7", "10.0.0.0/8", "10.0.0.0/8"]).unwrap();
        let s: Vec<String> = l.networks().iter().map(ToString::to_string).collect();
        assert_eq!(s, ["10.0.0.0/8", "192.0.2.7/32"]);
        assert!(l.allows("10.200.0.1".parse().unwrap()));
        assert!(!l.allows("11.0.0.1".parse().unwrap()));
        assert!(AllowList::default().allows("11.0.0.1".parse().unwrap()));
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"["10.0.0.0/8","192.0.2.7/32"]"#
        );
    }

    #[test]
    fn refuses_bad_networks_host_bits_and_long_lists() {
        assert!(matches!(
            AllowList::parse(&["10.0.0.0/33"]),
            Err(AllowListError::NotANetwork { index: 0, .. })
        ));
        assert!(matches!(
            AllowList::parse(&["ok", "x"]),
            Err(AllowListError::NotANetwork { index: 0, .. })
        ));
        for bad in [" 10.0.0.1", "10.0.0.0/08", "10.0.0.0/", "10.0.0.01"] {
            assert!(
                matches!(
                    AllowList::parse(&[bad]),
                    Err(AllowListError::NotANetwork { .. })
                ),
                "{bad}"
            );
        }
        let e = AllowList::parse(&["10.0.0.0/8", "10.1.2.3/8"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "allow_from[1]: \"10.1.2.3/8\" has host bits set; the network is 10.0.0.0/8"
        );
        let many: Vec<String> = (0..=MAX_ALLOW_FROM)
            .map(|i| format!("10.0.{i}.0/24"))
            .collect();
        assert_eq!(
            AllowList::parse(&many),
            Err(AllowListError::TooMany(MAX_ALLOW_FROM + 1))
        );
    }
}
