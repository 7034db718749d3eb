//! The port maps' view of the kernel: a small blocking trait, so the domain logic can be
//! unit-tested against memory and run against nftables in production.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use futures_util::future::BoxFuture;
use ipnetwork::Ipv4Network;

use crate::model::{MapCounters, PortMap, PortRule, Proto};
use crate::net::antispoof::TunnelGuard;
use crate::net::nft::NftError;

/// What a refusal means for the caller, decided once from the kernel's errno so that
/// nothing downstream reads the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirewallErrorKind {
    /// `ENOENT`: the table, a map or an element the change needs is missing. The agent
    /// only touches what the database says is there, so someone changed the kernel
    /// behind its back and a reconcile is due.
    NotFound,
    /// `EEXIST`: an element the change adds is already there: the same drift, the other
    /// way round.
    Exists,
    /// Any other refusal or failure (permissions, a batch the kernel rejects, the
    /// netlink socket, the node's settings).
    Failed,
}

/// Why the kernel (or the fake) refused a change: its kind, and the error that says why
/// (the nftables driver's [`NftError`] in production), whose text is shown to API
/// clients.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct FirewallError {
    kind: FirewallErrorKind,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl FirewallError {
    pub fn new(
        kind: FirewallErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }

    /// A failure that is not about the table's contents (`FirewallErrorKind::Failed`).
    pub fn failed(source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self::new(FirewallErrorKind::Failed, source)
    }

    pub fn kind(&self) -> FirewallErrorKind {
        self.kind
    }

    /// The kernel no longer holds what the database says it does (`NotFound` or
    /// `Exists`): rewriting the table from the database repairs it.
    pub fn is_drift(&self) -> bool {
        matches!(
            self.kind,
            FirewallErrorKind::NotFound | FirewallErrorKind::Exists
        )
    }

    /// The nftables driver's error, when the kernel refused.
    pub fn nft(&self) -> Option<&NftError> {
        self.source.downcast_ref()
    }
}

impl From<NftError> for FirewallError {
    fn from(e: NftError) -> Self {
        let kind = match e.errno() {
            Some(libc::ENOENT) => FirewallErrorKind::NotFound,
            Some(libc::EEXIST) => FirewallErrorKind::Exists,
            _ => FirewallErrorKind::Failed,
        };
        Self::new(kind, e)
    }
}

/// A firewall call's future: boxed, so that the port-map service holds the firewall as
/// `dyn Firewall` (the nftables driver in production, [`MemoryFirewall`] in tests).
pub type FwFuture<'a, T> = BoxFuture<'a, Result<T, FirewallError>>;

/// What the port-map logic needs from the packet filter. Every method is one atomic
/// change, awaited on the async runtime (the nftables driver speaks netlink
/// asynchronously; nothing blocks). A rule is a map and its source allow-list; the
/// kernel carries both, and the map's counters.
pub trait Firewall: Send + Sync + 'static {
    /// Rewrites everything (table, sets with all elements, chains, rules) in one
    /// transaction. Maps the kernel already held unchanged keep their counters.
    fn apply_all<'a>(&'a self, rules: &'a [PortRule]) -> FwFuture<'a, ()>;
    /// Fails with `Exists` if the listen port is mapped, `NotFound` without the table.
    fn add<'a>(&'a self, rule: &'a PortRule) -> FwFuture<'a, ()>;
    /// Removes `rules` in one transaction: all of them, or none (`NotFound` if one is
    /// missing).
    fn remove<'a>(&'a self, rules: &'a [PortRule]) -> FwFuture<'a, ()>;
    /// Puts `new` in the place of `old` (same listen port) in one transaction; the map's
    /// counters start again.
    fn replace<'a>(&'a self, old: &'a PortRule, new: &'a PortRule) -> FwFuture<'a, ()>;
    /// Human-readable differences between the kernel and `desired`; empty when in sync.
    fn drift<'a>(&'a self, desired: &'a [PortRule]) -> FwFuture<'a, Vec<String>>;
    /// Every map's live counters, read at once; a map the kernel lacks is absent.
    fn counters(&self) -> FwFuture<'_, BTreeMap<(Proto, u16), MapCounters>>;
    /// What `ensure_forward_accept` would change; empty when nothing.
    fn forward_accept_drift(&self) -> FwFuture<'_, Vec<String>>;
    /// Makes sure forwarded DNAT traffic gets past libvirt's reject rules; returns what it
    /// changed.
    fn ensure_forward_accept(&self) -> FwFuture<'_, Vec<String>>;
    /// Removes every trace of the agent from the kernel.
    fn cleanup(&self) -> FwFuture<'_, ()>;
    /// Whether `ip` is one of the node's own addresses (never a port-map target).
    fn is_local_address(&self, ip: Ipv4Addr) -> FwFuture<'_, bool>;
}

