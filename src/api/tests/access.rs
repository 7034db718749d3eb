//! Who may call: the token on every route but the public ones, refusals counted and
//! never stored, and the audit rows of what was let in.

use super::*;

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

/// Every route the table calls private refuses a request without the token, before
/// anything else; the public ones answer it.
#[tokio::test]
async fn the_route_table_says_which_routes_need_the_token() {
    let h = harness();
    for r in routes::ROUTES {
        let uri = r
            .path
            .replace("{listen_port}", "8080")
            .replace("{name}", "no-such-vm");
        let req = Request::builder()
            .method(r.verb.method())
            .uri(&uri)
            .body(Body::empty())
            .unwrap();
        let resp = h.app.clone().oneshot(req).await.unwrap();
        let refused = resp.status() == StatusCode::UNAUTHORIZED;
        assert_eq!(refused, !r.public, "{} {}", r.verb.method(), r.path);
    }
}

/// A body over its route's limit is refused with 413 before the handler runs, and
/// before a byte is read when its length is declared; the streamed upload has no such
/// limit (VM_MAX_DISK_GB bounds it, in the image service).
#[tokio::test]
async fn every_body_is_held_to_its_routes_limit() {
    let h = harness();
    for r in routes::ROUTES {
        let routes::BodyRule::Limit(limit) = r.body else {
            continue;
        };
        let uri = r
            .path
            .replace("{listen_port}", "8080")
            .replace("{name}", "no-such-vm");
        let req = Request::builder()
            .method(r.verb.method())
            .uri(&uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(vec![b' '; limit + 1]))
            .unwrap();
        let resp = h.app.clone().oneshot(req).await.unwrap();
        let what = format!("{} {}", r.verb.method(), r.path);
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE, "{what}");
        let v: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let msg = v["error"].as_str().unwrap();
        assert!(
            msg.contains(&format!("larger than {limit} bytes (the limit of {what})")),
            "{what}: {msg}"
        );
    }
    assert_eq!(routes::body_limit(None), routes::DEFAULT_BODY_LIMIT);
}
