//! `port_maps`: the desired port maps, one row per (proto, listen_port), and
//! `port_map_allow`: each map's source allow-list, one row per network.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{NOW, StoreError};
use crate::model::{AllowList, PortMap, PortRule, Proto};

/// A port map with its allow-list and bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapRow {
    pub map: PortMap,
    /// Sources allowed to connect; empty: everyone.
    pub allow_from: AllowList,
    /// The VM the client named; `target_ip` is kept at its address. `None`: a map to
    /// an address.
    pub target_vm: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub created_by: String,
    pub updated_by: String,
}

const COLUMNS: &str = "proto, listen_port, target_ip, target_port, created_at, updated_at, \
    created_by, updated_by, target_vm";

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
        allow_from: AllowList::default(),
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        created_by: r.get(6)?,
        updated_by: r.get(7)?,
        target_vm: r.get(8)?,
    })
}

/// Every allow-list, by protocol and listen port (few rows: most maps have none).
fn all_allow_lists(conn: &Connection) -> Result<BTreeMap<(Proto, u16), AllowList>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT proto, listen_port, cidr FROM port_map_allow")?;
    let mut rows = stmt.query([])?;
    let mut nets: BTreeMap<(Proto, u16), Vec<Ipv4Network>> = BTreeMap::new();
    while let Some(r) = rows.next()? {
        let cidr: String = r.get(2)?;
        let net = cidr.parse::<Ipv4Network>().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
        })?;
        nets.entry((r.get(0)?, r.get(1)?)).or_default().push(net);
    }
    Ok(nets
        .into_iter()
        .map(|(k, v)| (k, AllowList::from_networks(v)))
        .collect())
}

fn allow_list(conn: &Connection, proto: Proto, listen_port: u16) -> Result<AllowList, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT cidr FROM port_map_allow WHERE proto = ?1 AND listen_port = ?2")?;
    let nets = stmt
        .query_map(params![proto, listen_port], |r| r.get::<_, String>(0))?
        .map(|c| {
            c.and_then(|c| {
                c.parse::<Ipv4Network>().map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AllowList::from_networks(nets))
}

/// Every port map, ordered by protocol then listen port.
pub fn list(conn: &Connection) -> Result<Vec<PortMapRow>, StoreError> {
    let mut out = Vec::new();
    for_each(conn, |row| {
        out.push(row.clone());
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f` with every row in order (proto, listen port), without collecting them.
pub fn for_each(
    conn: &Connection,
    mut f: impl FnMut(&PortMapRow) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut allow = all_allow_lists(conn)?;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM port_maps ORDER BY proto, listen_port"
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let mut row = from_row(r)?;
        if let Some(a) = allow.remove(&(row.map.proto, row.map.listen_port)) {
            row.allow_from = a;
        }
        f(&row)?;
    }
    Ok(())
}

/// Just the maps and their allow-lists, as the kernel needs them (no bookkeeping).
pub fn list_rules(conn: &Connection) -> Result<Vec<PortRule>, StoreError> {
    let mut allow = all_allow_lists(conn)?;
    let mut stmt = conn.prepare_cached(
        "SELECT proto, listen_port, target_ip, target_port FROM port_maps ORDER BY proto, listen_port",
    )?;
    let rows = stmt.query_map([], map_from_row)?;
    rows.map(|m| {
        let map = m?;
        Ok(PortRule {
            map,
            allow_from: allow
                .remove(&(map.proto, map.listen_port))
                .unwrap_or_default(),
        })
    })
    .collect()
}

pub fn count(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT count(*) FROM port_maps", [], |r| r.get(0))?)
}

/// How many maps of `proto` there are.
pub fn count_of(conn: &Connection, proto: Proto) -> Result<i64, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT count(*) FROM port_maps WHERE proto = ?1")?;
    Ok(stmt.query_row([proto], |r| r.get(0))?)
}

pub fn get(
    conn: &Connection,
    proto: Proto,
    listen_port: u16,
) -> Result<Option<PortMapRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM port_maps WHERE proto = ?1 AND listen_port = ?2"
    ))?;
    let Some(mut row) = stmt
        .query_row(params![proto, listen_port], from_row)
        .optional()?
    else {
        return Ok(None);
    };
    row.allow_from = allow_list(conn, proto, listen_port)?;
    Ok(Some(row))
}

/// Inserts a new map or points an existing one at a new target, and sets its allow-list
/// and the VM it names (`None`: an address).
pub fn upsert(
    conn: &Connection,
    rule: &PortRule,
    target_vm: Option<&str>,
    by: &str,
) -> Result<(), StoreError> {
    let map = &rule.map;
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO port_maps ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, {NOW}, {NOW}, ?5, ?5, ?6)
         ON CONFLICT (proto, listen_port) DO UPDATE SET
             target_ip = excluded.target_ip, target_port = excluded.target_port,
             target_vm = excluded.target_vm,
             updated_at = excluded.updated_at, updated_by = excluded.updated_by"
    ))?;
    stmt.execute(params![
        map.proto,
        map.listen_port,
        map.target_ip.to_string(),
        map.target_port,
        by,
        target_vm
    ])?;
    conn.prepare_cached("DELETE FROM port_map_allow WHERE proto = ?1 AND listen_port = ?2")?
        .execute(params![map.proto, map.listen_port])?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO port_map_allow (proto, listen_port, cidr) VALUES (?1, ?2, ?3)",
    )?;
    for net in rule.allow_from.networks() {
        insert.execute(params![map.proto, map.listen_port, net.to_string()])?;
    }
    Ok(())
}

/// The maps that name `vm`, with their allow-lists, in order.
pub fn naming(conn: &Connection, vm: &str) -> Result<Vec<PortMapRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM port_maps WHERE target_vm = ?1 ORDER BY proto, listen_port"
    ))?;
    let rows = stmt
        .query_map([vm], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|mut row| {
            row.allow_from = allow_list(conn, row.map.proto, row.map.listen_port)?;
            Ok(row)
        })
        .collect()
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
                upsert(c, &map(8080, [10, 0, 0, 2], 80).into(), None, "token")?;
                upsert(c, &map(8080, [10, 0, 0, 3], 81).into(), None, "other")?;
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

    #[test]
    fn allow_lists_are_stored_replaced_and_deleted_with_their_map() {
        let store = Store::open_in_memory().unwrap();
        store
            .with(|c| {
                let mut rule = PortRule::from(map(8080, [10, 0, 0, 2], 80));
                rule.allow_from = AllowList::parse(&["192.0.2.0/24", "10.0.0.0/8"]).unwrap();
                upsert(c, &rule, None, "token")?;
                upsert(c, &map(9090, [10, 0, 0, 2], 90).into(), None, "token")?;
                assert_eq!(
                    get(c, Proto::Tcp, 8080)?.unwrap().allow_from,
                    rule.allow_from
                );
                let rules = list_rules(c)?;
                assert_eq!(rules[0], rule);
                assert!(rules[1].allow_from.is_empty());
                assert_eq!(list(c)?[0].allow_from, rule.allow_from);

                rule.allow_from = AllowList::parse(&["198.51.100.7"]).unwrap();
                upsert(c, &rule, None, "token")?;
                assert_eq!(list_rules(c)?[0], rule);
                assert!(delete(c, Proto::Tcp, 8080)?);
                let left: i64 =
                    c.query_row("SELECT count(*) FROM port_map_allow", [], |r| r.get(0))?;
                assert_eq!(left, 0, "ON DELETE CASCADE");
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }
}
