//! The API's one error type and its mapping to status codes, in the original agent's
//! shape `{"ok": false, "error": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::wire::sorted::SortedJson;
use crate::portmap::{FirewallErrorKind, PortMapError};
use crate::store::StoreError;

/// The error shape of every failing call.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always false.
    ok: bool,
    /// What went wrong, for a person.
    error: String,
}

/// The message of an error response, kept in the response's extensions so the audit
/// layer can record it without parsing the body.
#[derive(Clone, Debug)]
pub struct ErrorMessage(pub String);

/// On a response: its audit row was written with the change (`audit::Draft`), so the
/// audit layer writes no second one.
#[derive(Clone, Copy, Debug)]
pub struct Audited;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request's audit row already says this (`audit::around`).
    pub audited: bool,
}

/// The message of a 507: the change was refused for want of disk, not for its content.
pub const DISK_FULL: &str =
    "the node's disk is full (DATA_DIR's filesystem): nothing was changed; free space and retry";

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            audited: false,
        }
    }

    pub fn disk_full() -> Self {
        Self::new(StatusCode::INSUFFICIENT_STORAGE, DISK_FULL)
    }

    /// Marks the error as already recorded in the request's audit row.
    pub fn audited(mut self) -> Self {
        self.audited = true;
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "request failed");
        }
        let body = ErrorBody {
            ok: false,
            error: self.message.clone(),
        };
        let mut resp = (self.status, SortedJson(body)).into_response();
        resp.extensions_mut().insert(ErrorMessage(self.message));
        if self.audited {
            resp.extensions_mut().insert(Audited);
        }
        resp
    }
}

impl From<PortMapError> for ApiError {
    fn from(e: PortMapError) -> Self {
        if let PortMapError::Store(s) = &e
            && s.is_disk_full()
        {
            return Self::disk_full();
        }
        let status = match &e {
            PortMapError::Policy(_) => StatusCode::FORBIDDEN,
            PortMapError::Conflict { .. }
            | PortMapError::VmWithoutAddress(_)
            | PortMapError::VmMoved(_) => StatusCode::CONFLICT,
            PortMapError::UnknownVm(_) => StatusCode::NOT_FOUND,
            // The kernel drifted from the database: a reconcile repairs it, so the client
            // may try again; anything else the kernel says is the node's fault.
            PortMapError::Drifted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            PortMapError::Kernel(f) | PortMapError::Read(f) => match f.kind() {
                FirewallErrorKind::NotFound | FirewallErrorKind::Exists => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                FirewallErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            },
            PortMapError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_disk_full() {
            return Self::disk_full();
        }
        Self::internal(e.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::internal(format!("request task failed: {e}"))
    }
}

/// Turns any error response that is not already JSON (axum's own rejections, a 405 from
/// the router, ...) into the `{"ok": false, "error": ...}` shape.
pub async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || resp.extensions().get::<ErrorMessage>().is_some()
    {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut fixed = ApiError::new(status, message).into_response();
    // Keep headers such as WWW-Authenticate or Allow.
    for (name, value) in parts.headers.iter() {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fixed
}

impl From<crate::vm::VmError> for ApiError {
    fn from(e: crate::vm::VmError) -> Self {
        use crate::vm::{LibvirtKind, VmError};
        if let VmError::Store(s) = &e
            && s.is_disk_full()
        {
            return Self::disk_full();
        }
        let status = match &e {
            VmError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            VmError::NotFound(_) => StatusCode::NOT_FOUND,
            VmError::Invalid(_) => StatusCode::BAD_REQUEST,
            VmError::Conflict(_) => StatusCode::CONFLICT,
            VmError::Timeout(_) | VmError::Stalled(_) => StatusCode::GATEWAY_TIMEOUT,
            VmError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            // What libvirt said, by its error number (`LibvirtFailure::kind`).
            VmError::Libvirt(f) => match f.kind() {
                LibvirtKind::NotFound => StatusCode::NOT_FOUND,
                LibvirtKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                LibvirtKind::Conflict => StatusCode::CONFLICT,
                LibvirtKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
                LibvirtKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            },
            VmError::Internal(_) | VmError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}
