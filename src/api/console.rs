//! `GET /vms/{name}/console/attach`: an interactive serial console over a WebSocket.
//! Everything that can be refused is refused before the upgrade, as JSON (400 for a
//! request that is not a WebSocket upgrade, 404, 409, 503); then `console_pump.rs` moves
//! the bytes until either end closes.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Extension, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::auth::Identity;
use super::body;
use super::console_pump;
use super::error::ApiError;
use super::server::ConnInfo;
use super::state::AppState;
use super::wire::console::{AttachQuery, CONSOLE_SUBPROTOCOL};
use crate::vm::console::{Client, ConsoleError};
use crate::vm::spec;

/// Largest WebSocket message (and frame) a client may send: a paste, not a file.
pub const MAX_INPUT_MESSAGE: usize = 16 * 1024;

#[utoipa::path(
    get, path = "/vms/{name}/console/attach", tag = "vms",
    params(("name" = String, Path, description = "VM name"), AttachQuery),
    responses(
        (status = 101, description = "Switching Protocols: a WebSocket carrying the serial console's raw bytes both ways (binary frames; a text frame's UTF-8 bytes are sent as typed). One session per VM. The agent pings every 15 s and closes with a code and a reason: 1000 client, 1001 agent shutting down, 1008 client not reading, 1011 libvirt failed, 4001 taken over (names by whom), 4002 idle (CONSOLE_IDLE_TIMEOUT), 4003 the VM stopped or was deleted. A browser may send the token as the subprotocol `base64url.bearer.authorization.k8s.io.<token, unpadded base64url>` beside `console.node-vm-agent`, which the agent selects."),
        (status = 400, description = "Not a WebSocket upgrade request", body = super::error::ErrorBody),
        (status = 409, description = "The VM is not running, or its console is held (by a session, named with since when, or by another libvirt client) and force was not asked", body = super::error::ErrorBody),
        (status = 503, description = "CONSOLE_MAX_SESSIONS sessions are open, libvirt is unavailable, or the agent is stopping", body = super::error::ErrorBody),
    ),
)]
pub async fn attach(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    identity: Option<Extension<Identity>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let vm = spec::vm_name("VM name", &name).map_err(ApiError::from)?;
    let q: AttachQuery = body::query(q.as_deref())?;
    let ws = ws.map_err(|e| {
        ApiError::bad_request(format!(
            "this route is a WebSocket: send a GET with Connection: Upgrade, Upgrade: websocket \
             ({e})"
        ))
    })?;
    let client = Client {
        identity: identity
            .map_or(Identity::None, |i| i.0)
            .as_str()
            .to_string(),
        addr: Some(conn.peer.to_string()),
    };
    let session = state
        .consoles
        .attach(vm, client, q.force.unwrap_or(false))
        .await
        .map_err(refused)?;
    let settings = state.consoles.settings();
    let ws = ws
        .protocols([CONSOLE_SUBPROTOCOL])
        .max_message_size(MAX_INPUT_MESSAGE)
        .max_frame_size(MAX_INPUT_MESSAGE)
        .read_buffer_size(4096)
        .write_buffer_size(0);
    Ok(ws.on_upgrade(move |socket| console_pump::pump(socket, session, settings)))
}

/// An attach refused, as the client sees it.
fn refused(e: ConsoleError) -> ApiError {
    let status = match &e {
        ConsoleError::NoSuchVm(_) => StatusCode::NOT_FOUND,
        ConsoleError::NotRunning(_) | ConsoleError::Held { .. } | ConsoleError::HeldOutside(_) => {
            StatusCode::CONFLICT
        }
        ConsoleError::TooMany(_) | ConsoleError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ConsoleError::Vm(_) | ConsoleError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    match e {
        ConsoleError::Vm(v) => v.into(),
        ConsoleError::Store(s) => s.into(),
        e => ApiError::new(status, e.to_string()),
    }
}
