//! SQLite: the desired state and the audit trail, in one file `$DATA_DIR/agent.db`.
//!
//! One connection behind a mutex. Every call blocks, so async code reaches the store
//! through `Store::run`: a blocking thread, at most `STORE_THREADS` of them at a time.

pub mod audit;
pub mod mesh;
pub mod portmaps;
pub mod retention;
pub mod settings;
pub mod vms;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction};
use tokio::sync::Semaphore;

/// Numbered migrations; index + 1 is the schema version they produce. Never edit one that
/// has been released: add a new file.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_mesh_join.sql"),
    include_str!("../../migrations/0003_vms.sql"),
    include_str!("../../migrations/0004_vm_seeds.sql"),
    include_str!("../../migrations/0005_refused_requests.sql"),
    include_str!("../../migrations/0006_vm_last_state_check.sql"),
    include_str!("../../migrations/0007_vm_pinned_ip.sql"),
    include_str!("../../migrations/0008_port_map_allow_from.sql"),
    include_str!("../../migrations/0009_port_map_target_vm.sql"),
];

/// Blocking threads that `Store::run` work may hold at once. The work serializes on the
/// one connection anyway; unbounded, a burst of requests took a blocking thread each
/// while it waited for the lock (64 parallel `POST /ports` made 170 threads, whose
/// stacks and malloc arenas outlived the burst). Two keep the next one ready at the lock.
const STORE_THREADS: usize = 2;

/// The current time as SQLite writes it into every `*_at` column.
pub const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or used.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer agent.
    #[error(
        "the database {path} has schema version {found}, newer than the {known} this agent knows; \
         run a newer node-vm-agent or restore a backup"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    /// A migration would have broken the data; it was rolled back.
    #[error("database migration to schema {version} refused: {reason}")]
    Migration { version: i64, reason: String },
    /// The database file's mode could not be set to 0600.
    #[error("cannot make {path} private (mode 0600): {source}")]
    Mode {
        path: String,
        source: std::io::Error,
    },
    /// A blocking task panicked or was cancelled.
    #[error("database task failed: {0}")]
    Task(String),
    /// The connection mutex was poisoned by a panic.
    #[error("database connection poisoned")]
    Poisoned,
}

impl StoreError {
    /// The filesystem of the database is full (SQLITE_FULL): the write was not made.
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull
        )
    }
}

/// Shared handle to the database.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// `STORE_THREADS` permits, shared by every clone.
    threads: Arc<Semaphore>,
}

/// The database file's size in bytes, as SQLite counts its pages.
pub fn database_bytes(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row(
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        [],
        |r| r.get(0),
    )?)
}

impl Store {
    /// Opens (or creates) the database, sets WAL, foreign keys and a busy timeout, and
    /// applies pending migrations in one transaction each.
    ///
    /// The file and its -wal and -shm companions are made mode 0600: the database keeps
    /// the VMs' cloud-init user-data, which may hold secrets.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        // Before WAL is switched on, so SQLite creates -wal and -shm with this mode.
        restrict(path)?;
        let store = Self::prepare(conn, &path.display().to_string())?;
        for suffix in ["-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            restrict(Path::new(&p))?;
        }
        Ok(store)
    }

    /// An in-memory database, for unit tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::prepare(Connection::open_in_memory()?, ":memory:")
    }

    fn prepare(mut conn: Connection, path: &str) -> Result<Self, StoreError> {
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL lets `sqlite3 agent.db` read while the agent writes; NORMAL syncs at
        // checkpoints only, which survives a killed agent (not a power cut mid-commit).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn, path)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            threads: Arc::new(Semaphore::new(STORE_THREADS)),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Runs `f` on the connection (blocking).
    pub fn with<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let conn = self.lock()?;
        f(&conn)
    }

    /// Runs `f` in one transaction (blocking): committed if `f` returns Ok, rolled back
    /// otherwise. A failed commit is returned as an error (and the work is rolled back).
    pub fn transaction<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(StoreError::from)?;
        let value = f(&tx)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(value)
    }

    /// Runs blocking store work off the async runtime, on at most `STORE_THREADS`
    /// blocking threads at a time: the rest waits here, as a task.
    pub async fn run<T, E>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let permit = self
            .threads
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            // Released when the work is done, not when the caller stops waiting: a
            // cancelled request's work still occupies its thread.
            let _permit = permit;
            f(&store)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// Sets mode 0600 on `path` if it exists.
