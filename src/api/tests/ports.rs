//! `/ports` through the whole application: maps made, listed, replaced and deleted,
//! every bad input a JSON 4xx that changes nothing, and the kernel's refusals.

use super::*;

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

/// Requests to refuse, part 1.
fn bad_port_requests_1() -> Vec<(
    &'static str,
    &'static str,
    Option<&'static str>,
    StatusCode,
    &'static str,
)> {
    vec![
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
    ]
}

/// Requests to refuse, part 2.
fn bad_port_requests_2() -> Vec<(
    &'static str,
    &'static str,
    Option<&'static str>,
    StatusCode,
    &'static str,
)> {
    vec![
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
    ]
}

/// Requests to refuse, part 3.
fn bad_port_requests_3() -> Vec<(
    &'static str,
    &'static str,
    Option<&'static str>,
    StatusCode,
    &'static str,
)> {
    vec![
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
    ]
}

/// Requests to refuse, part 4.
fn bad_port_requests_4(huge: &str) -> Vec<(&str, &str, Option<&str>, StatusCode, &str)> {
    vec![
        (
            "POST",
            "/ports",
            Some(huge),
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
    ]
}

/// Requests to refuse, part 5.
fn bad_port_requests_5() -> Vec<(
    &'static str,
    &'static str,
    Option<&'static str>,
    StatusCode,
    &'static str,
)> {
    vec![
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
    ]
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
        "a".repeat(routes::MAX_BODY_BYTES)
    );
    let cases: Vec<(&str, &str, Option<&str>, StatusCode, &str)> = [
        bad_port_requests_1(),
        bad_port_requests_2(),
        bad_port_requests_3(),
        bad_port_requests_4(&huge),
        bad_port_requests_5(),
    ]
    .concat();
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
