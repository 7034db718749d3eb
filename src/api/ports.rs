//! `/ports`: node port -> VM ip:port maps. Parse, call one `PortMaps` method, map.

use std::net::Ipv4Addr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit::{AuditedResponse, Draft};
use super::body::{self, port};
use super::error::ApiError;
use super::{AppState, Identity};
use crate::model::{AllowList, PortMap, PortRule, Proto, VmName};
use crate::portmap::{CreateOutcome, NewMap, Target};

/// Body of `POST /ports`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(try_from = "RawCreate")]
pub struct CreatePortMap {
    /// Node port, 1..65535 (a string of digits is accepted too).
    #[schema(schema_with = super::doc::port)]
    pub listen_port: u16,
    /// VM address; must lie in VM_SUBNET (or ALLOWED_TARGETS). Give this or `target_vm`.
    #[schema(schema_with = super::doc::ipv4)]
    pub target_ip: Option<Ipv4Addr>,
    /// A VM of this agent by name, instead of `target_ip`: the map goes to the VM's
    /// pinned address (for a VM from before pinned addresses: its last seen one), follows
    /// it through a recreate, and is removed with it. Unknown VM: 404.
    #[schema(schema_with = super::doc::name_or_null)]
    pub target_vm: Option<VmName>,
    /// VM port, 1..65535.
    #[schema(schema_with = super::doc::port)]
    pub target_port: u16,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    #[schema(schema_with = super::doc::proto)]
    pub proto: Proto,
    /// Switch an existing map of this port to the new target or allow-list (atomically)
    /// instead of answering 409.
    #[serde(default)]
    #[schema(value_type = Option<bool>)]
    pub replace: bool,
    /// Sources allowed to connect: IPv4 networks (`"192.0.2.0/24"`) or addresses
    /// (`"192.0.2.7"`, a /32), at most 64. Connections from anywhere else are dropped
    /// before the DNAT and counted as `drops`. Host bits set (`"10.1.2.3/8"`) are a 400;
    /// duplicates and networks inside another entry are dropped. Absent or empty: open to
    /// every source.
    #[serde(default)]
    #[schema(schema_with = super::doc::allow_from)]
    pub allow_from: AllowList,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCreate {
    listen_port: serde_json::Value,
    #[serde(default)]
    target_ip: Option<serde_json::Value>,
    #[serde(default)]
    target_vm: Option<serde_json::Value>,
    target_port: serde_json::Value,
    #[serde(default)]
    proto: Option<serde_json::Value>,
    #[serde(default)]
    replace: Option<serde_json::Value>,
    #[serde(default)]
    allow_from: Option<serde_json::Value>,
}

/// `target_ip` or `target_vm`, exactly one of them (`null` counts as absent).
fn target(
    ip: Option<&serde_json::Value>,
    vm: Option<&serde_json::Value>,
) -> Result<(Option<Ipv4Addr>, Option<VmName>), String> {
    match (ip.filter(|v| !v.is_null()), vm.filter(|v| !v.is_null())) {
        (Some(_), Some(_)) => Err("give target_ip or target_vm, not both".into()),
        (None, None) => Err("missing field `target_ip` (or `target_vm`, a VM's name)".into()),
        // As written: an address with whitespace around it (" 10.0.0.5\n") is refused,
        // not trimmed into a different string from the one that was sent.
        (Some(serde_json::Value::String(s)), None) => s
            .parse::<Ipv4Addr>()
            .map(|ip| (Some(ip), None))
            .map_err(|_| {
                format!("target_ip must be an IPv4 address like \"192.168.122.50\", not {s:?}")
            }),
        (Some(other), None) => Err(format!("target_ip must be a string, not {other}")),
        (None, Some(serde_json::Value::String(s))) => s
            .parse::<VmName>()
            .map(|n| (None, Some(n)))
            .map_err(|e| format!("target_vm: {e}")),
        (None, Some(other)) => Err(format!("target_vm must be a VM's name, not {other}")),
    }
}

/// `allow_from` as sent: `null`, or an array of strings.
fn allow_from(v: Option<&serde_json::Value>) -> Result<AllowList, String> {
    let items = match v {
        None | Some(serde_json::Value::Null) => return Ok(AllowList::default()),
        Some(serde_json::Value::Array(items)) => items,
        Some(other) => {
            return Err(format!(
                "allow_from must be a list of IPv4 networks, not {other}"
            ));
        }
    };
    let strings = items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            serde_json::Value::String(s) => Ok(s.as_str()),
            other => Err(format!("allow_from[{i}] must be a string, not {other}")),
        })
        .collect::<Result<Vec<&str>, String>>()?;
    AllowList::parse(&strings).map_err(|e| e.to_string())
}

