//! Settings of the mesh: the join (controller, token, node id, retries) and the
//! WireGuard link it brings up (decisions §7, §8).

use std::time::Duration;

use clap::{Args, ValueEnum};

use super::error::{SettingError, names_with_verb};
use super::parse_ifname;

/// How the WireGuard link is implemented (the setting WG_MODE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WgMode {
    /// The kernel module where it exists, else the embedded userspace implementation.
    Auto,
    /// The kernel module only (fails without it).
    Kernel,
    /// The embedded userspace implementation (boringtun over /dev/net/tun) only.
    Userspace,
}

/// The join and the WireGuard link; the mesh task takes this group as it is.
#[derive(Args, Clone, Debug)]
pub struct MeshSettings {
    /// Controller API base URL, for the mesh join.
    ///
    /// http:// or https://. With JOIN_TOKEN and NODE_ID the node joins the mesh; with
    /// none of the three it runs standalone (no tunnel); one or two of them stop the
    /// agent at startup with an error naming the missing ones.
    #[arg(long, env = "CONTROLLER_URL", value_name = "CONTROLLER_URL")]
    pub controller_url: Option<String>,

    /// Join token, sent as X-Join-Token on `POST {CONTROLLER_URL}/join`.
    #[arg(
        long,
        env = "JOIN_TOKEN",
        value_name = "JOIN_TOKEN",
        hide_env_values = true
    )]
    pub join_token: Option<String>,

    /// Unique node identifier, sent on join.
    ///
    /// 1 to 128 printable characters.
    #[arg(long, env = "NODE_ID", value_name = "NODE_ID")]
    pub node_id: Option<String>,

    /// WireGuard interface name.
    ///
    /// Traffic leaving through it is masqueraded (multi-hop proxy chains). Once joined,
    /// the controller's tunnel address is accepted as a source only through it.
    #[arg(long, env = "WG_IFACE", value_name = "WG_IFACE", default_value = "wg0", value_parser = parse_ifname)]
    pub wg_iface: String,

    /// WireGuard listen port.
    ///
    /// 1..65535; when set, refused as a port-map listen port. Unset: a port the system
    /// chooses.
    #[arg(long, env = "WG_LISTEN_PORT", value_name = "WG_LISTEN_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub wg_listen_port: Option<u16>,

    /// WireGuard implementation.
    ///
    /// `auto` logs which one it chose. A kernel link stays up when the agent stops; a
    /// userspace link goes down with the process.
    #[arg(
        long,
        env = "WG_MODE",
        value_name = "WG_MODE",
        value_enum,
        default_value = "auto"
    )]
    pub wg_mode: WgMode,

    /// MTU of the WireGuard link.
    ///
    /// 576..9000.
    #[arg(long, env = "WG_MTU", value_name = "WG_MTU", default_value_t = 1420, value_parser = clap::value_parser!(u32).range(576..=9000))]
    pub wg_mtu: u32,

    /// Persistent keepalive towards the controller, in seconds.
    ///
    /// 0: off.
    #[arg(
        long,
        env = "WG_KEEPALIVE",
        value_name = "WG_KEEPALIVE",
        default_value_t = 25
    )]
    pub wg_keepalive: u16,

    /// Seconds of silence from the controller after which the tunnel counts as dead.
    ///
    /// 0..86400; 0: off. Silence: no handshake and no packet from the controller through
    /// the tunnel (a controller that restarted and forgot its peers). The agent sends the
    /// controller's tunnel address a probe datagram (UDP port 9) whenever the tunnel has
    /// been quiet for a look (every 5 s; every second once quiet for half of
    /// WG_STALE_AFTER); a live controller answers it (an ICMP port unreachable or, where
    /// that is dropped, WireGuard's passive keepalive 10 s later), one that forgot the
    /// node does not.
    ///
    /// Dead, the agent re-joins after a random delay of at most a quarter of
    /// WG_STALE_AFTER and 10 s (so a fleet does not re-join at once) and restarts the
    /// handshake (re-resolving a DNS endpoint); while it stays dead it re-joins with the
    /// join backoff, at most 10 s apart. /health says `tunnel_stale` meanwhile.
    #[arg(long, env = "WG_STALE_AFTER", value_name = "WG_STALE_AFTER", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub wg_stale_after: u64,

    /// First delay after a failed join, in milliseconds.
    ///
    /// 10..600000. A failed join is a network error or a 5xx; the delay d doubles after
    /// every failure, with jitter in [d/2, d], up to JOIN_RETRY_MAX.
    #[arg(long, env = "JOIN_RETRY_INITIAL_MS", value_name = "JOIN_RETRY_INITIAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub join_retry_initial_ms: u64,

    /// Longest delay between two join attempts, in seconds.
    ///
    /// 1..3600. The attempts never stop, but a 403 (wrong JOIN_TOKEN) or 400 answer
    /// stops them at once.
    #[arg(long, env = "JOIN_RETRY_MAX", value_name = "JOIN_RETRY_MAX", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub join_retry_max: u64,

    /// Seconds between two re-joins once joined.
    ///
    /// 1..86400. A changed node_ip, endpoint or controller key is applied then, without
    /// a restart.
    #[arg(long, env = "JOIN_REFRESH_INTERVAL", value_name = "JOIN_REFRESH_INTERVAL", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub join_refresh_interval: u64,

    /// Timeout of one join request, in seconds.
    ///
    /// 1..300.
    #[arg(long, env = "JOIN_TIMEOUT", value_name = "JOIN_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub join_timeout: u64,

    /// Authorise the controller's requests through the tunnel without a token.
    ///
    /// Requests accepted on the node's tunnel address, through WG_IFACE, from the
    /// controller's tunnel address (allowed_ips of the join answer) need no token, as the
    /// original controller's proxy sends no authentication header; that source address
    /// is dropped on every other interface.
    #[arg(long, env = "TRUST_CONTROLLER_TUNNEL", value_name = "TRUST_CONTROLLER_TUNNEL", default_value_t = true, action = clap::ArgAction::Set)]
    pub trust_controller_tunnel: bool,
}

