//! `node_settings`: small facts about this node, one row per key.

use rusqlite::{Connection, OptionalExtension, params};

use super::{NOW, StoreError};

pub fn get(conn: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value FROM node_settings WHERE key = ?1",
            [key],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn set(conn: &Connection, key: &str, value: &str) -> Result<(), StoreError> {
    conn.execute(
        &format!(
            "INSERT INTO node_settings (key, value, updated_at) VALUES (?1, ?2, {NOW})
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
        ),
        params![key, value],
    )?;
    Ok(())
}
