//! `/vms` and `/stats`: parse, call one `Vms` method, map its value to its answer.

use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::audit::{AuditedResponse, Draft, around};
use super::auth::Identity;
use super::body;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use super::wire::node::{HostStats, Stats, VmCounts};
use super::wire::sorted::SortedJson;
use super::wire::vms::{
    ConsoleQuery, CreateQuery, CreateVm, DeleteQuery, IpQuery, MAX_CONSOLE_BYTES, MAX_IP_TIMEOUT_S,
    StopQuery, VmConsole, VmCreated, VmCreating, VmDeleted, VmIp, VmList, VmRebooted, VmStarted,
    VmStatusAnswer, VmStopped,
};
use crate::hoststats;
use crate::model::VmName;
use crate::vm::spec::{self, check_name};

/// The VM's name from the path, parsed; a bad one is refused (400) before anything.
fn vm_name(name: &str) -> Result<VmName, ApiError> {
    spec::vm_name("VM name", name).map_err(ApiError::from)
}

/// What `POST /vms` answers: the VM created and running, or (`wait=false`) accepted
/// and being created.
pub enum CreateAnswer {
    Created(VmCreated),
    Creating(VmCreating),
}

impl IntoResponse for CreateAnswer {
    fn into_response(self) -> Response {
        match self {
            Self::Created(c) => (StatusCode::OK, SortedJson(c)).into_response(),
            Self::Creating(c) => (StatusCode::ACCEPTED, SortedJson(c)).into_response(),
        }
    }
}

#[utoipa::path(
    post, path = "/vms", tag = "vms",
    params(CreateQuery),
    request_body = CreateVm,
    responses(
        (status = 200, description = "Created and started", body = VmCreated),
        (status = 202, description = "`wait=false`: accepted, being created", body = VmCreating),
        (status = 400, description = "Invalid body, name, network or bounds, or an `ip` outside the network's DHCP range; nothing created", body = ErrorBody),
        (status = 404, description = "Image not found", body = ErrorBody),
        (status = 409, description = "VM exists (without `recreate`), is not the agent's, or is busy; the `ip` asked for is taken; the network has no DHCP range, or no free address in it", body = ErrorBody),
        (status = 503, description = "libvirt unavailable, or the default image is being fetched", body = ErrorBody),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    identity: axum::Extension<Identity>,
    Extension(draft): Extension<Draft>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<AuditedResponse<CreateAnswer>, ApiError> {
    let q: CreateQuery = body::query(q.as_deref())?;
    let req: CreateVm = body::json_with_secrets(&body)?;
    let spec = spec::VmSpec::from(req);
    if q.wait == Some(false) {
        let name = spec.name.clone();
        return around(&state.store, &draft, StatusCode::ACCEPTED, async {
            let ip = state
                .vms
                .create_in_background(spec, identity.0.as_str())
                .await?;
            Ok(CreateAnswer::Creating(VmCreating {
                ok: true,
                name,
                state: "creating".into(),
                ip: ip.to_string(),
            }))
        })
        .await;
    }
    around(&state.store, &draft, StatusCode::OK, async {
        let created = state.vms.create(spec, identity.0.as_str()).await?;
        Ok(CreateAnswer::Created(VmCreated {
            ok: true,
            created: created.into(),
        }))
    })
    .await
}

#[utoipa::path(
    get, path = "/vms", tag = "vms",
    responses((status = 200, description = "`{ok, vms: [{name, active, state, uuid, instance_id, managed, ip, ...}]}`; domains the agent did not create have `managed: false` and no `instance_id`", body = VmList)),
)]
pub async fn list(State(state): State<AppState>) -> Result<SortedJson<VmList>, ApiError> {
    let vms = state.vms.list().await?;
    Ok(SortedJson(VmList {
        ok: true,
        vms: vms.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(
    get, path = "/vms/{name}/status", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses(
        (status = 200, description = "The VM as libvirt and the agent know it", body = VmStatusAnswer),
        (status = 404, description = "No such VM", body = ErrorBody),
    ),
)]
pub async fn status(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<SortedJson<VmStatusAnswer>, ApiError> {
    let name = vm_name(&name)?;
    let s = state.vms.status(&name).await?;
    Ok(SortedJson(VmStatusAnswer {
        ok: true,
        status: s.into(),
    }))
}

#[utoipa::path(
    post, path = "/vms/{name}/start", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Running", body = VmStarted), (status = 404, description = "No such VM", body = ErrorBody)),
)]
pub async fn start(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
) -> Result<AuditedResponse<SortedJson<VmStarted>>, ApiError> {
    let name = vm_name(&name)?;
    around(&state.store, &draft, StatusCode::OK, async {
        let was_running = state.vms.start(&name).await?;
        Ok(SortedJson(VmStarted {
            ok: true,
            name: name.to_string(),
            was_running,
        }))
    })
    .await
}

#[utoipa::path(
    post, path = "/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StopQuery),
    responses((status = 200, description = "Stopped: ACPI shutdown, forced off after VM_STOP_TIMEOUT", body = VmStopped), (status = 404, description = "No such VM", body = ErrorBody)),
)]
pub async fn stop(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<AuditedResponse<SortedJson<VmStopped>>, ApiError> {
    let name = vm_name(&name)?;
    let q: StopQuery = body::query(q.as_deref())?;
    around(&state.store, &draft, StatusCode::OK, async {
        let forced = state.vms.stop(&name, q.force.unwrap_or(false)).await?;
        Ok(SortedJson(VmStopped {
            ok: true,
            name: name.to_string(),
            forced,
        }))
    })
    .await
}

#[utoipa::path(
    post, path = "/vms/{name}/reboot", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Rebooted (ACPI)", body = VmRebooted), (status = 409, description = "Not running", body = ErrorBody)),
)]
pub async fn reboot(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
) -> Result<AuditedResponse<SortedJson<VmRebooted>>, ApiError> {
    let name = vm_name(&name)?;
    around(&state.store, &draft, StatusCode::OK, async {
        state.vms.reboot(&name).await?;
        Ok(SortedJson(VmRebooted {
            ok: true,
            name: name.to_string(),
        }))
    })
    .await
}