fn restrict(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Mode {
            path: path.display().to_string(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > known {
        return Err(StoreError::TooNew {
            path: path.to_string(),
            found,
            known,
        });
    }
    if found == known {
        return Ok(());
    }
    // A migration that rebuilds a table (the only way SQLite adds a CHECK) drops the old
    // one, which with foreign keys on would cascade into the tables that reference it.
    // The switch is a no-op inside a transaction, so it is made around them; each
    // migration checks the keys itself before it commits.
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    let migrated = (|| {
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = i as i64 + 1;
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            if let Some(table) = broken_foreign_key(&tx)? {
                // Dropping `tx` rolls the migration back.
                return Err(StoreError::Migration {
                    version,
                    reason: format!("rows of {table} would lose the row they reference"),
                });
            }
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
            tracing::info!(version, "database migrated");
        }
        Ok(())
    })();
    conn.pragma_update(None, "foreign_keys", "ON")?;
    migrated
}

/// The first table with a row whose parent row is gone, if any.
fn broken_foreign_key(tx: &Transaction<'_>) -> Result<Option<String>, StoreError> {
    Ok(tx
        .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Schema 6 rebuilds `vms` to add the CHECK on `last_state`: a node's VMs, their
    /// seed inputs (which reference `vms` with ON DELETE CASCADE) survive it.
    #[test]
    fn the_rebuild_of_vms_keeps_every_vm_and_its_seed_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        for (i, sql) in MIGRATIONS.iter().take(5).enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", i as i64 + 1)
                .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO vms VALUES ('vm1', 'u1', 'i1', 'vm1', 512, 1, 10, 'default', 'x86_64', \
             'kvm', NULL, '52:54:00:00:00:01', NULL, NULL, NULL, 1, 0, 'vm1.qcow2', 'vm1.seed', \
             'running', 'shut off', '10.0.0.5', 't', 't', 't', 'token'); \
             INSERT INTO vm_seeds VALUES ('vm1', '[\"ssh-ed25519 AAAA\"]', NULL, NULL);",
        )
        .unwrap();
        drop(conn);

        let store = Store::open(&path).unwrap();
        let (seeds, last_ip, last_state, fk): (i64, String, Option<String>, bool) = store
            .with(|c| {
                Ok::<_, StoreError>((
                    c.query_row("SELECT count(*) FROM vm_seeds", [], |r| r.get(0))?,
                    c.query_row("SELECT last_ip FROM vms", [], |r| r.get(0))?,
                    c.query_row("SELECT last_state FROM vms", [], |r| r.get(0))?,
                    c.pragma_query_value(None, "foreign_keys", |r| r.get(0))?,
                ))
            })
            .unwrap();
        assert_eq!(seeds, 1, "the seed inputs went with the old table");
        assert_eq!(last_ip, "10.0.0.5");
        assert_eq!(last_state, None, "a spelling outside the list becomes NULL");
        assert!(fk, "foreign keys are on again after the migration");
        let refused = store.with(|c| {
            Ok::<_, StoreError>(c.execute("UPDATE vms SET last_state = 'shut off'", [])?)
        });
        assert!(refused.is_err(), "the CHECK holds");
        // The cascade works on the rebuilt table.
        store
            .with(|c| Ok::<_, StoreError>(c.execute("DELETE FROM vms", [])?))
            .unwrap();
        let seeds: i64 = store
            .with(|c| {
                Ok::<_, StoreError>(c.query_row("SELECT count(*) FROM vm_seeds", [], |r| r.get(0))?)
            })
            .unwrap();
        assert_eq!(seeds, 0);
    }

    #[test]
    fn migrates_once_and_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        drop(Store::open(&path).unwrap());
        // Reopening applies nothing twice.
        let store = Store::open(&path).unwrap();
        let version: i64 = store
            .with(|c| {
                Ok::<_, StoreError>(c.pragma_query_value(None, "user_version", |r| r.get(0))?)
            })
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        drop(store);

        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[test]
    fn the_database_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        // An older agent left the file world-readable.
        drop(Connection::open(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(&path).unwrap();
        store
            .with(|c| {
                Ok::<_, StoreError>(
                    c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")?,
                )
            })
            .unwrap();
        for name in ["agent.db", "agent.db-wal", "agent.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
        }
    }

    #[test]
    fn uses_wal_and_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("agent.db")).unwrap();
        let (mode, fk): (String, i64) = store
            .with(|c| {
                Ok::<_, StoreError>((
                    c.pragma_query_value(None, "journal_mode", |r| r.get(0))?,
                    c.pragma_query_value(None, "foreign_keys", |r| r.get(0))?,
                ))
            })
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(fk, 1);
    }
}
