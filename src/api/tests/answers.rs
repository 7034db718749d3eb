//! The bytes of the answers, pinned: field names, their order, null or absent, as
//! clients have read them. What changes from run to run (times, ids, MACs, addresses
//! chosen, the host's figures, the version) is replaced by a placeholder first.

use serde_json::value::RawValue;

use super::*;

/// `text` with what changes from run to run replaced by `<...>`.
fn steady(text: &str) -> String {
    let rules = [
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", "<time>"),
        (
            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "<uuid>",
        ),
        (r"52:54:00(:[0-9a-f]{2}){3}", "<mac>"),
        (r#""version":"[^"]*""#, r#""version":"<v>""#),
        // When libvirt was last asked: null until the first observation.
        (r#""observed_at":(null|"<time>")"#, r#""observed_at":<t>"#),
        (
            r#""(cores|load1|load5|load15|total_mb|free_mb|total_gb|free_gb|total|running)":[0-9.]+"#,
            r#""$1":<n>"#,
        ),
    ];
    let mut out = text.to_string();
    for (pattern, with) in rules {
        out = regex::Regex::new(pattern)
            .unwrap()
            .replace_all(&out, with)
            .into_owned();
    }
    out
}

impl Harness {
    /// An authorised request's status and its body as sent.
    async fn raw(&self, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn steady(&self, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, String) {
        let (s, text) = self.raw(method, uri, body).await;
        (s, steady(&text))
    }
}

#[tokio::test]
async fn health_and_error_answers_keep_their_bytes() {
    let h = harness();
    let req = Request::builder()
        .uri("/health")
        .body(Body::empty())
        .unwrap();
    let resp = h.app.clone().oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        steady(&String::from_utf8_lossy(&bytes)),
        r#"{"join":"standalone","join_error":null,"last_handshake_s":null,"node_ip":null,"ok":true,"tunnel":null,"tunnel_stale":false,"version":"<v>"}"#
    );
    let (s, text) = h.raw("POST", "/ports", Some("{")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        text,
        r#"{"error":"malformed JSON: EOF while parsing an object at line 1 column 1","ok":false}"#
    );
    let (s, text) = h.raw("GET", "/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(text, r#"{"error":"no such route","ok":false}"#);
}

/// A VM row pinned to `ip`, without a domain (its state reads `missing`).
fn plant_vm(h: &Harness, name: &str, mac: &str, ip: &str) {
    let row = crate::store::vms::VmRow {
        pinned_ip: Some(ip.parse().unwrap()),
        ..crate::store::vms::test_row(name, mac)
    };
    h.store
        .transaction(|tx| {
            crate::store::vms::upsert(tx, &row, &crate::store::vms::SeedInputs::default())
        })
        .unwrap();
}

#[tokio::test]
async fn port_map_answers_keep_their_bytes() {
    let h = harness();
    plant_vm(&h, "wire-web", "52:54:00:00:00:71", "192.168.122.71");
    let want = [
        (
            GOOD,
            r#"{"ok":true,"rule_id":"8080","result":"created","rule":{"listen_port":8080,"target_ip":"192.168.122.50","target_port":80,"proto":"tcp"}}"#,
        ),
        (
            GOOD,
            r#"{"ok":true,"rule_id":"8080","result":"unchanged","rule":{"listen_port":8080,"target_ip":"192.168.122.50","target_port":80,"proto":"tcp"}}"#,
        ),
        (
            r#"{"listen_port": "8080", "target_ip": "192.168.122.51", "target_port": 81, "replace": true, "allow_from": ["203.0.113.0/24"]}"#,
            r#"{"ok":true,"rule_id":"8080","result":"replaced","rule":{"listen_port":8080,"target_ip":"192.168.122.51","target_port":81,"proto":"tcp","allow_from":["203.0.113.0/24"]},"previous":{"listen_port":8080,"target_ip":"192.168.122.50","target_port":80,"proto":"tcp"}}"#,
        ),
        (
            r#"{"listen_port": 5353, "target_vm": "wire-web", "target_port": 53, "proto": "UDP"}"#,
            r#"{"ok":true,"rule_id":"5353/udp","result":"created","rule":{"listen_port":5353,"target_ip":"192.168.122.71","target_port":53,"proto":"udp","target_vm":"wire-web"}}"#,
        ),
    ];
    for (body, answer) in want {
        let (s, text) = h.raw("POST", "/ports", Some(body)).await;
        assert_eq!((s, text.as_str()), (StatusCode::OK, answer), "{body}");
    }
    let (s, text) = h.steady("GET", "/ports", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        text,
        r#"{"ok":true,"rules":{"8080":{"proto":"tcp","listen_port":8080,"target_ip":"192.168.122.51","target_port":81,"allow_from":["203.0.113.0/24"],"target_vm":null,"created_at":"<time>","updated_at":"<time>","created_by":"token","updated_by":"token","rule_id":"8080","packets":0,"bytes":0,"connections":0,"drops":0},"5353/udp":{"proto":"udp","listen_port":5353,"target_ip":"192.168.122.71","target_port":53,"allow_from":[],"target_vm":"wire-web","created_at":"<time>","updated_at":"<time>","created_by":"token","updated_by":"token","rule_id":"5353/udp","packets":0,"bytes":0,"connections":0,"drops":0}}}"#
    );
    let (s, text) = h.steady("GET", "/ports/8080", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        text,
        r#"{"ok":true,"rule":{"allow_from":["203.0.113.0/24"],"bytes":0,"connections":0,"created_at":"<time>","created_by":"token","drops":0,"listen_port":8080,"packets":0,"proto":"tcp","rule_id":"8080","target_ip":"192.168.122.51","target_port":81,"target_vm":null,"updated_at":"<time>","updated_by":"token"}}"#
    );
    let (s, text) = h.steady("GET", "/vms/wire-web/status", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        text,
        r#"{"ok":true,"status":{"active":false,"created_at":"<time>","desired_state":"running","image":null,"instance_id":"iid-<mac>","ip":"192.168.122.71","ip_source":"pinned","mac":"<mac>","managed":true,"memory_mib":128,"name":"wire-web","network":"default","observed_at":<t>,"pinned_ip":"192.168.122.71","port_maps":[{"allow_from":[],"created_at":"<time>","created_by":"token","listen_port":5353,"proto":"udp","rule_id":"5353/udp","target_ip":"192.168.122.71","target_port":53,"target_vm":"wire-web","updated_at":"<time>","updated_by":"token"}],"state":"missing","uuid":"uuid-wire-web-<mac>","vcpus":1}}"#
    );
    let (s, text) = h.raw("DELETE", "/ports/5353?proto=udp", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        text,
        r#"{"ok":true,"deleted":true,"rule_id":"5353/udp","rule":{"listen_port":5353,"target_ip":"192.168.122.71","target_port":53,"proto":"udp"}}"#
    );
    let (s, text) = h.raw("DELETE", "/ports/5353?proto=udp", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(text, r#"{"ok":true,"deleted":false}"#);
    let (s, text) = h.raw("POST", "/ports/restore", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        text,
        r#"{"ok":true,"restored":1,"drift":[],"forward_accept":[]}"#
    );
}

#[tokio::test]
async fn vm_and_image_answers_keep_their_bytes() {
    let h = harness();
    plant_vm(&h, "wire-gone", "52:54:00:00:00:72", "192.168.122.72");
    let (s, text) = h.raw("GET", "/vms", None).await;
    assert_eq!(s, StatusCode::OK);
    #[derive(serde::Deserialize)]
    struct Listed<'a> {
        #[serde(borrow)]
        vms: Vec<&'a RawValue>,
    }
    let listed: Listed = serde_json::from_str(&text).unwrap();
    let entry = listed
        .vms
        .iter()
        .find(|v| v.get().contains(r#""name":"wire-gone""#))
        .unwrap();
    assert_eq!(
        steady(entry.get()),
        r#"{"active":false,"created_at":"<time>","desired_state":"running","image":null,"instance_id":"iid-<mac>","ip":"192.168.122.72","ip_source":"pinned","mac":"<mac>","managed":true,"memory_mib":128,"name":"wire-gone","network":"default","observed_at":<t>,"pinned_ip":"192.168.122.72","state":"missing","uuid":"uuid-wire-gone-<mac>","vcpus":1}"#
    );
    assert!(text.starts_with(r#"{"ok":true,"vms":["#), "{text}");
    let (s, text) = h.steady("GET", "/stats", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        text,
        r#"{"cpu":{"cores":<n>,"load1":<n>,"load15":<n>,"load5":<n>},"disk":{"free_gb":<n>,"total_gb":<n>},"ok":true,"ram":{"free_mb":<n>,"total_mb":<n>},"vms":{"running":<n>,"total":<n>}}"#
    );
    h.store
        .with(|c| {
            crate::store::vms::image_begin(c, "wire-img", "upload", None, "wire-img.qcow2", "t")?;
            crate::store::vms::image_ready(c, "wire-img", &"ab".repeat(32), "qcow2", 4096)
        })
        .unwrap();
    let (s, text) = h.steady("GET", "/images", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        text,
        format!(
            r#"{{"images":[{{"created_at":"<time>","created_by":"t","error":null,"format":"qcow2","name":"wire-img","received_bytes":null,"sha256":"{}","sha256_expected":null,"size_bytes":4096,"source":"upload","state":"ready","total_bytes":null,"updated_at":"<time>","used_by":[],"volume":"wire-img.qcow2"}}],"ok":true}}"#,
            "ab".repeat(32)
        )
    );
    let kernel = tempfile::NamedTempFile::new().unwrap();
    let kernel = kernel.path().to_string_lossy().into_owned();
    let body = json!({"name": "wire-bg", "kernel": kernel, "memory_mib": 64}).to_string();
    let (s, text) = h.raw("POST", "/vms?wait=false", Some(&body)).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let text = regex::Regex::new(r#""ip":"[0-9.]+""#)
        .unwrap()
        .replace(&text, r#""ip":"<ip>""#)
        .into_owned();
    assert_eq!(
        text,
        r#"{"ip":"<ip>","name":"wire-bg","ok":true,"state":"creating"}"#
    );
}

/// The bytes of `answer` as a handler writes it: keys sorted.
fn sorted<T: serde::Serialize>(answer: T) -> String {
    serde_json::to_string(&crate::api::wire::sorted::Sorted(answer)).unwrap()
}

/// The answers no in-process call can reach (libvirt's test driver runs no guest of
/// the agent's), from the services' values.
#[test]
fn answers_from_the_services_values_keep_their_bytes() {
    use crate::api::wire::images::ImageStored;
    use crate::api::wire::vms::{VmCreated, VmDeleted};
    let created = crate::vm::service::Created {
        name: "a".into(),
        uuid: "u".into(),
        mac: "m".into(),
        instance_id: "iid-u".into(),
        hostname: "a".into(),
        image: None,
        recreated: false,
        ip: "192.168.122.2".parse().unwrap(),
    };
    let created = VmCreated {
        ok: true,
        created: created.into(),
    };
    assert_eq!(
        sorted(created),
        r#"{"hostname":"a","image":null,"instance_id":"iid-u","ip":"192.168.122.2","mac":"m","name":"a","ok":true,"recreated":false,"uuid":"u"}"#
    );
    let deleted = crate::vm::service::Deleted {
        name: "a".into(),
        deleted_files: true,
        removed_port_maps: vec!["8080".into()],
    };
    let deleted = VmDeleted {
        ok: true,
        deleted: deleted.into(),
    };
    assert_eq!(
        sorted(deleted),
        r#"{"deleted_files":true,"name":"a","ok":true,"removed_port_maps":["8080"]}"#
    );
    let row = crate::store::vms::ImageRow {
        name: "img".into(),
        source: "upload".into(),
        sha256_expected: None,
        sha256: Some("ab".into()),
        format: Some("raw".into()),
        size_bytes: Some(1),
        state: crate::model::ImageState::Ready,
        error: None,
        volume: "img.raw".into(),
        created_at: "c".into(),
        updated_at: "u".into(),
        created_by: "token".into(),
    };
    let stored = ImageStored {
        ok: true,
        image: row.into(),
    };
    assert_eq!(
        sorted(stored),
        r#"{"image":{"created_at":"c","created_by":"token","error":null,"format":"raw","name":"img","sha256":"ab","sha256_expected":null,"size_bytes":1,"source":"upload","state":"ready","updated_at":"u","volume":"img.raw"},"ok":true}"#
    );
}

/// The small answers of the VM and image changes, from their values.
#[test]
fn the_changes_answers_keep_their_bytes() {
    use crate::api::wire::images::{ImageAccepted, ImageDeleted};
    use crate::api::wire::vms::{VmConsole, VmIp, VmRebooted, VmStarted, VmStopped};
    let (ok, name) = (true, "a".to_string());
    for (v, want) in [
        (
            sorted(VmStarted {
                ok,
                name: name.clone(),
                was_running: true,
            }),
            r#"{"name":"a","ok":true,"was_running":true}"#,
        ),
        (
            sorted(VmStopped {
                ok,
                name: name.clone(),
                forced: false,
            }),
            r#"{"forced":false,"name":"a","ok":true}"#,
        ),
        (
            sorted(VmRebooted {
                ok,
                name: name.clone(),
            }),
            r#"{"name":"a","ok":true}"#,
        ),
        (
            sorted(VmIp {
                ok,
                name: name.clone(),
                ip: "192.168.122.2".parse().unwrap(),
            }),
            r#"{"ip":"192.168.122.2","name":"a","ok":true}"#,
        ),
        (
            sorted(VmConsole {
                ok,
                name: name.clone(),
                console: "boot\n".into(),
            }),
            r#"{"console":"boot\n","name":"a","ok":true}"#,
        ),
        (
            sorted(ImageAccepted {
                ok,
                name: "img".into(),
                state: "downloading".into(),
            }),
            r#"{"name":"img","ok":true,"state":"downloading"}"#,
        ),
        (
            sorted(ImageDeleted {
                ok,
                name: "img".into(),
                deleted: true,
            }),
            r#"{"deleted":true,"name":"img","ok":true}"#,
        ),
    ] {
        assert_eq!(v, want);
    }
}
