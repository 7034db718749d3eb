//! `GET /health`: the controller polls it and expects 200 `{"ok": true}`; the rest tells
//! an operator where the node stands with the mesh. Never a secret.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;

/// Answer of `GET /health`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct Health {
    ok: bool,
    version: String,
    /// `standalone`, `joining`, `joined` or `cached`.
    join: String,
    node_ip: Option<String>,
    /// `kernel` or `userspace`.
    tunnel: Option<String>,
    last_handshake_s: Option<u64>,
    /// No handshake with the controller for WG_STALE_AFTER: the node is re-joining.
    tunnel_stale: bool,
    join_error: Option<String>,
}

#[utoipa::path(
    get, path = "/health", tag = "node",
    responses((status = 200, description = "The API is up; no authentication needed. \
        `join`: standalone, joining, joined or cached; `node_ip`, `tunnel` (kernel or userspace) \
        and `last_handshake_s` (seconds since the controller's last handshake) once known; \
        `tunnel_stale`: no handshake for WG_STALE_AFTER, the node is re-joining", body = Health))
)]
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let s = state.mesh.snapshot();
    let since = s
        .last_handshake
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs());
    Json(json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "join": s.state.as_str(),
        "node_ip": s.node_ip.map(|ip| ip.to_string()),
        "tunnel": s.tunnel.map(|t| t.as_str()),
        "last_handshake_s": since,
        "tunnel_stale": s.stale,
        "join_error": s.error,
    }))
}
