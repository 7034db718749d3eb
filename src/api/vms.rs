//! `/vms`, `/images`, `/stats`: parse, call one `Vms`/`Images` method, map.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::audit::{AuditedResponse, Draft, around};
use super::body;
use super::error::ApiError;
use super::{AppState, Identity};
use crate::hoststats;
use crate::model::VmName;
use crate::vm::spec::{self, CreateVm, check_name};

/// Longest `/ip` wait, seconds.
pub const MAX_IP_TIMEOUT_S: u64 = 600;
/// Largest console tail, bytes.
pub const MAX_CONSOLE_BYTES: u64 = 1 << 20;

// The answers, as the document describes them (the handlers build them with `json!`;
// scripts/contract.sh checks every answer against these).

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmCreated {
    ok: bool,
    #[serde(flatten)]
    created: crate::vm::service::Created,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmList {
    ok: bool,
    /// The agent's VMs and every other domain (`managed: false`).
    vms: Vec<crate::vm::service::VmStatus>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmStatusAnswer {
    ok: bool,
    status: crate::vm::service::VmStatus,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmStarted {
    ok: bool,
    name: String,
    was_running: bool,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmStopped {
    ok: bool,
    name: String,
    forced: bool,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmRebooted {
    ok: bool,
    name: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmDeleted {
    ok: bool,
    #[serde(flatten)]
    deleted: crate::vm::service::Deleted,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmIp {
    ok: bool,
    name: String,
    #[schema(format = Ipv4)]
    ip: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmConsole {
    ok: bool,
    name: String,
    console: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmCounts {
    total: usize,
    running: usize,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct Stats {
    ok: bool,
    #[serde(flatten)]
    host: hoststats::HostStats,
    vms: VmCounts,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct ImageList {
    ok: bool,
    images: Vec<crate::vm::images::ImageInfo>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct ImageAccepted {
    ok: bool,
    name: String,
    /// `downloading`.
    state: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct ImageStored {
    ok: bool,
    image: crate::store::vms::ImageRow,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct ImageDeleted {
    ok: bool,
    name: String,
    deleted: bool,
}

/// The VM's name from the path, parsed; a bad one is refused (400) before anything.
fn vm_name(name: &str) -> Result<VmName, ApiError> {
    spec::vm_name("VM name", name).map_err(ApiError::from)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// `false`: answer 202 at once, the VM `creating`; its outcome shows in
    /// `GET /vms/{name}/status` (running, or `failed` with `error`) and the audit log.
    /// Default `true`: answer once the domain runs.
    wait: Option<bool>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct VmCreating {
    ok: bool,
    name: String,
    /// `creating`.
    state: String,
    /// The address pinned for the VM (its DHCP lease once it boots).
    #[schema(format = Ipv4)]
    ip: String,
}

#[utoipa::path(
    post, path = "/vms", tag = "vms",
    params(CreateQuery),
    request_body = CreateVm,
    responses(
        (status = 200, description = "Created and started", body = VmCreated),
        (status = 202, description = "`wait=false`: accepted, being created", body = VmCreating),
        (status = 400, description = "Invalid body, name, network or bounds, or an `ip` outside the network's DHCP range; nothing created", body = super::ErrorBody),
        (status = 404, description = "Image not found", body = super::ErrorBody),
        (status = 409, description = "VM exists (without `recreate`), is not the agent's, or is busy; the `ip` asked for is taken; the network has no DHCP range, or no free address in it", body = super::ErrorBody),
        (status = 503, description = "libvirt unavailable, or the default image is being fetched", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    identity: axum::Extension<Identity>,
    Extension(draft): Extension<Draft>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<AuditedResponse<(StatusCode, Json<Value>)>, ApiError> {
    let q: CreateQuery = body::query(q.as_deref())?;
    let req: CreateVm = body::json_with_secrets(&body)?;
    if q.wait == Some(false) {
        let name = req.name.clone();
        return around(&state.store, &draft, StatusCode::ACCEPTED, async {
            let ip = state
                .vms
                .create_in_background(req, identity.0.as_str())
                .await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"ok": true, "name": name, "state": "creating", "ip": ip.to_string()})),
            ))
        })
        .await;
    }
    around(&state.store, &draft, StatusCode::OK, async {
        let created = state.vms.create(req, identity.0.as_str()).await?;
        let mut v = serde_json::to_value(created).map_err(|e| ApiError::internal(e.to_string()))?;
        v["ok"] = json!(true);
        Ok((StatusCode::OK, Json(v)))
    })
    .await
}

#[utoipa::path(
    get, path = "/vms", tag = "vms",
    responses((status = 200, description = "`{ok, vms: [{name, active, state, uuid, instance_id, managed, ip, ...}]}`; domains the agent did not create have `managed: false` and no `instance_id`", body = VmList)),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let vms = state.vms.list().await?;
    Ok(Json(json!({"ok": true, "vms": vms})))
}

#[utoipa::path(
    get, path = "/vms/{name}/status", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses(
        (status = 200, description = "The VM as libvirt and the agent know it", body = VmStatusAnswer),
        (status = 404, description = "No such VM", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn status(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let name = vm_name(&name)?;
    let s = state.vms.status(&name).await?;
    Ok(Json(json!({"ok": true, "status": s})))
}

#[utoipa::path(
    post, path = "/vms/{name}/start", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Running", body = VmStarted), (status = 404, description = "No such VM", body = super::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn start(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
) -> Result<AuditedResponse<Json<Value>>, ApiError> {
    let name = vm_name(&name)?;
    around(&state.store, &draft, StatusCode::OK, async {
        let was_running = state.vms.start(&name).await?;
        Ok(Json(
            json!({"ok": true, "name": name, "was_running": was_running}),
        ))
    })
    .await
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StopQuery {
    /// Power off at once instead of an ACPI shutdown.
    force: Option<bool>,
}

#[utoipa::path(
    post, path = "/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StopQuery),
    responses((status = 200, description = "Stopped: ACPI shutdown, forced off after VM_STOP_TIMEOUT", body = VmStopped), (status = 404, description = "No such VM", body = super::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn stop(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<AuditedResponse<Json<Value>>, ApiError> {
    let name = vm_name(&name)?;
    let q: StopQuery = body::query(q.as_deref())?;
    around(&state.store, &draft, StatusCode::OK, async {
        let forced = state.vms.stop(&name, q.force.unwrap_or(false)).await?;
        Ok(Json(json!({"ok": true, "name": name, "forced": forced})))
    })
    .await
}

#[utoipa::path(
    post, path = "/vms/{name}/reboot", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Rebooted (ACPI)", body = VmRebooted), (status = 409, description = "Not running", body = super::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn reboot(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
) -> Result<AuditedResponse<Json<Value>>, ApiError> {
    let name = vm_name(&name)?;
    around(&state.store, &draft, StatusCode::OK, async {
        state.vms.reboot(&name).await?;
        Ok(Json(json!({"ok": true, "name": name})))
    })
    .await
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Also delete the disk, seed and console volumes.
    delete_files: Option<bool>,
}

#[utoipa::path(
    delete, path = "/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), DeleteQuery),
    responses(
        (status = 200, description = "Deleted; port maps to the VM's address are removed with it", body = VmDeleted),
        (status = 404, description = "No such VM", body = super::ErrorBody),
        (status = 409, description = "Not created by this agent", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<AuditedResponse<Json<Value>>, ApiError> {
    let name = vm_name(&name)?;
    let q: DeleteQuery = body::query(q.as_deref())?;
    around(&state.store, &draft, StatusCode::OK, async {
        let d = state
            .vms
            .delete(&name, q.delete_files.unwrap_or(false))
            .await?;
        let mut v = serde_json::to_value(d).map_err(|e| ApiError::internal(e.to_string()))?;
        v["ok"] = json!(true);
        Ok(Json(v))
    })
    .await
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct IpQuery {
    /// Seconds to wait for a lease, 0..=600 (default 120).
    timeout: Option<u64>,
    /// Network whose leases to read (default: the VM's).
    network: Option<String>,
}

#[utoipa::path(
    get, path = "/vms/{name}/ip", tag = "vms",
    params(("name" = String, Path, description = "VM name"), IpQuery),
    responses(
        (status = 200, description = "A VM with a pinned address: that address, at once (`timeout` is accepted and not needed). Others: as soon as the DHCP lease exists", body = VmIp),
        (status = 504, description = "No lease within `timeout`", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn ip(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let name = vm_name(&name)?;
    let q: IpQuery = body::query(q.as_deref())?;
    let timeout = q.timeout.unwrap_or(120);
    if timeout > MAX_IP_TIMEOUT_S {
        return Err(ApiError::bad_request(format!(
            "timeout must be 0..={MAX_IP_TIMEOUT_S} seconds, not {timeout}"
        )));
    }
    if let Some(n) = &q.network {
        check_name("network", n)?;
    }
    let ip = state
        .vms
        .ip(&name, q.network, Duration::from_secs(timeout))
        .await?;
    Ok(Json(json!({"ok": true, "name": name, "ip": ip})))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// How many bytes of the end of the log (default 16384, at most 1 MiB).
    bytes: Option<u64>,
}

#[utoipa::path(
    get, path = "/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ConsoleQuery),
    responses((status = 200, description = "The end of the serial console log", body = VmConsole)),
    security(("bearer" = []))
)]
pub async fn console(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let name = vm_name(&name)?;
    let q: ConsoleQuery = body::query(q.as_deref())?;
    let bytes = q.bytes.unwrap_or(16384);
    if bytes == 0 || bytes > MAX_CONSOLE_BYTES {
        return Err(ApiError::bad_request(format!(
            "bytes must be 1..={MAX_CONSOLE_BYTES}"
        )));
    }
    let text = state.vms.console(&name, bytes).await?;
    Ok(Json(json!({"ok": true, "name": name, "console": text})))
}

#[utoipa::path(
    get, path = "/stats", tag = "node",
    responses((status = 200, description = "The node's CPU, memory, disk (VMS_WORK_DIR) and VM counts", body = Stats)),
    security(("bearer" = []))
)]
pub async fn stats(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let dir = state.stats_dir.clone();
    let host = tokio::task::spawn_blocking(move || hoststats::collect(&dir))
        .await?
        .map_err(|e| ApiError::internal(format!("reading host figures: {e}")))?;
    let (total, running) = state.vms.counts().await?;
    let mut v = serde_json::to_value(host).map_err(|e| ApiError::internal(e.to_string()))?;
    v["ok"] = json!(true);
    v["vms"] = json!({"total": total, "running": running});
    Ok(Json(v))
}

#[utoipa::path(
    get, path = "/images", tag = "images",
    responses((status = 200, description = "Every image, with download progress and the VMs backed by it", body = ImageList)),
    security(("bearer" = []))
)]
pub async fn images(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let list = state.images.list().await?;
    Ok(Json(json!({"ok": true, "images": list})))
}

/// Body of `POST /images`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddImage {
    /// `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`.
    #[schema(schema_with = super::doc::name)]
    name: String,
    /// A plain `http(s)://host[:port][/path][?query]`: a DNS name or IPv4 address, no
    /// user name or fragment.
    #[schema(schema_with = super::doc::url)]
    url: String,
    /// Hex SHA-256 of the file; the download is refused if it differs.
    #[schema(schema_with = super::doc::sha256)]
    sha256: String,
}

#[utoipa::path(
    post, path = "/images", tag = "images",
    request_body = AddImage,
    responses(
        (status = 202, description = "Download started; follow it in GET /images", body = ImageAccepted),
        (status = 409, description = "Exists or in transfer", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn add_image(
    State(state): State<AppState>,
    identity: axum::Extension<Identity>,
    Extension(draft): Extension<Draft>,
    body: Bytes,
) -> Result<AuditedResponse<(StatusCode, Json<Value>)>, ApiError> {
    let req: AddImage = body::json(&body)?;
    around(&state.store, &draft, StatusCode::ACCEPTED, async {
        state
            .images
            .download(&req.name, &req.url, Some(&req.sha256), identity.0.as_str())
            .await?;
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({"ok": true, "name": req.name, "state": "downloading"})),
        ))
    })
    .await
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Hex SHA-256 to check the upload against (optional).
    sha256: Option<String>,
}

#[utoipa::path(
    post, path = "/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name"), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The image file (qcow2 or raw)"),
    responses(
        (status = 200, description = "Stored", body = ImageStored),
        (status = 409, description = "Exists or in transfer", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn upload_image(
    State(state): State<AppState>,
    identity: axum::Extension<Identity>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<AuditedResponse<Json<Value>>, ApiError> {
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
            if let Some(t) = crate::api::server::BodyTimeout::find(&e) {
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
        Ok(Json(json!({"ok": true, "image": row})))
    })
    .await
}

#[utoipa::path(
    delete, path = "/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses(
        (status = 200, description = "Deleted", body = ImageDeleted),
        (status = 409, description = "A VM's disk is backed by it, or it is in transfer", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_image(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
) -> Result<AuditedResponse<Json<Value>>, ApiError> {
    around(&state.store, &draft, StatusCode::OK, async {
        state.images.delete(&name).await?;
        Ok(Json(json!({"ok": true, "name": name, "deleted": true})))
    })
    .await
}
