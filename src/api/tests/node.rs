//! `GET /metrics` and `GET /events` through the whole application (the real metrics,
//! the process's event bus; the kernel and libvirt sides are in tests/observability.rs).

use std::time::Duration;

use super::*;

async fn text(resp: axum::response::Response) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The value of the series `line_start` (its whole name and labels), if present.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_scrape_needs_the_token_and_reports_the_maps_and_the_requests() {
    let h = harness();
    let (s, _) = h.call("GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for port in [18081, 18082] {
        let body = format!(
            r#"{{"listen_port": {port}, "target_ip": "192.168.122.50", "target_port": 80}}"#
        );
        let (s, v) = h.authed("POST", "/ports", Some(&body)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, resp) = h.head("GET", "/metrics", &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], crate::metrics::CONTENT_TYPE);
    let scrape = text(resp).await;
    assert_eq!(
        value(&scrape, r#"node_vm_agent_port_maps{proto="tcp"}"#),
        Some(2.0)
    );
    assert_eq!(
        value(
            &scrape,
            r#"node_vm_agent_port_map_packets_total{listen_port="18081",proto="tcp"}"#
        ),
        Some(0.0)
    );
    let posted = value(
        &scrape,
        r#"node_vm_agent_http_requests_total{method="POST",route="/ports",status="200"}"#,
    );
    assert!(posted.is_some_and(|n| n >= 2.0), "{scrape}");
    let refused = value(&scrape, "node_vm_agent_refused_requests_total");
    assert!(refused.is_some_and(|n| n >= 1.0), "{scrape}");
    assert!(value(&scrape, "node_vm_agent_audit_rows_total").is_some_and(|n| n >= 2.0));
    assert!(scrape.contains("node_vm_agent_build_info{version="));
}

/// The SSE messages' JSON events, read until `until` says stop or 5 s pass.
async fn read_events(
    body: &mut axum::body::Body,
    mut until: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !until(&events) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("the awaited events within 5 s")
            .expect("the stream went on")
            .unwrap();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let message: String = buf.drain(..end + 2).collect();
            for line in message.lines() {
                if let Some(json) = line.strip_prefix("data: ") {
                    events.push(serde_json::from_str(json).unwrap());
                }
            }
        }
    }
    events
}

#[tokio::test]
async fn the_event_stream_shows_changes_in_order_and_resumes_after_an_id() {
    let h = harness();
    let (s, resp) = h.head("GET", "/events", &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let map = r#"{"listen_port": 18091, "target_ip": "192.168.122.50", "target_port": 80}"#;
    assert_eq!(
        h.authed("POST", "/ports", Some(map)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.authed("DELETE", "/ports/18091", None).await.0,
        StatusCode::OK
    );
    let ours = |e: &&Value| e["subject"] == "18091";
    let seen = read_events(&mut body, |ev| ev.iter().filter(ours).count() == 2).await;
    let ours: Vec<&Value> = seen.iter().filter(ours).collect();
    assert_eq!(ours[0]["kind"], "portmap.added");
    assert_eq!(ours[0]["detail"]["target_ip"], "192.168.122.50");
    assert_eq!(ours[1]["kind"], "portmap.removed");
    let (first, second) = (
        ours[0]["id"].as_u64().unwrap(),
        ours[1]["id"].as_u64().unwrap(),
    );
    assert!(first < second);

    // A client that saw the first comes back and gets the second from the buffer.
    let resume = first.to_string();
    let (s, resp) = h
        .head("GET", "/events", &[("last-event-id", &resume)])
        .await;
    assert_eq!(s, StatusCode::OK);
    let mut body = resp.into_body();
    let replayed = read_events(&mut body, |ev| ev.iter().any(|e| e["id"] == second)).await;
    assert!(replayed.iter().all(|e| e["id"].as_u64().unwrap() > first));
}

#[tokio::test]
async fn a_bad_last_event_id_is_a_400_and_streams_are_bounded() {
    let h = harness();
    let (s, resp) = h
        .head("GET", "/events", &[("last-event-id", "yesterday")])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(text(resp).await.contains("Last-Event-ID"));
    let mut open = Vec::new();
    for _ in 0..crate::api::events::MAX_STREAMS {
        let (s, resp) = h.head("GET", "/events", &[]).await;
        assert_eq!(s, StatusCode::OK);
        open.push(resp);
    }
    let (s, resp) = h.head("GET", "/events", &[]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(text(resp).await.contains("event streams are open"));
    open.pop();
    let (s, _) = h.head("GET", "/events", &[]).await;
    assert_eq!(s, StatusCode::OK, "a closed stream frees its place");
}
