//! The WireGuard link (WG_IFACE), configured in-process: the kernel module over its
//! generic-netlink API, or defguard's embedded boringtun over /dev/net/tun where the module
//! is missing. Addresses, MTU and the mesh route go through rtnetlink (nlink).
//!
//! [`WgLink::apply`] is idempotent: a link that already has the wanted configuration (an
//! agent restart with the kernel module) is left alone, so no address is flushed and no
//! handshake is lost; a different configuration is changed in place, piece by piece.
//!
//! A kernel link outlives the agent (the mesh stays reachable across restarts). A
//! userspace link is a tun device owned by the agent's process: it goes down with it.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::SystemTime;

use defguard_wireguard_rs::host::Host;
use defguard_wireguard_rs::key::Key;
use defguard_wireguard_rs::net::IpAddrMask;
use defguard_wireguard_rs::peer::Peer;
use defguard_wireguard_rs::{
    InterfaceConfiguration, Kernel, Userspace, WGApi, WireguardInterfaceApi,
};
use ipnetwork::Ipv4Network;
use nlink::netlink::route::Ipv4Route;
use nlink::netlink::types::route::{RouteProtocol, RouteScope};
use nlink::netlink::{Connection, Route};
use tokio::runtime::Handle;

pub use crate::config::WgMode;

/// `RT_TABLE_MAIN`.
const RT_TABLE_MAIN: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// WireGuard refused or failed (kernel genetlink or the userspace device).
    #[error("WireGuard link {ifname}: {op}: {reason}")]
    Wireguard {
        ifname: String,
        op: &'static str,
        reason: String,
    },
    /// rtnetlink refused or failed (addresses, MTU, routes).
    #[error("link {ifname}: {op}: {source}")]
    Netlink {
        ifname: String,
        op: &'static str,
        #[source]
        source: nlink::Error,
    },
    /// The link cannot be used the way WG_MODE asks.
    #[error("{0}")]
    Mode(String),
    /// The controller's endpoint does not resolve.
    #[error("cannot resolve the controller endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
}

/// Which implementation carries the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelMode {
    Kernel,
    Userspace,
}

impl TunnelMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelMode::Kernel => "kernel",
            TunnelMode::Userspace => "userspace",
        }
    }
}

/// What is already there under WG_IFACE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Existing {
    Absent,
    /// A kernel WireGuard link (`kind wireguard`).
    Wireguard,
    /// Something else (`kind` as rtnetlink reports it; a userspace WireGuard is a `tun`).
    Other(Option<String>),
}

/// The outcome of [`choose`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub mode: TunnelMode,
    /// The kernel link was created while probing (auto/kernel on an absent link).
    pub created: bool,
    /// Why auto fell back to userspace.
    pub fallback: Option<String>,
}

/// Picks the implementation. `kernel_create` tries to create a kernel WireGuard link
/// (it fails where the module is missing); it is only called when the link is absent
/// and WG_MODE allows the kernel.
pub fn choose(
    mode: WgMode,
    existing: &Existing,
    kernel_create: impl FnOnce() -> Result<(), WgError>,
) -> Result<Choice, WgError> {
    let kernel = |created| Choice {
        mode: TunnelMode::Kernel,
        created,
        fallback: None,
    };
    match (existing, mode) {
        (Existing::Other(kind), _) => Err(WgError::Mode(format!(
            "WG_IFACE already exists as a {} link, not a WireGuard link this agent can take over \
             (a userspace WireGuard of another process?); delete it or choose another WG_IFACE",
            kind.as_deref().unwrap_or("non-WireGuard")
        ))),
        (Existing::Wireguard, WgMode::Userspace) => Err(WgError::Mode(
            "WG_IFACE is a kernel WireGuard link and WG_MODE=userspace cannot take it over; \
             use WG_MODE=auto or kernel, or delete the link"
                .into(),
        )),
        (Existing::Wireguard, WgMode::Auto | WgMode::Kernel) => Ok(kernel(false)),
        (Existing::Absent, WgMode::Userspace) => Ok(Choice {
            mode: TunnelMode::Userspace,
            created: false,
            fallback: None,
        }),
        (Existing::Absent, WgMode::Kernel) => match kernel_create() {
            Ok(()) => Ok(kernel(true)),
            Err(e) => Err(WgError::Mode(format!(
                "WG_MODE=kernel but the kernel cannot create a WireGuard link ({e}); \
                 load the wireguard module or use WG_MODE=auto/userspace"
            ))),
        },
        (Existing::Absent, WgMode::Auto) => match kernel_create() {
            Ok(()) => Ok(kernel(true)),
            Err(e) => Ok(Choice {
                mode: TunnelMode::Userspace,
                created: false,
                fallback: Some(e.to_string()),
            }),
        },
    }
}

