//! The OpenAPI document: generated from the handlers' annotations and the wire types,
//! then completed here. The route table (`routes.rs`) says which operations need the
//! token and which statuses each can return for reasons outside its handler
//! (authentication, body limits and timeouts, the connection cap, a full disk, libvirt
//! being away); `doc.rs` gives the inputs' schemas; the node's settings give the VM
//! bounds. `scripts/contract.sh` holds the agent to the result with schemathesis.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use utoipa::openapi::schema::Schema;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::doc;
use super::routes::{self, BodyRule, Route};
use super::state::AppState;
use super::wire::vms::{MAX_CONSOLE_BYTES, MAX_IP_TIMEOUT_S};
use crate::vm::spec::{Limits, MIN_MEMORY_MIB};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "node-vm-agent",
        description = "Node agent API: VMs, images and port maps. Every route but /health needs `Authorization: Bearer <token>`."
    ),
    modifiers(&BearerAuth),
    tags((name = "ports", description = "Node port -> VM ip:port maps"), (name = "vms", description = "libvirt VMs"), (name = "images", description = "Base images"), (name = "node"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The served document's bytes, written once at startup.
pub struct Document(pub Bytes);

impl IntoResponse for Document {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0).into_response()
    }
}

#[utoipa::path(
    get, path = "/openapi.json", tag = "node",
    responses((status = 200, description = "This document", body = serde_json::Value)),
)]
pub async fn openapi_json(State(state): State<AppState>) -> Document {
    Document(state.openapi.clone())
}

/// The statuses an operation of `route` can return besides those its handler
/// documents, and why.
fn common_statuses(route: &Route, op: &Value) -> Vec<(u16, &'static str)> {
    let has_params = op["parameters"].as_array().is_some_and(|p| !p.is_empty())
        || op.get("requestBody").is_some();
    let changes = route.body != BodyRule::None;
    let mut out = vec![
        (500, "Internal error (the agent's log says more)"),
        (
            503,
            if route.libvirt {
                "libvirt is unavailable, or the agent is at its connection cap"
            } else {
                "The agent is at its connection cap and every connection is busy"
            },
        ),
    ];
    if !route.public {
        out.push((401, "Missing or wrong bearer token"));
    }
    if has_params || changes {
        out.push((400, "Malformed or invalid path, query or body"));
    }
    if changes {
        out.push((408, "The body was not sent within BODY_READ_TIMEOUT"));
        out.push((413, "The body is over the route's limit"));
        out.push((
            507,
            "The node's disk is full (DATA_DIR): nothing was changed",
        ));
    }
    if route.libvirt {
        out.push((
            501,
            "This node's libvirt driver cannot do the operation (the message names it)",
        ));
    }
    if route.named {
        out.push((404, "No such VM or image"));
    }
    if changes && route.libvirt {
        out.push((409, "Clashes with what exists, or the VM or image is busy"));
    }
    if route.may_outlive_its_answer {
        out.push((
            504,
            "libvirt did not finish within LIBVIRT_TIMEOUT; the operation goes on, holding the VM, and its outcome shows in GET /vms and the audit log",
        ));
    }
    out
}

/// The schema of a path or query parameter, by its name (every route that has one
/// validates it the same way).
fn parameter_schema(name: &str) -> Option<Value> {
    let v = |s: Schema| serde_json::to_value(s).ok();
    match name {
        "listen_port" => v(doc::port()),
        "name" | "network" => v(doc::name()),
        "proto" => v(doc::proto_param()),
        "sha256" => v(doc::sha256()),
        "timeout" => Some(json!({"type": "integer", "minimum": 0, "maximum": MAX_IP_TIMEOUT_S})),
        "bytes" => Some(json!({"type": "integer", "minimum": 1, "maximum": MAX_CONSOLE_BYTES})),
        _ => None,
    }
}

/// One operation completed: who may call it, whether its body may be left out, its
/// parameters' schemas, and its other statuses, each with the error schema.
fn complete_operation(route: &Route, op: &mut Value) {
    if route.public {
        if let Some(o) = op.as_object_mut() {
            o.remove("security");
        }
    } else {
        op["security"] = json!([{"bearer": []}]);
    }
    if route.body_optional && op.get("requestBody").is_some() {
        op["requestBody"]["required"] = json!(false);
    }
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for p in params {
            if let Some(schema) = parameter_schema(p["name"].as_str().unwrap_or("")) {
                p["schema"] = schema;
            }
        }
    }
    let error_ref = json!({"$ref": "#/components/schemas/ErrorBody"});
    let extra = common_statuses(route, op);
    let responses = &mut op["responses"];
    for (status, why) in extra {
        let key = status.to_string();
        if responses.get(&key).is_none() {
            responses[key] = json!({
                "description": why,
                "content": {"application/json": {"schema": error_ref.clone()}},
            });
        }
    }
}

/// What the bodies' schemas cannot say by their types: no other field, and which
/// fields go together.
fn complete_bodies(doc: &mut Value) {
    for body in ["CreatePortMap", "CreateVm", "AddImage"] {
        let schema = &mut doc["components"]["schemas"][body];
        if schema.is_object() {
            schema["additionalProperties"] = json!(false);
        }
    }
    // A map's target: `target_ip` or `target_vm`, exactly one given (null is absent).
    let ports = &mut doc["components"]["schemas"]["CreatePortMap"];
    if ports.is_object() {
        let given =
            |field: &str| json!({"required": [field], "properties": {field: {"type": "string"}}});
        ports["oneOf"] = json!([given("target_ip"), given("target_vm")]);
    }
    // `initrd` and `cmdline` (given, not null) need a `kernel` (given, not null).
    let vm = &mut doc["components"]["schemas"]["CreateVm"];
    if vm.is_object() {
        let needs_kernel = |field: &str| {
            json!({
                "if": {"required": [field], "properties": {field: {"type": "string"}}},
                "then": {"required": ["kernel"], "properties": {"kernel": {"type": "string"}}},
            })
        };
        vm["allOf"] = json!([needs_kernel("initrd"), needs_kernel("cmdline")]);
    }
}

/// The VM bounds of this node's settings.
fn add_limits(doc: &mut Value, l: &Limits) {
    let vm = &mut doc["components"]["schemas"]["CreateVm"]["properties"];
    if vm.is_object() {
        vm["memory_mib"]["minimum"] = json!(MIN_MEMORY_MIB);
        vm["memory_mib"]["maximum"] = json!(l.max_memory_mib);
        vm["vcpus"]["minimum"] = json!(1);
        vm["vcpus"]["maximum"] = json!(l.max_vcpus);
        vm["disk_size_gb"]["minimum"] = json!(1);
        vm["disk_size_gb"]["maximum"] = json!(l.max_disk_gb);
    }
}

/// Completes the generated document: every operation from its route, the bodies'
/// rules, and the VM bounds of this node's settings.
pub fn finish(doc: &mut Value, limits: Option<&Limits>) {
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                let method = method.to_uppercase().parse().ok();
                let route = method.and_then(|m| routes::by_template(&m, path));
                if let Some(route) = route {
                    complete_operation(route, op);
                }
            }
        }
    }
    complete_bodies(doc);
    if let Some(l) = limits {
        add_limits(doc, l);
    }
}
