//! `GET /health`: the controller polls it and expects 200 `{"ok": true}`; the rest tells
//! an operator where the node stands with the mesh. Never a secret.

use axum::extract::State;

use super::state::AppState;
use super::wire::node::Health;
use super::wire::sorted::SortedJson;

#[utoipa::path(
    get, path = "/health", tag = "node",
    responses((status = 200, description = "The API is up; no authentication needed. \
        `join`: standalone, joining, joined or cached; `node_ip`, `tunnel` (kernel or userspace) \
        and `last_handshake_s` (seconds since the controller's last handshake) once known; \
        `tunnel_stale`: no handshake for WG_STALE_AFTER, the node is re-joining", body = Health))
)]
pub async fn health(State(state): State<AppState>) -> SortedJson<Health> {
    SortedJson(Health::of(state.mesh.snapshot()))
}
