//! The mesh conductor: joins the controller in the background, brings the tunnel up from
//! the cached join when the controller is away, follows changes on re-join, and keeps
//! the status `/health` shows and the API's trusted-tunnel check reads.

mod stale;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use ipnetwork::Ipv4Network;
use tokio::sync::watch;
use tokio::time::Instant;

use self::stale::{StaleWatch, Verdict};
use crate::config::MeshSettings;
use crate::join::{self, Backoff, Client, Join, Retry};
use crate::keys::NodeKeys;
use crate::net::antispoof::TunnelGuard;
use crate::net::wireguard::{LinkSpec, TunnelMode, WgError, WgLink};
use crate::portmap::PortMaps;
use crate::store::Store;

/// Where the node stands with the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JoinState {
    /// No CONTROLLER_URL/JOIN_TOKEN/NODE_ID: no tunnel.
    #[default]
    Standalone,
    /// Trying to join; no tunnel yet.
    Joining,
    /// The controller answered during this run; the tunnel follows its answer.
    Joined,
    /// The tunnel runs from a previous join; re-joining in the background.
    Cached,
}

impl JoinState {
    pub fn as_str(self) -> &'static str {
        match self {
            JoinState::Standalone => "standalone",
            JoinState::Joining => "joining",
            JoinState::Joined => "joined",
            JoinState::Cached => "cached",
        }
    }
}

/// What `/health` reports and the trusted-tunnel check reads. Never a secret.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub state: JoinState,
    pub node_ip: Option<Ipv4Addr>,
    pub controller_nets: Vec<Ipv4Network>,
    pub tunnel: Option<TunnelMode>,
    pub last_handshake: Option<SystemTime>,
    /// No handshake for WG_STALE_AFTER: the agent is re-joining.
    pub stale: bool,
    /// The last join or tunnel error, for operators.
    pub error: Option<String>,
    /// Bytes received from and sent to the controller through the tunnel, as of the
    /// last look at it.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Shared, cheap to read from request handlers.
#[derive(Debug, Default)]
pub struct MeshStatus {
    trust_tunnel: bool,
    inner: RwLock<Status>,
}

impl MeshStatus {
    pub fn new(trust_tunnel: bool, state: JoinState) -> Self {
        Self {
            trust_tunnel,
            inner: RwLock::new(Status {
                state,
                ..Status::default()
            }),
        }
    }

