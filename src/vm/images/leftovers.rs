//! What an interrupted run left of its image transfers: rows still `downloading` and
//! `partial.*` volumes, cleared at startup (`agent::vm_reconcile_loop`).

use super::Images;
use crate::model::ImageState;
use crate::store::vms;
use crate::vm::{VmError, storage};

impl Images {
    /// At startup, in SQLite only: transfers the last run did not finish are failed.
    /// Returns how many; only then can the pool hold partial volumes of ours (the row is
    /// written before its volume), see [`Images::remove_partial_volumes`].
    pub async fn fail_interrupted(&self) -> Result<usize, VmError> {
        let rows = self.store.run(|s| s.with(vms::images)).await?;
        let interrupted: Vec<_> = rows
            .iter()
            .filter(|r| r.state == ImageState::Downloading)
            .collect();
        for r in &interrupted {
            let n = r.name.clone();
            self.store
                .run(move |s| {
                    s.with(|c| {
                        vms::image_failed(
                            c,
                            &n,
                            "interrupted: the agent stopped during the transfer",
                        )
                    })
                })
                .await?;
        }
        Ok(interrupted.len())
    }

    /// Removes the partial volumes of transfers that did not finish.
    pub async fn remove_partial_volumes(&self) -> Result<usize, VmError> {
        let (pool_name, pool_dir) = (self.pool.clone(), self.pool_dir.clone());
        self.lv
            .call(move |conn| {
                // Nothing to clean where the pool was never made (and it is not made
                // just for this: an agent that never ran a VM leaves libvirt alone).
                let _ = &pool_dir;
                let pool = match conn.lookup_storage_pool_by_name(&pool_name) {
                    Ok(p) if p.is_active().unwrap_or(false) => p,
                    _ => return Ok(0),
                };
                let _ = pool.refresh(0);
                let names = pool
                    .list_volumes()
                    .map_err(|e| VmError::libvirt("listing volumes", e))?;
                let mut removed = 0;
                for v in names
                    .iter()
                    .filter(|v| v.starts_with(storage::PARTIAL_PREFIX))
                {
                    if storage::delete_volume(&pool, v)? {
                        tracing::info!(volume = %v, "removed an unfinished image transfer");
                        removed += 1;
                    }
                }
                Ok(removed)
            })
            .await
    }
}
