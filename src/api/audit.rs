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
    let action = action_of(&req);
    let identity = req
        .extensions()
        .get::<Identity>()
        .copied()
        .unwrap_or(Identity::None);
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
            .and_then(|v| v.parse::<u64>().ok())
            .map_or_else(|| "unknown".to_string(), |n| n.to_string());
        let resp = next.run(Request::from_parts(parts, body)).await;
        (resp, Recorded::Upload(size))
    } else {
        let limit = body_limit(&action);
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {limit} bytes (the limit of {action})"),
            )
            .into_response()
        };
        // A declared length over the limit is refused before a byte of the body is read.
        let declared = parts
            .headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            (too_large(), Recorded::Body(axum::body::Bytes::new()))
        } else {
            match to_bytes(body, limit).await {
                Ok(bytes) => {
                    let resp = next
                        .run(Request::from_parts(parts, Body::from(bytes.clone())))
                        .await;
                    (resp, Recorded::Body(bytes))
                }
                Err(_) => (too_large(), Recorded::Body(axum::body::Bytes::new())),
            }
        }
    };
    let status = resp.status();
    let entry = Entry {
        client_addr,
        identity: identity.as_str().to_string(),
        action,
        parameters: Some(parameters(&uri, body_text)),
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

/// `POST /ports`, `DELETE /ports/{listen_port}`: the method and the route's template
/// (the path itself only where no route matched).
pub fn action_of(req: &Request) -> String {
    format!(
        "{} {}",
        req.method(),
        req.extensions()
            .get::<MatchedPath>()
            .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string())
    )
}

/// The route of a refused request as counted: like [`action_of`], but from a small,
/// fixed set of names (a stranger chooses the path and the method, not the routes).
pub fn route_of(req: &Request) -> String {
    let method = match *req.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::PATCH
        | Method::HEAD
        | Method::OPTIONS => req.method().as_str(),
        _ => "(other method)",
    };
    match req.extensions().get::<MatchedPath>() {
        Some(p) => format!("{method} {}", p.as_str()),
        None => format!("{method} (no such route)"),
    }
}

/// The largest body a route reads: what its fields can need, no more. `POST /vms`
/// carries up to 32 KiB each of user-data and network-config (JSON-escaped, up to twice
/// that); the streamed image upload has its own limit (VM_MAX_DISK_GB).
pub fn body_limit(action: &str) -> usize {
    match action {
        "POST /vms" => MAX_BODY_BYTES,
        "POST /images" => 8 * 1024,
        "POST /ports" => 4 * 1024,
        // restore, start, stop, reboot, deletes: nothing, or `{}`.
        _ => 1024,
    }
}

/// What of a request body goes into its audit row.
enum Recorded {
    Body(axum::body::Bytes),
    /// A streamed image upload: its declared size only.
    Upload(String),
}

/// Request fields that may carry secrets (cloud-init user-data often holds passwords or
/// tokens): wherever they appear in a body, their audit row keeps their size and
/// SHA-256, never their content. Add future secret fields here.
pub const SECRET_FIELDS: &[&str] = &["user_data", "network_config"];

/// The `parameters` of an audit row: the URI and the body, with secrets left out. A body
/// that is not JSON (malformed, truncated, anything) is not recorded at all, only its
/// size and SHA-256: nobody can tell what in it is secret.
fn parameters(uri: &str, body: Recorded) -> String {
    let body = match body {
        Recorded::Upload(size) => {
            serde_json::Value::String(format!("<binary upload, content-length {size}>"))
        }
        Recorded::Body(b) if b.is_empty() => serde_json::Value::Null,
        Recorded::Body(b) => match serde_json::from_slice::<serde_json::Value>(&b) {
            Ok(v) => redact(v),
            Err(_) => serde_json::Value::String(format!(
                "<{} bytes, not valid JSON, sha256 {}, not recorded>",
                b.len(),
                sha256_hex(&b)
            )),
        },
    };
    serde_json::json!({"uri": uri, "body": body}).to_string()
}

/// Replaces the value of every [`SECRET_FIELDS`] key, at any depth and of any type.
fn redact(mut v: serde_json::Value) -> serde_json::Value {
    match &mut v {
        serde_json::Value::Object(obj) => {
            for (key, value) in obj.iter_mut() {
                if SECRET_FIELDS.contains(&key.as_str()) {
                    let bytes = match &*value {
                        serde_json::Value::String(s) => s.clone().into_bytes(),
                        other => other.to_string().into_bytes(),
                    };
                    *value = serde_json::Value::String(format!(
                        "<{} bytes, sha256 {}, not recorded>",
                        bytes.len(),
                        sha256_hex(&bytes)
                    ));
                } else {
                    *value = redact(std::mem::take(value));
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items.iter_mut() {
                *item = redact(std::mem::take(item));
            }
        }
        _ => {}
    }
    v
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "hunter2-not-for-the-audit";

    fn recorded(body: &str) -> String {
        parameters(
            "/vms",
            Recorded::Body(axum::body::Bytes::from(body.to_string())),
        )
    }

    #[test]
    fn secret_fields_keep_their_size_and_hash_only() {
        let p = recorded(&format!(r#"{{"name": "vm1", "user_data": "{SECRET}"}}"#));
        assert!(!p.contains(SECRET), "{p}");
        assert!(p.contains(r#""name":"vm1""#), "{p}");
        assert!(
            p.contains(&format!(
                "<25 bytes, sha256 {}, not recorded>",
                sha256_hex(SECRET.as_bytes())
            )),
            "{p}"
        );
    }

    #[test]
    fn no_body_shape_lets_a_secret_through() {
        for body in [
            // Wrong types, nested, in arrays.
            format!(r#"{{"name": "a", "user_data": {{"password": "{SECRET}"}}}}"#),
            format!(r#"{{"name": "a", "network_config": ["{SECRET}"]}}"#),
            format!(r#"[{{"user_data": "{SECRET}"}}]"#),
            format!(r#"{{"outer": {{"user_data": "{SECRET}"}}}}"#),
            // Malformed: missing brace, trailing garbage, truncated.
            format!(r#"{{"name": "a", "user_data": "{SECRET}""#),
            format!(r#"{{"name": "a", "user_data": "{SECRET}"}} x"#),
            format!(r#"{{"name": "a", "user_data": "{}"#, &SECRET[..10]),
            format!("user_data={SECRET}"),
        ] {
            let p = recorded(&body);
            assert!(!p.contains(&SECRET[..10]), "{body} -> {p}");
        }
        let p = recorded("{ nope");
        assert!(p.contains("<6 bytes, not valid JSON, sha256 "), "{p}");
    }
}
