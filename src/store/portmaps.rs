//! `port_maps`: the desired port maps, one row per (proto, listen_port).

use std::net::Ipv4Addr;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::{NOW, StoreError};
use crate::model::{PortMap, Proto};

/// A port map with its bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortMapRow {
    #[serde(flatten)]
    pub map: PortMap,
    pub created_at: String,
    pub updated_at: String,
    pub created_by: String,
    pub updated_by: String,
}

const COLUMNS: &str =
    "proto, listen_port, target_ip, target_port, created_at, updated_at, created_by, updated_by";

/// The map in a row's first four columns (proto, listen_port, target_ip, target_port).
fn map_from_row(r: &Row<'_>) -> rusqlite::Result<PortMap> {
    let ip: String = r.get(2)?;
    Ok(PortMap {
        proto: r.get(0)?,
        listen_port: r.get(1)?,
        target_ip: ip.parse::<Ipv4Addr>().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
        })?,
        target_port: r.get(3)?,
    })
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<PortMapRow> {
    Ok(PortMapRow {
        map: map_from_row(r)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        created_by: r.get(6)?,
        updated_by: r.get(7)?,
    })
}

/// Every port map, ordered by protocol then listen port.
pub fn list(conn: &Connection) -> Result<Vec<PortMapRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM port_maps ORDER BY proto, listen_port"
    ))?;
    let rows = stmt.query_map([], from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Calls `f` with every row in order (proto, listen port), without collecting them.
pub fn for_each(
    conn: &Connection,
    mut f: impl FnMut(&PortMapRow) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM port_maps ORDER BY proto, listen_port"
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        f(&from_row(r)?)?;
    }
    Ok(())
}

/// Just the maps, as the kernel needs them (no bookkeeping columns).
pub fn list_maps(conn: &Connection) -> Result<Vec<PortMap>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT proto, listen_port, target_ip, target_port FROM port_maps ORDER BY proto, listen_port",
    )?;
    let rows = stmt.query_map([], map_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn count(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT count(*) FROM port_maps", [], |r| r.get(0))?)
}

pub fn get(
    conn: &Connection,
    proto: Proto,
    listen_port: u16,
) -> Result<Option<PortMapRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM port_maps WHERE proto = ?1 AND listen_port = ?2"
    ))?;
    Ok(stmt
        .query_row(params![proto, listen_port], from_row)
        .optional()?)
}

/// Inserts a new map or points an existing one at a new target.
pub fn upsert(conn: &Connection, map: &PortMap, by: &str) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO port_maps ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, {NOW}, {NOW}, ?5, ?5)
         ON CONFLICT (proto, listen_port) DO UPDATE SET
             target_ip = excluded.target_ip, target_port = excluded.target_port,
             updated_at = excluded.updated_at, updated_by = excluded.updated_by"
    ))?;
    stmt.execute(params![
        map.proto,
        map.listen_port,
        map.target_ip.to_string(),
        map.target_port,
        by
    ])?;
    Ok(())
}

/// Deletes a map; true when there was one.
pub fn delete(conn: &Connection, proto: Proto, listen_port: u16) -> Result<bool, StoreError> {
    let mut stmt =
        conn.prepare_cached("DELETE FROM port_maps WHERE proto = ?1 AND listen_port = ?2")?;
    Ok(stmt.execute(params![proto, listen_port])? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn map(port: u16, ip: [u8; 4], target: u16) -> PortMap {
        PortMap {
            proto: Proto::Tcp,
            listen_port: port,
            target_ip: Ipv4Addr::from(ip),
            target_port: target,
        }
    }

    #[test]
    fn upsert_keeps_created_and_moves_updated() {
        let store = Store::open_in_memory().unwrap();
        store
            .with(|c| {
                upsert(c, &map(8080, [10, 0, 0, 2], 80), "token")?;
                upsert(c, &map(8080, [10, 0, 0, 3], 81), "other")?;
                let row = get(c, Proto::Tcp, 8080)?.unwrap();
                assert_eq!(row.map, map(8080, [10, 0, 0, 3], 81));
                assert_eq!(row.created_by, "token");
                assert_eq!(row.updated_by, "other");
                assert!(row.updated_at >= row.created_at);
                assert_eq!(get(c, Proto::Udp, 8080)?, None);
                assert_eq!(count(c)?, 1);
                assert!(delete(c, Proto::Tcp, 8080)?);
                assert!(!delete(c, Proto::Tcp, 8080)?);
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn the_schema_refuses_impossible_rows() {
        let store = Store::open_in_memory().unwrap();
        let err = store.with(|c| {
            Ok::<_, StoreError>(c.execute(
                "INSERT INTO port_maps VALUES ('sctp', 1, '1.2.3.4', 1, 'x', 'x', 'x', 'x')",
                [],
            )?)
        });
        assert!(err.is_err());
    }
}