#[utoipa::path(
    delete, path = "/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), DeleteQuery),
    responses(
        (status = 200, description = "Deleted; port maps to the VM's address are removed with it", body = VmDeleted),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "Not created by this agent", body = ErrorBody),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(draft): Extension<Draft>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<AuditedResponse<SortedJson<VmDeleted>>, ApiError> {
    let name = vm_name(&name)?;
    let q: DeleteQuery = body::query(q.as_deref())?;
    around(&state.store, &draft, StatusCode::OK, async {
        let d = state
            .vms
            .delete(&name, q.delete_files.unwrap_or(false))
            .await?;
        Ok(SortedJson(VmDeleted {
            ok: true,
            deleted: d.into(),
        }))
    })
    .await
}

#[utoipa::path(
    get, path = "/vms/{name}/ip", tag = "vms",
    params(("name" = String, Path, description = "VM name"), IpQuery),
    responses(
        (status = 200, description = "A VM with a pinned address: that address, at once (`timeout` is accepted and not needed). Others: as soon as the DHCP lease exists", body = VmIp),
        (status = 504, description = "No lease within `timeout`", body = ErrorBody),
    ),
)]
pub async fn ip(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<SortedJson<VmIp>, ApiError> {
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
    Ok(SortedJson(VmIp {
        ok: true,
        name: name.to_string(),
        ip: ip.to_string(),
    }))
}

#[utoipa::path(
    get, path = "/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ConsoleQuery),
    responses((status = 200, description = "The end of the serial console log", body = VmConsole)),
)]
pub async fn console(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<SortedJson<VmConsole>, ApiError> {
    let name = vm_name(&name)?;
    let q: ConsoleQuery = body::query(q.as_deref())?;
    let bytes = q.bytes.unwrap_or(16384);
    if bytes == 0 || bytes > MAX_CONSOLE_BYTES {
        return Err(ApiError::bad_request(format!(
            "bytes must be 1..={MAX_CONSOLE_BYTES}"
        )));
    }
    let text = state.vms.console(&name, bytes).await?;
    Ok(SortedJson(VmConsole {
        ok: true,
        name: name.to_string(),
        console: text,
    }))
}

#[utoipa::path(
    get, path = "/stats", tag = "node",
    responses((status = 200, description = "The node's CPU, memory, disk (VMS_WORK_DIR) and VM counts", body = Stats)),
)]
pub async fn stats(State(state): State<AppState>) -> Result<SortedJson<Stats>, ApiError> {
    let dir = state.stats_dir.clone();
    let host = tokio::task::spawn_blocking(move || hoststats::collect(&dir))
        .await?
        .map_err(|e| ApiError::internal(format!("reading host figures: {e}")))?;
    let (total, running) = state.vms.counts().await?;
    Ok(SortedJson(Stats {
        ok: true,
        host: HostStats::from(host),
        vms: VmCounts { total, running },
    }))
}
