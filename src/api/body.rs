//! Request inputs read by us rather than by axum's extractors, so that every rejection
//! (empty body, bad JSON, wrong types, unknown fields, bad query) is an `ApiError` with
//! a message that says what to fix.

use axum::body::Bytes;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Parses a JSON body. The original agent ignored Content-Type (`get_json(force=True)`)
/// and so do we: existing clients send JSON without it.
pub fn json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request(
            "request body must be a JSON object, got an empty body",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "invalid request",
            _ => "malformed JSON",
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// As [`json`], for a body with secret fields (`audit::SECRET_FIELDS`): one of those
/// that is not a string (or null) is refused without serde's message, which would quote
/// a scalar value.
pub fn json_with_secrets<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let v: serde_json::Value = json(body)?;
    if let Some(obj) = v.as_object() {
        for field in super::audit::SECRET_FIELDS {
            if let Some(value) = obj.get(*field)
                && !(value.is_string() || value.is_null())
            {
                return Err(ApiError::bad_request(format!(
                    "invalid request: {field} must be a string"
                )));
            }
        }
    }
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

/// Parses a query string into `T` (use `deny_unknown_fields` on it).
pub fn query<T: DeserializeOwned>(raw: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
}
