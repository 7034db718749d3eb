//! `/images`: parse, call one `Images` method, map its value to its answer.

use std::sync::Arc;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use futures_util::StreamExt;

use super::audit::{AuditedResponse, Draft, around};
use super::auth::Identity;
use super::body;
use super::error::{ApiError, ErrorBody};
use super::server::BodyTimeout;
use super::state::AppState;
use super::wire::images::{
    AddImage, ImageAccepted, ImageDeleted, ImageList, ImageStored, UploadQuery,
};
use super::wire::sorted::SortedJson;
use crate::vm::spec::check_name;

#[utoipa::path(
    get, path = "/images", tag = "images",
    responses((status = 200, description = "Every image, with download progress and the VMs backed by it", body = ImageList)),
)]
pub async fn images(State(state): State<AppState>) -> Result<SortedJson<ImageList>, ApiError> {
    let list = state.images.list().await?;
    Ok(SortedJson(ImageList {
        ok: true,
        images: list.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(
    post, path = "/images", tag = "images",
    request_body = AddImage,
    responses(
        (status = 202, description = "Download started; follow it in GET /images", body = ImageAccepted),
        (status = 409, description = "Exists or in transfer", body = ErrorBody),
    ),
)]
pub async fn add_image(
    State(state): State<AppState>,
    identity: axum::Extension<Identity>,
    Extension(draft): Extension<Draft>,
    body: Bytes,
) -> Result<AuditedResponse<(StatusCode, SortedJson<ImageAccepted>)>, ApiError> {
    let req: AddImage = body::json(&body)?;
    around(&state.store, &draft, StatusCode::ACCEPTED, async {
        state
            .images
            .download(&req.name, &req.url, Some(&req.sha256), identity.0.as_str())
            .await?;
        Ok((
            StatusCode::ACCEPTED,
            SortedJson(ImageAccepted {
                ok: true,
                name: req.name.clone(),
                state: "downloading".into(),
            }),
        ))
    })
    .await
}

#[utoipa::path(
    post, path = "/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name"), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The image file (qcow2 or raw)"),
    responses(
        (status = 200, description = "Stored", body = ImageStored),
        (status = 409, description = "Exists or in transfer", body = ErrorBody),
    ),
)]
pub async fn upload_image(
    State(state): State<AppState>,
    identity: axum::Extension<Identity>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<AuditedResponse<SortedJson<ImageStored>>, ApiError> {
    check_name("image name", &name)?;
    let q: UploadQuery = body::query(q.as_deref())?;
    let total = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // The server's time rule (UPLOAD_MIN_BYTES per UPLOAD_WINDOW) cuts a stalled upload
    // inside the stream; remembered here so the answer is a 408, not a broken body's 400.
    let cut = Arc::new(std::sync::OnceLock::new());
    let seen = cut.clone();
    let stream = body.into_data_stream().map(move |r| {
        r.map_err(|e| {
            if let Some(t) = BodyTimeout::find(&e) {
                let _ = seen.set(t);
            }
            format!("upload interrupted: {e}")
        })
    });
    around(&state.store, &draft, StatusCode::OK, async {
        let stored = state
            .images
            .upload(
                &name,
                stream,
                total,
                q.sha256.as_deref(),
                identity.0.as_str(),
            )
            .await;
        let row = match (stored, cut.get()) {
            (Err(_), Some(t)) => {
                return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, t.to_string()));
            }
            (stored, _) => stored?,
        };
        Ok(SortedJson(ImageStored {
            ok: true,
            image: row.into(),
        }))
    })
    .await
}

#[utoipa::path(
    delete, path = "/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses(
        (status = 200, description = "Deleted", body = ImageDeleted),
        (status = 409, description = "A VM's disk is backed by it, or it is in transfer", body = ErrorBody),
    ),
)]
pub async fn delete_image(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
) -> Result<AuditedResponse<SortedJson<ImageDeleted>>, ApiError> {
    around(&state.store, &draft, StatusCode::OK, async {
        state.images.delete(&name).await?;
        Ok(SortedJson(ImageDeleted {
            ok: true,
            name,
            deleted: true,
        }))
    })
    .await
}
