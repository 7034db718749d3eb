//! `/images` on the wire: the body of `POST /images`, the upload's query, and the
//! answers, each made from the image service's values and written with their keys
//! sorted (`sorted.rs`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::names::ImageState;
use crate::api::doc;
use crate::store::vms as rows;
use crate::vm::images;

/// Body of `POST /images`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddImage {
    /// `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`.
    #[schema(schema_with = doc::name)]
    pub name: String,
    /// A plain `http(s)://host[:port][/path][?query]`: a DNS name or IPv4 address, no
    /// user name or fragment.
    #[schema(schema_with = doc::url)]
    pub url: String,
    /// Hex SHA-256 of the file; the download is refused if it differs.
    #[schema(schema_with = doc::sha256)]
    pub sha256: String,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Hex SHA-256 to check the upload against (optional).
    pub sha256: Option<String>,
}

/// One base image.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageRow {
    pub name: String,
    pub source: String,
    pub sha256_expected: Option<String>,
    pub sha256: Option<String>,
    pub format: Option<String>,
    pub size_bytes: Option<i64>,
    pub state: ImageState,
    pub error: Option<String>,
    pub volume: String,
    pub created_at: String,
    pub updated_at: String,
    pub created_by: String,
}

impl From<rows::ImageRow> for ImageRow {
    fn from(r: rows::ImageRow) -> Self {
        let rows::ImageRow {
            name,
            source,
            sha256_expected,
            sha256,
            format,
            size_bytes,
            state,
            error,
            volume,
            created_at,
            updated_at,
            created_by,
        } = r;
        Self {
            name,
            source,
            sha256_expected,
            sha256,
            format,
            size_bytes,
            state: state.into(),
            error,
            volume,
            created_at,
            updated_at,
            created_by,
        }
    }
}

/// An image as `GET /images` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageInfo {
    #[serde(flatten)]
    pub row: ImageRow,
    /// Bytes received so far, while downloading.
    pub received_bytes: Option<u64>,
    /// Expected size, while downloading (when the server said).
    pub total_bytes: Option<u64>,
    /// Managed VMs whose disk is backed by this image.
    pub used_by: Vec<String>,
}

impl From<images::ImageInfo> for ImageInfo {
    fn from(i: images::ImageInfo) -> Self {
        let images::ImageInfo {
            row,
            received_bytes,
            total_bytes,
            used_by,
        } = i;
        Self {
            row: row.into(),
            received_bytes,
            total_bytes,
            used_by,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageList {
    pub ok: bool,
    pub images: Vec<ImageInfo>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageAccepted {
    pub ok: bool,
    pub name: String,
    /// `downloading`.
    pub state: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageStored {
    pub ok: bool,
    pub image: ImageRow,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageDeleted {
    pub ok: bool,
    pub name: String,
    pub deleted: bool,
}