    pub fn snapshot(&self) -> Status {
        match self.inner.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Changes the status; a new join state, a tunnel come up or gone, or a tunnel gone
    /// stale or live again is published to `GET /events`.
    fn update(&self, f: impl FnOnce(&mut Status)) {
        let look = |s: &Status| (s.state, s.tunnel.is_some(), s.stale);
        let (before, after) = {
            let mut s = self.inner.write().unwrap_or_else(|p| p.into_inner());
            let before = look(&s);
            f(&mut s);
            (before, look(&s))
        };
        use crate::events::{Kind, publish};
        if before.0 != after.0 {
            publish(
                Kind::MeshState,
                "mesh",
                serde_json::json!({ "state": after.0.as_str(), "previous": before.0.as_str() }),
            );
        }
        if (before.1, before.2) != (after.1, after.2) {
            let tunnel = match after {
                (_, false, _) => "down",
                (_, true, true) => "stale",
                (_, true, false) => "live",
            };
            publish(
                Kind::MeshTunnel,
                "mesh",
                serde_json::json!({ "tunnel": tunnel }),
            );
        }
    }

    /// Whether a connection accepted on `local` from `peer` came through the tunnel from
    /// the controller: its local address is the node's tunnel address and its peer one
    /// of the controller's allowed IPs. The agent's anti-spoofing rule drops those source
    /// addresses on every other interface, so they cannot be forged from outside.
    pub fn is_controller_tunnel(&self, local: IpAddr, peer: IpAddr) -> bool {
        if !self.trust_tunnel {
            return false;
        }
        let (IpAddr::V4(local), IpAddr::V4(peer)) = (to_v4(local), to_v4(peer)) else {
            return false;
        };
        let s = self.snapshot();
        s.node_ip == Some(local) && s.controller_nets.iter().any(|n| n.contains(peer))
    }
}

/// IPv4-mapped IPv6 (a dual-stack listener) as plain IPv4.
fn to_v4(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Everything the background task needs.
pub struct Mesh {
    pub settings: MeshSettings,
    /// DATA_DIR, where the join response is kept.
    pub data_dir: std::path::PathBuf,
    pub store: Store,
    pub keys: NodeKeys,
    /// The anti-spoofing rule; written into the kernel by `portmaps.restore()`.
    pub guard: Arc<dyn TunnelGuard>,
    pub portmaps: Arc<PortMaps>,
    pub status: Arc<MeshStatus>,
}

type SharedLink = Arc<Mutex<WgLink>>;

impl Mesh {
    fn spec(&self, j: &Join) -> LinkSpec {
        LinkSpec {
            ifname: self.settings.wg_iface.clone(),
            private_key: self.keys.private().clone(),
            listen_port: self.settings.wg_listen_port,
            address: j.node_ip,
            peer_key: j.controller_pubkey.clone(),
            endpoint: j.endpoint.clone(),
            keepalive: self.settings.keepalive(),
            mesh: j.wg_net,
            mtu: self.settings.wg_mtu,
        }
    }

    /// Makes the link, and the anti-spoofing rule, match `j`; then trusts the tunnel.
    async fn apply(&self, link: &mut Option<SharedLink>, j: &Join) -> Result<(), LinkError> {
        let spec = self.spec(j);
        let existing = link.clone();
        let ifname = self.settings.wg_iface.clone();
        let mode = self.settings.wg_mode;
        let rt = tokio::runtime::Handle::current();
        let (shared, changed) = tokio::task::spawn_blocking(move || {
            let shared = match existing {
                Some(l) => l,
                None => Arc::new(Mutex::new(WgLink::open(&ifname, mode, rt)?)),
            };
            let changed = {
                let l = shared.lock().map_err(|_| LinkError::Poisoned)?;
                l.apply(&spec).map_err(LinkError::from)
            };
            // Keep the link even if configuring failed: a userspace device must not be
            // dropped, and the next attempt retries the configuration.
            Ok::<_, LinkError>((shared, changed))
        })
        .await??;
        let tunnel = shared.lock().map(|l| l.mode()).ok();
        *link = Some(shared);
        let changed = changed?;
        if changed.is_empty() {
            tracing::info!(iface = %self.settings.wg_iface, "WireGuard link already as wanted; left alone");
        } else {
            tracing::info!(iface = %self.settings.wg_iface, changed = ?changed, node_ip = %j.node_ip, "WireGuard link configured");
        }

        // The anti-spoofing rule goes into the kernel before the API trusts the address.
        self.guard.set_tunnel_sources(&j.allowed_ips);
        self.portmaps
            .restore()
            .await
            .map_err(LinkError::AntiSpoofing)?;
        self.status.update(|s| {
            s.node_ip = Some(j.node_ip);
            s.controller_nets = j.allowed_ips.clone();
            s.tunnel = tunnel;
        });
        Ok(())
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let Some(client) = self.client() else {
            return;
        };
        let mut l = self.start().await;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(l.next_join), if l.joining => {
                    self.join_due(&client, &mut l).await
                }
                _ = tokio::time::sleep_until(l.next_poll) => self.poll_due(&mut l).await,
            }
        }
        if let Some(link) = l.link
            && let Ok(m) = Arc::try_unwrap(link)
            && let Ok(link) = m.into_inner()
        {
            let _ = tokio::task::spawn_blocking(move || link.shutdown()).await;
        }
    }

    /// The controller client, when the settings ask for a join and it can be built.
    fn client(&self) -> Option<Client> {
        let Ok(Some(join_settings)) = self.settings.join_settings() else {
            return None;
        };
        Client::new(
            join_settings,
            self.keys.public_base64(),
            self.settings.join_timeout(),
        )
        .map_err(|e| tracing::error!(error = %e, "mesh join disabled"))
        .ok()
    }

