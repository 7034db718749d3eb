//! Port-map operations: validate, change the kernel, then write the desired state and
//! its audit row in one SQLite transaction (docs/decisions/28-portmap-write-path.md).
//!
//! One change at a time holds the service's writer lock from its first read of SQLite to
//! its commit, so SQLite and the kernel see changes in the same order and a change's
//! plan stays true while the kernel makes it. The kernel is awaited on the runtime (no
//! thread blocks on it) and no SQLite lock is held meanwhile. SQLite commits only what
//! the kernel took; when the commit itself fails after the kernel changed, the table is
//! rewritten from SQLite, so the two agree again.

use std::sync::Arc;

use super::firewall::Firewall;
use super::policy::Policy;
use crate::events::Kind;
use crate::model::{PortMap, PortRule, Proto};
use crate::store::Store;
use crate::store::portmaps::{self, PortMapRow};

pub(super) mod listing;
mod naming;
mod repair;
mod sample;
mod types;
mod write;

use types::{CountersCache, ListCache};
pub use types::{CreateOutcome, LIST_MAX_AGE, Made, NewMap, PortMapError, ReconcileReport, Target};

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
    counters_cache: CountersCache,
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

    pub(super) fn invalidate(&self) {
        if let Ok(mut c) = self.list_cache.write() {
            *c = None;
        }
    }

    /// Every rule the database holds.
    pub(super) async fn rules(&self) -> Result<Vec<PortRule>, PortMapError> {
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
