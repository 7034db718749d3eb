//! One-time import of the original agent's `$DATA_DIR/portmap.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::policy::Policy;
use crate::model::{PortMap, Proto};
use crate::store::audit::{self, Entry};
use crate::store::{Store, StoreError, portmaps, settings};

/// `node_settings` key recording that the import ran (and what it found).
pub const IMPORTED_KEY: &str = "portmap_json_imported";

#[derive(Deserialize)]
struct OriginalState {
    #[serde(default)]
    rules: BTreeMap<String, OriginalRule>,
}

#[derive(Deserialize)]
struct OriginalRule {
    listen_port: serde_json::Value,
    target_ip: String,
    target_port: serde_json::Value,
    #[serde(default)]
    proto: Option<String>,
}

fn port(v: &serde_json::Value) -> Option<u16> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|p| *p != 0)
}

/// Why a rule of the original's file is not imported.
#[derive(Debug, thiserror::Error)]
enum Skip {
    #[error("bad proto {0:?}")]
    Proto(String),
    #[error("bad listen_port")]
    ListenPort,
    #[error("bad target_ip {0:?}")]
    TargetIp(String),
    #[error("bad target_port")]
    TargetPort,
    #[error(transparent)]
    Policy(#[from] crate::portmap::policy::PolicyError),
}

impl OriginalRule {
    fn to_map(&self) -> Result<PortMap, Skip> {
        let proto = self.proto.as_deref().unwrap_or("tcp");
        Ok(PortMap {
            proto: proto
                .to_ascii_lowercase()
                .parse::<Proto>()
                .map_err(|_| Skip::Proto(proto.to_owned()))?,
            listen_port: port(&self.listen_port).ok_or(Skip::ListenPort)?,
            target_ip: self
                .target_ip
                .trim()
                .parse()
                .map_err(|_| Skip::TargetIp(self.target_ip.clone()))?,
            target_port: port(&self.target_port).ok_or(Skip::TargetPort)?,
        })
    }
}

/// What the import did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub imported: Vec<PortMap>,
    pub skipped: Vec<(String, String)>,
}

/// Imports `portmap.json` once, when the database has no port maps and never imported it.
/// Rules the policy refuses are skipped and audited, not fatal. Returns `None` when there
/// was nothing to do.
pub fn import_original_state(
    store: &Store,
    policy: &Policy,
    data_dir: &Path,
) -> Result<Option<ImportReport>, StoreError> {
    let path = data_dir.join("portmap.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    store.transaction(|tx| {
        if settings::get(tx, IMPORTED_KEY)?.is_some() || portmaps::count(tx)? > 0 {
            return Ok(None);
        }
        let mut report = ImportReport::default();
        match serde_json::from_str::<OriginalState>(&text) {
            Err(e) => report.skipped.push(("*".into(), format!("unreadable: {e}"))),
            Ok(state) => {
                for (id, rule) in &state.rules {
                    match rule
                        .to_map()
                        .and_then(|m| policy.check(&m).map(|_| m).map_err(Skip::from))
                    {
                        Ok(m) if portmaps::get(tx, m.proto, m.listen_port)?.is_none() => {
                            portmaps::upsert(tx, &m.into(), None, "import:portmap.json")?;
                            report.imported.push(m);
                        }
                        Ok(_) => report.skipped.push((id.clone(), "duplicate".into())),
                        Err(e) => report.skipped.push((id.clone(), e.to_string())),
                    }
                }
            }
        }
        let summary = serde_json::json!({
            "file": path.display().to_string(),
            "imported": report.imported.len(),
            "skipped": report.skipped.iter().map(|(id, why)| format!("{id}: {why}")).collect::<Vec<_>>(),
        })
        .to_string();
        settings::set(tx, IMPORTED_KEY, &summary)?;
        audit::record(
            tx,
            &Entry::by_agent("import portmap.json", Some(summary)),
        )?;
        Ok(Some(report))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn imports_once_and_skips_what_policy_refuses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("portmap.json"),
            r#"{"rules": {
                "8080": {"listen_port": 8080, "target_ip": "192.168.122.50", "target_port": 80, "proto": "tcp"},
                "9090": {"listen_port": "9090", "target_ip": "192.168.122.51", "target_port": "22"},
                "22": {"listen_port": 22, "target_ip": "192.168.122.50", "target_port": 22, "proto": "tcp"},
                "53": {"listen_port": 53, "target_ip": "8.8.8.8", "target_port": 53, "proto": "tcp"}
            }}"#,
        )
        .unwrap();
        let store = Store::open_in_memory().unwrap();
        let mut reserved = BTreeMap::new();
        reserved.insert(22, "SSH".to_string());
        let policy = Policy::new(vec!["192.168.122.0/24".parse().unwrap()], reserved);
        let report = import_original_state(&store, &policy, dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(report.imported.len(), 2);
        assert_eq!(report.skipped.len(), 2);
        let rows = store.with(portmaps::list).unwrap();
        assert_eq!(rows[1].map.target_ip, Ipv4Addr::new(192, 168, 122, 51));
        assert_eq!(rows[1].created_by, "import:portmap.json");
        // A second start imports nothing again, even after the maps were deleted.
        store
            .with(|c| portmaps::delete(c, Proto::Tcp, 8080))
            .unwrap();
        assert_eq!(
            import_original_state(&store, &policy, dir.path()).unwrap(),
            None
        );
    }
}
