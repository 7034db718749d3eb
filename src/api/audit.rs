//! One audit row for every mutating call: who (address, identity), what (method, route,
//! parameters), and what came of it (status, error). Also where bodies are limited.

use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorMessage};
use super::{AppState, ConnInfo, Identity, MAX_BODY_BYTES};
use crate::store::audit::{self, Entry, Outcome};

/// The route whose body is streamed (`POST /images/{name}`).
pub const UPLOAD_ROUTE: &str = "/images/{name}";

pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    // Forwarding headers are ignored on purpose: only the socket's peer is known.
    let client_addr = req
        .extensions()
        .get::<ConnectInfo<ConnInfo>>()
        .map(|c| c.0.peer.to_string());
    let action = format!(
        "{} {}",
        req.method(),
        req.extensions()
            .get::<MatchedPath>()
            .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string())
    );
    let uri = req.uri().to_string();
    let (parts, body) = req.into_parts();
    // An image upload is a stream of any size into libvirt: it is neither buffered nor
    // limited here, and the audit row records its size, not its bytes.
    let streamed = parts.method == Method::POST && action == format!("POST {UPLOAD_ROUTE}");
    let (resp, body_text) = if streamed {
        let size = parts
            .headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| "unknown".to_string(), str::to_string);
        let resp = next.run(Request::from_parts(parts, body)).await;
        (resp, format!("<binary upload, content-length {size}>"))
    } else {
        match to_bytes(body, MAX_BODY_BYTES).await {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let resp = next
                    .run(Request::from_parts(parts, Body::from(bytes)))
                    .await;
                (resp, text)
            }
            Err(_) => (
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {MAX_BODY_BYTES} bytes"),
                )
                .into_response(),
                String::new(),
            ),
        }
    };
    let status = resp.status();
    let entry = Entry {
        client_addr,
        identity: resp
            .extensions()
            .get::<Identity>()
            .copied()
            .unwrap_or(Identity::None)
            .as_str()
            .to_string(),
        action,
        parameters: Some(
            serde_json::json!({
                "uri": uri,
                "body": serde_json::from_str::<serde_json::Value>(&body_text)
                    .map(redact)
                    .unwrap_or(serde_json::Value::String(body_text)),
            })
            .to_string(),
        ),
        outcome: if status.is_success() {
            Outcome::Ok
        } else if status.is_client_error() {
            Outcome::Refused
        } else {
            Outcome::Failed
        },
        status: Some(status.as_u16()),
        error: resp.extensions().get::<ErrorMessage>().map(|m| m.0.clone()),
    };
    let store = state.store.clone();
    let written =
        tokio::task::spawn_blocking(move || store.with(|c| audit::record(c, &entry))).await;
    if !matches!(written, Ok(Ok(()))) {
        // The change itself is done; losing its audit row is logged loudly, not hidden.
        tracing::error!(result = ?written, "could not write the audit row");
    }
    resp
}

/// Request fields that may carry secrets (cloud-init user-data often holds passwords or
/// tokens): the audit row keeps their size, not their content.
const REDACTED_FIELDS: &[&str] = &["user_data", "network_config"];

fn redact(mut body: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = body.as_object_mut() {
        for field in REDACTED_FIELDS {
            if let Some(v) = obj.get_mut(*field)
                && let Some(text) = v.as_str()
            {
                *v = serde_json::Value::String(format!("<{} bytes, not recorded>", text.len()));
            }
        }
    }
    body
}

#[cfg(test)]
mod tests {
    #[test]
    fn user_data_is_not_recorded() {
        let body =
            serde_json::json!({"name": "vm1", "user_data": "#cloud-config\npassword: hunter2"});
        let r = super::redact(body);
        assert_eq!(r["name"], "vm1");
        assert_eq!(r["user_data"], "<31 bytes, not recorded>");
        assert!(!r.to_string().contains("hunter2"));
    }
}
