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
