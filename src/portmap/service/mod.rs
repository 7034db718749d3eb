//! Port-map operations: validate, write the desired state in one SQLite transaction, apply
//! it to the kernel inside that transaction, commit only if the kernel agreed.
//!
//! Every method blocks; callers on the async runtime use `spawn_blocking`. The store's
//! connection lock is held across the kernel change, so concurrent requests reach SQLite
//! and the kernel in the same order and the two never disagree.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::firewall::{Firewall, FirewallError};
use super::policy::{Policy, PolicyError};
use crate::model::{MapCounters, PortMap, PortRule, Proto};
use crate::store::audit::{self, Entry};
use crate::store::portmaps::{self, PortMapRow};
use crate::store::{Store, StoreError};

pub(super) mod listing;
mod naming;
mod sample;

use crate::events::Kind;

/// An event about map `m` (its rule id for a subject, its target in the detail).
fn publish(kind: Kind, m: &PortMap, mut detail: serde_json::Value) {
    let target = serde_json::json!({
        "proto": m.proto.to_string(),
        "listen_port": m.listen_port,
        "target_ip": m.target_ip.to_string(),
        "target_port": m.target_port,
    });
    match (&mut detail, target) {
        (serde_json::Value::Object(d), serde_json::Value::Object(t)) => d.extend(t),
        (d, t) => *d = t,
    }
    crate::events::publish(kind, m.rule_id(), detail);
}

/// Every map's counters, and when they were read.
type CountersCache = std::sync::Mutex<Option<(Arc<BTreeMap<(Proto, u16), MapCounters>>, Instant)>>;

/// How long a `GET /ports` body (with its counters) is served from the cache: the
/// listing of 10,000 maps is megabytes and six kernel dumps, so a load of listings
/// rebuilds it at most once a second. A change to the maps clears it at once.
pub const LIST_MAX_AGE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    /// Refused by policy (reserved port, target outside the VM networks).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The listen port is mapped to another target and the request did not ask to replace.
    #[error(
        "{proto} listen_port {listen_port} is already mapped to {target}; \
         send \"replace\": true to switch it"
    )]
    Conflict {
        proto: Proto,
        listen_port: u16,
        target: String,
    },
    /// The kernel refused the change; nothing was stored.
    #[error("nftables refused the change: {0}")]
    Kernel(#[from] FirewallError),
    /// The kernel had drifted from the database (someone deleted the table, a map or an
    /// element) and rewriting the table from the database failed too; nothing was
    /// stored. A reconcile is due: try again.
    #[error(
        "nftables no longer held what the database says ({drift}) and the repair failed: \
         {repair}; a reconcile is due, try again"
    )]
    Drifted {
        drift: FirewallError,
        #[source]
        repair: FirewallError,
    },
    /// The kernel's state could not be read (a comparison, which changes nothing).
    #[error("cannot read the kernel's nftables state: {0}")]
    Read(FirewallError),
    /// `target_vm` names no VM.
    #[error("no VM named {0}")]
    UnknownVm(String),
    /// The VM named has no address to map to yet: it was created before pinned
    /// addresses and no lease of it has been seen.
    #[error(
        "VM {0} has no known address yet (created before pinned addresses, no lease seen): \
         try again once GET /vms/{0}/ip answers"
    )]
    VmWithoutAddress(String),
    /// The VM named got another address while the map was being made.
    #[error("VM {0} changed its address while the map was being made; try again")]
    VmMoved(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a create did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// The same map existed already: nothing changed.
    Unchanged,
    /// The listen port pointed elsewhere (or had another allow-list) and was switched.
    Replaced {
        previous: PortRule,
    },
}

/// What a reconcile found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Differences found between the kernel and the database before repairing.
    pub drift: Vec<String>,
    /// Whether the whole table was rewritten.
    pub rewritten: bool,
    /// Changes made to keep forwarded DNAT traffic past libvirt's reject rules.
    pub forward_accept: Vec<String>,
    /// Maps in the database (and so in the kernel afterwards).
    pub maps: usize,
}

impl ReconcileReport {
    pub fn changed(&self) -> bool {
        self.rewritten || !self.forward_accept.is_empty()
    }
}

