//! Where the agent keeps its state (DATA_DIR) and how long its audit trail is kept.

use std::path::PathBuf;

use clap::Args;

use crate::store::retention::Retention;

/// DATA_DIR and the audit trail's bounds.
#[derive(Args, Clone, Debug)]
pub struct StateSettings {
    /// Directory for the SQLite database, keys, the generated API token and imports.
    #[arg(
        long,
        env = "DATA_DIR",
        value_name = "DATA_DIR",
        default_value = "/data"
    )]
    pub data_dir: PathBuf,

    /// Days the audit trail (audit_log, refused_requests) is kept; older rows are deleted
    /// in small batches every minute.
    #[arg(long, env = "AUDIT_RETENTION_DAYS", value_name = "AUDIT_RETENTION_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub audit_retention_days: u32,

    /// Most rows kept in each audit table; the oldest past it are deleted (about 200-500
    /// bytes a row).
    #[arg(long, env = "AUDIT_MAX_ROWS", value_name = "AUDIT_MAX_ROWS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000_000))]
    pub audit_max_rows: u64,
}

impl StateSettings {
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("agent.db")
    }

    /// What the audit pruner keeps.
    pub fn audit_retention(&self) -> Retention {
        Retention {
            max_age_days: self.audit_retention_days,
            max_rows: self.audit_max_rows,
        }
    }
}
