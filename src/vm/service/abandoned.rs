//! What a create cut off inside libvirt left behind (`vm::abandoned` keeps the list):
//! removed by the reconcile, and by the next create of the name, until it has settled.

use super::Vms;
use crate::vm::VmError;

impl Vms {
    /// One cleanup pass over what an abandoned create of `name` made, once its libvirt
    /// work has returned (`abandoned.rs`). The caller holds the name's claim.
    pub(super) async fn clean_abandoned(&self, name: &str) -> Result<(), VmError> {
        let Some(mut attempt) = self.abandoned.take_ready(name) else {
            return Ok(());
        };
        if !attempt.started() {
            return Ok(());
        }
        // A row: a later create (a recreate) of the name succeeded; it removed what this
        // one made before it built its own.
        let row = match self.row(name).await {
            Ok(r) => r,
            Err(e) => {
                self.abandoned.put_back(attempt);
                return Err(e);
            }
        };
        if row.is_some() {
            return Ok(());
        }
        let (cfg, n, iid) = (
            self.cfg.clone(),
            name.to_string(),
            attempt.instance_id().to_string(),
        );
        let removed = match self
            .lv
            .call_unbounded(move |conn| crate::vm::abandoned::clean(conn, &cfg, &n, &iid))
            .await
        {
            Ok(crate::vm::abandoned::Cleaned::NotOurs) => return Ok(()),
            Ok(crate::vm::abandoned::Cleaned::Removed(r)) => r,
            Err(e) => {
                self.abandoned.put_back(attempt);
                return Err(e);
            }
        };
        if !attempt.settled_after(!removed.is_empty()) {
            self.abandoned.put_back(attempt);
        }
        if removed.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            vm = name,
            ?removed,
            "removed what a create answered with 503 had made"
        );
        // The operator did not ask for this: the audit trail says what the agent did.
        self.record_own_ok(
            "remove abandoned create",
            serde_json::json!({"vm": name, "removed": removed}),
        )
        .await;
        Ok(())
    }
}
