//! `GET /health`: the controller polls it and expects 200 `{"ok": true}`.

use axum::Json;
use serde_json::{Value, json};

#[utoipa::path(
    get, path = "/health", tag = "node",
    responses((status = 200, description = "The API is up; no authentication needed", body = serde_json::Value))
)]
pub async fn health() -> Json<Value> {
    Json(json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
}
