//! One audit row for every mutating call: who (address, identity), what (method, route,
//! parameters), and what came of it (status, error). Also where bodies are read whole
//! and limited, by the route table's rule (`routes::BodyRule`).

use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::Identity;
use super::error::{ApiError, Audited, ErrorMessage};
use super::routes::{self, BodyRule};
use super::server::{BodyTimeout, ConnInfo};
use super::state::AppState;
use crate::store::audit::{self, Entry, Outcome};

/// The audit row of the request being served, known before its handler runs. A
/// handler whose change lives in SQLite hands [`Draft::accepted`] to that change, which
/// writes it in its own transaction, and marks its response [`Audited`]; every other
/// outcome (refused, failed, or a change outside SQLite) is written here afterwards.
#[derive(Clone, Debug)]
pub struct Draft(Entry);

impl Draft {
    /// The row of this request as an accepted change answered with `status`.
    pub fn accepted(&self, status: StatusCode) -> Entry {
        Entry {
            outcome: Outcome::Ok,
            status: Some(status.as_u16()),
            error: None,
            ..self.0.clone()
        }
    }
}

/// A handler's answer whose audit row is written: the layer writes no second one.
pub struct AuditedResponse<T>(pub T);

impl<T: IntoResponse> IntoResponse for AuditedResponse<T> {
    fn into_response(self) -> Response {
        let mut resp = self.0.into_response();
        resp.extensions_mut().insert(Audited);
        resp
    }
}

/// Runs a change that does not live in SQLite alone (libvirt, a kernel rewrite), with its
/// audit row written first, as unfinished: a full disk refuses the call (507) before
/// anything has happened, so no such change exists without its row. When the change ends
/// the row gets its outcome; if the agent stops in between, it stays unfinished.
pub async fn around<T>(
    store: &crate::store::Store,
    draft: &Draft,
    status: StatusCode,
    change: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<AuditedResponse<T>, ApiError> {
    let entry = Entry {
        outcome: Outcome::Failed,
        status: None,
        error: Some(audit::UNFINISHED.to_string()),
        ..draft.0.clone()
    };
    let id = store
        .run(move |s| s.with(|c| audit::record(c, &entry)))
        .await
        .map_err(ApiError::from)?;
    let result = change.await;
    let (outcome, code, message) = match &result {
        Ok(_) => (Outcome::Ok, status.as_u16(), None),
        Err(e) if e.status.is_client_error() => {
            (Outcome::Refused, e.status.as_u16(), Some(e.message.clone()))
        }
        Err(e) => (Outcome::Failed, e.status.as_u16(), Some(e.message.clone())),
    };
    let finished = store
        .run(move |s| s.with(|c| audit::finish(c, id, outcome, Some(code), message.as_deref())))
        .await;
    if let Err(err) = finished {
        tracing::error!(error = %err, row = id, "could not write the outcome of a change to its audit row");
    }
    result.map(AuditedResponse).map_err(ApiError::audited)
}

pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let route = routes::matched(&req);
    let drafts = Drafts::of(&req);
    let (parts, body) = req.into_parts();
    let (resp, draft) = match route.map(|r| r.body) {
        Some(BodyRule::Streamed) => streamed(parts, body, next, &drafts).await,
        _ => read_whole(parts, body, next, &drafts, routes::body_limit(route)).await,
    };
    if resp.extensions().get::<Audited>().is_none() {
        let error = resp.extensions().get::<ErrorMessage>().map(|m| m.0.clone());
        write_outcome(&state, resp.status(), error, draft).await;
    }
    resp
}

/// What the audit row of a request says before its body is known.
struct Drafts {
    client_addr: Option<String>,
    identity: Identity,
    action: String,
    uri: String,
}

impl Drafts {
    fn of(req: &Request) -> Self {
        Self {
            // Forwarding headers are ignored on purpose: only the socket's peer is known.
            client_addr: req
                .extensions()
                .get::<ConnectInfo<ConnInfo>>()
                .map(|c| c.0.peer.to_string()),
            identity: req
                .extensions()
                .get::<Identity>()
                .copied()
                .unwrap_or(Identity::None),
            action: routes::action_of(req),
            uri: req.uri().to_string(),
        }
    }

