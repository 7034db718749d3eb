//! nftables over netlink: the agent-owned port-map table, its read-back and drift
//! check, and the accept rule that lets DNAT'd traffic past libvirt's reject rules.
//!
//! ```text
//! table ip node_vm_agent {
//!   map tcp_ports { type inet_service : ipv4_addr . inet_service; counter; }
//!   map udp_ports { type inet_service : ipv4_addr . inet_service; counter; }
//!   set tcp_flows, tcp_restricted, tcp_allow, tcp_drops (and udp_*): see `sets.rs`
//!   chain prerouting  { type nat hook prerouting priority dstnat; policy accept;
//!     meta l4proto tcp tcp dport @tcp_restricted fib daddr type local
//!       tcp dport . ip saddr != @tcp_allow tcp dport @tcp_drops drop
//!     fib daddr type local meta l4proto tcp dnat ip to tcp dport map @tcp_ports
//!     (the same two for udp) }
//!   chain output      { type nat hook output priority -100; policy accept;
//!     ip daddr != 127.0.0.0/8 (then the same four: loopback stays the node's own) }
//!   chain forward     { type filter hook forward priority filter; policy accept;
//!     ct status dnat meta l4proto tcp ct original proto-dst @tcp_flows
//!     ct status dnat meta l4proto udp ct original proto-dst @udp_flows
//!     ct status dnat accept }
//!   chain antispoof   { type filter hook prerouting priority raw; policy accept;
//!     iifname != "<wg_iface>" ip saddr <controller net> drop }  (one per net, once joined)
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ct status dnat oifname "<vms_bridge>" masquerade
//!     oifname "<wg_iface>" masquerade                       (only with a wg_iface)
//!     ip saddr <vm_subnet> ip daddr != <vm_subnet> oifname "<external_iface>" masquerade }
//! }
//! ```
//!
//! Port maps, their allow-lists and their counters are set elements, so a lookup costs
//! the same for one map or 30,000, and adding or removing one is a one-transaction
//! change of a few elements (docs/decisions/22-allow-lists-and-counters-as-set-elements.md).

mod apply;
mod drift;
mod dump;
mod forward;
mod readback;
pub mod ruleset;
pub mod sets;
mod xt;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;

use ipnetwork::Ipv4Network;
use nlink::netlink::nftables::{RuleInfo, Transaction};
use nlink::netlink::{Connection, Nftables};

use crate::config::{MeshSettings, PortMapSettings};
use crate::model::{AllowList, MapCounters, PortMap, PortRule, Proto};

pub use drift::{Drift, diff};
pub use forward::{ForwardAcceptReport, ForwardChainOutcome};
pub use sets::ElementCounters;

use ruleset::{FAMILY, TABLE};

/// Errors of the nftables driver. Kernel refusals keep nlink's error, whose text is
/// the kernel's reason (`Operation not permitted (errno 1)`, the refused operation).
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The nftables netlink socket could not be opened or configured.
    #[error("nftables socket: {0}")]
    Socket(String),
    /// The kernel (or nlink, before sending) refused an operation.
    #[error("{op}: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: nlink::Error,
    },
    /// The request cannot be expressed as the agent's ruleset.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Several independent operations failed (teardown goes on after a failure).
    #[error("{} operations failed: {}", .0.len(), join_errors(.0))]
    Several(Vec<NftError>),
}

fn join_errors(errors: &[NftError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl NftError {
    fn kernel(op: &'static str) -> impl FnOnce(nlink::Error) -> NftError {
        move |source| NftError::Kernel { op, source }
    }

    /// The kernel's errno, when the kernel refused the operation.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Kernel { source, .. } => source.errno(),
            NftError::Several(errors) => errors.iter().find_map(NftError::errno),
            _ => None,
        }
    }

    /// The kernel's reason as text (`No such file or directory`), for API replies.
    pub fn reason(&self) -> String {
        match self.errno() {
            Some(errno) => nix::errno::Errno::from_raw(errno).desc().to_string(),
            None => self.to_string(),
        }
    }

    /// `ENOENT`: the table, map or element is not there.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }
}

