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

/// A body that carries nothing: absent (no byte at all), or exactly the JSON object `{}`
/// (not `[]`, `null`, an object with fields, or blanks, which are no JSON).
pub fn empty_object(body: &Bytes) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request(
            "request body must be absent or {}, not blank",
        ));
    }
    match json::<serde_json::Value>(body)? {
        serde_json::Value::Object(o) if o.is_empty() => Ok(()),
        other => Err(ApiError::bad_request(format!(
            "request body must be absent or {{}}, not {}",
            match other {
                serde_json::Value::Object(_) => "an object with fields",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Null => "null",
                _ => "a scalar",
            }
        ))),
    }
}

/// Parses a query string into `T` (use `deny_unknown_fields` on it).
pub fn query<T: DeserializeOwned>(raw: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
}

/// A port given as a JSON number or, as the original agent's `int()` accepted, a string
/// of digits. A number may be written with a zero fraction (`8080.0`): JSON Schema counts
/// it as an integer, and so did the original's `int()`.
pub fn port(field: &str, v: &serde_json::Value) -> Result<u16, String> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=65535.0).contains(f))
                .map(|f| f as u64)
        }),
        serde_json::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().ok()
        }
        _ => None,
    };
    match n {
        Some(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!(
            "{field} must be a whole number from 1 to 65535, not {v}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_port_is_a_whole_number_or_a_string_of_digits() {
        for (v, want) in [
            (json!(8080), Some(8080)),
            (json!(8080.0), Some(8080)),
            (json!("8080"), Some(8080)),
            (json!("08080"), Some(8080)),
            (json!(65535), Some(65535)),
            (json!(0), None),
            (json!(65536), None),
            (json!(65536.0), None),
            (json!(80.5), None),
            (json!(-1.0), None),
            (json!("8080.0"), None),
            (json!(" 80"), None),
            (json!(true), None),
        ] {
            assert_eq!(super::port("p", &v).ok(), want, "{v}");
        }
    }
}
