//! The HTTP contract, in-process (`tower::ServiceExt::oneshot`) against an in-memory
//! firewall: status codes, the error shape, and that refused requests change nothing.
//! The same contract against the real kernel is in tests/.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::portmap::{MemoryFirewall, Policy};

/// identity, action, outcome, status, error
type AuditRow = (String, String, String, Option<i64>, Option<String>);

const TOKEN: &str = "test-token-0123456789";

struct Harness {
    app: Router,
    fw: Arc<MemoryFirewall>,
    store: Store,
    refused: Arc<refused::RefusedRequests>,
}

fn harness() -> Harness {
    let store = Store::open_in_memory().unwrap();
    let fw = Arc::new(MemoryFirewall::with_empty_table());
    let mut reserved = BTreeMap::new();
    reserved.insert(22, "SSH of the node".to_string());
    reserved.insert(8000, "the node's own API (NODE_API_PORT)".to_string());
    let policy = Policy::new(vec!["192.168.122.0/24".parse().unwrap()], reserved);
    let pm = Arc::new(PortMaps::new(store.clone(), fw.clone(), policy));
    let refused = Arc::new(refused::RefusedRequests::default());
    Harness {
        app: app(
            store.clone(),
            pm,
            Callers {
                token: Arc::new(ApiToken::new(TOKEN)),
                mesh: Arc::new(crate::mesh::MeshStatus::default()),
                refused: refused.clone(),
            },
            test_vm_api(&store),
        ),
        fw,
        store,
        refused,
    }
}

/// The VM side over libvirt's in-process test driver (`test:///default`): domains,
/// networks (`default`) and pools exist in memory only; nothing reaches a real libvirtd.
pub(crate) fn test_vm_api(store: &Store) -> VmApi {
    use crate::vm;
    let driver = vm::driver::libvirt::testing::driver();
    let images = vm::images::Images::new(driver.clone(), store.clone(), 1 << 30);
    let cfg = vm::service::tests::test_config();
    let consoles = vm::console::Consoles::new(
        driver.clone(),
        store.clone(),
        vm::console::tests::settings(),
    );
    let vms = Arc::new(
        vm::service::Vms::new(driver, store.clone(), cfg, None).with_images(images.clone()),
    );
    vms.watch_events();
    VmApi {
        vms,
        images,
        consoles,
        stats_dir: std::env::temp_dir(),
    }
}

impl Harness {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "{method} {uri}: not JSON ({status}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(ctype.as_deref(), Some("application/json"), "{method} {uri}");
        (status, v)
    }

    /// An authorised request's status and `Content-Type`; the body stays unread (and
    /// is returned, for a stream).
    async fn head(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, axum::response::Response) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        (resp.status(), resp)
    }

    async fn authed(&self, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.call(method, uri, body, Some(TOKEN)).await
    }

    /// What a client and the kernel see: must not change on refused requests.
    async fn snapshot(&self) -> (Value, Vec<crate::model::PortMap>) {
        let (s, v) = self.authed("GET", "/ports", None).await;
        assert_eq!(s, StatusCode::OK);
        (v, self.fw.maps().unwrap().into_iter().collect())
    }

    fn audit_rows(&self) -> Vec<AuditRow> {
        self.store
            .with(|c| {
                let mut st = c.prepare(
                    "SELECT identity, action, outcome, status, error FROM audit_log ORDER BY id",
                )?;
                let rows = st.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?;
                Ok::<_, crate::store::StoreError>(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .unwrap()
    }
}

fn assert_error(status: StatusCode, v: &Value, want: StatusCode, needle: &str) {
    assert_eq!(status, want, "{v}");
    assert_eq!(v["ok"], false, "{v}");
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error text: {v}"));
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "error {msg:?} should mention {needle:?}"
    );
}

const GOOD: &str = r#"{"listen_port": 8080, "target_ip": "192.168.122.50", "target_port": 80}"#;

/// What the VM side shows a client: the agent's VMs, the image list, and the rows.
/// (Domains the agent did not make are left out: other tests share libvirt's test
/// driver and define and undefine their own while this one runs.)
async fn vm_snapshot(h: &Harness) -> (Value, Value, i64) {
    let (s, vms) = h.authed("GET", "/vms", None).await;
    assert_eq!(s, StatusCode::OK, "{vms}");
    let (s, images) = h.authed("GET", "/images", None).await;
    assert_eq!(s, StatusCode::OK, "{images}");
    let rows = h
        .store
        .with(|c| {
            c.query_row("SELECT count(*) FROM vms", [], |r| r.get::<_, i64>(0))
                .map_err(crate::store::StoreError::from)
        })
        .unwrap();
    let managed: Vec<Value> = vms["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["managed"] == true)
        .cloned()
        .collect();
    (Value::Array(managed), images["images"].clone(), rows)
}

/// The served document, as a client reads it.
async fn served_document() -> Value {
    let h = harness();
    let (s, doc) = h.authed("GET", "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    doc
}

mod access;
mod answers;
mod images;
mod node;
mod openapi;
mod ports;
mod vms;
