//! HTTP only: the router and its layers, from the route table (`routes.rs`); one file
//! per resource for the handlers, the wire types in `wire/`. This file only puts them
//! together: nothing in `api/` imports it.

mod admit;
mod audit;
pub mod auth;
pub mod body;
mod console;
mod console_pump;
pub mod doc;
pub mod error;
mod events;
mod health;
mod images;
mod metrics;
pub mod openapi;
mod ports;
pub mod refused;
pub mod routes;
pub mod server;
pub mod state;
mod vms;
pub mod wire;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::{ApiToken, Identity};
pub use server::ConnInfo;
pub use state::{AppState, Callers, Shared, VmApi};

use error::ApiError;

use crate::portmap::PortMaps;
use crate::store::Store;

/// The routes and their OpenAPI description, built from the same list so they cannot
/// disagree (and `routes::ROUTES` lists the same, which a test holds).
fn router() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(openapi::openapi_json))
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
        .routes(routes!(console::attach))
        .routes(routes!(vms::stats))
        .routes(routes!(images::images, images::add_image))
        .routes(routes!(images::upload_image, images::delete_image))
        .split_for_parts()
}

/// The OpenAPI document as generated from the routes' annotations, before
/// [`openapi::finish`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    router().1
}

/// The document served at `/openapi.json`: the generated one completed by
/// [`openapi::finish`], with this node's VM bounds.
pub fn document(
    doc: &utoipa::openapi::OpenApi,
    limits: Option<&crate::vm::spec::Limits>,
) -> serde_json::Value {
    let mut v = serde_json::to_value(doc).unwrap_or_default();
    openapi::finish(&mut v, limits);
    v
}

/// The whole HTTP application, and the one of METRICS_LISTEN (`GET /metrics` only,
/// without authentication), over the same state.
pub fn apps(
    store: Store,
    portmaps: Arc<PortMaps>,
    callers: Callers,
    vm: VmApi,
) -> (Router, Router) {
    let (router, doc) = router();
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
        consoles: vm.consoles,
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
            admit::require_token,
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
