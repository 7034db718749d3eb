//! Port-map operations: validate, change the kernel, then write the desired state and
//! its audit row in one SQLite transaction (docs/decisions/28-portmap-write-path.md).
//!
//! One change at a time holds the service's writer lock from its first read of SQLite to
//! its commit, so SQLite and the kernel see changes in the same order and a change's
//! plan stays true while the kernel makes it. The kernel is awaited on the runtime (no
//! thread blocks on it) and no SQLite lock is held meanwhile. SQLite commits only what
//! the kernel took; when the commit itself fails after the kernel changed, the table is
//! rewritten from SQLite, so the two agree again.

use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::firewall::{Firewall, FirewallError, FwFuture};
use super::policy::{Policy, PolicyError};
use crate::events::Kind;
use crate::model::{PortMap, PortRule, Proto, VmName};
use crate::store::audit::{self, Entry};
use crate::store::portmaps::{self, PortMapRow};
use crate::store::{Store, StoreError};

mod listing;
mod naming;
mod repair;
mod sample;

pub use repair::ReconcileReport;

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
    UnknownVm(VmName),
    /// The VM named has no address to map to yet: it was created before pinned
    /// addresses and no lease of it has been seen.
    #[error(
        "VM {0} has no known address yet (created before pinned addresses, no lease seen): \
         try again once GET /vms/{0}/ip answers"
    )]
    VmWithoutAddress(VmName),
    /// The VM named got another address while the map was being made.
    #[error("VM {0} changed its address while the map was being made; try again")]
    VmMoved(VmName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a new map goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An address (in VM_SUBNET or ALLOWED_TARGETS).
    Ip(Ipv4Addr),
    /// A VM of the agent, by name: its pinned address (for a VM from before pinned
    /// addresses, its last seen one), followed through a recreate, removed with it.
    Vm(VmName),
}

/// A map to make: `POST /ports` as the service takes it.
#[derive(Clone, Debug)]
pub struct NewMap {
    pub proto: Proto,
    pub listen_port: u16,
    pub target: Target,
    pub target_port: u16,
    pub allow_from: crate::model::AllowList,
    /// Switch an existing map of the port to this one instead of refusing (409).
    pub replace: bool,
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

/// A create's result: what it did, and the map as it now is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Made {
    pub outcome: CreateOutcome,
    pub rule: PortRule,
    /// The VM the map names, if it names one.
    pub target_vm: Option<VmName>,
}

/// The `GET /ports` body cache: the body and when it was built.
type ListCache = Arc<RwLock<Option<(Bytes, Instant)>>>;

pub struct PortMaps {
    store: Store,
    fw: Arc<dyn Firewall>,
    policy: Policy,
    /// Held by each change from its first read to its commit (the module's comment).
    writer: tokio::sync::Mutex<()>,
    /// The serialized `GET /ports` body; filled under the store lock, cleared after each
    /// commit, served for at most [`LIST_MAX_AGE`].
    list_cache: ListCache,
    /// Held while a `GET /ports` body is built, so that only one is (`listing.rs`).
    list_builder: tokio::sync::Mutex<()>,
    /// Every map's counters for `GET /metrics`, read at most once per [`LIST_MAX_AGE`].
    counters_cache: sample::CountersCache,
}