pub struct PortMaps {
    store: Store,
    fw: Arc<dyn Firewall>,
    policy: Policy,
    /// The written `GET /ports` listing and when it was written (`listing.rs`); filled
    /// and cleared under the store lock, served for at most [`LIST_MAX_AGE`].
    list_cache: RwLock<Option<(Bytes, Instant)>>,
    /// Every map's counters for `GET /metrics`, read at most once per [`LIST_MAX_AGE`].
    counters_cache: CountersCache,
}

impl PortMaps {
    pub fn new(store: Store, fw: Arc<dyn Firewall>, policy: Policy) -> Self {
        Self {
            store,
            fw,
            policy,
            list_cache: RwLock::new(None),
            counters_cache: Default::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn invalidate(&self) {
        if let Ok(mut c) = self.list_cache.write() {
            *c = None;
        }
    }

    /// Creates (or, with `replace`, re-targets) a map. `audit`, the caller's audit row,
    /// is written in the same transaction: the map and its row stand or fall together.
    /// A different allow-list for the same target is a replace too.
    pub fn create(
        &self,
        rule: impl Into<PortRule>,
        replace: bool,
        by: &str,
        audit: Option<&Entry>,
    ) -> Result<CreateOutcome, PortMapError> {
        self.create_naming(rule.into(), None, replace, by, audit)
    }

    /// [`PortMaps::create`] of a map that names VM `target_vm` (`rule`'s target is its
    /// address, from [`PortMaps::vm_address`]; checked again in the transaction). A
    /// different `target_vm` for the same map is a replace too.
    pub fn create_naming(
        &self,
        rule: PortRule,
        target_vm: Option<&str>,
        replace: bool,
        by: &str,
        audit: Option<&Entry>,
    ) -> Result<CreateOutcome, PortMapError> {
        let map = rule.map;
        self.policy.check(&map)?;
        if self.fw.is_local_address(map.target_ip)? {
            return Err(PolicyError::TargetIsNode {
                ip: map.target_ip.to_string(),
            }
            .into());
        }
        let outcome = self.store.transaction(|tx| {
            if let Some(vm) = target_vm {
                self.check_vm_address(tx, vm, map.target_ip)?;
            }
            let outcome = match portmaps::get(tx, map.proto, map.listen_port)? {
                Some(row)
                    if row.map == map
                        && row.allow_from == rule.allow_from
                        && row.target_vm.as_deref() == target_vm =>
                {
                    audit::record_opt(tx, audit)?;
                    return Ok(CreateOutcome::Unchanged);
                }
                Some(row) if !replace => {
                    return Err(PortMapError::Conflict {
                        proto: map.proto,
                        listen_port: map.listen_port,
                        target: describe(&row),
                    });
                }
                Some(row) => CreateOutcome::Replaced {
                    previous: PortRule {
                        map: row.map,
                        allow_from: row.allow_from,
                    },
                },
                None => CreateOutcome::Created,
            };
            portmaps::upsert(tx, &rule, target_vm, by)?;
            audit::record_opt(tx, audit)?;
            // The kernel goes last: if it refuses, the transaction rolls back.
            self.change_kernel(tx, || match &outcome {
                CreateOutcome::Replaced { previous } => self.fw.replace(previous, &rule),
                _ => self.fw.add(&rule),
            })?;
            Ok(outcome)
        });
        match outcome {
            Err(PortMapError::Store(e)) => {
                // The commit itself failed after the kernel changed (disk full, I/O):
                // put the kernel back so both still agree.
                self.resync_after_failed_commit();
                Err(e.into())
            }
            Ok(o) => {
                if o != CreateOutcome::Unchanged {
                    self.invalidate();
                    publish(
                        Kind::PortMapAdded,
                        &map,
                        serde_json::json!({
                            "target_vm": target_vm,
                            "allow_from": rule.allow_from.networks().iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                            "replaced": matches!(o, CreateOutcome::Replaced { .. }),
                        }),
                    );
                }
                Ok(o)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes a map; `None` when there was none. `audit` is written in the same
    /// transaction, as for [`PortMaps::create`].
    pub fn delete(
        &self,
        proto: Proto,
        listen_port: u16,
        audit: Option<&Entry>,
    ) -> Result<Option<PortMap>, PortMapError> {
        let deleted = self.store.transaction(|tx| {
            audit::record_opt(tx, audit)?;
            let Some(row) = portmaps::get(tx, proto, listen_port)? else {
                return Ok(None);
            };
            portmaps::delete(tx, proto, listen_port)?;
            let rule = PortRule {
                map: row.map,
                allow_from: row.allow_from,
            };
            self.change_kernel(tx, || self.fw.remove(std::slice::from_ref(&rule)))?;
            Ok(Some(row.map))
        });
        match deleted {
            Err(PortMapError::Store(e)) => {
                self.resync_after_failed_commit();
                Err(e.into())
            }
            Ok(Some(m)) => {
                self.invalidate();
                publish(Kind::PortMapRemoved, &m, serde_json::Value::Null);
                Ok(Some(m))
            }
            other => other,
        }
    }

    /// Removes every map that targets one of `targets` or names VM `vm`: one SQLite
    /// transaction holding each map's audit row (`audit` says it), one kernel
    /// transaction. Returns the maps removed.
    pub fn delete_targeting(
        &self,
        targets: &[std::net::Ipv4Addr],
        vm: Option<&str>,
        audit: impl Fn(&PortMap) -> Entry,
    ) -> Result<Vec<PortMap>, PortMapError> {
        let deleted = self.store.transaction(|tx| {
            let gone: Vec<PortRule> = portmaps::list(tx)?
                .into_iter()
                .filter(|r| {
                    targets.contains(&r.map.target_ip)
                        || vm.is_some_and(|v| r.target_vm.as_deref() == Some(v))
                })
                .map(|r| PortRule {
                    map: r.map,
                    allow_from: r.allow_from,
                })
                .collect();
            if gone.is_empty() {
                return Ok(Vec::new());
            }
            for r in &gone {
                audit::record(tx, &audit(&r.map))?;
                portmaps::delete(tx, r.map.proto, r.map.listen_port)?;
            }
            self.change_kernel(tx, || self.fw.remove(&gone))?;
            Ok(gone.into_iter().map(|r| r.map).collect())
        });
        self.after_bulk_change(deleted, Kind::PortMapRemoved)
    }

    /// The end of a change of several maps in one transaction: a failed commit (the
    /// kernel may already hold the change) is followed by a reconcile, and a change that
    /// touched maps makes the listing cache stale.
    fn after_bulk_change(
        &self,
        changed: Result<Vec<PortMap>, PortMapError>,
        kind: Kind,
    ) -> Result<Vec<PortMap>, PortMapError> {
        match changed {
            Err(PortMapError::Store(e)) => {
                self.resync_after_failed_commit();
                Err(e.into())
            }
            Ok(maps) => {
                if !maps.is_empty() {
                    self.invalidate();
                }
                for m in &maps {
                    publish(kind, m, serde_json::Value::Null);
                }
                Ok(maps)
            }
            other => other,
        }
    }

    /// Makes `change`, the kernel's half of a change whose rows `tx` already holds.
    ///
    /// When the kernel refuses because it drifted from the database (the table, a map or
    /// an element deleted or added behind the agent's back: `NotFound`, `Exists`), the
    /// whole table is rewritten from `tx`'s rows, as the reconcile would, which makes
    /// the change too, in one kernel transaction; the repair is audited in `tx` like a
    /// reconcile. If that fails as well: [`PortMapError::Drifted`].
    fn change_kernel(
        &self,
        tx: &rusqlite::Connection,
        change: impl FnOnce() -> Result<(), FirewallError>,
    ) -> Result<(), PortMapError> {
        let drift = match change() {
            Ok(()) => return Ok(()),
            Err(e) if e.is_drift() => e,
            Err(e) => return Err(e.into()),
        };
        let maps = portmaps::list_rules(tx)?;
        if let Err(repair) = self.fw.apply_all(&maps) {
            return Err(PortMapError::Drifted { drift, repair });
        }
        tracing::warn!(error = %drift, maps = maps.len(), "nftables had drifted from the database: table rewritten from it");
        crate::events::publish(
            Kind::PortMapRepaired,
            "portmaps",
            serde_json::json!({ "drift": [drift.to_string()], "maps": maps.len() }),
        );
        audit::record(tx, &reconcile_entry(&[drift.to_string()], &[]))?;
        Ok(())
    }

    fn resync_after_failed_commit(&self) {
        if let Err(e) = self.reconcile() {
            tracing::error!(error = %e, "kernel and database may disagree until the next reconcile");
        }
    }

    pub fn list(&self) -> Result<Vec<PortMapRow>, PortMapError> {
        Ok(self.store.with(portmaps::list)?)
    }

    /// Every map's counters; zeros (and a warning) when the kernel cannot be read, so a
    /// listing still answers.
    fn counters_or_zero(&self) -> BTreeMap<(Proto, u16), MapCounters> {
        self.fw.counters().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the port maps' counters; listing zeros");
            BTreeMap::new()
        })
    }

    /// One map with its live counters (read from the kernel now); `None` when there is
    /// no such map.
    pub fn get(
        &self,
        proto: Proto,
        listen_port: u16,
    ) -> Result<Option<(PortMapRow, MapCounters)>, PortMapError> {
        let Some(row) = self.store.with(|c| portmaps::get(c, proto, listen_port))? else {
            return Ok(None);
        };
        let counters = self
            .fw
            .counters()
            .map_err(PortMapError::Read)?
            .remove(&(proto, listen_port))
            .unwrap_or_default();
        Ok(Some((row, counters)))
    }

    /// Rewrites the kernel table from the database in one transaction; returns the number
    /// of maps written.
    pub fn restore(&self) -> Result<usize, PortMapError> {
        self.store.with(|conn| {
            let maps = portmaps::list_rules(conn)?;
            self.fw.apply_all(&maps)?;
            Ok(maps.len())
        })
    }

    /// Compares the kernel with the database and repairs any difference (`apply_all`:
    /// one transaction, in place or a rebuild), and keeps the libvirt accept in place.
    pub fn reconcile(&self) -> Result<ReconcileReport, PortMapError> {
        self.store.with(|conn| {
            let maps = portmaps::list_rules(conn)?;
            let drift = self.fw.drift(&maps)?;
            let rewritten = !drift.is_empty();
            if rewritten {
                self.fw.apply_all(&maps)?;
            }
            let forward_accept = self.fw.ensure_forward_accept()?;
            let report = ReconcileReport {
                drift,
                rewritten,
                forward_accept,
                maps: maps.len(),
            };
            if report.changed() {
                audit::record(
                    conn,
                    &reconcile_entry(&report.drift, &report.forward_accept),
                )?;
            }
            Ok(report)
        })
    }

    /// Differences between the kernel and the database (and the libvirt accept rule),
    /// changing nothing.
    pub fn drift(&self) -> Result<Vec<String>, PortMapError> {
        self.store.with(|conn| {
            let maps = portmaps::list_rules(conn)?;
            let mut lines = self.fw.drift(&maps).map_err(PortMapError::Read)?;
            lines.extend(self.fw.forward_accept_drift().map_err(PortMapError::Read)?);
            Ok(lines)
        })
    }

    pub fn cleanup(&self) -> Result<(), PortMapError> {
        Ok(self.fw.cleanup()?)
    }
}

/// What a conflicting map points at, for the 409's message.
fn describe(row: &PortMapRow) -> String {
    let target = format!("{}:{}", row.map.target_ip, row.map.target_port);
    if row.allow_from.is_empty() {
        target
    } else {
        format!("{target} (allow_from {})", row.allow_from)
    }
}

/// The audit row of a repair of the kernel from the database.
fn reconcile_entry(drift: &[String], forward_accept: &[String]) -> Entry {
    let parameters = serde_json::json!({
        "drift": drift,
        "forward_accept": forward_accept,
    });
    Entry::by_agent("reconcile", Some(parameters.to_string()))
}

#[cfg(test)]
mod tests;