impl MeshSettings {
    /// The three join settings, when all are set; `None` when none is (standalone). One
    /// or two of them is an error: the operator meant to join and forgot something.
    pub fn join_settings(&self) -> Result<Option<JoinSettings<'_>>, SettingError> {
        match (&self.controller_url, &self.join_token, &self.node_id) {
            (Some(url), Some(token), Some(node_id)) => Ok(Some(JoinSettings {
                url,
                token,
                node_id,
            })),
            (None, None, None) => Ok(None),
            (url, token, node_id) => {
                let all = [
                    ("CONTROLLER_URL", url.is_some()),
                    ("JOIN_TOKEN", token.is_some()),
                    ("NODE_ID", node_id.is_some()),
                ];
                let names = |present: bool| -> Vec<&str> {
                    all.iter()
                        .filter(|(_, p)| *p == present)
                        .map(|(v, _)| *v)
                        .collect()
                };
                Err(SettingError::IncompleteJoin {
                    set: names_with_verb(&names(true)),
                    missing: names_with_verb(&names(false)),
                    set_names: names(true).join(" and "),
                })
            }
        }
    }

    pub fn join_timeout(&self) -> Duration {
        Duration::from_secs(self.join_timeout)
    }

    /// The first and the longest delay between two join attempts.
    pub fn join_backoff(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.join_retry_initial_ms),
            Duration::from_secs(self.join_retry_max),
        )
    }

    pub fn join_refresh(&self) -> Duration {
        Duration::from_secs(self.join_refresh_interval)
    }

    /// WG_STALE_AFTER, `None` when 0 (off).
    pub fn stale_after(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.wg_stale_after)).filter(|d| !d.is_zero())
    }

    /// WG_KEEPALIVE, `None` when 0 (off).
    pub fn keepalive(&self) -> Option<u16> {
        Some(self.wg_keepalive).filter(|k| *k > 0)
    }
}

/// The settings of the mesh join, all three present.
#[derive(Clone, Copy, Debug)]
pub struct JoinSettings<'a> {
    pub url: &'a str,
    pub token: &'a str,
    pub node_id: &'a str,
}
