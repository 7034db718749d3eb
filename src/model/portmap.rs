//! A port map as every layer means it: node port -> VM ip:port, over TCP or UDP. The
//! store keeps it, the service checks it against the policy, nftables carries it out.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

/// Transport protocol of a port map.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lower-case name only; the API lower-cases what clients send first (the original
/// agent took `"TCP"`).
/// A protocol other than `tcp` and `udp` (the word as given).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("proto must be \"tcp\" or \"udp\", not {0:?}")]
pub struct ProtoError(pub String);

impl FromStr for Proto {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(ProtoError(other.to_owned())),
        }
    }
}

/// `port_maps.proto` (its CHECK constraint allows exactly these names).
impl ToSql for Proto {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for Proto {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        v.as_str()?
            .parse()
            .map_err(|e: ProtoError| FromSqlError::Other(Box::new(e)))
    }
}

/// One port map as the kernel sees it: `proto dport listen_port` on a local address is
/// DNAT'd to `target_ip:target_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMap {
    pub proto: Proto,
    pub listen_port: u16,
    pub target_ip: Ipv4Addr,
    pub target_port: u16,
}

impl PortMap {
    /// The id the original agent returned: the bare listen port for TCP; UDP maps get a
    /// `/udp` suffix so both protocols can map the same port.
    pub fn rule_id(&self) -> String {
        match self.proto {
            Proto::Tcp => self.listen_port.to_string(),
            Proto::Udp => format!("{}/udp", self.listen_port),
        }
    }
}

/// A port map with its source allow-list: everything the kernel holds for one listen
/// port. Changing either half is a replace (the map's counters start again).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    pub map: PortMap,
    pub allow_from: super::AllowList,
}

impl From<PortMap> for PortRule {
    fn from(map: PortMap) -> Self {
        Self {
            map,
            allow_from: super::AllowList::default(),
        }
    }
}

/// A map's live counters, from the kernel's per-element counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapCounters {
    /// Packets of the map's connections, both directions, forwarded to or from the VM.
    pub packets: u64,
    /// Bytes (IP packets, headers included) of the same packets.
    pub bytes: u64,
    /// New connections DNAT'd (a connection's first packet).
    pub connections: u64,
    /// First packets dropped because their source is outside `allow_from`.
    pub drops: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_is_spelled_the_same_in_rust_sql_and_json() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        for p in Proto::ALL {
            let back: Proto = c.query_row("SELECT ?1", [p], |r| r.get(0)).unwrap();
            assert_eq!(back, p);
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
            assert_eq!(p.as_str().parse::<Proto>(), Ok(p));
        }
        assert_eq!("TCP".parse::<Proto>(), Err(ProtoError("TCP".into())));
        let bad: rusqlite::Result<Proto> = c.query_row("SELECT 'sctp'", [], |r| r.get(0));
        assert!(bad.is_err());
    }

    #[test]
    fn rule_ids_are_the_originals() {
        let map = |proto| PortMap {
            proto,
            listen_port: 8080,
            target_ip: Ipv4Addr::new(10, 0, 0, 2),
            target_port: 80,
        };
        assert_eq!(map(Proto::Tcp).rule_id(), "8080");
        assert_eq!(map(Proto::Udp).rule_id(), "8080/udp");
    }
}