impl TryFrom<RawCreate> for CreatePortMap {
    type Error = String;
    fn try_from(r: RawCreate) -> Result<Self, String> {
        let (target_ip, target_vm) = target(r.target_ip.as_ref(), r.target_vm.as_ref())?;
        let proto = match &r.proto {
            None | Some(serde_json::Value::Null) => Proto::Tcp,
            // In any case, as the original took it.
            Some(serde_json::Value::String(s)) => s
                .to_ascii_lowercase()
                .parse()
                .map_err(|e: crate::model::portmap::ProtoError| e.to_string())?,
            Some(other) => return Err(format!("proto must be \"tcp\" or \"udp\", not {other}")),
        };
        let replace = match &r.replace {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => return Err(format!("replace must be true or false, not {other}")),
        };
        Ok(Self {
            listen_port: port("listen_port", &r.listen_port)?,
            target_ip,
            target_vm,
            target_port: port("target_port", &r.target_port)?,
            proto,
            replace,
            allow_from: allow_from(r.allow_from.as_ref())?,
        })
    }
}

impl CreatePortMap {
    /// The map the service makes: parsing left exactly one of `target_ip` and
    /// `target_vm`.
    fn into_new_map(self) -> NewMap {
        let target = match (self.target_ip, self.target_vm) {
            (_, Some(vm)) => Target::Vm(vm),
            (Some(ip), None) => Target::Ip(ip),
            (None, None) => Target::Ip(Ipv4Addr::UNSPECIFIED),
        };
        NewMap {
            proto: self.proto,
            listen_port: self.listen_port,
            target,
            target_port: self.target_port,
            allow_from: self.allow_from,
            replace: self.replace,
        }
    }
}

/// A port map as `GET /ports` and `POST /ports` show it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PortMapView {
    #[schema(minimum = 1, maximum = 65535)]
    pub listen_port: u16,
    #[schema(value_type = String, format = Ipv4)]
    pub target_ip: Ipv4Addr,
    #[schema(minimum = 1, maximum = 65535)]
    pub target_port: u16,
    #[schema(value_type = ProtoName)]
    pub proto: Proto,
    /// The map's allow-list; absent when the map is open to every source.
    #[serde(skip_serializing_if = "AllowList::is_empty")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allow_from: AllowList,
    /// The VM the map names (`target_ip` is its address); absent for a map to an address.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub target_vm: Option<VmName>,
}

impl From<PortMap> for PortMapView {
    fn from(m: PortMap) -> Self {
        Self {
            listen_port: m.listen_port,
            target_ip: m.target_ip,
            target_port: m.target_port,
            proto: m.proto,
            allow_from: AllowList::default(),
            target_vm: None,
        }
    }
}

impl From<PortRule> for PortMapView {
    fn from(r: PortRule) -> Self {
        Self {
            allow_from: r.allow_from,
            ..r.map.into()
        }
    }
}

/// `tcp` or `udp`, as the document names [`Proto`].
#[derive(ToSchema)]
#[allow(dead_code, non_camel_case_types, reason = "documentation only")]
enum ProtoName {
    tcp,
    udp,
}

