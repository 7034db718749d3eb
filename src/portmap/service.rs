//! Port-map operations: validate, write the desired state in one SQLite transaction, apply
//! it to the kernel inside that transaction, commit only if the kernel agreed.
//!
//! Every method blocks; callers on the async runtime use `spawn_blocking`. The store's
//! connection lock is held across the kernel change, so concurrent requests reach SQLite
//! and the kernel in the same order and the two never disagree.

use std::sync::{Arc, RwLock};

use bytes::Bytes;

use super::firewall::{Firewall, FirewallError};
use super::policy::{Policy, PolicyError};
use crate::model::{PortMap, Proto};
use crate::store::audit::{self, Entry, Outcome};
use crate::store::portmaps::{self, PortMapRow};
use crate::store::{Store, StoreError};

/// One rule of the `GET /ports` listing: the row plus its id.
#[derive(serde::Serialize)]
struct RuleView<'a> {
    #[serde(flatten)]
    row: &'a PortMapRow,
    rule_id: &'a str,
}

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
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a create did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// The same map existed already: nothing changed.
    Unchanged,
    /// The listen port pointed elsewhere and was switched.
    Replaced {
        previous: PortMap,
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
    /// The serialized `GET /ports` rules object; filled and cleared under the store lock.
    list_cache: RwLock<Option<Bytes>>,
}

