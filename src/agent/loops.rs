//! The agent's background loops: the port maps' and the VMs' reconcile, the audit
//! trail's pruning. Each runs until the stop signal.

use std::sync::Arc;

use tokio::sync::watch;

use crate::portmap::PortMaps;
use crate::store::Store;
use crate::vm;

/// At startup: unfinished image transfers are failed and, once libvirt answers, their
/// partial volumes removed; then, at startup and every interval, VMs whose domain
/// vanished from libvirt are defined again. A node without VM or transfer rows never
/// connects to libvirt here (a port-map-only node leaves its libvirtd alone).
pub(super) async fn vm_reconcile_loop(
    vms: Arc<vm::service::Vms>,
    images: Arc<vm::images::Images>,
    every: std::time::Duration,
    stop: watch::Receiver<bool>,
) {
    let partial_volumes_due = match images.fail_interrupted().await {
        Ok(n) => {
            if n > 0 {
                tracing::warn!(
                    images = n,
                    "image transfers of the last run did not finish; marked failed"
                );
            }
            n > 0
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the image transfers of the last run");
            false
        }
    };
    let partial_volumes_due = Arc::new(std::sync::atomic::AtomicBool::new(partial_volumes_due));
    let woken = {
        let vms = vms.clone();
        move || {
            let vms = vms.clone();
            async move { vms.reconcile_asked().await }
        }
    };
    crate::periodic::every_or_woken(every, crate::periodic::First::Now, stop, woken, || {
        let (vms, images, due) = (vms.clone(), images.clone(), partial_volumes_due.clone());
        async move { vm_reconcile_pass(&vms, &images, &due).await }
    })
    .await;
}

/// One pass of [`vm_reconcile_loop`]: the partial volumes of the last run while they
/// are due, then the VMs.
async fn vm_reconcile_pass(
    vms: &vm::service::Vms,
    images: &vm::images::Images,
    partial_volumes_due: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    if partial_volumes_due.load(Ordering::Relaxed) {
        match images.remove_partial_volumes().await {
            Ok(n) => {
                partial_volumes_due.store(false, Ordering::Relaxed);
                if n > 0 {
                    tracing::warn!(
                        removed = n,
                        "removed unfinished image transfers of the last run"
                    );
                }
            }
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "libvirt unavailable; VM reconcile retries next interval");
                return;
            }
            Err(e) => {
                partial_volumes_due.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, "cleaning up image transfers failed");
            }
        }
    }
    match vms.reconcile().await {
        Ok(r) if !r.is_empty() => {
            crate::metrics::global().reconciled("vms", r.len());
            crate::events::publish(
                crate::events::Kind::ReconcileRepaired,
                "vms",
                serde_json::json!({ "repaired": r }),
            );
            tracing::warn!(repaired = ?r, "VM reconcile repaired libvirt")
        }
        Ok(_) => {
            crate::metrics::global().reconciled("vms", 0);
            tracing::debug!("VM reconcile: libvirt in sync")
        }
        Err(e) if e.is_unavailable() => {
            tracing::debug!(error = %e, "libvirt unavailable; VM reconcile retries next interval")
        }
        Err(e) => tracing::error!(error = %e, "VM reconcile failed"),
    }
}

/// Keeps the audit tables within AUDIT_RETENTION_DAYS and AUDIT_MAX_ROWS: every minute,
/// one small batch at a time with a pause between, so requests are never held up.
pub(super) async fn audit_retention_loop(
    store: Store,
    retention: crate::store::retention::Retention,
    stop: watch::Receiver<bool>,
) {
    let every = std::time::Duration::from_secs(60);
    let stopping = stop.clone();
    crate::periodic::every(every, crate::periodic::First::Now, stop, || {
        let (store, stopping) = (store.clone(), stopping.clone());
        async move { prune_audit(&store, retention, &stopping).await }
    })
    .await;
}

/// One pass of [`audit_retention_loop`]: batches until nothing is left to prune.
async fn prune_audit(
    store: &Store,
    retention: crate::store::retention::Retention,
    stop: &watch::Receiver<bool>,
) {
    let mut total = 0;
    loop {
        let st = store.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            st.with(|c| crate::store::retention::prune_batch(c, &retention))
        })
        .await;
        match pruned {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not prune the audit trail");
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "audit pruning task failed");
                break;
            }
        }
        if *stop.borrow() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if total > 0 {
        tracing::info!(
            rows = total,
            "pruned the audit trail (AUDIT_RETENTION_DAYS, AUDIT_MAX_ROWS)"
        );
    }
}

/// Compares the kernel with the database every `every` and repairs drift.
pub(super) async fn reconcile_loop(
    portmaps: Arc<PortMaps>,
    every: std::time::Duration,
    stop: watch::Receiver<bool>,
) {
    crate::periodic::every(every, crate::periodic::First::AfterInterval, stop, || {
        let pm = portmaps.clone();
        async move {
            match pm.reconcile().await {
                Ok(r) if r.changed() => {
                    crate::metrics::global().reconciled("portmaps", 1);
                    crate::events::publish(
                        crate::events::Kind::PortMapRepaired,
                        "portmaps",
                        serde_json::json!({
                            "drift": r.drift,
                            "forward_accept": r.forward_accept,
                            "maps": r.maps,
                        }),
                    );
                    tracing::warn!(
                        drift = ?r.drift,
                        rewritten = r.rewritten,
                        forward_accept = ?r.forward_accept,
                        maps = r.maps,
                        "reconcile repaired drift"
                    )
                }
                Ok(_) => {
                    crate::metrics::global().reconciled("portmaps", 0);
                    tracing::debug!("reconcile: kernel in sync")
                }
                Err(e) => {
                    tracing::error!(error = %e, "reconcile failed; retrying next interval")
                }
            }
        }
    })
    .await;
}
