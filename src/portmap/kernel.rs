//! The production `Firewall`: the port-map logic's calls, carried out by the async
//! nftables driver (`net::nft`) on the agent's runtime. It lives with the service
//! that defines the trait, so the driver below knows nothing of the service.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use nlink::netlink::{Connection, Route};

use super::firewall::FwFuture;
use super::{Firewall, FirewallError};
use crate::model::{MapCounters, PortRule, Proto};
use crate::net::antispoof::TunnelGuard;
use crate::net::link;
use crate::net::nft::{self, NatSettings, Nft, NftError};

pub struct NftFirewall {
    nft: Nft,
    /// rtnetlink, for the node's own addresses.
    route: Connection<Route>,
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
    /// current network namespace.
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
        Ok(Self { nft, route })
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
async fn timed<T>(
    batch: impl std::future::Future<Output = Result<T, NftError>>,
) -> Result<T, FirewallError> {
    let started = std::time::Instant::now();
    let result = batch.await;
    crate::metrics::global()
        .kernel_apply_duration
        .observe(started.elapsed().as_secs_f64());
    result.map_err(FirewallError::from)
}

/// What `ensure_forward_accept` changed, a line per chain; none when nothing changed.
fn forward_accept_lines(report: &nft::ForwardAcceptReport) -> Vec<String> {
    if !report.changed() {
        return Vec::new();
    }
    report
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
        .collect()
}

// Every call is a netlink exchange awaited on the agent's runtime.
impl Firewall for NftFirewall {
    fn apply_all<'a>(&'a self, rules: &'a [PortRule]) -> FwFuture<'a, ()> {
        Box::pin(timed(self.nft.apply_all(rules)))
    }

    fn add<'a>(&'a self, rule: &'a PortRule) -> FwFuture<'a, ()> {
        Box::pin(timed(self.nft.add(rule)))
    }

    fn remove<'a>(&'a self, rules: &'a [PortRule]) -> FwFuture<'a, ()> {
        Box::pin(timed(self.nft.remove_all(rules)))
    }

    fn replace<'a>(&'a self, old: &'a PortRule, new: &'a PortRule) -> FwFuture<'a, ()> {
        Box::pin(timed(self.nft.replace(old, new)))
    }

    fn drift<'a>(&'a self, desired: &'a [PortRule]) -> FwFuture<'a, Vec<String>> {
        Box::pin(async move {
            let kernel = self.nft.read().await.map_err(FirewallError::from)?;
            let drift = nft::diff(desired, kernel.as_ref());
            if drift.is_empty() {
                return Ok(Vec::new());
            }
            Ok(drift.to_string().lines().map(str::to_owned).collect())
        })
    }

    fn counters(&self) -> FwFuture<'_, BTreeMap<(Proto, u16), MapCounters>> {
        Box::pin(async move { self.nft.counters().await.map_err(FirewallError::from) })
    }

    fn forward_accept_drift(&self) -> FwFuture<'_, Vec<String>> {
        Box::pin(async move {
            self.nft
                .forward_accept_drift()
                .await
                .map_err(FirewallError::from)
        })
    }

    fn ensure_forward_accept(&self) -> FwFuture<'_, Vec<String>> {
        Box::pin(async move {
            let report = self
                .nft
                .ensure_forward_accept()
                .await
                .map_err(FirewallError::from)?;
            Ok(forward_accept_lines(&report))
        })
    }

    fn is_local_address(&self, ip: Ipv4Addr) -> FwFuture<'_, bool> {
        Box::pin(async move {
            link::is_local_address(&self.route, ip)
                .await
                .map_err(FirewallError::failed)
        })
    }

    fn cleanup(&self) -> FwFuture<'_, ()> {
        Box::pin(async move {
            // Both are tried even if the first fails.
            let accept = self.nft.remove_forward_accept().await;
            let table = self.nft.delete_table().await;
            let mut errors: Vec<NftError> =
                [accept.err(), table.err()].into_iter().flatten().collect();
            match errors.len() {
                0 => Ok(()),
                1 => Err(errors.remove(0).into()),
                _ => Err(NftError::Several(errors).into()),
            }
        })
    }
}

/// The anti-spoofing chain is part of the agent's table: set here, written by the next
/// `apply_all`.
impl TunnelGuard for NftFirewall {
    fn set_tunnel_sources(&self, nets: &[ipnetwork::Ipv4Network]) {
        self.nft.set_tunnel_sources(nets.to_vec());
    }
}