/// What the NAT rules need to know about the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSettings {
    /// Bridge the VMs are attached to.
    pub vms_bridge: String,
    /// The VMs' subnet, masqueraded when it leaves for the outside.
    pub vm_subnet: Ipv4Network,
    /// WireGuard interface of the mesh, masqueraded for multi-hop proxy chains.
    pub wg_iface: Option<String>,
    /// Interface to the internet; `None` means "anything but the VM bridge".
    pub external_iface: Option<String>,
    /// Source networks that may only arrive through `wg_iface` (the controller's tunnel
    /// addresses, trusted by the API): dropped from any other interface.
    pub tunnel_sources: Vec<Ipv4Network>,
}

impl NatSettings {
    /// What the NAT rules need from the settings: the port maps' group and the mesh's
    /// interface. EXTERNAL_IFACE stays as set: when unset, the firewall looks up the
    /// default route's interface itself.
    pub fn from_settings(pm: &PortMapSettings, mesh: &MeshSettings) -> Self {
        Self {
            vms_bridge: pm.vms_bridge.clone(),
            vm_subnet: pm.vm_subnet,
            wg_iface: Some(mesh.wg_iface.clone()),
            external_iface: pm.external_iface.clone(),
            tunnel_sources: vec![],
        }
    }

    fn validate(&self) -> Result<(), NftError> {
        let names = std::iter::once(("vms_bridge", Some(&self.vms_bridge)))
            .chain([
                ("wg_iface", self.wg_iface.as_ref()),
                ("external_iface", self.external_iface.as_ref()),
            ])
            .filter_map(|(what, name)| name.map(|n| (what, n)));
        for (what, name) in names {
            // The kernel compares oifname as IFNAMSIZ bytes including the NUL.
            if name.is_empty() || name.len() >= ruleset::IFNAMSIZ || name.contains('\0') {
                return Err(NftError::Invalid(format!(
                    "{what} {name:?} is not an interface name (1 to 15 bytes)"
                )));
            }
        }
        Ok(())
    }
}

/// The agent's table as read from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Every element of both maps that decodes as a port map.
    pub maps: BTreeSet<PortMap>,
    /// The allow-lists in the allow sets, by protocol and listen port.
    pub allow: BTreeMap<(Proto, u16), AllowList>,
    /// The listen ports each of the other sets holds, by set name.
    pub members: BTreeMap<&'static str, BTreeSet<u16>>,
    /// Each map's element counters.
    pub counters: BTreeMap<(Proto, u16), ElementCounters>,
    /// Sets, chains and rules are exactly what [`Nft::apply_all`] writes.
    pub structure_ok: bool,
    /// Why `structure_ok` is false, one line each.
    pub problems: Vec<String>,
}

/// The nftables driver: one netlink socket, bound to the network namespace of the
/// thread that created it.
pub struct Nft {
    conn: Connection<Nftables>,
    settings: std::sync::RwLock<NatSettings>,
}

/// Bytes an element takes in a NEWSETELEM message (nests, key, concatenated value),
/// rounded up; only used to size the socket's send buffer.
const ELEMENT_WIRE_BYTES: usize = 64;
/// Headroom for everything that is not an element: table, maps, chains, rules.
const BATCH_OVERHEAD_BYTES: usize = 64 * 1024;

impl Nft {
    /// Opens the netlink socket in the calling thread's current network namespace.
    pub fn new(settings: NatSettings) -> Result<Self, NftError> {
        settings.validate()?;
        let conn = Connection::<Nftables>::new().map_err(|e| NftError::Socket(e.to_string()))?;
        Ok(Self {
            conn,
            settings: std::sync::RwLock::new(settings),
        })
    }

