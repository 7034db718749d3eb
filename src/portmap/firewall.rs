//! The port maps' view of the kernel: a small blocking trait, so the domain logic can be
//! unit-tested against memory and run against nftables in production.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use crate::model::PortMap;

/// Why the kernel (or the fake) refused a change; the text is shown to API clients.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FirewallError(pub String);

/// What the port-map logic needs from the packet filter. Every method is one atomic
/// change; implementations block (call them off the async runtime).
pub trait Firewall: Send + Sync + 'static {
    /// Rewrites everything (table, maps with all elements, chains, rules) in one
    /// transaction.
    fn apply_all(&self, maps: &[PortMap]) -> Result<(), FirewallError>;
    fn add(&self, map: &PortMap) -> Result<(), FirewallError>;
    /// Removes `maps` in one transaction: all of them, or none.
    fn remove(&self, maps: &[PortMap]) -> Result<(), FirewallError>;
    /// Points `old.listen_port` at `new`'s target in one transaction.
    fn replace(&self, old: &PortMap, new: &PortMap) -> Result<(), FirewallError>;
    /// Human-readable differences between the kernel and `desired`; empty when in sync.
    fn drift(&self, desired: &[PortMap]) -> Result<Vec<String>, FirewallError>;
    /// What `ensure_forward_accept` would change; empty when nothing.
    fn forward_accept_drift(&self) -> Result<Vec<String>, FirewallError>;
    /// Makes sure forwarded DNAT traffic gets past libvirt's reject rules; returns what it
    /// changed.
    fn ensure_forward_accept(&self) -> Result<Vec<String>, FirewallError>;
    /// Removes every trace of the agent from the kernel.
    fn cleanup(&self) -> Result<(), FirewallError>;
    /// Whether `ip` is one of the node's own addresses (never a port-map target).
    fn is_local_address(&self, ip: Ipv4Addr) -> Result<bool, FirewallError>;
    /// Source networks that may only arrive through the WireGuard link (the controller's
    /// tunnel addresses). Takes effect with the next `apply_all`.
    fn set_tunnel_sources(&self, _nets: &[ipnetwork::Ipv4Network]) {}
}

/// An in-memory firewall for fast unit tests; `fail_next` makes the next change fail.
#[derive(Default)]
pub struct MemoryFirewall {
    state: Mutex<(Option<BTreeSet<PortMap>>, Option<String>)>,
    local: Mutex<Vec<Ipv4Addr>>,
}

impl MemoryFirewall {
    pub fn maps(&self) -> Option<BTreeSet<PortMap>> {
        self.state.lock().ok().and_then(|s| s.0.clone())
    }

    pub fn fail_next(&self, reason: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = Some(reason.to_string());
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
            s.0 = None;
        }
    }

    /// Runs `f` on the whole state unless a failure was queued with `fail_next`.
    fn write(
        &self,
        f: impl FnOnce(&mut Option<BTreeSet<PortMap>>) -> Result<(), FirewallError>,
    ) -> Result<(), FirewallError> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| FirewallError("poisoned".into()))?;
        if let Some(reason) = s.1.take() {
            return Err(FirewallError(reason));
        }
        f(&mut s.0)
    }

    /// An element change: fails like the kernel when the table is missing.
    fn change(
        &self,
        f: impl FnOnce(&mut BTreeSet<PortMap>) -> Result<(), FirewallError>,
    ) -> Result<(), FirewallError> {
        self.write(|table| {
            let maps = table
                .as_mut()
                .ok_or_else(|| FirewallError("No such file or directory (table missing)".into()))?;
            f(maps)
        })
    }
}

impl Firewall for MemoryFirewall {
    fn apply_all(&self, maps: &[PortMap]) -> Result<(), FirewallError> {
        self.write(|table| {
            *table = Some(maps.iter().copied().collect());
            Ok(())
        })
    }

    fn add(&self, map: &PortMap) -> Result<(), FirewallError> {
        self.change(|m| {
            if m.iter()
                .any(|x| x.proto == map.proto && x.listen_port == map.listen_port)
            {
                return Err(FirewallError("File exists".into()));
            }
            m.insert(*map);
            Ok(())
        })
    }

    fn remove(&self, maps: &[PortMap]) -> Result<(), FirewallError> {
        self.change(|m| {
            if !maps.iter().all(|x| m.contains(x)) {
                return Err(FirewallError("No such file or directory".into()));
            }
            for x in maps {
                m.remove(x);
            }
            Ok(())
        })
    }

    fn replace(&self, old: &PortMap, new: &PortMap) -> Result<(), FirewallError> {
        self.change(|m| {
            if !m.remove(old) {
                return Err(FirewallError("No such file or directory".into()));
            }
            m.insert(*new);
            Ok(())
        })
    }

    fn drift(&self, desired: &[PortMap]) -> Result<Vec<String>, FirewallError> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| FirewallError("poisoned".into()))?;
        if let Some(reason) = s.1.take() {
            return Err(FirewallError(reason));
        }
        let Some(have) = &s.0 else {
            return Ok(vec!["table missing".into()]);
        };
        let want: BTreeSet<PortMap> = desired.iter().copied().collect();
        let mut out = Vec::new();
        for m in want.difference(have) {
            out.push(format!("missing {m:?}"));
        }
        for m in have.difference(&want) {
            out.push(format!("unexpected {m:?}"));
        }
        Ok(out)
    }

    fn forward_accept_drift(&self) -> Result<Vec<String>, FirewallError> {
        Ok(Vec::new())
    }

    fn ensure_forward_accept(&self) -> Result<Vec<String>, FirewallError> {
        Ok(Vec::new())
    }

    fn cleanup(&self) -> Result<(), FirewallError> {
        self.wipe();
        Ok(())
    }

    fn is_local_address(&self, ip: Ipv4Addr) -> Result<bool, FirewallError> {
        Ok(self.local.lock().is_ok_and(|l| l.contains(&ip)))
    }
}
