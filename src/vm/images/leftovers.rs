//! What an interrupted run left of its image transfers: rows still `downloading` and
//! `partial.*` volumes, cleared at startup (`agent::vm_reconcile_loop`).

use super::Images;
use crate::model::ImageState;
use crate::store::vms;
use crate::vm::VmError;
use crate::vm::driver::volumes;

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
        let removed = self
            .driver
            .ask(|hv, call| hv.delete_volumes_starting(call, volumes::PARTIAL_PREFIX))
            .await?;
        for v in &removed {
            tracing::info!(volume = %v, "removed an unfinished image transfer");
        }
        Ok(removed.len())
    }
}
