//! The kernel rebuilt and compared from SQLite: at startup, by the reconcile, for
//! `node-vm-agent diff`, and after a commit that failed behind a kernel change.

use super::{PortMapError, PortMaps, ReconcileReport};
use crate::store::audit::{self, Entry};

impl PortMaps {
    /// Rewrites the kernel table from the database in one transaction; returns the
    /// number of maps written.
    pub async fn restore(&self) -> Result<usize, PortMapError> {
        let _one = self.writer.lock().await;
        let rules = self.rules().await?;
        self.fw.apply_all(&rules).await?;
        Ok(rules.len())
    }

    /// Compares the kernel with the database and repairs any difference (`apply_all`:
    /// one transaction, in place or a rebuild), and keeps the libvirt accept in place.
    pub async fn reconcile(&self) -> Result<ReconcileReport, PortMapError> {
        let _one = self.writer.lock().await;
        let rules = self.rules().await?;
        let drift = self.fw.drift(&rules).await?;
        let rewritten = !drift.is_empty();
        if rewritten {
            self.fw.apply_all(&rules).await?;
        }
        let forward_accept = self.fw.ensure_forward_accept().await?;
        let report = ReconcileReport {
            drift,
            rewritten,
            forward_accept,
            maps: rules.len(),
        };
        if report.changed() {
            let entry = reconcile_entry(&report.drift, &report.forward_accept);
            self.store
                .run(move |s| s.with(|c| audit::record(c, &entry)))
                .await?;
        }
        Ok(report)
    }

    /// Differences between the kernel and the database (and the libvirt accept rule),
    /// changing nothing.
    pub async fn drift(&self) -> Result<Vec<String>, PortMapError> {
        let rules = self.rules().await?;
        let mut lines = self.fw.drift(&rules).await.map_err(PortMapError::Read)?;
        lines.extend(
            self.fw
                .forward_accept_drift()
                .await
                .map_err(PortMapError::Read)?,
        );
        Ok(lines)
    }

    pub async fn cleanup(&self) -> Result<(), PortMapError> {
        Ok(self.fw.cleanup().await?)
    }

    /// After a commit that failed behind a kernel change (disk full, I/O, a VM that
    /// moved): the kernel rewritten from the database, so that both agree again. Called
    /// under the writer lock.
    pub(super) async fn rewrite_from_store(&self) {
        let rewritten = match self.rules().await {
            Ok(rules) => self.fw.apply_all(&rules).await.map_err(PortMapError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = rewritten {
            tracing::error!(error = %e, "kernel and database may disagree until the next reconcile");
        }
    }
}

/// The audit row of a repair of the kernel from the database.
pub(super) fn reconcile_entry(drift: &[String], forward_accept: &[String]) -> Entry {
    let parameters = serde_json::json!({
        "drift": drift,
        "forward_accept": forward_accept,
    });
    Entry::by_agent("reconcile", Some(parameters.to_string()))
}