/// The fake kernel's table: the maps, and the anti-spoofing networks in force.
#[derive(Default)]
struct Table {
    rules: BTreeSet<PortRule>,
    /// Counters as a test set them ([`MemoryFirewall::count`]); kept like the kernel's.
    counters: BTreeMap<(Proto, u16), MapCounters>,
    tunnel_sources: Vec<Ipv4Network>,
}

#[derive(Default)]
struct State {
    /// `None`: the table is not there.
    table: Option<Table>,
    /// Refusals queued by `fail_next`, one per change.
    failures: VecDeque<(FirewallErrorKind, String)>,
    /// Anti-spoofing networks for the next `apply_all`.
    tunnel_sources: Vec<Ipv4Network>,
}

/// An in-memory firewall for fast unit tests: it refuses like the kernel (`NotFound`
/// without the table or an element, `Exists` for a mapped port), and `fail_next`
/// makes the next change fail.
#[derive(Default)]
pub struct MemoryFirewall {
    state: Mutex<State>,
    local: Mutex<Vec<Ipv4Addr>>,
}

fn not_found(what: &str) -> FirewallError {
    FirewallError::new(
        FirewallErrorKind::NotFound,
        format!("No such file or directory{what}"),
    )
}

fn poisoned() -> FirewallError {
    FirewallError::failed("poisoned")
}

impl MemoryFirewall {
    /// A fake kernel that already holds the agent's table, empty: as after the startup
    /// restore of a node without maps.
    pub fn with_empty_table() -> Self {
        let fw = Self::default();
        if let Ok(mut s) = fw.state.lock() {
            s.table = Some(Table::default());
        }
        fw
    }

    pub fn maps(&self) -> Option<BTreeSet<PortMap>> {
        self.rules().map(|r| r.into_iter().map(|r| r.map).collect())
    }

    /// The rules (maps with their allow-lists) in the fake kernel; `None` without it.
    pub fn rules(&self) -> Option<BTreeSet<PortRule>> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.table.as_ref().map(|t| t.rules.clone()))
    }

    /// Sets a map's counters, as traffic would.
    pub fn count(&self, proto: Proto, listen_port: u16, c: MapCounters) {
        if let Ok(mut s) = self.state.lock()
            && let Some(t) = s.table.as_mut()
        {
            t.counters.insert((proto, listen_port), c);
        }
    }

    /// The anti-spoofing networks in the fake kernel; `None` without the table.
    pub fn tunnel_sources_in_force(&self) -> Option<Vec<Ipv4Network>> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.table.as_ref().map(|t| t.tunnel_sources.clone()))
    }

    /// The next change fails with `reason` (kind `Failed`).
    pub fn fail_next(&self, reason: &str) {
        self.fail_next_as(FirewallErrorKind::Failed, reason);
    }

    /// Queues a refusal of `kind`; several queue up, one per change.
    pub fn fail_next_as(&self, kind: FirewallErrorKind, reason: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.failures.push_back((kind, reason.to_string()));
        }
    }

    /// Gives the fake node an address.
    pub fn add_local_address(&self, ip: Ipv4Addr) {
        if let Ok(mut l) = self.local.lock() {
            l.push(ip);
        }
    }

    /// Simulates someone deleting the table.
    pub fn wipe(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.table = None;
        }
    }

    /// Runs `f` on the whole state unless a failure was queued with `fail_next`.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, FirewallError>,
    ) -> Result<T, FirewallError> {
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        if let Some((kind, reason)) = s.failures.pop_front() {
            return Err(FirewallError::new(kind, reason));
        }
        f(&mut s)
    }

    /// An element change: fails like the kernel when the table is missing.
    fn change(
        &self,
        f: impl FnOnce(&mut Table) -> Result<(), FirewallError>,
    ) -> Result<(), FirewallError> {
        self.write(|s| {
            let table = s
                .table
                .as_mut()
                .ok_or_else(|| not_found(" (table missing)"))?;
            f(table)
        })
    }
}

fn key(r: &PortRule) -> (Proto, u16) {
    (r.map.proto, r.map.listen_port)
}

/// The fake's changes, synchronous: the trait's futures are ready at once.
impl MemoryFirewall {
    fn do_apply_all(&self, rules: &[PortRule]) -> Result<(), FirewallError> {
        self.write(|s| {
            let old = s.table.take().unwrap_or_default();
            let counters = rules
                .iter()
                .filter(|r| old.rules.contains(*r))
                .filter_map(|r| old.counters.get(&key(r)).map(|c| (key(r), *c)))
                .collect();
            s.table = Some(Table {
                rules: rules.iter().cloned().collect(),
                counters,
                tunnel_sources: s.tunnel_sources.clone(),
            });
            Ok(())
        })
    }