/// The wanted configuration of the link.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkSpec {
    pub ifname: String,
    pub private_key: Key,
    /// `None`: whatever port the kernel (or boringtun) picked.
    pub listen_port: Option<u16>,
    /// The node's tunnel address, configured as `/32`.
    pub address: Ipv4Addr,
    pub peer_key: Key,
    pub endpoint: String,
    pub keepalive: Option<u16>,
    /// The peer's allowed IPs and the route through the link: the mesh subnet.
    pub mesh: Ipv4Network,
    pub mtu: u32,
}

impl std::fmt::Debug for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSpec")
            .field("ifname", &self.ifname)
            .field("address", &self.address)
            .field("endpoint", &self.endpoint)
            .field("mesh", &self.mesh)
            .finish_non_exhaustive()
    }
}

enum Api {
    Kernel(WGApi<Kernel>),
    /// Holds the boringtun device: dropping it takes the link down.
    Userspace(WGApi<Userspace>),
}

/// What the tunnel's peer has done, as WireGuard counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerActivity {
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The WireGuard link of the node. Every method blocks: call it off the async runtime.
pub struct WgLink {
    ifname: String,
    api: Api,
    rt: Handle,
}

impl WgLink {
    /// Finds or creates WG_IFACE the way `mode` asks. Must be called from a blocking
    /// thread of the agent's runtime (it blocks on rtnetlink calls).
    pub fn open(ifname: &str, mode: WgMode, rt: Handle) -> Result<Self, WgError> {
        let existing = rt.block_on(existing(ifname))?;
        let mut kernel_api = WGApi::<Kernel>::new(ifname).map_err(wg(ifname, "open"))?;
        let choice = choose(mode, &existing, || {
            kernel_api
                .create_interface()
                .map_err(wg(ifname, "create the kernel link"))
        })?;
        if let Some(reason) = &choice.fallback {
            tracing::info!(iface = ifname, %reason, "no kernel WireGuard here: using the embedded userspace implementation (the link goes down with the agent)");
        }
        let api = match choice.mode {
            TunnelMode::Kernel => {
                if choice.created {
                    tracing::info!(iface = ifname, "created a kernel WireGuard link");
                } else {
                    tracing::info!(
                        iface = ifname,
                        "kernel WireGuard link exists; checking its configuration"
                    );
                }
                Api::Kernel(kernel_api)
            }
            TunnelMode::Userspace => {
                let mut api = WGApi::<Userspace>::new(ifname).map_err(wg(ifname, "open"))?;
                api.create_interface()
                    .map_err(wg(ifname, "create userspace device"))?;
                match disarm_boringtun_signal_handlers() {
                    Ok(n) => tracing::debug!(
                        signalfds = n,
                        "boringtun's SIGTERM/SIGINT handlers disarmed"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot disarm boringtun's signal handlers: SIGTERM may stop the tunnel instead of the agent")
                    }
                }
                tracing::info!(
                    iface = ifname,
                    "created a userspace WireGuard link (boringtun)"
                );
                Api::Userspace(api)
            }
        };
        Ok(Self {
            ifname: ifname.to_string(),
            api,
            rt,
        })
    }

    pub fn mode(&self) -> TunnelMode {
        match self.api {
            Api::Kernel(_) => TunnelMode::Kernel,
            Api::Userspace(_) => TunnelMode::Userspace,
        }
    }

    fn read_host(&self) -> Result<Host, WgError> {
        match &self.api {
            Api::Kernel(a) => a.read_interface_data(),
            Api::Userspace(a) => a.read_interface_data(),
        }
        .map_err(wg(&self.ifname, "read configuration"))
    }

