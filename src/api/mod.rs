//! HTTP only: the router, authentication, audit, error mapping; one file per resource.

mod audit;
pub mod auth;
pub mod body;
pub mod doc;
pub mod error;
mod events;
mod health;
mod metrics;
mod ports;
pub mod refused;
pub mod server;
mod vms;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::ApiToken;
use error::ApiError;

use crate::mesh::MeshStatus;
use crate::portmap::PortMaps;
use crate::store::Store;

/// The connection a request came on: the peer and the local address it was accepted
/// on (the tunnel address, for the controller). Forwarding headers are never read. The
/// server (`server/`) gives it to every request as `ConnectInfo<ConnInfo>`.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    pub local: Option<std::net::SocketAddr>,
}

/// Largest request body of any route but the streamed image upload (`POST /vms`, whose
/// user-data and network-config may each be 32 KiB, JSON-escaped up to twice that);
/// smaller routes have smaller limits (`audit::body_limit`).
pub const MAX_BODY_BYTES: usize = 160 * 1024;

/// How a request was authorised; recorded in the audit log and in `created_by`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// Not authorised (refused, or a public route).
    None,
    /// A valid bearer token.
    Token,
    /// No token, but the request came through the WireGuard tunnel from the
    /// controller's address (TRUST_CONTROLLER_TUNNEL).
    Controller,
}

impl Identity {
    pub fn as_str(self) -> &'static str {
        match self {
            Identity::None => "none",
            Identity::Token => "token",
            Identity::Controller => "controller-tunnel",
        }
    }
}

/// What every handler can reach; one `Arc`, so the per-request clone axum makes is a
/// single reference-count bump.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub store: Store,
    pub portmaps: Arc<PortMaps>,
    pub token: Arc<ApiToken>,
    pub mesh: Arc<MeshStatus>,
    /// Requests refused for want of authentication, counted until the next flush.
    pub refused: Arc<refused::RefusedRequests>,
    /// A full disk is logged once a minute, not once per request.
    pub disk_full_warning: crate::logging::Occasionally,
    pub vms: Arc<crate::vm::service::Vms>,
    pub images: Arc<crate::vm::images::Images>,
    /// Directory whose filesystem `GET /stats` reports as `disk`.
    pub stats_dir: std::path::PathBuf,
    /// One permit per open `GET /events` stream.
    pub event_streams: Arc<tokio::sync::Semaphore>,
    openapi: Bytes,
}

/// The VM side of the API.
pub struct VmApi {
    pub vms: Arc<crate::vm::service::Vms>,
    pub images: Arc<crate::vm::images::Images>,
    pub stats_dir: std::path::PathBuf,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The error shape of every failing call.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always false.
    ok: bool,
    /// What went wrong, for a person.
    error: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "node-vm-agent",
        description = "Node agent API: VMs, images and port maps. Every route but /health needs `Authorization: Bearer <token>`."
    ),
    modifiers(&BearerAuth),
    tags((name = "ports", description = "Node port -> VM ip:port maps"), (name = "vms", description = "libvirt VMs"), (name = "images", description = "Base images"), (name = "node"))
)]
struct ApiDoc;

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

#[utoipa::path(
    get, path = "/openapi.json", tag = "node",
    responses((status = 200, description = "This document", body = serde_json::Value)),
    security(("bearer" = []))
)]
async fn openapi_json(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.clone(),
    )
}

/// The routes and their OpenAPI description, built from the same list so they cannot
/// disagree.
fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(openapi_json))
        .routes(routes!(metrics::scrape))
        .routes(routes!(events::stream))
        .routes(routes!(ports::list, ports::create))
        .routes(routes!(ports::get, ports::delete))
        .routes(routes!(ports::restore))
        .routes(routes!(vms::list, vms::create))
        .routes(routes!(vms::status))
        .routes(routes!(vms::start))
        .routes(routes!(vms::stop))
        .routes(routes!(vms::reboot))
        .routes(routes!(vms::delete))
        .routes(routes!(vms::ip))
        .routes(routes!(vms::console))
        .routes(routes!(vms::stats))
        .routes(routes!(vms::images, vms::add_image))
        .routes(routes!(vms::upload_image, vms::delete_image))
        .split_for_parts()
}

/// The OpenAPI document as generated from the routes' annotations, before
/// [`doc::finish`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The document served at `/openapi.json`: the generated one completed by
/// [`doc::finish`], with this node's VM bounds.
pub fn document(
    doc: &utoipa::openapi::OpenApi,
    limits: Option<&crate::vm::spec::Limits>,
) -> serde_json::Value {
    let mut v = serde_json::to_value(doc).unwrap_or_default();
    doc::finish(&mut v, limits);
    v
}

/// How callers are known: the token, the controller's tunnel, and the counts of those
/// refused.
pub struct Callers {
    pub token: Arc<ApiToken>,
    pub mesh: Arc<MeshStatus>,
    pub refused: Arc<refused::RefusedRequests>,
}

/// The whole HTTP application, and the one of METRICS_LISTEN (`GET /metrics` only,
/// without authentication), over the same state.
pub fn apps(
    store: Store,
    portmaps: Arc<PortMaps>,
    callers: Callers,
    vm: VmApi,
) -> (Router, Router) {
    let (router, doc) = routes();
    let openapi = Bytes::from(document(&doc, Some(vm.vms.limits())).to_string());
    let Callers {
        token,
        mesh,
        refused,
    } = callers;
    let state = AppState(Arc::new(Shared {
        store,
        portmaps,
        token,
        mesh,
        refused,
        disk_full_warning: Default::default(),
        vms: vm.vms,
        images: vm.images,
        stats_dir: vm.stats_dir,
        event_streams: Arc::new(tokio::sync::Semaphore::new(events::MAX_STREAMS)),
        openapi,
    }));
    let metrics_only = Router::new()
        .route("/metrics", axum::routing::get(metrics::scrape))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(error::json_errors))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(metrics::record))
        .with_state(state.clone());
    let app = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Layers run bottom-up on the way in: auth first, from the headers alone, so
        // a refused request's body is never read and it is only counted; audit then
        // records every authorised mutating call; errors of any layer come out as JSON;
        // the outermost layer counts and times every answer, refusals and panics too.
        .layer(middleware::from_fn_with_state(state.clone(), audit::record))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(middleware::from_fn(error::json_errors))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(metrics::record))
        .with_state(state);
    (app, metrics_only)
}

/// The whole HTTP application.
pub fn app(store: Store, portmaps: Arc<PortMaps>, callers: Callers, vm: VmApi) -> Router {
    apps(store, portmaps, callers, vm).0
}

/// A handler's panic as the client sees it: a JSON 500 (the panic is in the log).
fn panicked(_: Box<dyn std::any::Any + Send>) -> axum::response::Response {
    ApiError::internal("internal error (panic); see the agent log").into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

#[cfg(test)]
mod tests;