    pub fn settings(&self) -> NatSettings {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Changes the networks of the anti-spoofing chain. Takes effect in the kernel with
    /// the next [`apply_all`](Self::apply_all); until then the read-back reports drift.
    pub fn set_tunnel_sources(&self, nets: Vec<Ipv4Network>) {
        let mut s = match self.settings.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        s.tunnel_sources = nets;
    }

    /// Adds one map (and its allow-list) in one transaction. Fails if its listen port
    /// is already mapped (use [`replace`](Self::replace) to move it) or the table is
    /// absent.
    pub async fn add(&self, r: &PortRule) -> Result<(), NftError> {
        with_elements(self.conn.transaction(), &[r], Op::Add)
            .commit(&self.conn)
            .await
            .map_err(NftError::kernel("add port map"))
    }

    /// Removes several maps in one transaction: all of them, or (one missing element,
    /// `ENOENT`) none. The kernel deletes elements by key; the target is not compared.
    ///
    /// A missing element is an error ([`NftError::is_not_found`]): the caller deletes
    /// only what it believes is there, so "not there" means the kernel drifted from the
    /// database and a reconcile is due.
    pub async fn remove_all(&self, rules: &[PortRule]) -> Result<(), NftError> {
        let allow_count: usize = rules.iter().map(|r| r.allow_from.networks().len()).sum();
        self.ensure_send_buffer(
            BATCH_OVERHEAD_BYTES + (rules.len() * 4 + allow_count) * ELEMENT_WIRE_BYTES,
        )?;
        let refs: Vec<&PortRule> = rules.iter().collect();
        with_elements(self.conn.transaction(), &refs, Op::Delete)
            .commit(&self.conn)
            .await
            .map_err(NftError::kernel("remove port maps"))
    }

    /// Deletes `old` and adds `new` in one transaction: traffic switches target (or
    /// allow-list) atomically, and if either half is refused nothing changes. The map's
    /// counters start again.
    pub async fn replace(&self, old: &PortRule, new: &PortRule) -> Result<(), NftError> {
        let tx = with_elements(self.conn.transaction(), &[old], Op::Delete);
        with_elements(tx, &[new], Op::Add)
            .commit(&self.conn)
            .await
            .map_err(NftError::kernel("replace port map"))
    }

    /// Every map's live counters, by protocol and listen port (one dump per counted
    /// set, not one call per map).
    pub async fn counters(&self) -> Result<BTreeMap<(Proto, u16), MapCounters>, NftError> {
        Ok(readback::read_counters(&self.conn)
            .await?
            .into_iter()
            .map(|(k, c)| (k, c.to_map()))
            .collect())
    }

    /// Deletes the agent's table; `false` if it was not there.
    pub async fn delete_table(&self) -> Result<bool, NftError> {
        self.conn
            .del_table_if_exists(TABLE, FAMILY)
            .await
            .map_err(NftError::kernel("delete table"))
    }

    /// Reads the agent's table back; `None` when it does not exist.
    pub async fn read(&self) -> Result<Option<KernelState>, NftError> {
        let tables = self
            .conn
            .list_tables_in(FAMILY)
            .await
            .map_err(NftError::kernel("list tables"))?;
        if !tables.iter().any(|t| t.name == TABLE) {
            return Ok(None);
        }

        let mut state = KernelState::default();
        readback::read_sets(&self.conn, &mut state).await?;
        self.check_chains(&mut state).await?;
        state.structure_ok = state.problems.is_empty();
        Ok(Some(state))
    }

    async fn check_chains(&self, state: &mut KernelState) -> Result<(), NftError> {
        let chains = self
            .conn
            .list_chains_in(TABLE, FAMILY)
            .await
            .map_err(NftError::kernel("list chains"))?;
        let rules = self
            .conn
            .list_rules(TABLE, FAMILY)
            .await
            .map_err(NftError::kernel("list rules"))?;
        let expected = ruleset::chains(&self.settings());

        for spec in &expected {
            let Some(info) = chains.iter().find(|c| c.name == spec.name) else {
                state
                    .problems
                    .push(format!("chain {} is missing", spec.name));
                continue;
            };
            if info.kind().as_ref() != Some(&spec.kind) {
                state.problems.push(format!(
                    "chain {} has the wrong hook, type, priority or policy",
                    spec.name
                ));
            }
            let found: Vec<&RuleInfo> = rules.iter().filter(|r| r.chain == spec.name).collect();
            for (i, want) in spec.rules.iter().enumerate() {
                match found.get(i) {
                    None => state.problems.push(format!(
                        "chain {}: rule `{}` is missing",
                        spec.name, want.nft
                    )),
                    Some(have) if have.expressions() != ruleset::decoded(&want.exprs) => {
                        state.problems.push(format!(
                            "chain {}: rule {} should be `{}`, found `{}`",
                            spec.name,
                            i + 1,
                            want.nft,
                            describe(have)
                        ))
                    }
                    Some(_) => {}
                }
            }
            for extra in found.iter().skip(spec.rules.len()) {
                state.problems.push(format!(
                    "chain {}: unexpected rule `{}`",
                    spec.name,
                    describe(extra)
                ));
            }
        }
        for extra in chains
            .iter()
            .filter(|c| !expected.iter().any(|e| e.name == c.name))
        {
            state
                .problems
                .push(format!("unexpected chain {} in the table", extra.name));
        }
        Ok(())
    }

    /// See [`forward`]: keeps `ct status dnat accept` first in libvirt's forward chains.
    pub async fn ensure_forward_accept(&self) -> Result<ForwardAcceptReport, NftError> {
        forward::ensure(&self.conn).await
    }

    /// Deletes every agent-tagged rule from libvirt's forward chains; how many went.
    /// What [`Nft::ensure_forward_accept`] would change, one line per chain.
    pub async fn forward_accept_drift(&self) -> Result<Vec<String>, NftError> {
        forward::drift(&self.conn).await
    }

    pub async fn remove_forward_accept(&self) -> Result<usize, NftError> {
        forward::remove(&self.conn).await
    }

    fn ensure_send_buffer(&self, bytes: usize) -> Result<(), NftError> {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt};
        let fd = self.conn.socket().as_fd();
        let current = getsockopt(&fd, sockopt::SndBuf)
            .map_err(|e| NftError::Socket(format!("SO_SNDBUF: {}", e.desc())))?;
        // getsockopt reports the doubled size the kernel keeps; setsockopt takes half.
        if current >= bytes {
            return Ok(());
        }
        // FORCE: the plain option is capped by net.core.wmem_max (~200 KiB), far below
        // what 30,000 elements need. The agent runs with CAP_NET_ADMIN anyway.
        setsockopt(&fd, sockopt::SndBufForce, &bytes)
            .map_err(|e| NftError::Socket(format!("SO_SNDBUFFORCE {bytes}: {}", e.desc())))
    }
}

/// A rule read back, for humans: nft syntax when nlink can print it, else its handle.
fn describe(rule: &RuleInfo) -> String {
    rule.nft_syntax_stateless()
        .unwrap_or_else(|| format!("handle {}", rule.handle))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Delete,
}

/// `tx` plus adding or deleting every element of `rules` in every set, grouped into one
/// message per set and protocol.
fn with_elements(mut tx: Transaction, rules: &[&PortRule], op: Op) -> Transaction {
    for proto in Proto::ALL {
        let mine: Vec<&PortRule> = rules
            .iter()
            .copied()
            .filter(|r| r.map.proto == proto)
            .collect();
        if mine.is_empty() {
            continue;
        }
        for kind in sets::Kind::ALL {
            let set = sets::set(kind, proto);
            let elements = sets::elements(kind, &mine);
            for chunk in elements.chunks(ruleset::ELEMENTS_PER_MESSAGE) {
                tx = match op {
                    Op::Add => tx.add_set_elements(&set, chunk),
                    Op::Delete => tx.del_set_elements(&set, chunk),
                };
            }
        }
    }
    tx
}
