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
    let fw = Arc::new(MemoryFirewall::default());
    let mut reserved = BTreeMap::new();
    reserved.insert(22, "SSH of the node".to_string());
    reserved.insert(8000, "the node's own API (NODE_API_PORT)".to_string());
    let policy = Policy::new(vec!["192.168.122.0/24".parse().unwrap()], reserved);
    let pm = Arc::new(PortMaps::new(store.clone(), fw.clone(), policy));
    pm.restore().unwrap();
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
    let vms = Arc::new(
        vm::service::Vms::new(driver, store.clone(), cfg, None).with_images(images.clone()),
    );
    vms.watch_events();
    VmApi {
        vms,
        images,
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

#[tokio::test]
async fn health_is_public_and_everything_else_needs_the_token() {
    let h = harness();
    let (s, v) = h.call("GET", "/health", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["ok"], true);
    for (m, uri, body) in [
        ("GET", "/ports", None),
        ("POST", "/ports", Some(GOOD)),
        ("DELETE", "/ports/8080", None),
        ("POST", "/ports/restore", None),
        ("GET", "/openapi.json", None),
        ("GET", "/nope", None),
        ("POST", "/health/../ports", Some(GOOD)),
    ] {
        for token in [None, Some("wrong-token-0123456789"), Some("")] {
            let (s, v) = h.call(m, uri, body, token).await;
            assert_error(s, &v, StatusCode::UNAUTHORIZED, "token");
        }
    }
    assert!(h.fw.maps().unwrap().is_empty());
    // Refused for want of a token: counted, never one audit row each.
    assert_eq!(h.audit_rows(), []);
    let counted = h.refused.take();
    assert_eq!(counted.len(), 1, "{counted:?}");
    assert_eq!(counted[0].requests, 21);
    assert_eq!(
        counted[0].routes,
        "DELETE /ports/{listen_port} x3, GET (no such route) x3, GET /openapi.json x3, \
         GET /ports x3, POST (no such route) x3, POST /ports x3, POST /ports/restore x3"
    );
}

#[tokio::test]
async fn create_list_replace_delete() {
    let h = harness();
    let (s, v) = h.authed("POST", "/ports", Some(GOOD)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["rule_id"], "8080");
    assert_eq!(v["result"], "created");

    // Same again: idempotent.
    let (s, v) = h.authed("POST", "/ports", Some(GOOD)).await;
    assert_eq!(
        (s, v["result"].clone()),
        (StatusCode::OK, json!("unchanged"))
    );

    // Another target: 409 unless replace.
    let other = r#"{"listen_port": 8080, "target_ip": "192.168.122.51", "target_port": 80}"#;
    let before = h.snapshot().await;
    let (s, v) = h.authed("POST", "/ports", Some(other)).await;
    assert_error(s, &v, StatusCode::CONFLICT, "replace");
    assert_eq!(h.snapshot().await, before);
    let replace = r#"{"listen_port": "8080", "target_ip": "192.168.122.51", "target_port": 80, "replace": true}"#;
    let (s, v) = h.authed("POST", "/ports", Some(replace)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["result"], "replaced");
    assert_eq!(v["previous"]["target_ip"], "192.168.122.50");

    // UDP on the same port is its own map; proto in any case, as the original took it.
    let udp = r#"{"listen_port": 8080, "target_ip": "192.168.122.52", "target_port": 53, "proto": "UDP"}"#;
    let (s, v) = h.authed("POST", "/ports", Some(udp)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rule_id"], "8080/udp");
    assert_eq!(v["rule"]["proto"], "udp");

    let (s, v) = h.authed("GET", "/ports", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["rules"]["8080"],
        json!({"listen_port": 8080, "target_ip": "192.168.122.51", "target_port": 80, "proto": "tcp",
               "rule_id": "8080", "created_at": v["rules"]["8080"]["created_at"],
               "updated_at": v["rules"]["8080"]["updated_at"], "created_by": "token", "updated_by": "token",
               "target_vm": null,
               "allow_from": [], "packets": 0, "bytes": 0, "connections": 0, "drops": 0})
    );
    assert_eq!(v["rules"]["8080/udp"]["target_port"], 53);
    assert_eq!(h.fw.maps().unwrap().len(), 2);

    let (s, v) = h.authed("DELETE", "/ports/8080?proto=UDP", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v,
        json!({"ok": true, "deleted": true, "rule_id": "8080/udp",
        "rule": {"listen_port": 8080, "target_ip": "192.168.122.52", "target_port": 53, "proto": "udp"}})
    );
    let (s, v) = h.authed("DELETE", "/ports/8080", None).await;
    assert_eq!((s, v["deleted"].clone()), (StatusCode::OK, json!(true)));
    let (s, v) = h.authed("DELETE", "/ports/8080", None).await;
    assert_eq!(
        (s, v),
        (StatusCode::OK, json!({"ok": true, "deleted": false}))
    );
    assert!(h.fw.maps().unwrap().is_empty());

    let (s, v) = h.authed("POST", "/ports/restore", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["restored"], 0);

    let ok_rows = h.audit_rows().iter().filter(|r| r.2 == "ok").count();
    assert!(ok_rows >= 7, "{:?}", h.audit_rows());
}

#[tokio::test]
async fn bad_input_gets_a_json_4xx_and_changes_nothing() {
    let h = harness();
    let (s, _) = h
        .authed(
            "POST",
            "/ports",
            Some(r#"{"listen_port": 9000, "target_ip": "192.168.122.9", "target_port": 90}"#),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let before = h.snapshot().await;
    let huge = format!(
        r#"{{"listen_port": 8081, "target_ip": "192.168.122.50", "target_port": 80, "x": "{}"}}"#,
        "a".repeat(MAX_BODY_BYTES)
    );
    let cases: Vec<(&str, &str, Option<&str>, StatusCode, &str)> = vec![
        (
            "POST",
            "/ports",
            Some("{"),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "POST",
            "/ports",
            Some("not json"),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "POST",
            "/ports",
            None,
            StatusCode::BAD_REQUEST,
            "empty body",
        ),
        (
            "POST",
            "/ports",
            Some("[]"),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8081, "target_ip": "192.168.122.50"}"#),
            StatusCode::BAD_REQUEST,
            "target_port",
        ),
        (
            "POST",
            "/ports",
            Some(
                r#"{"listen_port": 8081, "target_ip": "192.168.122.50", "target_port": 80, "evil": 1}"#,
            ),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 0, "target_ip": "192.168.122.50", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "listen_port",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 70000, "target_ip": "192.168.122.50", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "1 to 65535",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": -1, "target_ip": "192.168.122.50", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "listen_port",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 80.5, "target_ip": "192.168.122.50", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "listen_port",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": true, "target_ip": "192.168.122.50", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "listen_port",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": "80a", "target_ip": "192.168.122.50", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "listen_port",
        ),
        (
            "POST",
            "/ports",
            Some(
                r#"{"listen_port": 8081, "target_ip": "192.168.122.50", "target_port": 99999999999999999999}"#,
            ),
            StatusCode::BAD_REQUEST,
            "target_port",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8081, "target_ip": 5, "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "target_ip",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8081, "target_ip": "../etc/passwd", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "target_ip",
        ),
        (
            "POST",
            "/ports",
            Some(
                r#"{"listen_port": 8081, "target_ip": "192.168.122.50\"; flush ruleset", "target_port": 80}"#,
            ),
            StatusCode::BAD_REQUEST,
            "target_ip",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8081, "target_ip": "<x/>", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "target_ip",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8081, "target_ip": "::1", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "IPv4",
        ),
        (
            "POST",
            "/ports",
            Some(
                r#"{"listen_port": 8081, "target_ip": "192.168.122.50", "target_port": 80, "proto": "sctp"}"#,
            ),
            StatusCode::BAD_REQUEST,
            "proto",
        ),
        (
            "POST",
            "/ports",
            Some(
                r#"{"listen_port": 8081, "target_ip": "192.168.122.50", "target_port": 80, "replace": "yes"}"#,
            ),
            StatusCode::BAD_REQUEST,
            "replace",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8081, "target_ip": "8.8.8.8", "target_port": 80}"#),
            StatusCode::FORBIDDEN,
            "outside",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8081, "target_ip": "127.0.0.1", "target_port": 80}"#),
            StatusCode::FORBIDDEN,
            "outside",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 22, "target_ip": "192.168.122.50", "target_port": 22}"#),
            StatusCode::FORBIDDEN,
            "SSH",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8000, "target_ip": "192.168.122.50", "target_port": 80}"#),
            StatusCode::FORBIDDEN,
            "NODE_API_PORT",
        ),
        (
            "POST",
            "/ports",
            Some(huge.as_str()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than",
        ),
        (
            "DELETE",
            "/ports/abc",
            None,
            StatusCode::BAD_REQUEST,
            "listen_port",
        ),
        (
            "DELETE",
            "/ports/0",
            None,
            StatusCode::BAD_REQUEST,
            "listen_port",
        ),
        (
            "DELETE",
            "/ports/70000",
            None,
            StatusCode::BAD_REQUEST,
            "listen_port",
        ),
        (
            "DELETE",
            "/ports/..%2F..%2Fetc",
            None,
            StatusCode::BAD_REQUEST,
            "listen_port",
        ),
        (
            "DELETE",
            "/ports/9000?proto=icmp",
            None,
            StatusCode::BAD_REQUEST,
            "proto",
        ),
        (
            "DELETE",
            "/ports/9000?force=1",
            None,
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            "POST",
            "/ports/restore",
            Some(r#"{"all": true}"#),
            StatusCode::BAD_REQUEST,
            "absent or {}",
        ),
        (
            "POST",
            "/ports/restore",
            Some("[]"),
            StatusCode::BAD_REQUEST,
            "not an array",
        ),
        (
            "POST",
            "/ports/restore",
            Some("\n"),
            StatusCode::BAD_REQUEST,
            "not blank",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8082, "target_ip": "192.168.122.50\n", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "target_ip must be an IPv4 address",
        ),
        (
            "POST",
            "/ports",
            Some(r#"{"listen_port": 8082, "target_ip": " 192.168.122.50", "target_port": 80}"#),
            StatusCode::BAD_REQUEST,
            "target_ip must be an IPv4 address",
        ),
        ("GET", "/nope", None, StatusCode::NOT_FOUND, "no such route"),
        (
            "GET",
            "/ports/9000/x",
            None,
            StatusCode::NOT_FOUND,
            "no such route",
        ),
        (
            "PUT",
            "/ports",
            Some(GOOD),
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
        (
            "PATCH",
            "/ports/9000",
            Some(GOOD),
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
        (
            "POST",
            "/health",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
    ];
    for (m, uri, body, want, needle) in cases {
        let (s, v) = h.authed(m, uri, body).await;
        assert_error(s, &v, want, needle);
        assert_eq!(
            h.snapshot().await,
            before,
            "{m} {uri} {body:?} changed state"
        );
    }
    let refused = h
        .audit_rows()
        .into_iter()
        .filter(|r| r.2 == "refused" && r.4.is_some())
        .count();
    assert!(
        refused >= 30,
        "refused calls must be audited with their error"
    );
}

#[tokio::test]
async fn a_kernel_refusal_is_a_5xx_with_the_reason_and_changes_nothing() {
    let h = harness();
    let before = h.snapshot().await;
    h.fw.fail_next("Operation not permitted");
    let (s, v) = h.authed("POST", "/ports", Some(GOOD)).await;
    assert_error(
        s,
        &v,
        StatusCode::INTERNAL_SERVER_ERROR,
        "Operation not permitted",
    );
    assert_eq!(h.snapshot().await, before);
    let rows = h.audit_rows();
    let last = rows.last().unwrap();
    assert_eq!((last.2.as_str(), last.3), ("failed", Some(500)));
}

/// Someone deleted the agent's table: the next change repairs it from SQLite and goes
/// through (issue 11: an ENOENT used to reach the client as a 500). When even the
/// repair fails, the answer is a 503: a reconcile is due, try again.
#[tokio::test]
async fn a_change_after_the_table_was_deleted_repairs_it_and_succeeds() {
    let h = harness();
    let (s, v) = h.authed("POST", "/ports", Some(GOOD)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    h.fw.wipe();
    let other = r#"{"listen_port": 9090, "target_ip": "192.168.122.51", "target_port": 80}"#;
    let (s, v) = h.authed("POST", "/ports", Some(other)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h.fw.maps().map(|m| m.len()), Some(2));
    h.fw.wipe();
    let (s, v) = h.authed("DELETE", "/ports/8080", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["deleted"], true, "{v}");
    let (api, kernel) = h.snapshot().await;
    assert_eq!(api["rules"].as_object().map(|r| r.len()), Some(1), "{api}");
    assert_eq!(kernel.len(), 1);

    let before = h.snapshot().await;
    h.fw.fail_next_as(
        crate::portmap::FirewallErrorKind::NotFound,
        "No such file or directory",
    );
    h.fw.fail_next("Operation not permitted");
    let (s, v) = h.authed("POST", "/ports", Some(GOOD)).await;
    assert_error(s, &v, StatusCode::SERVICE_UNAVAILABLE, "try again");
    assert_eq!(h.snapshot().await, before);
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_served_routes() {
    let h = harness();
    let (s, doc) = h.authed("GET", "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let want = [
        ("DELETE", "/images/{name}"),
        ("DELETE", "/ports/{listen_port}"),
        ("DELETE", "/vms/{name}"),
        ("GET", "/events"),
        ("GET", "/health"),
        ("GET", "/images"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/ports"),
        ("GET", "/ports/{listen_port}"),
        ("GET", "/stats"),
        ("GET", "/vms"),
        ("GET", "/vms/{name}/console"),
        ("GET", "/vms/{name}/ip"),
        ("GET", "/vms/{name}/status"),
        ("POST", "/images"),
        ("POST", "/images/{name}"),
        ("POST", "/ports"),
        ("POST", "/ports/restore"),
        ("POST", "/vms"),
        ("POST", "/vms/{name}/reboot"),
        ("POST", "/vms/{name}/start"),
        ("POST", "/vms/{name}/stop"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, want);
    // Every documented route answers something other than 404/405.
    for (m, p) in &want {
        let uri = p
            .replace("{listen_port}", "8080")
            .replace("{name}", "no-such-vm")
            .replace("/ip", "/ip?timeout=0");
        if p == "/metrics" || p == "/events" {
            // Not JSON (and /events never ends): tests/observe.rs reads them.
            let (s, _) = h.head(m, &uri, &[]).await;
            assert_eq!(s, StatusCode::OK, "{m} {p}");
            continue;
        }
        let body = (m == "POST" && p == "/ports").then_some(GOOD);
        let (s, v) = h.authed(m, &uri, body).await;
        // A 404 about the VM or image itself is an answer; the router's is not.
        assert!(
            s != StatusCode::METHOD_NOT_ALLOWED && v["error"] != "no such route",
            "{m} {p}: {s} {v}"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// What the VM side shows a client: the VM list, the image list, and the rows.
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
    (vms["vms"].clone(), images["images"].clone(), rows)
}

#[tokio::test]
async fn bad_vm_requests_get_a_json_4xx_and_change_nothing() {
    let h = harness();
    let before = vm_snapshot(&h).await;
    let long = "x".repeat(200);
    let cases: Vec<(&str, String, Option<String>, StatusCode)> = vec![
        (
            "POST",
            "/vms".into(),
            Some("{".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some("[]".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some("".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"../x"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a'b"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a\"b"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"<x>"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(format!(r#"{{"name":"{long}"}}"#)),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","memory_mib":0}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","memory_mib":99999999999}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","memory_mib":"1024"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","vcpus":-1}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","disk_size_gb":0}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","os_arch":"z80"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","network_name":"../n"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","ssh_authorized_keys":["not a key"]}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","extra":true}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        // No such image (the default image has no URL here): 404, nothing made.
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a"}"#.into()),
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/vms/..%2Fx/status".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/vms/a'b/status".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/vms/nope/status".into(),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/vms/nope/start".into(),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/vms/nope/stop?force=yes".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms/nope/stop?colour=red".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "DELETE",
            "/vms/nope?delete_files=true".into(),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/vms/nope/ip?timeout=601".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/vms/nope/ip?timeout=-1".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/vms/nope/ip?network=../x".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/vms/nope/console?bytes=0".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images".into(),
            Some(r#"{"name":"../i","url":"http://h/x","sha256":"00"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images".into(),
            Some(format!(
                r#"{{"name":"i","url":"ftp://h/x","sha256":"{}"}}"#,
                "0".repeat(64)
            )),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images".into(),
            Some(r#"{"name":"i","url":"http://h/x","sha256":"zz"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images".into(),
            Some(r#"{"name":"i","url":"http://h/x"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images/..%2Fi".into(),
            Some("data".into()),
            StatusCode::BAD_REQUEST,
        ),
        // A URL with CR/LF would put a line of the sender's choosing into the log.
        (
            "POST",
            "/images".into(),
            Some(format!(
                r#"{{"name":"i","url":"http://h/x
FAKE LOG LINE","sha256":"{}"}}"#,
                "0".repeat(64)
            )),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images".into(),
            Some(format!(
                r#"{{"name":"i","url":"http://h/x","sha256":"{}"}}"#,
                "0".repeat(64)
            )),
            StatusCode::BAD_REQUEST,
        ),
        // A secret field of the wrong type is refused without quoting it.
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"ok9","user_data":424242}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        ("DELETE", "/images/nope".into(), None, StatusCode::NOT_FOUND),
    ];
    for (method, uri, body, want) in &cases {
        let (s, v) = h.authed(method, uri, body.as_deref()).await;
        assert_eq!(s, *want, "{method} {uri} {body:?}: {v}");
        assert_eq!(v["ok"], false, "{method} {uri}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert!(!v.to_string().contains("424242"), "{v}");
    }
    assert!(
        !format!("{:?}", h.audit_rows()).contains("424242"),
        "{:?}",
        h.audit_rows()
    );
    assert_eq!(vm_snapshot(&h).await, before);
    // Every route needs the token.
    for (m, u) in [
        ("GET", "/vms"),
        ("POST", "/vms"),
        ("GET", "/images"),
        ("GET", "/stats"),
        ("POST", "/images/x"),
    ] {
        let (s, v) = h.call(m, u, None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {u}: {v}");
    }
}

#[tokio::test]
async fn the_vm_list_and_stats_come_from_libvirt() {
    let h = harness();
    let (s, v) = h.authed("GET", "/vms", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // libvirt's test driver always has its domain "test", which the agent did not make.
    let test = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "test")
        .cloned()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(test["managed"], false);
    assert_eq!(test["state"], "running");
    // ... and the agent never deletes it.
    let (s, e) = h
        .authed("DELETE", "/vms/test?delete_files=true", None)
        .await;
    assert_error(s, &e, StatusCode::CONFLICT, "not created by this agent");
    let (s, st) = h.authed("GET", "/stats", None).await;
    assert_eq!(s, StatusCode::OK, "{st}");
    assert_eq!(st["ok"], true);
    assert!(st["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(st["ram"]["total_mb"].as_u64().unwrap() >= st["ram"]["free_mb"].as_u64().unwrap());
    assert!(st["vms"]["total"].as_u64().unwrap() >= 1, "{st}");
}

/// An operation the connection's libvirt driver lacks (the test driver has no DHCP
/// leases) is a 501 naming it, not a 500: the node's libvirt, not the agent, is what
/// cannot do it (found by schemathesis).
#[tokio::test]
async fn an_operation_the_libvirt_driver_lacks_is_a_501_that_names_it() {
    let h = harness();
    let (s, e) = h.authed("GET", "/vms/test/ip?timeout=0", None).await;
    assert_error(
        s,
        &e,
        StatusCode::NOT_IMPLEMENTED,
        "this node's libvirt cannot do it: reading DHCP leases",
    );
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("virNetworkGetDHCPLeases"),
        "{e}"
    );
    let doc = h.authed("GET", "/openapi.json", None).await.1;
    let ip = &doc["paths"]["/vms/{name}/ip"]["get"]["responses"]["501"];
    assert!(ip.is_object(), "the document lists the 501");
}

#[tokio::test]
async fn the_vm_list_and_status_show_the_instance_id() {
    let h = harness();
    let id = uuid::Uuid::new_v4().simple().to_string();
    // A VM whose domain runs (the test driver's own "test", given a row in this harness's
    // store), one whose domain vanished ("missing"), and a domain carrying the agent's
    // metadata without a row.
    let gone = format!("nva-gone-{id}");
    let rows = [
        ("test", format!("iid-running-{id}"), "52:54:00:00:00:41"),
        (gone.as_str(), format!("iid-gone-{id}"), "52:54:00:00:00:42"),
    ];
    for (name, iid, mac) in &rows {
        let mut row = crate::store::vms::test_row(name, mac);
        row.instance_id = iid.clone();
        h.store
            .transaction(|tx| {
                crate::store::vms::upsert(tx, &row, &crate::store::vms::SeedInputs::default())
            })
            .unwrap();
    }
    let orphan = format!("nva-orphan-{id}");
    let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let orphan_uuid = uuid::Uuid::new_v4().to_string();
    let orphan_iid = format!("iid-orphan-{id}");
    use crate::vm::driver::libvirt::testing as xml;
    let dom = conn
        .define_domain_xml(&xml::domain(&xml::DomainSpec {
            name: &orphan,
            uuid: &orphan_uuid,
            domain_type: "qemu",
            memory_mib: 128,
            vcpus: 1,
            arch: "x86_64",
            pool: "default-pool",
            disk_volume: "nva-orphan-disk.qcow2",
            seed_volume: "nva-orphan-seed.img",
            network: "default",
            mac: "52:54:00:00:00:43",
            console_log: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            instance_id: &orphan_iid,
        }))
        .unwrap();
    let (s, list) = h.authed("GET", "/vms", None).await;
    let mut statuses = Vec::new();
    for name in ["test", gone.as_str(), orphan.as_str()] {
        statuses.push(h.authed("GET", &format!("/vms/{name}/status"), None).await);
    }
    dom.undefine().unwrap();

    assert_eq!(s, StatusCode::OK, "{list}");
    let want = [
        ("test", json!(format!("iid-running-{id}")), true),
        (gone.as_str(), json!(format!("iid-gone-{id}")), true),
        (orphan.as_str(), json!(orphan_iid), false),
    ];
    for ((name, iid, managed), (s, status)) in want.iter().zip(&statuses) {
        let listed = list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == *name)
            .unwrap_or_else(|| panic!("{name} not in {list}"));
        assert_eq!(listed["instance_id"], *iid, "{listed}");
        assert_eq!(listed["managed"], *managed, "{listed}");
        assert_eq!(*s, StatusCode::OK, "{status}");
        assert_eq!(status["status"]["instance_id"], *iid, "{status}");
        // The status is the listing's entry plus the VM's port maps.
        let mut status = status["status"].clone();
        let maps = status.as_object_mut().unwrap().remove("port_maps");
        assert_eq!(maps, Some(json!([])), "{status}");
        assert_eq!(status, *listed);
    }
    assert_eq!(statuses[1].1["status"]["state"], "missing");
    // Another harness (no row for "test"): a domain the agent did not create has none.
    let other = harness();
    let (_, st) = other.authed("GET", "/vms/test/status", None).await;
    assert!(st["status"]["instance_id"].is_null(), "{st}");
    assert_eq!(st["status"]["managed"], false);
    // The document says so (scripts/contract.sh holds every answer to it).
    let doc = served_document().await;
    let prop = &doc["components"]["schemas"]["VmStatus"]["properties"]["instance_id"];
    assert_eq!(prop["type"], json!(["string", "null"]), "{prop}");
}

#[tokio::test]
async fn an_upload_over_the_largest_image_is_a_413_before_libvirt_is_asked() {
    let h = harness();
    // The harness takes images up to 1 GiB; the declared length is over it.
    let req = Request::builder()
        .method("POST")
        .uri("/images/big")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-length", (2u64 << 30).to_string())
        .body(Body::from("x"))
        .unwrap();
    let resp = h.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &v,
        StatusCode::PAYLOAD_TOO_LARGE,
        "VM_MAX_DISK_GB",
    );
}

/// The served document, as a client reads it.
async fn served_document() -> Value {
    let h = harness();
    let (s, doc) = h.authed("GET", "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    doc
}

/// `ip` on `POST /vms`: not an IPv4 address, or outside the network's DHCP range, is a
/// 400 in the usual error shape, before anything is created.
#[tokio::test]
async fn a_create_asking_for_an_ip_outside_the_range_is_refused() {
    let h = harness();
    let kernel = tempfile::NamedTempFile::new().unwrap();
    let kernel = kernel.path().to_string_lossy().into_owned();
    for (ip, says) in [
        ("::1", "ip"),
        ("192.168.122.300", "ip"),
        ("10.9.9.9", "DHCP range"),
    ] {
        let body = json!({"name": "ipwant", "kernel": kernel, "memory_mib": 64, "ip": ip});
        let (s, v) = h.authed("POST", "/vms", Some(&body.to_string())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{ip}: {v}");
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{ip}: {v}");
    }
    let (s, _) = h.authed("GET", "/vms/ipwant/status", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// Pinned addresses and a VM's port maps are in the document: `ip` on the create's
/// body and answers, `pinned_ip` and `port_maps` on the status.
#[tokio::test]
async fn the_document_describes_pinned_addresses_and_a_vms_port_maps() {
    let doc = served_document().await;
    let schemas = &doc["components"]["schemas"];
    let ipv4 = |v: &Value| v.to_string().contains("ipv4");
    assert!(
        ipv4(&schemas["CreateVm"]["properties"]["ip"]),
        "{}",
        schemas["CreateVm"]
    );
    assert!(
        ipv4(&schemas["Created"]["properties"]["ip"]),
        "{}",
        schemas["Created"]
    );
    assert!(ipv4(&schemas["VmCreating"]["properties"]["ip"]));
    assert!(ipv4(&schemas["VmStatus"]["properties"]["pinned_ip"]));
    let maps = &schemas["VmStatus"]["properties"]["port_maps"];
    assert!(maps.to_string().contains("VmPortMap"), "{maps}");
    let map = &schemas["VmPortMap"]["properties"];
    for field in [
        "proto",
        "listen_port",
        "target_ip",
        "target_port",
        "rule_id",
    ] {
        assert!(map[field].is_object(), "{field}: {map}");
    }
}

#[tokio::test]
async fn every_protected_operation_documents_401_and_every_error_has_the_error_schema() {
    let doc = served_document().await;
    let error_ref = "#/components/schemas/ErrorBody";
    assert_eq!(
        doc["components"]["schemas"]["ErrorBody"]["required"],
        json!(["ok", "error"])
    );
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            if path == "/openapi.json" {
                // The document itself: any JSON object.
                continue;
            }
            if path != "/health" {
                assert!(op.get("security").is_some(), "{method} {path}");
                assert!(responses.contains_key("401"), "{method} {path}: no 401");
            }
            for status in ["500", "503"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path}: no {status}"
                );
            }
            if method != "get" {
                for status in ["400", "408", "413", "507"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path}: no {status}"
                    );
                }
            }
            if path.contains("{name}") {
                assert!(responses.contains_key("404"), "{method} {path}: no 404");
            }
            for (status, r) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"], error_ref,
                        "{method} {path} {status}"
                    );
                } else if path == "/metrics" || path == "/events" {
                    // Prometheus' text format and Server-Sent Events, not JSON.
                    let content = r["content"].as_object().unwrap();
                    assert!(
                        content.contains_key("text/plain")
                            || content.contains_key("text/event-stream"),
                        "{method} {path} {status}: {content:?}"
                    );
                } else {
                    // Typed answers, never a bare object.
                    let schema = &r["content"]["application/json"]["schema"];
                    assert!(
                        schema.get("$ref").is_some(),
                        "{method} {path} {status}: {schema}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn the_document_states_the_input_rules_the_code_applies() {
    let doc = served_document().await;
    let schemas = &doc["components"]["schemas"];
    let create = &schemas["CreatePortMap"];
    assert_eq!(create["additionalProperties"], json!(false));
    for port in ["listen_port", "target_port"] {
        let alts = create["properties"][port]["anyOf"].as_array().unwrap();
        assert_eq!(alts[0]["type"], "integer");
        assert_eq!(
            (alts[0]["minimum"].as_u64(), alts[0]["maximum"].as_u64()),
            (Some(1), Some(65535))
        );
        assert_eq!(alts[1]["pattern"], super::doc::PORT_STRING_PATTERN);
    }
    assert_eq!(
        create["properties"]["proto"]["pattern"],
        super::doc::PROTO_PATTERN
    );
    let allow = &create["properties"]["allow_from"];
    assert_eq!(allow["type"], json!(["array", "null"]), "{allow}");
    assert_eq!(allow["maxItems"], 64);
    assert_eq!(allow["items"]["pattern"], super::doc::ALLOW_FROM_PATTERN);
    assert_eq!(
        create["properties"]["proto"]["type"],
        json!(["string", "null"])
    );
    assert_eq!(
        create["properties"]["target_ip"]["pattern"],
        super::doc::IPV4_PATTERN
    );
    let vm = &schemas["CreateVm"];
    assert_eq!(vm["additionalProperties"], json!(false));
    assert_eq!(
        vm["properties"]["name"]["pattern"],
        super::doc::NAME_PATTERN
    );
    // The harness's VM bounds (test_vm_api).
    assert_eq!(vm["properties"]["memory_mib"]["maximum"], json!(4096));
    assert_eq!(vm["properties"]["vcpus"]["maximum"], json!(4));
    let image = &schemas["AddImage"];
    assert_eq!(image["additionalProperties"], json!(false));
    assert_eq!(
        image["properties"]["url"]["pattern"],
        super::doc::URL_PATTERN
    );
    assert_eq!(
        image["properties"]["sha256"]["pattern"],
        super::doc::SHA256_PATTERN
    );
    // Path and query parameters.
    let delete = &doc["paths"]["/ports/{listen_port}"]["delete"]["parameters"];
    for p in delete.as_array().unwrap() {
        match p["name"].as_str().unwrap() {
            "listen_port" => assert_eq!(p["schema"]["anyOf"][0]["minimum"], json!(1)),
            "proto" => assert_eq!(p["schema"]["pattern"], super::doc::PROTO_PATTERN),
            other => panic!("unexpected parameter {other}"),
        }
    }
    let status = &doc["paths"]["/vms/{name}/status"]["get"]["parameters"][0];
    assert_eq!(status["schema"]["pattern"], super::doc::NAME_PATTERN);
    // Restore: no body, or exactly {}.
    let restore = &doc["paths"]["/ports/restore"]["post"]["requestBody"];
    assert_eq!(restore["required"], json!(false));
}

#[test]
fn the_documented_patterns_accept_exactly_what_the_code_accepts() {
    use super::doc;
    let re = |p: &str| regex::Regex::new(p).unwrap();
    let same = |pattern: &str, samples: &[&str], code: &dyn Fn(&str) -> bool| {
        let r = re(pattern);
        for s in samples {
            assert_eq!(r.is_match(s), code(s), "{pattern} vs the code on {s:?}");
        }
    };
    same(
        doc::NAME_PATTERN,
        &[
            "a",
            "web-1.a_b",
            "-a",
            "_a",
            "a/b",
            "",
            "é",
            &"a".repeat(63),
            &"a".repeat(64),
        ],
        &|s| crate::model::name::check_name(s).is_ok(),
    );
    same(
        doc::URL_PATTERN,
        &[
            "https://cloud-images.ubuntu.com/jammy/current/x.img",
            "HTTP://Mirror.Example/a/b.qcow2?sig=a%2Fb&x=1",
            "http://10.0.0.1:8080/a?b=c?d",
            "http://h",
            "http://h?q",
            "http://user@h/x",
            "http://h/x#f",
            "http://h/a b",
            "http://010.0.0.1/x",
            "http://1.2.3/x",
            "http://xn--bad/x",
            "http://a-b.c1/x",
            "http://a.1b/x",
            "http://h:0/x",
            "http://h:080/x",
            "http://h:65535/x",
            "http://h:65536/x",
            "http://[::1]/x",
            "ftp://h/x",
        ],
        &crate::vm::images::plain_url,
    );
    same(
        doc::PROTO_PATTERN,
        &[
            "tcp", "udp", "TCP", "Udp", "sctp", "", "tcp ", " udp", "tcpudp", "icmp",
        ],
        &|s| {
            s.to_ascii_lowercase()
                .parse::<crate::model::Proto>()
                .is_ok()
        },
    );
    same(
        doc::PORT_STRING_PATTERN,
        &[
            "1", "8080", "08080", "65535", "0065535", "65536", "0", "000", "", "1.0", " 80", "-1",
        ],
        &|s| super::body::port("p", &json!(s)).is_ok(),
    );
    same(
        doc::IPV4_PATTERN,
        &[
            "192.168.122.50",
            "0.0.0.0",
            "255.255.255.255",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3",
            " 1.2.3.4",
        ],
        &|s| s.parse::<std::net::Ipv4Addr>().is_ok(),
    );
    same(
        doc::HOSTNAME_PATTERN,
        &[
            "web-1",
            "a.b.c",
            "a.",
            "a..",
            "-a",
            "a-",
            "a_b",
            "",
            &"a".repeat(63),
            &"a".repeat(64),
        ],
        &|s| crate::vm::spec::check_hostname(s).is_ok(),
    );
}

/// A domain started and destroyed outside the agent (another connection to the same
/// test driver, as `virsh` would be) shows in `GET /vms/{name}/status` through libvirt's
/// lifecycle events: seen before the agent's own listing is old enough to be redone
/// (`observed::FRESH`), so nothing but the event can have told it.
#[tokio::test]
async fn an_outside_change_reaches_the_status_through_libvirt_events() {
    use crate::vm::service::FRESH;
    use std::time::{Duration, Instant};
    let h = harness();
    let seen_within = |name: &'static str, want: &'static str, since: Instant| {
        let h = &h;
        async move {
            loop {
                let (s, v) = h.authed("GET", &format!("/vms/{name}/status"), None).await;
                let state = if s == StatusCode::OK {
                    v["status"]["state"].as_str().unwrap_or_default().to_owned()
                } else {
                    s.as_u16().to_string()
                };
                if state == want {
                    return since.elapsed();
                }
                assert!(
                    since.elapsed() < FRESH - Duration::from_millis(100),
                    "{name} not {want} after {:?} (last: {state})",
                    since.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    crate::vm::driver::libvirt::testing::ensure_loaded().unwrap();
    let outside = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let xml = "<domain type='test'><name>evtest</name><memory>8192</memory>\
               <os><type>hvm</type></os></domain>";

    let (s, v) = h.authed("GET", "/vms", None).await;
    let listed = Instant::now();
    assert_eq!(s, StatusCode::OK, "{v}");
    let dom = outside.define_domain_xml(xml).unwrap();
    dom.create().unwrap();
    seen_within("evtest", "running", listed).await;

    let (s, v) = h.authed("GET", "/vms", None).await;
    let listed = Instant::now();
    assert_eq!(s, StatusCode::OK, "{v}");
    dom.destroy().unwrap();
    seen_within("evtest", "shutoff", listed).await;
    dom.undefine().unwrap();
    seen_within("evtest", "404", listed).await;
}

/// `POST /vms?wait=false` answers 202 at once with the VM `creating`; a failure that
/// comes later (here libvirt's test driver refuses the guest) shows in the VM's status,
/// state `failed` with the error, and in the audit log. A bad request is still refused
/// at once, and the default stays synchronous.
#[tokio::test]
async fn a_create_without_waiting_answers_202_and_its_later_failure_is_visible() {
    let h = harness();
    // A kernel this host can read: the harness's libvirt counts as local, and a missing
    // one would be refused at once.
    let kernel = tempfile::NamedTempFile::new().unwrap();
    let kernel = kernel.path().to_string_lossy().into_owned();
    let body = json!({"name": "bg1", "kernel": kernel, "memory_mib": 64}).to_string();
    let (s, v) = h.authed("POST", "/vms?wait=false", Some(&body)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let ip: std::net::Ipv4Addr = v["ip"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        ip.octets()[..3],
        [192, 168, 122],
        "pinned in the test network's range"
    );
    assert_eq!(
        v,
        json!({"ok": true, "name": "bg1", "state": "creating", "ip": ip.to_string()})
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        let (s, v) = h.authed("GET", "/vms/bg1/status", None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if v["status"]["state"] != "creating" {
            break v["status"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("cannot run x86_64 guests"),
        "{status}"
    );
    let (s, v) = h.authed("GET", "/vms", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|vm| vm["name"] == "bg1" && vm["state"] == "failed"),
        "{v}"
    );
    // The late outcome's audit row follows the state within moments.
    let late = |r: &AuditRow| r.1 == "POST /vms bg1 (wait=false) (finished after the answer)";
    while !h.audit_rows().iter().any(late) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let rows = h.audit_rows();
    assert!(
        rows.iter()
            .any(|r| r.1 == "POST /vms" && r.2 == "ok" && r.3 == Some(202)),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(
            |r| r.1 == "POST /vms bg1 (wait=false) (finished after the answer)"
                && r.2 == "failed"
                && r.4
                    .as_deref()
                    .is_some_and(|e| e.contains("cannot run x86_64 guests"))
        ),
        "{rows:?}"
    );
    // Deleting the failed create clears it.
    let (s, v) = h.authed("DELETE", "/vms/bg1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) = h.authed("GET", "/vms/bg1/status", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v) = h
        .authed("POST", "/vms?wait=false", Some(r#"{"name": "bad name"}"#))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // The texts clients see for a bad name (`model::name` holds the rule).
    assert_eq!(
        v["error"],
        "name \"bad name\" is not valid: character ' ' is not allowed in a name \
         (letters, digits, '_', '.', '-')"
    );
    let (s, v) = h.authed("POST", "/vms/-x/start", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        v["error"],
        "VM name \"-x\" is not valid: a name must start with a letter or digit"
    );
    let (s, v) = h.authed("POST", "/vms?wait=maybe", Some(&body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = h.authed("POST", "/vms", Some(&body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "synchronous by default: {v}");
}

#[tokio::test]
async fn allow_from_is_checked_stored_and_shown_and_one_map_is_read_by_its_port() {
    let h = harness();
    for (bad, needle) in [
        (r#""10.0.0.0/8""#, "list of IPv4 networks"),
        (r#"[8]"#, "allow_from[0] must be a string"),
        (r#"["10.0.0.0/8", "10.0.0.256"]"#, "allow_from[1]"),
        (
            r#"["10.1.2.3/8"]"#,
            "host bits set; the network is 10.0.0.0/8",
        ),
    ] {
        let body = format!(
            r#"{{"listen_port": 8080, "target_ip": "192.168.122.50", "target_port": 80, "allow_from": {bad}}}"#
        );
        let (s, v) = h.authed("POST", "/ports", Some(&body)).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, needle);
    }
    let many: Vec<String> = (0..65).map(|i| format!("\"10.0.{i}.0/24\"")).collect();
    let body = format!(
        r#"{{"listen_port": 8080, "target_ip": "192.168.122.50", "target_port": 80, "allow_from": [{}]}}"#,
        many.join(",")
    );
    let (s, v) = h.authed("POST", "/ports", Some(&body)).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "at most 64");
    assert!(h.fw.maps().unwrap().is_empty());

    // Without allow_from the answer is what it always was.
    let (s, v) = h.authed("POST", "/ports", Some(GOOD)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["rule"].get("allow_from").is_none(), "{v}");
    let body = r#"{"listen_port": 2222, "target_ip": "192.168.122.50", "target_port": 22,
                   "allow_from": ["203.0.113.0/24", "198.51.100.7", "203.0.113.128/25"]}"#;
    let (s, v) = h.authed("POST", "/ports", Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["rule"]["allow_from"],
        json!(["198.51.100.7/32", "203.0.113.0/24"])
    );

    let (s, v) = h.authed("GET", "/ports/2222", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(
        v["rule"]["allow_from"],
        json!(["198.51.100.7/32", "203.0.113.0/24"])
    );
    for k in ["packets", "bytes", "connections", "drops"] {
        assert_eq!(v["rule"][k], 0, "{k}: {v}");
    }
    let (s, list) = h.authed("GET", "/ports", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["rules"]["2222"], v["rule"]);
    let (s, v) = h.authed("GET", "/ports/2222?proto=udp", None).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "no udp map");
    let (s, v) = h.authed("GET", "/ports/0", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = h.call("GET", "/ports/2222", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_map_naming_a_vm_goes_to_its_pinned_address_and_bad_targets_are_4xx() {
    let h = harness();
    let row = crate::store::vms::VmRow {
        pinned_ip: Some([192, 168, 122, 77].into()),
        ..crate::store::vms::test_row("web1", "52:54:00:00:77:01")
    };
    let old = crate::store::vms::test_row("old1", "52:54:00:00:77:02");
    h.store
        .transaction(|tx| {
            crate::store::vms::upsert(tx, &row, &Default::default())?;
            crate::store::vms::upsert(tx, &old, &Default::default())
        })
        .unwrap();
    let before = h.snapshot().await;
    for (body, want, needle) in [
        (
            r#"{"listen_port": 2222, "target_ip": "192.168.122.77", "target_vm": "web1", "target_port": 22}"#,
            StatusCode::BAD_REQUEST,
            "not both",
        ),
        (
            r#"{"listen_port": 2222, "target_port": 22}"#,
            StatusCode::BAD_REQUEST,
            "target_vm",
        ),
        (
            r#"{"listen_port": 2222, "target_vm": 7, "target_port": 22}"#,
            StatusCode::BAD_REQUEST,
            "target_vm must be a VM's name",
        ),
        (
            r#"{"listen_port": 2222, "target_vm": "bad name", "target_port": 22}"#,
            StatusCode::BAD_REQUEST,
            "target_vm",
        ),
        (
            r#"{"listen_port": 2222, "target_vm": "nobody", "target_port": 22}"#,
            StatusCode::NOT_FOUND,
            "no VM named nobody",
        ),
        // From before pinned addresses and never seen with a lease.
        (
            r#"{"listen_port": 2222, "target_vm": "old1", "target_port": 22}"#,
            StatusCode::CONFLICT,
            "no known address",
        ),
    ] {
        let (s, v) = h.authed("POST", "/ports", Some(body)).await;
        assert_error(s, &v, want, needle);
    }
    assert_eq!(h.snapshot().await, before, "a refused map changes nothing");

    let body =
        r#"{"listen_port": 2222, "target_vm": "web1", "target_port": 22, "target_ip": null}"#;
    let (s, v) = h.authed("POST", "/ports", Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rule"]["target_vm"], "web1");
    assert_eq!(v["rule"]["target_ip"], "192.168.122.77");
    assert_eq!(
        h.fw.maps().unwrap().into_iter().collect::<Vec<_>>(),
        vec![crate::model::PortMap {
            proto: crate::model::Proto::Tcp,
            listen_port: 2222,
            target_ip: "192.168.122.77".parse().unwrap(),
            target_port: 22,
        }]
    );
    let (_, list) = h.authed("GET", "/ports", None).await;
    assert_eq!(list["rules"]["2222"]["target_vm"], "web1");
    assert_eq!(list["rules"]["2222"]["target_ip"], "192.168.122.77");
    // An address map shows no target_vm in its answer, as before.
    let (s, v) = h.authed("POST", "/ports", Some(GOOD)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["rule"].get("target_vm").is_none(), "{v}");
}

mod observe;