    fn configure_peer(&self, peer: &Peer) -> Result<(), WgError> {
        match &self.api {
            Api::Kernel(a) => a.configure_peer(peer),
            Api::Userspace(a) => a.configure_peer(peer),
        }
        .map_err(wg(&self.ifname, "configure peer"))
    }

    fn remove_peer(&self, key: &Key) -> Result<(), WgError> {
        match &self.api {
            Api::Kernel(a) => a.remove_peer(key),
            Api::Userspace(a) => a.remove_peer(key),
        }
        .map_err(wg(&self.ifname, "remove peer"))
    }

    /// Private key and listen port only; peers and addresses are handled apart.
    fn set_device(&self, spec: &LinkSpec) -> Result<(), WgError> {
        match &self.api {
            Api::Userspace(a) => {
                let host = Host::new(spec.listen_port.unwrap_or(0), spec.private_key.clone());
                a.write_host(&host).map_err(|e| WgError::Wireguard {
                    ifname: self.ifname.clone(),
                    op: "set private key and port",
                    reason: e.to_string(),
                })
            }
            // The kernel API only sets the device as a whole (and flushes addresses first);
            // this happens only when the key or port really changed, and the address is
            // put back right after.
            Api::Kernel(a) => a
                .configure_interface(&InterfaceConfiguration {
                    name: self.ifname.clone(),
                    prvkey: spec.private_key.to_string(),
                    addresses: vec![],
                    port: spec.listen_port.unwrap_or(0),
                    peers: vec![],
                    mtu: None,
                    fwmark: None,
                })
                .map_err(wg(&self.ifname, "set private key and port")),
        }
    }

    /// Makes the link match `spec`; returns what it changed (empty: nothing).
    pub fn apply(&self, spec: &LinkSpec) -> Result<Vec<String>, WgError> {
        let mut changed = Vec::new();
        let endpoint = resolve(&spec.endpoint)?;

        let mut host = self.read_host()?;
        let port_ok = spec.listen_port.is_none_or(|p| p == host.listen_port);
        if host.private_key.as_ref() != Some(&spec.private_key) || !port_ok {
            self.set_device(spec)?;
            changed.push("private key / listen port".to_string());
            // Setting the device replaces its peers: compare against what is there now.
            host = self.read_host()?;
        }

        let mut peer = Peer::new(spec.peer_key.clone());
        peer.endpoint = Some(endpoint);
        peer.persistent_keepalive_interval = spec.keepalive;
        peer.allowed_ips = vec![IpAddrMask::new(
            spec.mesh.network().into(),
            spec.mesh.prefix(),
        )];
        for key in host.peers.keys().filter(|k| **k != spec.peer_key) {
            self.remove_peer(key)?;
            changed.push("removed a stale peer".to_string());
        }
        let peer_ok = host.peers.get(&spec.peer_key).is_some_and(|have| {
            have.endpoint == peer.endpoint
                && have.persistent_keepalive_interval.unwrap_or(0) == spec.keepalive.unwrap_or(0)
                && have
                    .allowed_ips
                    .iter()
                    .map(IpAddrMask::to_string)
                    .collect::<BTreeSet<_>>()
                    == peer.allowed_ips.iter().map(IpAddrMask::to_string).collect()
        });
        if !peer_ok {
            // boringtun panics when an existing peer is modified: remove it first (the
            // kernel updates in place, keeping the session).
            if matches!(self.api, Api::Userspace(_)) && host.peers.contains_key(&spec.peer_key) {
                self.remove_peer(&spec.peer_key)?;
            }
            self.configure_peer(&peer)?;
            changed.push(format!("peer (endpoint {endpoint})"));
        }

        changed.extend(self.rt.block_on(self.apply_link(spec))?);
        Ok(changed)
    }

    /// Drops the peer's session and configures it again, so a handshake starts with the
    /// next packet instead of after WireGuard's own retry (5 s after a handshake the
    /// controller ignored: it did not know the node's key yet, or had forgotten the node).
    /// Returns what it configured (the peer, with its endpoint resolved anew).
    pub fn restart_handshake(&self, spec: &LinkSpec) -> Result<Vec<String>, WgError> {
        if self.read_host()?.peers.contains_key(&spec.peer_key) {
            self.remove_peer(&spec.peer_key)?;
        }
        self.apply(spec)
    }

