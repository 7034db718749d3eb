//! Keeping the audit trail bounded: rows older than the retention, and the oldest rows
//! past the row cap, are deleted in small batches, off the request path, so that neither
//! a busy node nor a flood can grow `agent.db` without end.

use rusqlite::{Connection, params};

use super::StoreError;
use crate::config::StateSettings;

/// Rows deleted per statement: one short write at a time, so requests interleave.
pub const BATCH: i64 = 500;

/// How long rows are kept, and how many at most, per table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub max_age_days: u32,
    pub max_rows: u64,
}

impl Retention {
    /// AUDIT_RETENTION_DAYS and AUDIT_MAX_ROWS.
    pub fn from_settings(s: &StateSettings) -> Self {
        Self {
            max_age_days: s.audit_retention_days,
            max_rows: s.audit_max_rows,
        }
    }
}

/// The tables with a retention, and their time column.
const TABLES: [(&str, &str); 2] = [("audit_log", "at"), ("refused_requests", "until")];

/// Deletes at most one batch per table of rows past `r`; returns how many were deleted
/// (0: everything is within bounds).
pub fn prune_batch(conn: &Connection, r: &Retention) -> Result<usize, StoreError> {
    let mut deleted = 0;
    for (table, at) in TABLES {
        let old = conn.execute(
            &format!(
                "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} \
                 WHERE {at} < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1) ORDER BY id LIMIT ?2)"
            ),
            params![format!("-{} days", r.max_age_days), BATCH],
        )?;
        let over = conn.execute(
            &format!(
                "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id \
                 LIMIT max(0, min(?2, (SELECT count(*) FROM {table}) - ?1)))"
            ),
            params![i64::try_from(r.max_rows).unwrap_or(i64::MAX), BATCH],
        )?;
        deleted += old + over;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn count(store: &Store, table: &str) -> i64 {
        store
            .with(|c| {
                Ok::<_, StoreError>(c.query_row(
                    &format!("SELECT count(*) FROM {table}"),
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap()
    }

    #[test]
    fn old_rows_and_rows_past_the_cap_go_oldest_first_in_batches() {
        let store = Store::open_in_memory().unwrap();
        store
            .with(|c| {
                c.execute_batch(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 700)
                     INSERT INTO audit_log (at, identity, action, outcome)
                       SELECT '2020-01-01T00:00:00.000Z', 'token', 'old', 'ok' FROM n;",
                )?;
                c.execute_batch(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
                     INSERT INTO audit_log (at, identity, action, outcome)
                       SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'token', 'new', 'ok' FROM n;
                     INSERT INTO refused_requests (since, until, client_addr, requests, routes)
                       VALUES ('2020-01-01T00:00:00.000Z', '2020-01-01T00:01:00.000Z', '10.0.0.1', 5, 'GET /ports x5');",
                )?;
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let r = Retention {
            max_age_days: 30,
            max_rows: 200,
        };
        // One batch: at most BATCH old rows and BATCH over the cap per table.
        let first = store.with(|c| prune_batch(c, &r)).unwrap();
        assert!(first as i64 <= 2 * BATCH * 2, "{first}");
        while store.with(|c| prune_batch(c, &r)).unwrap() > 0 {}
        assert_eq!(count(&store, "audit_log"), 200);
        assert_eq!(count(&store, "refused_requests"), 0);
        let oldest_kept: String = store
            .with(|c| {
                Ok::<_, StoreError>(c.query_row(
                    "SELECT action FROM audit_log ORDER BY id LIMIT 1",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(oldest_kept, "new");
    }
}