/// A map as `GET /ports` and `GET /ports/{listen_port}` show it (written by
/// `PortMaps::list_body` and `PortMaps::rule_json`).
#[derive(ToSchema)]
#[allow(dead_code, reason = "documentation only")]
struct ListedPortMap {
    #[schema(minimum = 1, maximum = 65535)]
    listen_port: u16,
    #[schema(value_type = String, format = Ipv4)]
    target_ip: Ipv4Addr,
    #[schema(minimum = 1, maximum = 65535)]
    target_port: u16,
    #[schema(value_type = ProtoName)]
    proto: Proto,
    /// Sources allowed to connect; empty: every source.
    allow_from: Vec<String>,
    /// The VM the map names (`target_ip` is its address now); null for a map to an
    /// address.
    target_vm: Option<String>,
    created_at: String,
    updated_at: String,
    created_by: String,
    updated_by: String,
    rule_id: String,
    /// Packets of the map's connections forwarded to or from the VM, both directions
    /// (traffic from the node itself to a mapped port is not forwarded, so not counted).
    packets: u64,
    /// Bytes of those packets (whole IP packets).
    bytes: u64,
    /// New connections DNAT'd to the target.
    connections: u64,
    /// Connections refused by `allow_from` (each refused first packet, retries included).
    drops: u64,
}

/// Answer of `GET /ports` (written by `PortMaps::list_body`, cached for at most a
/// second: counters may be that old).
#[derive(ToSchema)]
#[allow(dead_code, reason = "documentation only")]
struct PortList {
    ok: bool,
    /// Every map by rule id (`8080`, `8080/udp`), with when and by whom it was made and
    /// its counters. Counters start at zero when the map is created or replaced.
    rules: std::collections::BTreeMap<String, ListedPortMap>,
}

/// Answer of `GET /ports/{listen_port}`.
#[derive(ToSchema)]
#[allow(dead_code, reason = "documentation only")]
struct OnePort {
    ok: bool,
    /// The same object as the map's entry in `GET /ports`, with counters read now.
    rule: ListedPortMap,
}

/// Answer of `POST /ports`.
#[derive(Serialize, ToSchema)]
pub struct CreatedPortMap {
    ok: bool,
    /// The bare listen port for TCP (as the original agent), `<port>/udp` for UDP.
    rule_id: String,
    /// `created`, `unchanged` or `replaced`.
    result: &'static str,
    rule: PortMapView,
    /// The target before a replace.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<PortMapView>,
}

#[utoipa::path(
    post, path = "/ports", tag = "ports",
    request_body = CreatePortMap,
    responses(
        (status = 200, description = "Created, unchanged (same map again) or replaced", body = CreatedPortMap),
        (status = 400, description = "Malformed or invalid body", body = super::ErrorBody),
        (status = 403, description = "Reserved listen port or target outside the VM networks", body = super::ErrorBody),
        (status = 404, description = "`target_vm` names no VM", body = super::ErrorBody),
        (status = 409, description = "Listen port mapped elsewhere (or to another allow-list or VM) and `replace` not set; or the VM named has no known address yet (created before pinned addresses, no lease seen)", body = super::ErrorBody),
        (status = 500, description = "The kernel refused; nothing changed", body = super::ErrorBody),
        (status = 503, description = "The kernel had drifted from the database (table or map deleted behind the agent's back) and rewriting it failed; nothing changed: a reconcile is due, try again. Also: the agent is at its connection cap", body = super::ErrorBody),
    ),
    security(("bearer" = []))
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
        .create(req.into_new_map(), &by, Some(entry))
        .await?;
    let (outcome, rule) = (made.outcome, made.rule);
    let map = rule.map;
    let mut view: PortMapView = rule.into();
    view.target_vm = made.target_vm;
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
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    // The body is cached until the next change, so this is a reference-count bump in
    // the common case; on a miss one request builds it and the others wait for it.
    let body = state.portmaps.list_body().await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The map a `/ports/{listen_port}?proto=` path names.