impl PortMaps {
    pub fn new(store: Store, fw: Arc<dyn Firewall>, policy: Policy) -> Self {
        Self {
            store,
            fw,
            policy,
            writer: tokio::sync::Mutex::new(()),
            list_cache: Arc::default(),
            list_builder: tokio::sync::Mutex::new(()),
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
    /// is written in the same transaction as the map: they stand or fall together. A
    /// different allow-list or `target_vm` for the same target is a replace too.
    pub async fn create(
        &self,
        new: NewMap,
        by: &str,
        audit: Option<Entry>,
    ) -> Result<Made, PortMapError> {
        let _one = self.writer.lock().await;
        let target_vm = match &new.target {
            Target::Vm(vm) => Some(vm.clone()),
            Target::Ip(_) => None,
        };
        let rule = self.resolve(&new).await?;
        let outcome = self
            .plan_create(&rule, target_vm.clone(), new.replace)
            .await?;
        if outcome == CreateOutcome::Unchanged {
            self.commit(None, move |tx| Ok(audit::record_opt(tx, audit.as_ref())?))
                .await?;
            return Ok(Made {
                outcome,
                rule,
                target_vm,
            });
        }
        let change = match &outcome {
            CreateOutcome::Replaced { previous } => self.fw.replace(previous, &rule),
            _ => self.fw.add(&rule),
        };
        let added = rule.clone();
        let repair = self
            .change_kernel(change, move |rules| {
                rules.retain(|r| key(r) != key(&added));
                rules.push(added);
            })
            .await?;
        let (row, vm, by) = (rule.clone(), target_vm.clone(), by.to_owned());
        self.commit(repair, move |tx| {
            if let Some(vm) = &vm {
                naming::check_vm_address(tx, vm, row.map.target_ip)?;
            }
            portmaps::upsert(tx, &row, vm.as_ref().map(VmName::as_str), &by)?;
            Ok(audit::record_opt(tx, audit.as_ref())?)
        })
        .await?;
        publish_added(&rule, target_vm.as_ref(), &outcome);
        Ok(Made {
            outcome,
            rule,
            target_vm,
        })
    }

    /// What a create of `rule` would do, from the database as it is (under the writer
    /// lock, so it stays true until the commit).
    async fn plan_create(
        &self,
        rule: &PortRule,
        target_vm: Option<VmName>,
        replace: bool,
    ) -> Result<CreateOutcome, PortMapError> {
        let (proto, port) = key(rule);
        let row = self
            .store
            .run(move |s| s.with(|c| portmaps::get(c, proto, port)))
            .await?;
        Ok(match row {
            Some(row)
                if row.map == rule.map
                    && row.allow_from == rule.allow_from
                    && row.target_vm.as_deref() == target_vm.as_ref().map(VmName::as_str) =>
            {
                CreateOutcome::Unchanged
            }
            Some(row) if !replace => {
                return Err(PortMapError::Conflict {
                    proto,
                    listen_port: port,
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
        })
    }

    /// Deletes a map; `None` when there was none. `audit` is written in the same
    /// transaction, as for [`PortMaps::create`].
    pub async fn delete(
        &self,
        proto: Proto,
        listen_port: u16,
        audit: Option<Entry>,
    ) -> Result<Option<PortMap>, PortMapError> {
        let _one = self.writer.lock().await;
        let row = self
            .store
            .run(move |s| s.with(|c| portmaps::get(c, proto, listen_port)))
            .await?;
        let Some(row) = row else {
            self.commit(None, move |tx| Ok(audit::record_opt(tx, audit.as_ref())?))
                .await?;
            return Ok(None);
        };
        let rule = PortRule {
            map: row.map,
            allow_from: row.allow_from,
        };
        let repair = self
            .change_kernel(self.fw.remove(std::slice::from_ref(&rule)), |rules| {
                rules.retain(|r| key(r) != (proto, listen_port))
            })
            .await?;
        self.commit(repair, move |tx| {
            portmaps::delete(tx, proto, listen_port)?;
            Ok(audit::record_opt(tx, audit.as_ref())?)
        })
        .await?;
        publish(Kind::PortMapRemoved, &row.map, serde_json::Value::Null);
        Ok(Some(row.map))
    }

    /// Makes `change`, the kernel's half of a change that SQLite does not hold yet.
    ///
    /// When the kernel refuses because it drifted from the database (the table, a map or
    /// an element deleted or added behind the agent's back: `NotFound`, `Exists`), the
    /// whole table is rewritten from the database's rules as `after` changes them (the
    /// change included), as the reconcile would, in one kernel transaction; the repair's
    /// audit row is returned for the change's commit. If that fails as well:
    /// [`PortMapError::Drifted`].
    async fn change_kernel(
        &self,
        change: FwFuture<'_, ()>,
        after: impl FnOnce(&mut Vec<PortRule>),
    ) -> Result<Option<Entry>, PortMapError> {
        let drift = match change.await {
            Ok(()) => return Ok(None),
            Err(e) if e.is_drift() => e,
            Err(e) => return Err(e.into()),
        };
        let mut rules = self.rules().await?;
        after(&mut rules);
        if let Err(repair) = self.fw.apply_all(&rules).await {
            return Err(PortMapError::Drifted { drift, repair });
        }
        tracing::warn!(error = %drift, maps = rules.len(), "nftables had drifted from the database: table rewritten from it");
        crate::events::publish(
            Kind::PortMapRepaired,
            "portmaps",
            serde_json::json!({ "drift": [drift.to_string()], "maps": rules.len() }),
        );
        Ok(Some(repair::reconcile_entry(&[drift.to_string()], &[])))
    }

    /// Writes a change the kernel already made (and the audit row of a repair it needed)
    /// in one transaction. If that fails, the kernel is rewritten from the database, so
    /// that the two agree again, and the error is returned. Clears the listing cache.
    async fn commit(
        &self,
        repair: Option<Entry>,
        write: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(), PortMapError> + Send + 'static,
    ) -> Result<(), PortMapError> {
        let written = self
            .store
            .run(move |s| {
                s.transaction(|tx| {
                    write(tx)?;
                    audit::record_opt(tx, repair.as_ref())?;
                    Ok::<_, PortMapError>(())
                })
            })
            .await;
        self.invalidate();
        if written.is_err() {
            self.rewrite_from_store().await;
        }
        written
    }

    /// Every rule the database holds.
    async fn rules(&self) -> Result<Vec<PortRule>, PortMapError> {
        Ok(self.store.run(|s| s.with(portmaps::list_rules)).await?)
    }
}

/// A rule's key: its protocol and listen port.
fn key(r: &PortRule) -> (Proto, u16) {
    (r.map.proto, r.map.listen_port)
}

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

/// `portmap.added` for a map made or switched.
fn publish_added(rule: &PortRule, target_vm: Option<&VmName>, outcome: &CreateOutcome) {
    publish(
        Kind::PortMapAdded,
        &rule.map,
        serde_json::json!({
            "target_vm": target_vm.map(VmName::as_str),
            "allow_from": rule.allow_from.networks().iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "replaced": matches!(outcome, CreateOutcome::Replaced { .. }),
        }),
    );
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

#[cfg(test)]
mod tests;