    fn do_add(&self, rule: &PortRule) -> Result<(), FirewallError> {
        self.change(|t| {
            if t.rules.iter().any(|x| key(x) == key(rule)) {
                return Err(FirewallError::new(FirewallErrorKind::Exists, "File exists"));
            }
            t.rules.insert(rule.clone());
            Ok(())
        })
    }

    fn do_remove(&self, rules: &[PortRule]) -> Result<(), FirewallError> {
        self.change(|t| {
            if !rules.iter().all(|x| t.rules.contains(x)) {
                return Err(not_found(""));
            }
            for x in rules {
                t.rules.remove(x);
                t.counters.remove(&key(x));
            }
            Ok(())
        })
    }

    fn do_replace(&self, old: &PortRule, new: &PortRule) -> Result<(), FirewallError> {
        self.change(|t| {
            if !t.rules.remove(old) {
                return Err(not_found(""));
            }
            t.counters.remove(&key(old));
            t.rules.insert(new.clone());
            Ok(())
        })
    }

    fn do_drift(&self, desired: &[PortRule]) -> Result<Vec<String>, FirewallError> {
        self.write(|s| {
            let Some(table) = &s.table else {
                return Ok(vec!["table missing".into()]);
            };
            let have = &table.rules;
            let want: BTreeSet<PortRule> = desired.iter().cloned().collect();
            let mut out = Vec::new();
            for m in want.difference(have) {
                out.push(format!("missing {m:?}"));
            }
            for m in have.difference(&want) {
                out.push(format!("unexpected {m:?}"));
            }
            if table.tunnel_sources != s.tunnel_sources {
                out.push(format!(
                    "anti-spoofing networks {:?}, should be {:?}",
                    table.tunnel_sources, s.tunnel_sources
                ));
            }
            Ok(out)
        })
    }

    fn do_counters(&self) -> Result<BTreeMap<(Proto, u16), MapCounters>, FirewallError> {
        let s = self.state.lock().map_err(|_| poisoned())?;
        let Some(t) = &s.table else {
            return Err(not_found(" (table missing)"));
        };
        Ok(t.rules
            .iter()
            .map(|r| (key(r), t.counters.get(&key(r)).copied().unwrap_or_default()))
            .collect())
    }

    fn do_forward_accept_drift(&self) -> Result<Vec<String>, FirewallError> {
        Ok(Vec::new())
    }

    fn do_ensure_forward_accept(&self) -> Result<Vec<String>, FirewallError> {
        Ok(Vec::new())
    }

    fn do_cleanup(&self) -> Result<(), FirewallError> {
        self.wipe();
        Ok(())
    }

    fn do_is_local_address(&self, ip: Ipv4Addr) -> Result<bool, FirewallError> {
        Ok(self.local.lock().is_ok_and(|l| l.contains(&ip)))
    }
}

impl Firewall for MemoryFirewall {
    fn apply_all<'a>(&'a self, rules: &'a [PortRule]) -> FwFuture<'a, ()> {
        ready(self.do_apply_all(rules))
    }

    fn add<'a>(&'a self, rule: &'a PortRule) -> FwFuture<'a, ()> {
        ready(self.do_add(rule))
    }

    fn remove<'a>(&'a self, rules: &'a [PortRule]) -> FwFuture<'a, ()> {
        ready(self.do_remove(rules))
    }

    fn replace<'a>(&'a self, old: &'a PortRule, new: &'a PortRule) -> FwFuture<'a, ()> {
        ready(self.do_replace(old, new))
    }

    fn drift<'a>(&'a self, desired: &'a [PortRule]) -> FwFuture<'a, Vec<String>> {
        ready(self.do_drift(desired))
    }

    fn counters(&self) -> FwFuture<'_, BTreeMap<(Proto, u16), MapCounters>> {
        ready(self.do_counters())
    }

    fn forward_accept_drift(&self) -> FwFuture<'_, Vec<String>> {
        ready(self.do_forward_accept_drift())
    }

    fn ensure_forward_accept(&self) -> FwFuture<'_, Vec<String>> {
        ready(self.do_ensure_forward_accept())
    }

    fn cleanup(&self) -> FwFuture<'_, ()> {
        ready(self.do_cleanup())
    }

    fn is_local_address(&self, ip: Ipv4Addr) -> FwFuture<'_, bool> {
        ready(self.do_is_local_address(ip))
    }
}

/// A result as an already finished firewall future.
fn ready<'a, T: Send + 'a>(r: Result<T, FirewallError>) -> FwFuture<'a, T> {
    Box::pin(std::future::ready(r))
}

/// Like the nftables driver: the networks wait for the next `apply_all`.
impl TunnelGuard for MemoryFirewall {
    fn set_tunnel_sources(&self, nets: &[Ipv4Network]) {
        if let Ok(mut s) = self.state.lock() {
            s.tunnel_sources = nets.to_vec();
        }
    }
}