impl PortMaps {
    pub fn new(store: Store, fw: Arc<dyn Firewall>, policy: Policy) -> Self {
        Self {
            store,
            fw,
            policy,
            list_cache: RwLock::new(None),
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
    pub fn create(
        &self,
        map: PortMap,
        replace: bool,
        by: &str,
        audit: Option<&Entry>,
    ) -> Result<CreateOutcome, PortMapError> {
        self.policy.check(&map)?;
        if self.fw.is_local_address(map.target_ip)? {
            return Err(PolicyError::TargetIsNode {
                ip: map.target_ip.to_string(),
            }
            .into());
        }
        let outcome = self.store.transaction(|tx| {
            let outcome = match portmaps::get(tx, map.proto, map.listen_port)? {
                Some(row) if row.map == map => {
                    audit::record_opt(tx, audit)?;
                    return Ok(CreateOutcome::Unchanged);
                }
                Some(row) if !replace => {
                    return Err(PortMapError::Conflict {
                        proto: map.proto,
                        listen_port: map.listen_port,
                        target: format!("{}:{}", row.map.target_ip, row.map.target_port),
                    });
                }
                Some(row) => CreateOutcome::Replaced { previous: row.map },
                None => CreateOutcome::Created,
            };
            portmaps::upsert(tx, &map, by)?;
            audit::record_opt(tx, audit)?;
            // The kernel goes last: if it refuses, the transaction rolls back.
            self.change_kernel(tx, || match outcome {
                CreateOutcome::Replaced { previous } => self.fw.replace(&previous, &map),
                _ => self.fw.add(&map),
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
            self.change_kernel(tx, || self.fw.remove(&[row.map]))?;
            Ok(Some(row.map))
        });
        match deleted {
            Err(PortMapError::Store(e)) => {
                self.resync_after_failed_commit();
                Err(e.into())
            }
            Ok(Some(m)) => {
                self.invalidate();
                Ok(Some(m))
            }
            other => other,
        }
    }

    /// Removes every map that targets one of `targets`: one SQLite transaction holding
    /// each map's audit row (`audit` says it), one kernel transaction. Returns the maps
    /// removed.
    pub fn delete_targeting(
        &self,
        targets: &[std::net::Ipv4Addr],
        audit: impl Fn(&PortMap) -> Entry,
    ) -> Result<Vec<PortMap>, PortMapError> {
        let deleted = self.store.transaction(|tx| {
            let gone: Vec<PortMap> = portmaps::list(tx)?
                .into_iter()
                .map(|r| r.map)
                .filter(|m| targets.contains(&m.target_ip))
                .collect();
            if gone.is_empty() {
                return Ok(gone);
            }
            for m in &gone {
                audit::record(tx, &audit(m))?;
                portmaps::delete(tx, m.proto, m.listen_port)?;
            }
            self.change_kernel(tx, || self.fw.remove(&gone))?;
            Ok(gone)
        });
        match deleted {
            Err(PortMapError::Store(e)) => {
                self.resync_after_failed_commit();
                Err(e.into())
            }
            Ok(gone) => {
                if !gone.is_empty() {
                    self.invalidate();
                }
                Ok(gone)
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
        let maps = portmaps::list_maps(tx)?;
        if let Err(repair) = self.fw.apply_all(&maps) {
            return Err(PortMapError::Drifted { drift, repair });
        }
        tracing::warn!(error = %drift, maps = maps.len(), "nftables had drifted from the database: table rewritten from it");
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

    /// The `GET /ports` body if it is cached (no blocking).
    pub fn cached_list_body(&self) -> Option<Bytes> {
        self.list_cache.read().ok().and_then(|c| c.clone())
    }

    /// The `GET /ports` body, `{"ok":true,"rules":{"<rule_id>":{...},...}}` (the original
    /// agent's shape plus bookkeeping), cached until the next change.
    pub fn list_body(&self) -> Result<Bytes, PortMapError> {
        if let Some(v) = self.cached_list_body() {
            return Ok(v);
        }
        // Built under the store lock so that a change cannot slip in between reading the
        // rows and filling the cache. Rows are streamed into the buffer: with 10,000 maps
        // a per-row JSON value tree would cost the idle agent megabytes of heap.
        let (body, built) = self.store.with(|conn| {
            // Checked again under the lock: callers that missed the cache together queue
            // here, and each would otherwise build its own copy of the whole listing
            // (2.5 MB with 10,000 maps).
            if let Some(v) = self.cached_list_body() {
                return Ok((v, false));
            }
            let mut out = Vec::with_capacity(32 + 256 * portmaps::count(conn)?.max(0) as usize);
            out.extend_from_slice(br#"{"ok":true,"rules":{"#);
            let mut first = true;
            portmaps::for_each(conn, |row| {
                if !first {
                    out.push(b',');
                }
                first = false;
                let rule_id = row.map.rule_id();
                serde_json::to_writer(&mut out, &rule_id)
                    .and_then(|()| {
                        out.push(b':');
                        serde_json::to_writer(
                            &mut out,
                            &RuleView {
                                row,
                                rule_id: &rule_id,
                            },
                        )
                    })
                    .map_err(|e| StoreError::Task(format!("serialize: {e}")))
            })?;
            out.extend_from_slice(b"}}");
            // The estimate above is generous; the cache keeps the body for as long as
            // the maps do not change, so it should not keep the slack too.
            out.shrink_to_fit();
            let bytes = Bytes::from(out);
            if let Ok(mut c) = self.list_cache.write() {
                *c = Some(bytes.clone());
            }
            Ok::<_, PortMapError>((bytes, true))
        })?;
        if built {
            crate::memory::release_free_heap();
        }
        Ok(body)
    }

    /// Rewrites the kernel table from the database in one transaction; returns the number
    /// of maps written.
    pub fn restore(&self) -> Result<usize, PortMapError> {
        self.store.with(|conn| {
            let maps = portmaps::list_maps(conn)?;
            self.fw.apply_all(&maps)?;
            Ok(maps.len())
        })
    }

    /// Compares the kernel with the database and repairs any difference (whole-table
    /// rewrite, which is one cheap transaction), and keeps the libvirt accept in place.
    pub fn reconcile(&self) -> Result<ReconcileReport, PortMapError> {
        self.store.with(|conn| {
            let maps = portmaps::list_maps(conn)?;
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
            let maps = portmaps::list_maps(conn)?;
            let mut lines = self.fw.drift(&maps).map_err(PortMapError::Read)?;
            lines.extend(self.fw.forward_accept_drift().map_err(PortMapError::Read)?);
            Ok(lines)
        })
    }

    pub fn cleanup(&self) -> Result<(), PortMapError> {
        Ok(self.fw.cleanup()?)
    }
}

/// The audit row of a repair of the kernel from the database.
fn reconcile_entry(drift: &[String], forward_accept: &[String]) -> Entry {
    Entry {
        client_addr: None,
        identity: "agent".into(),
        action: "reconcile".into(),
        parameters: Some(
            serde_json::json!({
                "drift": drift,
                "forward_accept": forward_accept,
            })
            .to_string(),
        ),
        outcome: Outcome::Ok,
        status: None,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portmap::MemoryFirewall;
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    fn setup() -> (PortMaps, Arc<MemoryFirewall>) {
        let fw = Arc::new(MemoryFirewall::default());
        let mut reserved = BTreeMap::new();
        reserved.insert(22, "SSH".to_string());
        let svc = PortMaps::new(
            Store::open_in_memory().unwrap(),
            fw.clone(),
            Policy::new(vec!["10.0.0.0/24".parse().unwrap()], reserved),
        );
        svc.restore().unwrap();
        (svc, fw)
    }

    fn map(proto: Proto, port: u16, host: u8, target: u16) -> PortMap {
        PortMap {
            proto,
            listen_port: port,
            target_ip: Ipv4Addr::new(10, 0, 0, host),
            target_port: target,
        }
    }

    fn kernel(fw: &MemoryFirewall) -> Vec<PortMap> {
        fw.maps().unwrap().into_iter().collect()
    }

    fn stored(svc: &PortMaps) -> Vec<PortMap> {
        let mut v: Vec<_> = svc.list().unwrap().into_iter().map(|r| r.map).collect();
        v.sort();
        v
    }

    #[test]
    fn the_maps_of_a_target_go_in_one_transaction_with_their_audit_rows_or_not_at_all() {
        let (svc, fw) = setup();
        let (a, b, c) = (
            map(Proto::Tcp, 2222, 5, 22),
            map(Proto::Udp, 5353, 5, 53),
            map(Proto::Tcp, 8080, 6, 80),
        );
        for m in [a, b, c] {
            svc.create(m, false, "t", None).unwrap();
        }
        let entry = |m: &PortMap| Entry {
            client_addr: None,
            identity: "agent".into(),
            action: format!("DELETE /ports/{} (VM deleted)", m.listen_port),
            parameters: None,
            outcome: audit::Outcome::Ok,
            status: None,
            error: None,
        };
        let audit_rows = |svc: &PortMaps| -> i64 {
            svc.store()
                .with(|c| {
                    Ok::<_, crate::store::StoreError>(c.query_row(
                        "SELECT count(*) FROM audit_log",
                        [],
                        |r| r.get(0),
                    )?)
                })
                .unwrap()
        };
        // The kernel refuses: nothing changes anywhere.
        fw.fail_next("Operation not permitted");
        assert!(
            svc.delete_targeting(&[Ipv4Addr::new(10, 0, 0, 5)], entry)
                .is_err()
        );
        assert_eq!(stored(&svc), vec![a, c, b]);
        assert_eq!(kernel(&fw).len(), 3);
        assert_eq!(audit_rows(&svc), 0);

        let gone = svc
            .delete_targeting(&[Ipv4Addr::new(10, 0, 0, 5)], entry)
            .unwrap();
        assert_eq!(gone, vec![a, b]);
        assert_eq!(stored(&svc), vec![c]);
        assert_eq!(kernel(&fw), vec![c]);
        assert_eq!(audit_rows(&svc), 2);
        assert!(
            svc.delete_targeting(&[Ipv4Addr::new(10, 0, 0, 9)], entry)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_comparison_that_cannot_read_the_kernel_says_so_and_not_refused() {
        let (svc, fw) = setup();
        fw.fail_next("Operation not permitted (errno 1)");
        let e = svc.drift().unwrap_err().to_string();
        assert_eq!(
            e,
            "cannot read the kernel's nftables state: Operation not permitted (errno 1)"
        );
    }

    #[test]
    fn create_is_idempotent_and_conflicts_need_replace() {
        let (svc, fw) = setup();
        let a = map(Proto::Tcp, 8080, 2, 80);
        assert_eq!(
            svc.create(a, false, "t", None).unwrap(),
            CreateOutcome::Created
        );
        assert_eq!(
            svc.create(a, false, "t", None).unwrap(),
            CreateOutcome::Unchanged
        );
        let b = map(Proto::Tcp, 8080, 3, 80);
        assert!(matches!(
            svc.create(b, false, "t", None),
            Err(PortMapError::Conflict { .. })
        ));
        assert_eq!(kernel(&fw), vec![a]);
        assert_eq!(
            svc.create(b, true, "t", None).unwrap(),
            CreateOutcome::Replaced { previous: a }
        );
        assert_eq!(kernel(&fw), vec![b]);
        assert_eq!(stored(&svc), vec![b]);
        // The same port in UDP is another map.
        let u = map(Proto::Udp, 8080, 2, 53);
        svc.create(u, false, "t", None).unwrap();
        assert_eq!(stored(&svc), kernel(&fw));
    }

    #[test]
    fn a_kernel_refusal_leaves_the_database_untouched() {
        let (svc, fw) = setup();
        let a = map(Proto::Tcp, 8080, 2, 80);
        svc.create(a, false, "t", None).unwrap();
        fw.fail_next("Operation not permitted");
        let err = svc
            .create(map(Proto::Tcp, 8080, 3, 80), true, "t", None)
            .unwrap_err();
        assert!(err.to_string().contains("Operation not permitted"), "{err}");
        assert_eq!(stored(&svc), vec![a]);
        fw.fail_next("Operation not permitted");
        svc.create(map(Proto::Tcp, 9090, 3, 80), false, "t", None)
            .unwrap_err();
        fw.fail_next("Operation not permitted");
        svc.delete(Proto::Tcp, 8080, None).unwrap_err();
        assert_eq!(stored(&svc), vec![a]);
        assert_eq!(kernel(&fw), vec![a]);
    }

    #[test]
    fn policy_refusals_change_nothing() {
        let (svc, fw) = setup();
        assert!(matches!(
            svc.create(map(Proto::Tcp, 22, 2, 80), false, "t", None),
            Err(PortMapError::Policy(_))
        ));
        let outside = PortMap {
            target_ip: Ipv4Addr::new(1, 1, 1, 1),
            ..map(Proto::Tcp, 8080, 2, 80)
        };
        assert!(matches!(
            svc.create(outside, false, "t", None),
            Err(PortMapError::Policy(_))
        ));
        // The node's own address inside the VM subnet (the bridge's) is not a VM.
        fw.add_local_address(Ipv4Addr::new(10, 0, 0, 1));
        let e = svc
            .create(map(Proto::Tcp, 8080, 1, 22), false, "t", None)
            .unwrap_err();
        assert!(e.to_string().contains("node itself"), "{e}");
        assert!(stored(&svc).is_empty());
        assert!(kernel(&fw).is_empty());
    }

    #[test]
    fn delete_reports_whether_something_was_deleted() {
        let (svc, fw) = setup();
        let a = map(Proto::Udp, 5353, 2, 53);
        svc.create(a, false, "t", None).unwrap();
        assert_eq!(svc.delete(Proto::Tcp, 5353, None).unwrap(), None);
        assert_eq!(svc.delete(Proto::Udp, 5353, None).unwrap(), Some(a));
        assert_eq!(svc.delete(Proto::Udp, 5353, None).unwrap(), None);
        assert!(kernel(&fw).is_empty());
    }

    #[test]
    fn reconcile_repairs_a_wiped_table_and_is_quiet_when_in_sync() {
        let (svc, fw) = setup();
        let a = map(Proto::Tcp, 8080, 2, 80);
        svc.create(a, false, "t", None).unwrap();
        let r = svc.reconcile().unwrap();
        assert!(!r.changed(), "{r:?}");
        fw.wipe();
        assert_eq!(svc.drift().unwrap(), vec!["table missing".to_string()]);
        let r = svc.reconcile().unwrap();
        assert!(r.rewritten);
        assert_eq!(kernel(&fw), vec![a]);
        let audited: i64 = svc
            .store()
            .with(|c| {
                Ok::<_, StoreError>(c.query_row(
                    "SELECT count(*) FROM audit_log WHERE action = 'reconcile'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(audited, 1);
    }

    fn reconcile_rows(svc: &PortMaps) -> Vec<String> {
        svc.store()
            .with(|c| {
                let mut stmt = c.prepare(
                    "SELECT parameters FROM audit_log WHERE action = 'reconcile' ORDER BY id",
                )?;
                let rows = stmt
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, StoreError>(rows)
            })
            .unwrap()
    }

    #[test]
    fn a_change_to_a_table_deleted_behind_the_agents_back_repairs_it_first() {
        let (svc, fw) = setup();
        let (a, b, c) = (
            map(Proto::Tcp, 8080, 2, 80),
            map(Proto::Udp, 5353, 2, 53),
            map(Proto::Tcp, 9090, 3, 80),
        );
        svc.create(a, false, "t", None).unwrap();
        svc.create(b, false, "t", None).unwrap();

        // Add: the kernel says ENOENT; the table comes back with every map and the new one.
        fw.wipe();
        assert_eq!(
            svc.create(c, false, "t", None).unwrap(),
            CreateOutcome::Created
        );
        assert_eq!(kernel(&fw), vec![a, c, b]);
        assert_eq!(stored(&svc), kernel(&fw));
        let rows = reconcile_rows(&svc);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(rows[0].contains("No such file or directory"), "{rows:?}");

        // Delete and replace alike.
        fw.wipe();
        assert_eq!(svc.delete(Proto::Tcp, 8080, None).unwrap(), Some(a));
        assert_eq!(kernel(&fw), vec![c, b]);
        fw.wipe();
        let c2 = map(Proto::Tcp, 9090, 4, 80);
        assert_eq!(
            svc.create(c2, true, "t", None).unwrap(),
            CreateOutcome::Replaced { previous: c }
        );
        assert_eq!(kernel(&fw), vec![c2, b]);
        fw.wipe();
        svc.delete_targeting(&[Ipv4Addr::new(10, 0, 0, 2)], |_| Entry {
            client_addr: None,
            identity: "agent".into(),
            action: "DELETE (VM deleted)".into(),
            parameters: None,
            outcome: Outcome::Ok,
            status: None,
            error: None,
        })
        .unwrap();
        assert_eq!(kernel(&fw), vec![c2]);
        assert_eq!(stored(&svc), vec![c2]);
        assert_eq!(reconcile_rows(&svc).len(), 4);
        assert!(!svc.reconcile().unwrap().changed());
    }

    #[test]
    fn a_drifted_table_that_cannot_be_repaired_changes_nothing_and_says_try_again() {
        let (svc, fw) = setup();
        let a = map(Proto::Tcp, 8080, 2, 80);
        svc.create(a, false, "t", None).unwrap();
        fw.fail_next_as(
            crate::portmap::FirewallErrorKind::NotFound,
            "No such file or directory",
        );
        fw.fail_next("Operation not permitted");
        let e = svc
            .create(map(Proto::Tcp, 9090, 3, 80), false, "t", None)
            .unwrap_err();
        assert!(matches!(e, PortMapError::Drifted { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("No such file or directory"), "{text}");
        assert!(text.contains("Operation not permitted"), "{text}");
        assert!(text.contains("try again"), "{text}");
        assert_eq!(stored(&svc), vec![a]);
        assert_eq!(kernel(&fw), vec![a]);
        assert!(reconcile_rows(&svc).is_empty());
        // Other refusals are not drift: no repair is tried.
        fw.fail_next("Operation not permitted");
        let e = svc
            .create(map(Proto::Tcp, 9090, 3, 80), false, "t", None)
            .unwrap_err();
        assert!(matches!(e, PortMapError::Kernel(_)), "{e:?}");
    }

    #[test]
    fn tunnel_sources_take_effect_with_the_next_whole_table_write() {
        use crate::net::antispoof::TunnelGuard;
        let (svc, fw) = setup();
        let nets = vec!["10.50.0.1/32".parse().unwrap()];
        fw.set_tunnel_sources(&nets);
        assert_eq!(fw.tunnel_sources_in_force(), Some(vec![]));
        assert_eq!(svc.drift().unwrap().len(), 1);
        svc.restore().unwrap();
        assert_eq!(fw.tunnel_sources_in_force(), Some(nets));
        assert!(svc.drift().unwrap().is_empty());
    }

    #[test]
    fn the_list_cache_follows_every_change() {
        let (svc, _fw) = setup();
        let json = |svc: &PortMaps| -> serde_json::Value {
            let body: serde_json::Value =
                serde_json::from_slice(&svc.list_body().unwrap()).unwrap();
            assert_eq!(body["ok"], true);
            body["rules"].clone()
        };
        assert_eq!(json(&svc).as_object().unwrap().len(), 0);
        svc.create(map(Proto::Tcp, 8080, 2, 80), false, "t", None)
            .unwrap();
        svc.create(map(Proto::Udp, 8080, 2, 53), false, "t", None)
            .unwrap();
        let v = json(&svc);
        assert_eq!(v["8080"]["target_port"], 80);
        assert_eq!(v["8080/udp"]["proto"], "udp");
        svc.delete(Proto::Tcp, 8080, None).unwrap();
        assert!(json(&svc).get("8080").is_none());
    }
}
