//! `/images` through the whole application.

use super::*;

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

#[tokio::test]
async fn a_url_longer_than_the_document_allows_is_a_400_and_nothing_is_fetched() {
    let h = harness();
    let url = format!("http://example.com/{}", "a".repeat(4096));
    let body = json!({"name": "long", "url": url, "sha256": "0".repeat(64)}).to_string();
    let (s, v) = h.call("POST", "/images", Some(&body), Some(TOKEN)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("at most 4096"), "{v}");
    let (_, list) = h.call("GET", "/images", None, Some(TOKEN)).await;
    assert_eq!(list["images"].as_array().map(Vec::len), Some(0), "{list}");
}
