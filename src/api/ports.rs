//! `/ports`: node port -> VM ip:port maps. Parse, call one `PortMaps` method, map.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::audit::{self, AuditedResponse, Draft};
use super::auth::Identity;
use super::body;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use super::wire::ports::{
    CreatePortMap, CreatedPortMap, DeleteQuery, DeletedPortMap, EmptyObject, Invalid,
    ListedPortMap, OnePort, PortList, PortMapView, Restored, port,
};
use super::wire::sorted::SortedJson;
use crate::model::Proto;
use crate::portmap::{CreateOutcome, Listed, NewMap};

/// The JSON of a [`PortList`], as [`PortList::write`] wrote it (the port-map service
/// keeps it until the maps change).
pub struct PortListJson(Bytes);

impl IntoResponse for PortListJson {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0).into_response()
    }
}

#[utoipa::path(
    post, path = "/ports", tag = "ports",
    request_body = CreatePortMap,
    responses(
        (status = 200, description = "Created, unchanged (same map again) or replaced", body = CreatedPortMap),
        (status = 400, description = "Malformed or invalid body", body = ErrorBody),
        (status = 403, description = "Reserved listen port or target outside the VM networks", body = ErrorBody),
        (status = 404, description = "`target_vm` names no VM", body = ErrorBody),
        (status = 409, description = "Listen port mapped elsewhere (or to another allow-list or VM) and `replace` not set; or the VM named has no known address yet (created before pinned addresses, no lease seen)", body = ErrorBody),
        (status = 500, description = "The kernel refused; nothing changed", body = ErrorBody),
        (status = 503, description = "The kernel had drifted from the database (table or map deleted behind the agent's back) and rewriting it failed; nothing changed: a reconcile is due, try again. Also: the agent is at its connection cap", body = ErrorBody),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    identity: axum::Extension<Identity>,
    axum::Extension(draft): axum::Extension<Draft>,
    body: Bytes,
) -> Result<AuditedResponse<Json<CreatedPortMap>>, ApiError> {
    let req: CreatePortMap = body::json(&body)?;
    let by = identity.0.as_str().to_string();
    let entry = draft.accepted(StatusCode::OK);
    let made = state
        .portmaps
        .create(NewMap::from(req), &by, Some(entry))
        .await?;
    let (outcome, rule) = (made.outcome, made.rule);
    let map = rule.map;
    let mut view = PortMapView::from(rule);
    view.target_vm = made.target_vm.map(String::from);
    let (result, previous) = match outcome {
        CreateOutcome::Created => ("created", None),
        CreateOutcome::Unchanged => ("unchanged", None),
        CreateOutcome::Replaced { previous } => ("replaced", Some(previous.into())),
    };
    Ok(AuditedResponse(Json(CreatedPortMap {
        ok: true,
        rule_id: map.rule_id(),
        result,
        rule: view,
        previous,
    })))
}

#[utoipa::path(
    get, path = "/ports", tag = "ports",
    responses((status = 200, description = "Every map, keyed by rule id (`8080`, `8080/udp`), with its allow-list and counters (at most a second old)", body = PortList)),
)]
pub async fn list(State(state): State<AppState>) -> Result<PortListJson, ApiError> {
    // The listing is cached until the next change, so this is a reference-count bump in
    // the common case; on a miss one request writes it and the others wait for it.
    let json = state.portmaps.listing(PortList::write).await?;
    Ok(PortListJson(json))
}

/// The map a `/ports/{listen_port}?proto=` path names.
fn port_and_proto(listen_port: String, query: Option<&str>) -> Result<(u16, Proto), ApiError> {
    let listen_port = port("listen_port", &serde_json::Value::String(listen_port))
        .map_err(|Invalid(m)| ApiError::bad_request(m))?;
    let q: DeleteQuery = body::query(query)?;
    Ok((listen_port, query_proto(q.proto)?))
}

/// The protocol of a `?proto=` query: `tcp` when absent, in any case.
fn query_proto(p: Option<String>) -> Result<Proto, ApiError> {
    match p {
        None => Ok(Proto::Tcp),
        Some(p) => p
            .to_ascii_lowercase()
            .parse()
            .map_err(|e: crate::model::portmap::ProtoError| ApiError::bad_request(e.to_string())),
    }
}

#[utoipa::path(
    get, path = "/ports/{listen_port}", tag = "ports",
    params(("listen_port" = u16, Path, description = "Node port, 1..65535"), DeleteQuery),
    responses(
        (status = 200, description = "The map with its counters, read from the kernel now", body = OnePort),
        (status = 400, description = "Bad port or query", body = ErrorBody),
        (status = 404, description = "No map of this port and protocol", body = ErrorBody),
        (status = 500, description = "The kernel's counters could not be read", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Path(listen_port): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<SortedJson<OnePort>, ApiError> {
    let (listen_port, proto) = port_and_proto(listen_port, query.as_deref())?;
    let found = state.portmaps.get(proto, listen_port).await?;
    let Some((row, counters)) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no {proto} map of listen_port {listen_port}"),
        ));
    };
    let rule = ListedPortMap::from(Listed {
        row: &row,
        counters,
    });
    Ok(SortedJson(OnePort { ok: true, rule }))
}

#[utoipa::path(
    delete, path = "/ports/{listen_port}", tag = "ports",
    params(("listen_port" = u16, Path, description = "Node port, 1..65535"), DeleteQuery),
    responses(
        (status = 200, description = "`deleted` says whether a map existed", body = DeletedPortMap),
        (status = 400, description = "Bad port or query", body = ErrorBody),
        (status = 500, description = "The kernel refused; nothing changed", body = ErrorBody),
        (status = 503, description = "The kernel had drifted from the database (table or map deleted behind the agent's back) and rewriting it failed; nothing changed: a reconcile is due, try again. Also: the agent is at its connection cap", body = ErrorBody),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    axum::Extension(draft): axum::Extension<Draft>,
    Path(listen_port): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<AuditedResponse<Json<DeletedPortMap>>, ApiError> {
    let (listen_port, proto) = port_and_proto(listen_port, query.as_deref())?;
    let entry = draft.accepted(StatusCode::OK);
    let deleted = state
        .portmaps
        .delete(proto, listen_port, Some(entry))
        .await?;
    Ok(AuditedResponse(Json(DeletedPortMap::from(deleted))))
}

#[utoipa::path(
    post, path = "/ports/restore", tag = "ports",
    request_body(content = EmptyObject, description = "None (not a byte), or exactly `{}`"),
    responses(
        (status = 200, description = "The table was rewritten from the database in one transaction", body = Restored),
        (status = 500, description = "The kernel refused", body = ErrorBody),
    ),
)]
pub async fn restore(
    State(state): State<AppState>,
    axum::Extension(draft): axum::Extension<Draft>,
    body: Bytes,
) -> Result<AuditedResponse<Json<Restored>>, ApiError> {
    let EmptyObject {} = EmptyObject::from_body(&body)?;
    let svc = state.portmaps.clone();
    // A kernel rewrite, not a change in SQLite: its row goes first (`audit::around`).
    audit::around(&state.store, &draft, StatusCode::OK, async move {
        let drift = svc
            .drift()
            .await
            .unwrap_or_else(|e| vec![format!("could not compare: {e}")]);
        let restored = svc.restore().await?;
        let forward_accept = svc.reconcile().await?.forward_accept;
        Ok(Json(Restored {
            ok: true,
            restored,
            drift,
            forward_accept,
        }))
    })
    .await
}