fn port_and_proto(listen_port: String, query: Option<&str>) -> Result<(u16, Proto), ApiError> {
    let listen_port = port("listen_port", &serde_json::Value::String(listen_port))
        .map_err(ApiError::bad_request)?;
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
        (status = 400, description = "Bad port or query", body = super::ErrorBody),
        (status = 404, description = "No map of this port and protocol", body = super::ErrorBody),
        (status = 500, description = "The kernel's counters could not be read", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Path(listen_port): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (listen_port, proto) = port_and_proto(listen_port, query.as_deref())?;
    let found = state.portmaps.get(proto, listen_port).await?;
    let Some((row, counters)) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no {proto} map of listen_port {listen_port}"),
        ));
    };
    let rule = crate::portmap::PortMaps::rule_json(&row, counters);
    Ok(Json(serde_json::json!({"ok": true, "rule": rule})).into_response())
}

/// Query of `DELETE /ports/{listen_port}` and `GET /ports/{listen_port}`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// `tcp` (default) or `udp`, in any case.
    #[param(value_type = Option<String>)]
    proto: Option<String>,
}

/// Answer of `DELETE /ports/{listen_port}`.
#[derive(Serialize, ToSchema)]
pub struct DeletedPortMap {
    ok: bool,
    deleted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<PortMapView>,
}

#[utoipa::path(
    delete, path = "/ports/{listen_port}", tag = "ports",
    params(("listen_port" = u16, Path, description = "Node port, 1..65535"), DeleteQuery),
    responses(
        (status = 200, description = "`deleted` says whether a map existed", body = DeletedPortMap),
        (status = 400, description = "Bad port or query", body = super::ErrorBody),
        (status = 500, description = "The kernel refused; nothing changed", body = super::ErrorBody),
        (status = 503, description = "The kernel had drifted from the database (table or map deleted behind the agent's back) and rewriting it failed; nothing changed: a reconcile is due, try again. Also: the agent is at its connection cap", body = super::ErrorBody),
    ),
    security(("bearer" = []))
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
    Ok(AuditedResponse(Json(match deleted {
        Some(m) => DeletedPortMap {
            ok: true,
            deleted: true,
            rule_id: Some(m.rule_id()),
            rule: Some(m.into()),
        },
        None => DeletedPortMap {
            ok: true,
            deleted: false,
            rule_id: None,
            rule: None,
        },
    })))
}

/// `{}`: the only body `POST /ports/restore` takes.
#[derive(ToSchema)]
#[schema(max_properties = 0)]
#[allow(dead_code, reason = "documentation only")]
struct EmptyObject {}

/// Answer of `POST /ports/restore`.
#[derive(Serialize, ToSchema)]
pub struct Restored {
    ok: bool,
    /// Maps written to the kernel.
    restored: usize,
    /// Differences found before the rewrite (empty when the kernel was in sync).
    drift: Vec<String>,
    /// Changes made to the accept rule ahead of libvirt's reject rules.
    forward_accept: Vec<String>,
}

#[utoipa::path(
    post, path = "/ports/restore", tag = "ports",
    request_body(content = EmptyObject, description = "None (not a byte), or exactly `{}`"),
    responses(
        (status = 200, description = "The table was rewritten from the database in one transaction", body = Restored),
        (status = 500, description = "The kernel refused", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn restore(
    State(state): State<AppState>,
    axum::Extension(draft): axum::Extension<Draft>,
    body: Bytes,
) -> Result<AuditedResponse<Json<Restored>>, ApiError> {
    body::empty_object(&body)?;
    let svc = state.portmaps.clone();
    // A kernel rewrite, not a change in SQLite: its row goes first (`audit::around`).
    super::audit::around(&state.store, &draft, StatusCode::OK, async move {
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