    fn draft(&self, body: Recorded) -> Draft {
        Draft(Entry {
            client_addr: self.client_addr.clone(),
            identity: self.identity.as_str().to_string(),
            action: self.action.clone(),
            parameters: Some(parameters(&self.uri, body)),
            outcome: Outcome::Ok,
            status: None,
            error: None,
        })
    }
}

/// A body's declared length, when it says one.
fn content_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// An image upload is a stream of any size into libvirt: it is neither buffered nor
/// limited here, and the audit row records its size, not its bytes.
async fn streamed(mut parts: Parts, body: Body, next: Next, drafts: &Drafts) -> (Response, Draft) {
    let size = content_length(&parts).map_or_else(|| "unknown".to_string(), |n| n.to_string());
    let draft = drafts.draft(Recorded::Upload(size));
    parts.extensions.insert(draft.clone());
    (next.run(Request::from_parts(parts, body)).await, draft)
}

/// Every other body is read whole, up to `limit`, before the handler runs.
async fn read_whole(
    mut parts: Parts,
    body: Body,
    next: Next,
    drafts: &Drafts,
    limit: usize,
) -> (Response, Draft) {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body larger than {limit} bytes (the limit of {})",
                drafts.action
            ),
        )
        .into_response()
    };
    let no_body = || drafts.draft(Recorded::Body(Bytes::new()));
    // A declared length over the limit is refused before a byte of the body is read.
    if content_length(&parts).is_some_and(|n| n > limit as u64) {
        return (too_large(), no_body());
    }
    match to_bytes(body, limit).await {
        Ok(bytes) => {
            let draft = drafts.draft(Recorded::Body(bytes.clone()));
            parts.extensions.insert(draft.clone());
            let resp = next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
            (resp, draft)
        }
        // Too slow (the server's time rule cut it), too big, or broken.
        Err(e) => match BodyTimeout::find(&e) {
            Some(t) => (
                ApiError::new(StatusCode::REQUEST_TIMEOUT, t.to_string()).into_response(),
                no_body(),
            ),
            None if over_limit(&e) => (too_large(), no_body()),
            // Not a size: the body itself was broken (a malformed chunk, a connection
            // closed halfway), a client's mistake like any other bad body.
            None => (
                ApiError::bad_request(
                    "the request body could not be read (malformed chunked encoding, or \
                     the connection ended before the body did)",
                )
                .into_response(),
                no_body(),
            ),
        },
    }
}

/// The audit row of a request whose handler wrote none: refused, failed, or a change
/// that answered without one.
async fn write_outcome(state: &AppState, status: StatusCode, error: Option<String>, draft: Draft) {
    let entry = Entry {
        outcome: if status.is_success() {
            Outcome::Ok
        } else if status.is_client_error() {
            Outcome::Refused
        } else {
            Outcome::Failed
        },
        status: Some(status.as_u16()),
        error,
        ..draft.0
    };
    let written = state
        .store
        .run(move |s| s.with(|c| audit::record(c, &entry)))
        .await;
    match written {
        Ok(_) => {}
        // Refused and failed calls changed nothing; a full disk is said once a minute,
        // not once per request (the log is on a disk too).
        Err(e) if e.is_disk_full() => state.disk_full_warning.say(|| {
            tracing::error!(error = %e, "disk full: audit rows of refused or failed calls are not written");
        }),
        Err(e) => tracing::error!(error = %e, "could not write the audit row"),
    }
}

/// Whether reading a body failed because it was over the limit given to `to_bytes`
/// (rather than because the body itself was broken).
fn over_limit(e: &axum::Error) -> bool {
    std::error::Error::source(e).is_some_and(|inner| inner.is::<http_body_util::LengthLimitError>())
}

/// What of a request body goes into its audit row.
enum Recorded {
    Body(Bytes),
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

    #[tokio::test]
    async fn only_a_body_over_the_limit_counts_as_too_large() {
        let big = axum::body::Body::from(vec![b'x'; 100]);
        let e = to_bytes(big, 10).await.unwrap_err();
        assert!(over_limit(&e), "{e}");
        // A body that breaks off (a malformed chunk, a connection gone) is not too large.
        let broken = axum::body::Body::from_stream(futures_util::stream::iter([
            Ok(axum::body::Bytes::from_static(b"{")),
            Err(std::io::Error::other("connection reset")),
        ]));
        let e = to_bytes(broken, 10).await.unwrap_err();
        assert!(!over_limit(&e), "{e}");
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
