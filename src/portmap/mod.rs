//! Port maps: node port -> VM ip:port, their validation and the desired ruleset.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

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

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("proto must be \"tcp\" or \"udp\", not {other:?}")),
        }
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
        rule_id(self.proto, self.listen_port)
    }
}

pub fn rule_id(proto: Proto, listen_port: u16) -> String {
    match proto {
        Proto::Tcp => listen_port.to_string(),
        Proto::Udp => format!("{listen_port}/udp"),
    }
}

mod firewall;
mod import;
mod policy;
mod service;

pub use firewall::{Firewall, FirewallError, FirewallErrorKind, MemoryFirewall};
pub use import::import_original_state;
pub use policy::Policy;
pub use service::{CreateOutcome, PortMapError, PortMaps, ReconcileReport};