    /// The loop's first state: the tunnel up from the cached join when it was made for
    /// this key; a join due at once.
    async fn start(&self) -> JoinLoop {
        let (first_delay, longest_delay) = self.settings.join_backoff();
        let mut l = JoinLoop {
            link: None,
            current: None,
            applied: false,
            held_back: None,
            key_unconfirmed: false,
            stale_rejoin: false,
            joining: true,
            backoff: Backoff::new(first_delay, longest_delay),
            stale: StaleWatch::new(self.settings.stale_after(), first_delay, longest_delay),
            next_join: Instant::now(),
            next_poll: Instant::now(),
        };
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || join::load_cached(&store)).await {
            Ok(Ok(Some((j, key)))) if key == self.keys.public_base64() => {
                tracing::info!(node_ip = %j.node_ip, endpoint = %j.endpoint, "bringing the tunnel up from the previous join; re-joining in the background");
                self.bring_up_cached(&mut l.link, &mut l.applied, &j).await;
                l.current = Some(j);
            }
            Ok(Ok(Some((j, _)))) => {
                tracing::info!(
                    "the node's WireGuard key is not the one of the previous join; joining before the tunnel comes up"
                );
                l.held_back = Some(j);
            }
            Ok(Ok(None)) => {}
            other => {
                tracing::warn!(result = ?other.map(|r| r.map(|_| ())), "cannot read the cached join")
            }
        }
        if l.applied {
            l.stale.configured(SystemTime::now());
        }
        l
    }

    /// A join is due: joined (the link follows the answer), or when the next one is.
    async fn join_due(&self, client: &Client, l: &mut JoinLoop) {
        match client.join_once().await {
            Ok(j) => {
                l.backoff.reset();
                l.next_join = Instant::now() + self.settings.join_refresh();
                l.held_back = None;
                self.joined(&mut l.link, &mut l.current, &mut l.applied, j)
                    .await;
                if std::mem::take(&mut l.key_unconfirmed) | std::mem::take(&mut l.stale_rejoin) {
                    self.restart_handshake(&l.link, &l.current).await;
                }
                l.stale.configured(SystemTime::now());
                // A reconfigured peer needs a new handshake: look (and nudge) now.
                l.next_poll = Instant::now();
            }
            Err(e) => self.join_failed(client, l, e).await,
        }
    }

    /// A join failed: retried after the backoff, slowly, or never, by what the failure
    /// means; the previous join of another key brought up once the controller is away.
    async fn join_failed(&self, client: &Client, l: &mut JoinLoop, e: join::JoinError) {
        let msg = e.to_string();
        match e.kind() {
            Retry::Backoff => {
                let d = l.backoff.next_delay();
                tracing::warn!(error = %msg, retry_in_ms = d.as_millis() as u64, url = client.url(), "join failed; retrying");
                l.next_join = Instant::now() + d;
                if let Some(j) = l.held_back.take() {
                    tracing::info!(node_ip = %j.node_ip, "the controller cannot be reached: bringing the tunnel up from the previous join with the new key");
                    self.bring_up_cached(&mut l.link, &mut l.applied, &j).await;
                    l.stale.configured(SystemTime::now());
                    l.current = Some(j);
                    l.key_unconfirmed = true;
                }
            }
            Retry::Slow => {
                tracing::error!(error = %msg, retry_in_s = l.backoff.max().as_secs(), "join refused by the controller's configuration; retrying slowly");
                l.next_join = Instant::now() + l.backoff.max();
            }
            Retry::Never => {
                tracing::error!(error = %msg, "join stopped; no further attempt until the agent restarts");
                l.joining = false;
            }
        }
        self.status.update(|s| s.error = Some(msg));
    }

    /// A look at the handshake is due: a dead tunnel brings the next join forward.
    async fn poll_due(&self, l: &mut JoinLoop) {
        let has_handshake = self.poll_handshake(&l.link, &l.current, &mut l.stale).await;
        if l.applied
            && l.joining
            && let Some(delay) = self.watch_staleness(&mut l.stale)
        {
            l.next_join = Instant::now() + delay;
            l.stale_rejoin = true;
        }
        // Often until the first handshake (health shows it at once), then rarely,
        // unless the tunnel has gone quiet.
        l.next_poll = Instant::now()
            + if has_handshake {
                l.stale.look_interval()
            } else {
                Duration::from_millis(200)
            };
    }

    /// Looks at the handshake's age; `Some(delay)` when a re-join is due after `delay`.
    /// Logs each transition once.
    fn watch_staleness(&self, stale: &mut StaleWatch) -> Option<Duration> {
        let verdict = stale.check(
            self.snapshot_handshake(),
            SystemTime::now(),
            std::time::Instant::now(),
        );
        match verdict {
            Verdict::Wait => None,
            Verdict::Rejoin { age, first, delay } => {
                if first {
                    tracing::warn!(
                        age_s = age.as_secs(),
                        rejoin_in_ms = delay.as_millis() as u64,
                        "no handshake with the controller for WG_STALE_AFTER: the tunnel is dead; re-joining"
                    );
                    self.status.update(|s| s.stale = true);
                } else {
                    tracing::debug!(
                        age_s = age.as_secs(),
                        "the tunnel is still dead; re-joining"
                    );
                }
                Some(delay)
            }
            Verdict::Back { after } => {
                tracing::info!(
                    after_ms = after.as_millis() as u64,
                    "handshake with the controller again; the tunnel is back"
                );
                self.status.update(|s| s.stale = false);
                None
            }
        }
    }

    /// The tunnel from a previous run's join (the controller is not asked first).
    async fn bring_up_cached(&self, link: &mut Option<SharedLink>, applied: &mut bool, j: &Join) {
        match self.apply(link, j).await {
            Ok(()) => {
                *applied = true;
                self.status.update(|s| s.state = JoinState::Cached);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot bring the tunnel up from the previous join");
                self.status.update(|s| s.error = Some(e.to_string()));
            }
        }
    }

    /// Starts a new handshake now (the controller ignored earlier ones) and sends the
    /// packet that makes the link initiate it.
    async fn restart_handshake(&self, link: &Option<SharedLink>, current: &Option<Join>) {
        let (Some(link), Some(j)) = (link.clone(), current.clone()) else {
            return;
        };
        let spec = self.spec(&j);
        match on_link(link, move |l| l.restart_handshake(&spec)).await {
            Ok(changed) => {
                tracing::info!(changed = ?changed, "the controller knows the node now; handshaking again");
                nudge(&j);
            }
            Err(e) => tracing::warn!(error = %e, "cannot restart the handshake"),
        }
    }

    async fn joined(
        &self,
        link: &mut Option<SharedLink>,
        current: &mut Option<Join>,
        applied: &mut bool,
        j: Join,
    ) {
        let (store, dir, jc) = (self.store.clone(), self.data_dir.clone(), j.clone());
        let (node_id, pubkey, url) = (
            self.settings.node_id.clone().unwrap_or_default(),
            self.keys.public_base64(),
            self.settings.controller_url.clone().unwrap_or_default(),
        );
        match tokio::task::spawn_blocking(move || {
            join::save(&store, &dir, &jc, &node_id, &pubkey, &url)
        })
        .await
        {
            Ok(Ok(())) => {}
            other => {
                tracing::error!(result = ?other.map(|r| r.map_err(|e| e.to_string())), "cannot keep the join response")
            }
        }
        let differs = current.as_ref().is_none_or(|c| c.link_differs(&j));
        if differs || !*applied {
            if let Some(old) = current.as_ref().filter(|_| differs) {
                tracing::info!(old_ip = %old.node_ip, new_ip = %j.node_ip, old_endpoint = %old.endpoint, new_endpoint = %j.endpoint, "the controller changed the tunnel; applying without restart");
            }
            match self.apply(link, &j).await {
                Ok(()) => {
                    *applied = true;
                    tracing::info!(node_ip = %j.node_ip, endpoint = %j.endpoint, "joined the mesh");
                    self.status.update(|s| {
                        s.state = JoinState::Joined;
                        s.error = None;
                    });
                }
                Err(e) => {
                    *applied = false;
                    tracing::error!(error = %e, "joined, but the tunnel cannot be configured");
                    self.status.update(|s| s.error = Some(e.to_string()));
                }
            }
        } else {
            self.status.update(|s| {
                s.state = JoinState::Joined;
                s.error = None;
            });
        }
        *current = Some(j);
    }

    /// Reads the peer's last handshake and received bytes; sends the probe datagram
    /// when nothing came from the controller since the last look (a live controller
    /// answers it: an ICMP port unreachable through the tunnel, or, where that is
    /// dropped, the new handshake WireGuard starts 15 s after data that got no answer).
    /// Returns whether there was a handshake.
    async fn poll_handshake(
        &self,
        link: &Option<SharedLink>,
        current: &Option<Join>,
        stale: &mut StaleWatch,
    ) -> bool {
        let (Some(link), Some(j)) = (link.clone(), current.as_ref()) else {
            return false;
        };
        let key = j.controller_pubkey.clone();
        match on_link(link, move |l| l.peer_activity(&key)).await {
            Ok(activity) => {
                let t = activity.last_handshake;
                let heard = stale.received(activity.rx_bytes, SystemTime::now());
                if t.is_none() || !heard {
                    nudge(j);
                }
                let first = t.is_some() && self.snapshot_handshake().is_none();
                if first {
                    tracing::info!("first handshake with the controller");
                }
                self.status.update(|s| {
                    s.last_handshake = t;
                    s.rx_bytes = activity.rx_bytes;
                    s.tx_bytes = activity.tx_bytes;
                });
                t.is_some()
            }
            _ => false,
        }
    }

    fn snapshot_handshake(&self) -> Option<SystemTime> {
        self.status.snapshot().last_handshake
    }
}

