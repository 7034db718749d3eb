//! The changes: a map made, switched or deleted. Each plans from SQLite under the writer
//! lock, changes the kernel, then commits (the module comment of `service`).

use super::naming::check_vm_address;
use super::repair::reconcile_entry;
use super::{CreateOutcome, Made, NewMap, PortMapError, PortMaps, Target, describe, key, publish};
use crate::events::Kind;
use crate::model::{PortMap, PortRule, Proto, VmName};
use crate::portmap::firewall::FwFuture;
use crate::store::audit::{self, Entry};
use crate::store::portmaps;

impl PortMaps {
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
                check_vm_address(tx, vm, row.map.target_ip)?;
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
    pub(super) async fn plan_create(
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
    pub(super) async fn change_kernel(
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
        Ok(Some(reconcile_entry(&[drift.to_string()], &[])))
    }

    /// Writes a change the kernel already made (and the audit row of a repair it needed)
    /// in one transaction. If that fails, the kernel is rewritten from the database, so
    /// that the two agree again, and the error is returned. Clears the listing cache.
    pub(super) async fn commit(
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
