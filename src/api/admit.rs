//! Who may call: every route but the public ones needs the token, checked from the
//! request's headers before anything reads its body.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::{Identity, PORTMAP_TOKEN_HEADER};
use super::error::ApiError;
use super::routes;
use super::server::ConnInfo;
use super::state::AppState;

/// Lets a public route (`routes::ROUTES`: `GET /health`) through; everything else needs
/// the token, or must come through the WireGuard tunnel from the controller (see
/// `MeshStatus::is_controller_tunnel`).
///
/// Runs before anything reads the body: a refused request is answered from its headers
/// alone, its body is never read, and it is only counted (`refused.rs`), never stored.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    if routes::is_public(&req) {
        return next.run(req).await;
    }
    let headers = req.headers();
    let token_ok = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| state.token.matches_header(v.as_bytes()))
        || headers
            .get(PORTMAP_TOKEN_HEADER)
            .is_some_and(|v| state.token.matches_portmap_header(v.as_bytes()))
        || headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .any(|v| state.token.matches_subprotocols(v.as_bytes()));
    // Only the socket's addresses count; X-Forwarded-For / Forwarded are never read.
    let conn = req
        .extensions()
        .get::<axum::extract::ConnectInfo<ConnInfo>>()
        .map(|c| c.0);
    let tunnel_ok = !token_ok
        && conn
            .and_then(|c| c.local.map(|local| (local.ip(), c.peer.ip())))
            .is_some_and(|(local, peer)| state.mesh.is_controller_tunnel(local, peer));
    if !token_ok && !tunnel_ok {
        state
            .refused
            .count(conn.map(|c| c.peer.ip()), &routes::counted_name(&req));
        let mut resp = (
            [
                (header::WWW_AUTHENTICATE, "Bearer"),
                // The body was not read: the connection cannot carry another request.
                (header::CONNECTION, "close"),
            ],
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API token: send Authorization: Bearer <token> \
                 (or X-Portmap-Token: <token>)",
            ),
        )
            .into_response();
        resp.extensions_mut().insert(Identity::None);
        return resp;
    }
    let identity = if token_ok {
        Identity::Token
    } else {
        Identity::Controller
    };
    req.extensions_mut().insert(identity);
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(identity);
    resp
}