/// The join loop's state between two of its events.
struct JoinLoop {
    link: Option<SharedLink>,
    /// The join the link was last configured from.
    current: Option<Join>,
    /// Whether the link has been configured at least once in this run.
    applied: bool,
    /// A cached join made for another key: used only if the controller cannot be
    /// reached, since the controller does not know the new key before a join.
    held_back: Option<Join>,
    /// The tunnel runs from a cached join with a key the controller may not know yet:
    /// once a join registers it, the handshake is started again at once.
    key_unconfirmed: bool,
    /// A re-join because the tunnel went stale: once it succeeds, the handshake is
    /// started again (the controller forgot the session) and the endpoint resolved anew.
    stale_rejoin: bool,
    /// False once the controller refused for good (no further attempt).
    joining: bool,
    backoff: Backoff,
    stale: StaleWatch,
    next_join: Instant,
    next_poll: Instant,
}

/// Why the WireGuard link could not be brought to what a join says.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Wg(#[from] WgError),
    /// A panic while the link was held: nothing can be known of its state.
    #[error("the WireGuard link's lock was poisoned by a panic")]
    Poisoned,
    /// The blocking task that drives the link died (a panic) or was cancelled.
    #[error("the WireGuard link task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot install the anti-spoofing rule: {0}")]
    AntiSpoofing(#[source] crate::portmap::PortMapError),
}

