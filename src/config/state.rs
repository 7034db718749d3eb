//! Where the agent keeps its state (DATA_DIR) and how long its audit trail is kept.

use std::path::PathBuf;

use clap::Args;

/// DATA_DIR and the audit trail's bounds.
#[derive(Args, Clone, Debug)]
pub struct StateSettings {
    /// Directory of the agent's state.
    ///
    /// It holds the SQLite database `agent.db` (port maps, VMs, the audit log), the
    /// WireGuard key pair `node.key`/`node.pub`, the last join `join.json`, the
    /// generated `api.token`, the lock `agent.lock`, and an original agent's
    /// `portmap.json`, imported once on first start. Created with mode 0700 when missing.
    #[arg(
        long,
        env = "DATA_DIR",
        value_name = "DATA_DIR",
        default_value = "/data"
    )]
    pub data_dir: PathBuf,

    /// Days the audit trail is kept.
    ///
    /// 1..36500. Rows of `audit_log` and `refused_requests` older than that are deleted
    /// every minute (and at startup) in batches of 500, off the request path.
    #[arg(long, env = "AUDIT_RETENTION_DAYS", value_name = "AUDIT_RETENTION_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub audit_retention_days: u32,

    /// Most rows kept in each audit table.
    ///
    /// 100..1000000000. The oldest rows past it are deleted on the same schedule as
    /// those past AUDIT_RETENTION_DAYS (a row is about 200-500 bytes).
    #[arg(long, env = "AUDIT_MAX_ROWS", value_name = "AUDIT_MAX_ROWS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000_000))]
    pub audit_max_rows: u64,
}

impl StateSettings {
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("agent.db")
    }
}
