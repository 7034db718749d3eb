//! The production `Firewall`: the port-map logic's blocking calls, carried out by the
//! async nftables driver (`net::nft`) on the agent's runtime. It lives with the service
//! that defines the trait, so the driver below knows nothing of the service.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use nlink::netlink::{Connection, Route};
use tokio::runtime::Handle;

use super::{Firewall, FirewallError};
use crate::model::{MapCounters, PortRule, Proto};
use crate::net::antispoof::TunnelGuard;
use crate::net::link;
use crate::net::nft::{self, NatSettings, Nft, NftError};

pub struct NftFirewall {
    nft: Nft,
    /// rtnetlink, for the node's own addresses.
    route: Connection<Route>,
    rt: Handle,
}

/// Setting the node up failed for `why`; the cause is kept as the error's source.
#[derive(Debug, thiserror::Error)]
#[error("{why}: {source}")]
struct SetupError {
    why: &'static str,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

fn setup(
    why: &'static str,
    source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
) -> FirewallError {
    FirewallError::failed(SetupError {
        why,
        source: source.into(),
    })
}

impl NftFirewall {
    /// Prepares the node for port maps: IPv4 forwarding on, the egress interface known
    /// (`nat.external_iface`, else the default route's), and a netlink socket in the
    /// current network namespace. Must run on the runtime that will serve the calls.
    pub async fn from_settings(nat: NatSettings) -> Result<Self, FirewallError> {
        match link::enable_ip_forward() {
            Ok(true) => tracing::info!("net.ipv4.ip_forward was 0; set to 1"),
            Ok(false) => {}
            Err(e) => return Err(setup("cannot enable IPv4 forwarding", e)),
        }
        Self::from_settings_readonly(nat).await
    }

    /// The same driver without touching the node's settings (for `node-vm-agent diff`).
    pub async fn from_settings_readonly(mut nat: NatSettings) -> Result<Self, FirewallError> {
        if nat.external_iface.is_none() {
            nat.external_iface = default_egress(&nat.vms_bridge).await?;
        }
        let nft = Nft::new(nat)?;
        let route = Connection::<Route>::new().map_err(|e| setup("cannot open rtnetlink", e))?;
        Ok(Self {
            nft,
            route,
            rt: Handle::current(),
        })
    }
}

/// EXTERNAL_IFACE unset: the default route's interface; without a default route,
/// `None` (masquerade on every interface but the VM bridge).
async fn default_egress(vms_bridge: &str) -> Result<Option<String>, FirewallError> {
    match link::default_route_iface().await {
        Ok(Some(i)) => {
            tracing::info!(iface = %i, "EXTERNAL_IFACE unset: using the default route's interface");
            Ok(Some(i))
        }
        Ok(None) => {
            tracing::warn!(bridge = %vms_bridge, "EXTERNAL_IFACE unset and no default route: VM egress is masqueraded on every interface but the VM bridge");
            Ok(None)
        }
        Err(e) => Err(setup("cannot read the default route", e)),
    }
}

/// Runs one nftables batch, observed as `node_vm_agent_kernel_apply_duration_seconds`.
fn timed<T>(batch: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let result = batch();
    crate::metrics::global()
        .kernel_apply_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

// Every method blocks on the runtime: callers are on blocking threads (spawn_blocking),
// never on a runtime worker.
impl Firewall for NftFirewall {
    fn apply_all(&self, rules: &[PortRule]) -> Result<(), FirewallError> {
        timed(|| self.rt.block_on(self.nft.apply_all(rules))).map_err(FirewallError::from)
    }

    fn add(&self, rule: &PortRule) -> Result<(), FirewallError> {
        timed(|| self.rt.block_on(self.nft.add(rule))).map_err(FirewallError::from)
    }

    fn remove(&self, rules: &[PortRule]) -> Result<(), FirewallError> {
        timed(|| self.rt.block_on(self.nft.remove_all(rules))).map_err(FirewallError::from)
    }

    fn replace(&self, old: &PortRule, new: &PortRule) -> Result<(), FirewallError> {
        timed(|| self.rt.block_on(self.nft.replace(old, new))).map_err(FirewallError::from)
    }

    fn drift(&self, desired: &[PortRule]) -> Result<Vec<String>, FirewallError> {
        let kernel = self
            .rt
            .block_on(self.nft.read())
            .map_err(FirewallError::from)?;
        let drift = nft::diff(desired, kernel.as_ref());
        if drift.is_empty() {
            return Ok(Vec::new());
        }
        Ok(drift.to_string().lines().map(str::to_owned).collect())
    }

    fn counters(&self) -> Result<BTreeMap<(Proto, u16), MapCounters>, FirewallError> {
        self.rt
            .block_on(self.nft.counters())
            .map_err(FirewallError::from)
    }

    fn forward_accept_drift(&self) -> Result<Vec<String>, FirewallError> {
        self.rt
            .block_on(self.nft.forward_accept_drift())
            .map_err(FirewallError::from)
    }

    fn ensure_forward_accept(&self) -> Result<Vec<String>, FirewallError> {
        let report = self
            .rt
            .block_on(self.nft.ensure_forward_accept())
            .map_err(FirewallError::from)?;
        if !report.changed() {
            return Ok(Vec::new());
        }
        Ok(report
            .touched
            .iter()
            .map(|o| {
                format!(
                    "ip {}: {}removed {} stale",
                    o.chain,
                    if o.inserted {
                        "forward accept inserted at the head, "
                    } else {
                        ""
                    },
                    o.removed_stale
                )
            })
            .collect())
    }

    fn is_local_address(&self, ip: Ipv4Addr) -> Result<bool, FirewallError> {
        self.rt
            .block_on(link::is_local_address(&self.route, ip))
            .map_err(FirewallError::failed)
    }

    fn cleanup(&self) -> Result<(), FirewallError> {
        // Both are tried even if the first fails.
        let accept = self.rt.block_on(self.nft.remove_forward_accept());
        let table = self.rt.block_on(self.nft.delete_table());
        let mut errors: Vec<NftError> = [accept.err(), table.err()].into_iter().flatten().collect();
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0).into()),
            _ => Err(NftError::Several(errors).into()),
        }
    }
}

/// The anti-spoofing chain is part of the agent's table: set here, written by the next
/// `apply_all`.
impl TunnelGuard for NftFirewall {
    fn set_tunnel_sources(&self, nets: &[ipnetwork::Ipv4Network]) {
        self.nft.set_tunnel_sources(nets.to_vec());
    }
}
