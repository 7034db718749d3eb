//! `mesh_join`: the last successful join response, the desired state of the tunnel.

use rusqlite::{Connection, OptionalExtension, params};

use super::{NOW, StoreError};

/// One join response as stored; fields are the controller's, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRow {
    pub node_id: String,
    pub node_pubkey: String,
    pub node_ip: String,
    pub controller_pubkey: String,
    pub endpoint: String,
    pub allowed_ips: String,
    pub wg_net: String,
    pub controller_url: String,
    pub raw_response: String,
    /// Set on read; ignored on write.
    pub joined_at: String,
}

pub fn load(conn: &Connection) -> Result<Option<JoinRow>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT node_id, node_pubkey, node_ip, controller_pubkey, endpoint, allowed_ips,
                    wg_net, controller_url, raw_response, joined_at
             FROM mesh_join WHERE id = 1",
            [],
            |r| {
                Ok(JoinRow {
                    node_id: r.get(0)?,
                    node_pubkey: r.get(1)?,
                    node_ip: r.get(2)?,
                    controller_pubkey: r.get(3)?,
                    endpoint: r.get(4)?,
                    allowed_ips: r.get(5)?,
                    wg_net: r.get(6)?,
                    controller_url: r.get(7)?,
                    raw_response: r.get(8)?,
                    joined_at: r.get(9)?,
                })
            },
        )
        .optional()?)
}

pub fn save(conn: &Connection, j: &JoinRow) -> Result<(), StoreError> {
    conn.execute(
        &format!(
            "INSERT INTO mesh_join (id, node_id, node_pubkey, node_ip, controller_pubkey, endpoint,
                                    allowed_ips, wg_net, controller_url, raw_response,
                                    first_joined_at, joined_at)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, {NOW}, {NOW})
             ON CONFLICT (id) DO UPDATE SET
                node_id = excluded.node_id, node_pubkey = excluded.node_pubkey,
                node_ip = excluded.node_ip, controller_pubkey = excluded.controller_pubkey,
                endpoint = excluded.endpoint, allowed_ips = excluded.allowed_ips,
                wg_net = excluded.wg_net, controller_url = excluded.controller_url,
                raw_response = excluded.raw_response, joined_at = excluded.joined_at"
        ),
        params![
            j.node_id,
            j.node_pubkey,
            j.node_ip,
            j.controller_pubkey,
            j.endpoint,
            j.allowed_ips,
            j.wg_net,
            j.controller_url,
            j.raw_response
        ],
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn one_row_replaced_on_every_join() {
        let store = Store::open_in_memory().unwrap();
        let mut row = JoinRow {
            node_id: "n1".into(),
            node_pubkey: "pk".into(),
            node_ip: "10.50.0.2".into(),
            controller_pubkey: "ck".into(),
            endpoint: "192.0.2.1:51820".into(),
            allowed_ips: "10.50.0.1/32".into(),
            wg_net: "10.50.0.0/24".into(),
            controller_url: "http://c".into(),
            raw_response: "{}".into(),
            joined_at: String::new(),
        };
        store.with(|c| save(c, &row)).unwrap();
        row.endpoint = "192.0.2.9:51820".into();
        store.with(|c| save(c, &row)).unwrap();
        let got = store.with(load).unwrap().unwrap();
        assert_eq!(got.endpoint, "192.0.2.9:51820");
        assert!(got.joined_at.ends_with('Z'));
        let n: i64 = store
            .with(|c| {
                Ok::<_, StoreError>(
                    c.query_row("SELECT count(*) FROM mesh_join", [], |r| r.get(0))?,
                )
            })
            .unwrap();
        assert_eq!(n, 1);
    }
}
