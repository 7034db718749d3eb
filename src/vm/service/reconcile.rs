//! The VM reconcile: a VM whose domain vanished from libvirt is defined again (and
//! started if it should run); domains the agent did not create are never touched.

use std::sync::Arc;

use super::Vms;
use crate::store::vms;
use crate::vm::VmError;
use crate::vm::domain::reconcile_one;

impl Vms {
    /// Makes libvirt match the rows: a VM whose domain vanished is defined again (its
    /// volumes re-created if they vanished too) and started if it should run. Domains
    /// the agent did not create are never touched. Returns what was repaired.
    pub async fn reconcile(&self) -> Result<Vec<String>, VmError> {
        for name in self.abandoned.ready() {
            let Some(_claim) = self.claims.for_reconcile(&name) else {
                continue;
            };
            match self.clean_abandoned(&name).await {
                Ok(()) => {}
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "cannot remove what an abandoned create made")
                }
            }
        }
        let rows = self.store.run(|s| s.with(vms::list)).await?;
        // A node without VMs leaves libvirt alone (and never loads it).
        if !rows.is_empty() {
            self.refresh_listing();
        }
        let images = Arc::new(self.store.run(|s| s.with(vms::images)).await?);
        let mut repaired = Vec::new();
        for row in rows {
            // A VM with an operation in flight is that operation's business; holding the
            // claim keeps a create or delete from starting while this repairs the row.
            let Some(_claim) = self.claims.for_reconcile(&row.name) else {
                continue;
            };
            // Read again under the claim: a delete that finished since the list above
            // must not be undone.
            let name = row.name.clone();
            let n = name.clone();
            let fresh = self
                .store
                .run(move |s| {
                    s.with(|c| {
                        Ok::<_, crate::store::StoreError>((vms::get(c, &n)?, vms::seed(c, &n)?))
                    })
                })
                .await?;
            let (Some(row), seed) = fresh else {
                continue;
            };
            let cfg = self.cfg.clone();
            let images = Arc::clone(&images);
            // Waits for libvirt's real answer: the claim lives as long as the work.
            let result = self
                .lv
                .call_unbounded(move |conn| reconcile_one(conn, &cfg, &row, seed.as_ref(), &images))
                .await;
            match result {
                Ok(done) if done.is_empty() => {}
                Ok(done) => {
                    tracing::warn!(vm = %name, repaired = ?done, "libvirt did not match the database; repaired");
                    // The operator did not ask for this: the audit trail says what the
                    // agent did on its own.
                    self.record_own_ok(
                        "reconcile VM",
                        serde_json::json!({"vm": name, "repaired": done}),
                    )
                    .await;
                    repaired.extend(done.iter().map(|d| format!("{name}: {d}")));
                }
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => tracing::error!(vm = %name, error = %e, "cannot restore the VM's domain"),
            }
        }
        Ok(repaired)
    }
}
