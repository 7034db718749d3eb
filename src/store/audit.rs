//! `audit_log`: who asked the node to do what, and what came of it.

use rusqlite::{Connection, params};

use super::{NOW, StoreError};
pub use crate::model::time::{iso_utc, now_iso};

/// Longest `parameters` text kept per row.
pub const MAX_PARAMETERS: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The request was refused (bad input, conflict, no authentication).
    Refused,
    /// The request was valid but could not be carried out.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// One audit row.
#[derive(Clone, Debug)]
pub struct Entry {
    pub client_addr: Option<String>,
    pub identity: String,
    pub action: String,
    pub parameters: Option<String>,
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub error: Option<String>,
}

impl Entry {
    /// A successful `action` the agent did on its own: no client, identity `agent`.
    pub fn by_agent(action: impl Into<String>, parameters: Option<String>) -> Self {
        Self {
            client_addr: None,
            identity: "agent".into(),
            action: action.into(),
            parameters,
            outcome: Outcome::Ok,
            status: None,
            error: None,
        }
    }
}

/// Writes one row; returns its id. Text columns get their control characters escaped: a
/// row is read in a terminal, and nothing a client sent may move its cursor or forge a
/// line there.
pub fn record(conn: &Connection, e: &Entry) -> Result<i64, StoreError> {
    use crate::logging::escape_str;
    let parameters = e
        .parameters
        .as_deref()
        .map(|p| truncate(&escape_str(p), MAX_PARAMETERS).to_string());
    let text = |v: &Option<String>| v.as_deref().map(|s| escape_str(s).into_owned());
    conn.execute(
        &format!(
            "INSERT INTO audit_log (at, client_addr, identity, action, parameters, outcome, status, error)
             VALUES ({NOW}, ?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ),
        params![
            text(&e.client_addr),
            escape_str(&e.identity),
            escape_str(&e.action),
            parameters,
            e.outcome.as_str(),
            e.status,
            text(&e.error)
        ],
    )?;
    crate::metrics::global().audit_rows.inc();
    Ok(conn.last_insert_rowid())
}

/// What the row of a change written before it runs says until the change ends: if the
/// agent stops in between, it stays so.
pub const UNFINISHED: &str = "unfinished: the agent stopped before this change completed";

/// Sets the outcome of row `id`, a change whose row was written before it ran.
pub fn finish(
    conn: &Connection,
    id: i64,
    outcome: Outcome,
    status: Option<u16>,
    error: Option<&str>,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE audit_log SET outcome = ?2, status = ?3, error = ?4 WHERE id = ?1",
        params![
            id,
            outcome.as_str(),
            status,
            error.map(|e| crate::logging::escape_str(e).into_owned())
        ],
    )?;
    Ok(())
}

/// [`finish`] for a console session's row, whose parameters are only known at its end
/// (when it detached, bytes each way, how it ended).
pub fn finish_session(
    conn: &Connection,
    id: i64,
    outcome: Outcome,
    status: Option<u16>,
    error: Option<&str>,
    parameters: &str,
) -> Result<(), StoreError> {
    finish(conn, id, outcome, status, error)?;
    let parameters = truncate(&crate::logging::escape_str(parameters), MAX_PARAMETERS).to_string();
    conn.execute(
        "UPDATE audit_log SET parameters = ?2 WHERE id = ?1",
        params![id, parameters],
    )?;
    Ok(())
}

/// Writes `entry` when there is one: the audit row of a change, written by the change
/// itself inside its own transaction, so that the change and its row stand or fall
/// together.
pub fn record_opt(conn: &Connection, entry: Option<&Entry>) -> Result<(), StoreError> {
    if let Some(e) = entry {
        record(conn, e)?;
    }
    Ok(())
}

/// One row of `refused_requests`: requests refused for want of authentication from one
/// source address in one period, counted (see `api::refused`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedRow {
    pub since: String,
    pub until: String,
    pub client_addr: String,
    pub requests: u64,
    /// `POST /ports x1200, GET /vms x3`
    pub routes: String,
}

pub fn record_refused(conn: &Connection, rows: &[RefusedRow]) -> Result<(), StoreError> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO refused_requests (since, until, client_addr, requests, routes)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for r in rows {
        insert.execute(params![
            r.since,
            r.until,
            r.client_addr,
            i64::try_from(r.requests).unwrap_or(i64::MAX),
            r.routes
        ])?;
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn times_are_written_as_sqlite_writes_them() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(iso_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_864_453_123);
        assert_eq!(iso_utc(t), "2026-11-28T11:14:13.123Z");
        assert_eq!(
            iso_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        let store = Store::open_in_memory().unwrap();
        let sqlite: String = store
            .with(|c| Ok::<_, StoreError>(c.query_row(&format!("SELECT {NOW}"), [], |r| r.get(0))?))
            .unwrap();
        let ours = now_iso();
        assert_eq!(ours.len(), sqlite.len());
        assert_eq!(ours[..16], sqlite[..16], "same minute, same shape");
    }

    #[test]
    fn rows_are_readable_with_plain_sql() {
        let store = Store::open_in_memory().unwrap();
        store
            .with(|c| {
                record(
                    c,
                    &Entry {
                        client_addr: Some("10.0.0.9:5000".into()),
                        identity: "token".into(),
                        action: "POST /ports".into(),
                        parameters: Some("é".repeat(5000)),
                        outcome: Outcome::Refused,
                        status: Some(409),
                        error: Some("conflict".into()),
                    },
                )
            })
            .unwrap();
        let (at, action, len, outcome): (String, String, i64, String) = store
            .with(|c| {
                Ok::<_, StoreError>(c.query_row(
                    "SELECT at, action, length(CAST(parameters AS BLOB)), outcome FROM audit_log",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )?)
            })
            .unwrap();
        assert!(at.ends_with('Z') && at.contains('T'), "{at}");
        assert_eq!(action, "POST /ports");
        assert!(len as usize <= MAX_PARAMETERS);
        assert_eq!(outcome, "refused");
    }
}