    /// An rtnetlink failure of operation `op` on this link.
    fn nl(&self, op: &'static str) -> impl Fn(nlink::Error) -> WgError + '_ {
        move |source| WgError::Netlink {
            ifname: self.ifname.clone(),
            op,
            source,
        }
    }

    /// The link's MTU, address, state and mesh route as `spec` says; returns what it
    /// changed.
    async fn apply_link(&self, spec: &LinkSpec) -> Result<Vec<String>, WgError> {
        let ifname = self.ifname.as_str();
        let mut changed = Vec::new();
        let conn = Connection::<Route>::new().map_err(self.nl("open rtnetlink socket"))?;
        let link = conn
            .get_link_by_name(ifname)
            .await
            .map_err(self.nl("look up link"))?
            .ok_or_else(|| WgError::Mode(format!("link {ifname} vanished")))?;
        let index = link.ifindex();
        if link.mtu() != Some(spec.mtu) {
            conn.set_link_mtu_by_index(index, spec.mtu)
                .await
                .map_err(self.nl("set MTU"))?;
            changed.push(format!("mtu {}", spec.mtu));
        }
        self.apply_address(&conn, index, spec, &mut changed).await?;
        if !link.is_up() {
            conn.set_link_up_by_index(index)
                .await
                .map_err(self.nl("set link up"))?;
            changed.push("up".to_string());
        }
        self.apply_route(&conn, index, spec, &mut changed).await?;
        Ok(changed)
    }

    /// Only `spec.address`/32 on the link: other IPv4 addresses removed.
    async fn apply_address(
        &self,
        conn: &Connection<Route>,
        index: u32,
        spec: &LinkSpec,
        changed: &mut Vec<String>,
    ) -> Result<(), WgError> {
        let addrs = conn
            .get_addresses_by_index(index)
            .await
            .map_err(self.nl("list addresses"))?;
        let mut have_wanted = false;
        for a in addrs.iter().filter(|a| a.is_ipv4()) {
            let ip = a.local().or(a.address()).copied();
            if ip == Some(spec.address.into()) && a.prefix_len() == 32 {
                have_wanted = true;
            } else if let Some(std::net::IpAddr::V4(old)) = ip {
                conn.del_address_v4(&self.ifname, old, a.prefix_len())
                    .await
                    .map_err(self.nl("remove old address"))?;
                changed.push(format!("removed address {old}/{}", a.prefix_len()));
            }
        }
        if !have_wanted {
            conn.add_address_by_index(index, spec.address.into(), 32)
                .await
                .map_err(self.nl("add address"))?;
            changed.push(format!("address {}/32", spec.address));
        }
        Ok(())
    }

    /// Only the route to `spec.mesh` through the link among the agent's (boot-protocol)
    /// routes on it: older mesh routes removed.
    async fn apply_route(
        &self,
        conn: &Connection<Route>,
        index: u32,
        spec: &LinkSpec,
        changed: &mut Vec<String>,
    ) -> Result<(), WgError> {
        let routes = conn
            .get_routes_for_table(RT_TABLE_MAIN)
            .await
            .map_err(self.nl("list routes"))?;
        let mut route_ok = false;
        for r in routes.iter().filter(|r| {
            r.is_ipv4() && r.oif() == Some(index) && r.protocol() == RouteProtocol::Boot
        }) {
            let Some(std::net::IpAddr::V4(dst)) = r.destination().copied() else {
                continue;
            };
            if dst == spec.mesh.network() && r.dst_len() == spec.mesh.prefix() {
                route_ok = true;
            } else {
                conn.del_route(Ipv4Route::new(dst, r.dst_len()).dev_index(index))
                    .await
                    .map_err(self.nl("remove old mesh route"))?;
                changed.push(format!("removed route {dst}/{}", r.dst_len()));
            }
        }
        if !route_ok {
            conn.add_route(
                Ipv4Route::new(spec.mesh.network(), spec.mesh.prefix())
                    .dev_index(index)
                    .scope(RouteScope::Link),
            )
            .await
            .map_err(self.nl("add mesh route"))?;
            changed.push(format!("route {}", spec.mesh));
        }
        Ok(())
    }

    /// The peer's last handshake (`None`: none yet) and the bytes received from it and
    /// sent to it.
    pub fn peer_activity(&self, peer: &Key) -> Result<PeerActivity, WgError> {
        let host = self.read_host()?;
        let p = host.peers.get(peer);
        Ok(PeerActivity {
            last_handshake: p
                .and_then(|p| p.last_handshake)
                .filter(|t| *t > SystemTime::UNIX_EPOCH),
            rx_bytes: p.map_or(0, |p| p.rx_bytes),
            tx_bytes: p.map_or(0, |p| p.tx_bytes),
        })
    }

    /// A kernel link stays (the mesh stays reachable while the agent restarts); a
    /// userspace device is stopped and its control socket removed.
    pub fn shutdown(self) {
        if let Api::Userspace(_) = &self.api {
            // Dropping the device handle stops boringtun, closes the tun device (the link
            // disappears) and removes the control socket. `remove_interface` is not used:
            // it also tries to undo DNS settings the agent never made.
            tracing::info!(iface = %self.ifname, "userspace WireGuard link goes down with the agent");
        }
        drop(self.api);
    }
}

async fn existing(ifname: &str) -> Result<Existing, WgError> {
    let conn = Connection::<Route>::new().map_err(|source| WgError::Netlink {
        ifname: ifname.to_string(),
        op: "open rtnetlink socket",
        source,
    })?;
    let link = conn
        .get_link_by_name(ifname)
        .await
        .map_err(|source| WgError::Netlink {
            ifname: ifname.to_string(),
            op: "look up link",
            source,
        })?;
    Ok(match link {
        None => Existing::Absent,
        Some(l) if l.kind() == Some("wireguard") => Existing::Wireguard,
        Some(l) => Existing::Other(l.kind().map(str::to_owned)),
    })
}

fn resolve(endpoint: &str) -> Result<SocketAddr, WgError> {
    let err = |reason: String| WgError::Endpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    let mut addrs = endpoint.to_socket_addrs().map_err(|e| err(e.to_string()))?;
    // IPv4 first: the mesh is IPv4 and so is the original's endpoint.
    let all: Vec<SocketAddr> = addrs.by_ref().collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or_else(|| all.first())
        .copied()
        .ok_or_else(|| err("no address".into()))
}

fn wg<'a>(
    ifname: &'a str,
    op: &'static str,
) -> impl FnOnce(defguard_wireguard_rs::error::WireguardInterfaceError) -> WgError + 'a {
    move |e| WgError::Wireguard {
        ifname: ifname.to_string(),
        op,
        reason: e.to_string(),
    }
}

