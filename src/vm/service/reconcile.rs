//! The VM reconcile: a VM whose domain vanished from libvirt is defined again (and
//! started if it should run), a pinned address whose DHCP host entry vanished is
//! reserved again; domains the agent did not create are never touched.

use std::sync::Arc;

use super::Vms;
use crate::store::vms;
use crate::vm::VmError;
use crate::vm::dhcp_hosts;
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
        let mut repaired = self.clean_stray_pins().await?;
        let rows = self.store.run(|s| s.with(vms::list)).await?;
        // A node without VMs leaves libvirt alone (and never loads it).
        if !rows.is_empty() {
            self.refresh_listing();
        }
        let images = Arc::new(self.store.run(|s| s.with(vms::images)).await?);
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
                .call_unbounded(move |conn| {
                    // The reservation first: a domain started here gets its address on
                    // its first lease.
                    let mut done = match reassert_pin(conn, &row) {
                        Ok(done) => done,
                        Err(e) if e.is_unavailable() => return Err(e),
                        // The domain is still worth restoring (a network defined
                        // anew later gets the entry at the next pass).
                        Err(e) => {
                            tracing::error!(vm = %row.name, error = %e, "cannot restore the VM's DHCP host entry");
                            Vec::new()
                        }
                    };
                    done.extend(reconcile_one(conn, &cfg, &row, seed.as_ref(), &images)?);
                    Ok(done)
                })
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

/// Puts back the DHCP host entry of a VM with a pinned address when the network lacks it
/// (someone ran `virsh net-update ... delete`, or the network was defined anew).
fn reassert_pin(
    conn: &virt::connect::Connect,
    row: &vms::VmRow,
) -> Result<Vec<&'static str>, VmError> {
    let Some(ip) = super::pinning::pinned(row) else {
        return Ok(Vec::new());
    };
    if dhcp_hosts::ensure(conn, &row.network_name, &row.mac, &row.name, ip)? {
        return Ok(vec!["DHCP host entry added again"]);
    }
    Ok(Vec::new())
}
