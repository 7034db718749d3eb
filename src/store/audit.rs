//! `audit_log`: who asked the node to do what, and what came of it.

use rusqlite::{Connection, params};

use super::{NOW, StoreError};

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

pub fn record(conn: &Connection, e: &Entry) -> Result<(), StoreError> {
    let parameters = e.parameters.as_deref().map(|p| truncate(p, MAX_PARAMETERS));
    conn.execute(
        &format!(
            "INSERT INTO audit_log (at, client_addr, identity, action, parameters, outcome, status, error)
             VALUES ({NOW}, ?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ),
        params![
            e.client_addr,
            e.identity,
            e.action,
            parameters,
            e.outcome.as_str(),
            e.status,
            e.error
        ],
    )?;
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