/// boringtun (behind defguard's userspace API) is written for its own binary: creating
/// a device blocks SIGTERM and SIGINT in the calling thread and reads them from
/// signalfds in its event loop, where either one stops the device. In the agent those
/// signalfds race tokio's handler for the same process-wide signals: a SIGTERM could
/// stop the tunnel and never reach the agent's graceful shutdown (seen in the tests and
/// the join benchmark). defguard offers no way to create the device without them, so
/// they are disarmed here: every signalfd of the process (only boringtun makes them) gets
/// an empty mask, so it stays in boringtun's epoll set but never fires, and the calling
/// thread's mask is restored. Returns how many were disarmed.
fn disarm_boringtun_signal_handlers() -> std::io::Result<usize> {
    let mut disarmed = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.as_os_str() != "anon_inode:[signalfd]" {
            continue;
        }
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<std::os::fd::RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: signalfd() on an existing signalfd descriptor only replaces the set of
        // signals it reports (here: none); the descriptor, its owner and its epoll
        // registration stay as they are. `empty` is a valid, initialised sigset_t.
        #[allow(unsafe_code)]
        let rc = unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::signalfd(fd, &empty, 0)
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        disarmed += 1;
    }
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_UNBLOCK, Some(&set), None)
        .map_err(std::io::Error::from)?;
    Ok(disarmed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
