//! What a create cut off inside libvirt left behind (`attempts.rs` keeps the list):
//! removed by the reconcile, and by the next create of the name, until it has settled.

use super::Vms;
use crate::vm::VmError;
use crate::vm::driver::{Call, Hypervisor, LibvirtFailure};

/// What one cleanup pass found.
enum Cleaned {
    /// The name's domain is not this attempt's (another create made it): leave it.
    NotOurs,
    /// What was removed (empty: nothing of the attempt was left).
    Removed(Vec<&'static str>),
}

/// Removes what an abandoned create of `name` made: its domain while it carries
/// `instance_id`, and the name's volumes. Blocking.
fn clean(
    hv: &dyn Hypervisor,
    call: &Call,
    name: &str,
    instance_id: &str,
) -> Result<Cleaned, LibvirtFailure> {
    let mut removed = Vec::new();
    if let Some(d) = hv.domain(call, name)? {
        if d.instance_id.as_deref() != Some(instance_id) {
            return Ok(Cleaned::NotOurs);
        }
        if hv.undefine(call, name)? {
            removed.push("domain");
        }
    }
    removed.extend(hv.delete_volumes(call, name)?);
    Ok(Cleaned::Removed(removed))
}

impl Vms {
    /// One cleanup pass over what an abandoned create of `name` made, once its libvirt
    /// work has returned (`attempts.rs`). The caller holds the name's claim.
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
        let (n, iid) = (name.to_string(), attempt.instance_id().to_string());
        let cleaned = self
            .driver
            .work(move |hv, call| clean(hv, call, &n, &iid))
            .await;
        let removed = match cleaned {
            Ok(Cleaned::NotOurs) => return Ok(()),
            Ok(Cleaned::Removed(r)) => r,
            Err(e) => {
                self.abandoned.put_back(attempt);
                return Err(e.into());
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
