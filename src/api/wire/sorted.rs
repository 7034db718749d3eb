//! Answers whose object keys come out in alphabetical order, at every depth.
//!
//! Every answer of the VM side, the image side, `/health`, `/stats` and the error shape
//! was written as a `serde_json::Value` (`json!`), whose keys serde_json keeps sorted;
//! clients have read them so. Their types now say what they hold, and are written
//! through a `Value` all the same, so the bytes stay as they were. The port maps'
//! answers were typed from the start and keep their fields' order.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde::{Serialize, Serializer};

/// `T` as a JSON answer, its keys sorted.
#[derive(Debug)]
pub struct SortedJson<T>(pub T);

impl<T: Serialize> IntoResponse for SortedJson<T> {
    fn into_response(self) -> Response {
        Json(Sorted(self.0)).into_response()
    }
}

/// `T`, serialized with its keys sorted.
#[derive(Debug)]
pub struct Sorted<T>(pub T);

impl<T: Serialize> Serialize for Sorted<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        sorted(&self.0, s)
    }
}

/// `value` with its keys sorted, through a `serde_json::Value`.
fn sorted<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    serde_json::to_value(value)
        .map_err(serde::ser::Error::custom)?
        .serialize(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Inner {
        z: u8,
        a: u8,
    }

    #[derive(Serialize)]
    struct Outer {
        ok: bool,
        inner: Inner,
        #[serde(skip_serializing_if = "Option::is_none")]
        gone: Option<u8>,
    }

    #[test]
    fn keys_come_out_sorted_at_every_depth_and_absent_stays_absent() {
        let v = Outer {
            ok: true,
            inner: Inner { z: 1, a: 2 },
            gone: None,
        };
        assert_eq!(
            serde_json::to_string(&Sorted(v)).unwrap(),
            r#"{"inner":{"a":2,"z":1},"ok":true}"#
        );
    }
}