/// Runs `f` on the link, off the runtime (the link's calls block).
async fn on_link<T: Send + 'static>(
    link: SharedLink,
    f: impl FnOnce(&WgLink) -> Result<T, WgError> + Send + 'static,
) -> Result<T, LinkError> {
    tokio::task::spawn_blocking(move || {
        let l = link.lock().map_err(|_| LinkError::Poisoned)?;
        Ok(f(&l)?)
    })
    .await?
}

/// Sends one datagram to the controller's tunnel address (the discard port) so that the
/// link starts its handshake now: boringtun, unlike the kernel, waits for traffic or the
/// first keepalive (25 s) before initiating, and the original controller polls /health
/// over the tunnel right after the join.
fn nudge(j: &Join) {
    let Some(net) = j.allowed_ips.first() else {
        return;
    };
    let target = std::net::SocketAddr::from((net.ip(), 9));
    if let Ok(sock) = std::net::UdpSocket::bind((j.node_ip, 0)) {
        let _ = sock.set_nonblocking(true);
        let _ = sock.send_to(b"", target);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_is_trusted_only_on_the_tunnel_address_from_the_controller() {
        let m = MeshStatus::new(true, JoinState::Joining);
        let local: IpAddr = "10.50.0.2".parse().unwrap();
        let ctl: IpAddr = "10.50.0.1".parse().unwrap();
        assert!(
            !m.is_controller_tunnel(local, ctl),
            "nothing trusted before the join"
        );
        m.update(|s| {
            s.node_ip = Some(Ipv4Addr::new(10, 50, 0, 2));
            s.controller_nets = vec!["10.50.0.1/32".parse().unwrap()];
        });
        assert!(m.is_controller_tunnel(local, ctl));
        assert!(m.is_controller_tunnel(
            "::ffff:10.50.0.2".parse().unwrap(),
            "::ffff:10.50.0.1".parse().unwrap()
        ));
        assert!(!m.is_controller_tunnel(local, "10.50.0.3".parse().unwrap()));
        assert!(!m.is_controller_tunnel("192.0.2.1".parse().unwrap(), ctl));
        let off = MeshStatus::new(false, JoinState::Joined);
        off.update(|s| {
            s.node_ip = Some(Ipv4Addr::new(10, 50, 0, 2));
            s.controller_nets = vec!["10.50.0.1/32".parse().unwrap()];
        });
        assert!(!off.is_controller_tunnel(local, ctl));
    }
}
