//! What every handler can reach: the services, the callers' credentials and counts, and
//! the served document.

use std::sync::Arc;

use axum::body::Bytes;

use super::auth::ApiToken;
use super::refused::RefusedRequests;
use crate::mesh::MeshStatus;
use crate::portmap::PortMaps;
use crate::store::Store;

/// What every handler can reach; one `Arc`, so the per-request clone axum makes is a
/// single reference-count bump.
#[derive(Clone)]
pub struct AppState(pub(super) Arc<Shared>);

pub struct Shared {
    pub store: Store,
    pub portmaps: Arc<PortMaps>,
    pub token: Arc<ApiToken>,
    pub mesh: Arc<MeshStatus>,
    /// Requests refused for want of authentication, counted until the next flush.
    pub refused: Arc<RefusedRequests>,
    /// A full disk is logged once a minute, not once per request.
    pub disk_full_warning: crate::logging::Occasionally,
    pub vms: Arc<crate::vm::service::Vms>,
    pub images: Arc<crate::vm::images::Images>,
    pub consoles: Arc<crate::vm::console::Consoles>,
    /// Directory whose filesystem `GET /stats` reports as `disk`.
    pub stats_dir: std::path::PathBuf,
    /// One permit per open `GET /events` stream.
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// The document `GET /openapi.json` serves, written once.
    pub(super) openapi: Bytes,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The VM side of the API.
pub struct VmApi {
    pub vms: Arc<crate::vm::service::Vms>,
    pub images: Arc<crate::vm::images::Images>,
    pub consoles: Arc<crate::vm::console::Consoles>,
    pub stats_dir: std::path::PathBuf,
}

/// How callers are known: the token, the controller's tunnel, and the counts of those
/// refused.
pub struct Callers {
    pub token: Arc<ApiToken>,
    pub mesh: Arc<MeshStatus>,
    pub refused: Arc<RefusedRequests>,
}
