//! `GET /metrics`: the Prometheus scrape (`crate::metrics` writes it; this gathers the
//! node's state from the services), and the layer that counts and times every request.

use std::time::{Instant, SystemTime};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::AppState;
use crate::metrics::sample::{MeshSample, NodeSample};
use crate::metrics::{self, HttpLabels, RouteLabels};

#[utoipa::path(
    get, path = "/metrics", tag = "node",
    responses((status = 200, description = "The node's metrics in Prometheus' text format \
        (`node_vm_agent_*`: requests, reconciles, port maps and their counters, VMs from \
        libvirt's bulk statistics, the mesh). Above 1,000 port maps the per-map series are \
        left out and only totals remain. Also served without authentication on \
        METRICS_LISTEN when that is set.", content_type = "text/plain", body = String)),
)]
pub async fn scrape(State(state): State<AppState>) -> Result<Scrape, ApiError> {
    let node = gather(&state).await?;
    Ok(Scrape(metrics::global().render(node)))
}

/// A scrape in Prometheus' text format.
pub struct Scrape(String);

impl IntoResponse for Scrape {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], self.0).into_response()
    }
}

/// The node's state now: the database's and the kernel's on a blocking thread, libvirt's
/// from the last statistics (never waiting behind a slow libvirt), the mesh's from its
/// status.
async fn gather(state: &AppState) -> Result<NodeSample, ApiError> {
    let stored = state.store.run(|s| {
        s.with(|c| {
            let (images, bytes) = crate::store::vms::ready_image_totals(c)?;
            Ok::<_, crate::store::StoreError>((images, bytes, crate::store::database_bytes(c)?))
        })
    });
    let (maps, stored, vms) = tokio::join!(
        state.portmaps.metrics_sample(),
        stored,
        state.vms.metrics_sample()
    );
    let (maps, (images, image_bytes, database_bytes)) = (maps?, stored?);
    let m = metrics::global();
    Ok(NodeSample {
        version: metrics::VERSION,
        commit: metrics::COMMIT,
        start_time_seconds: unix_seconds(m.started()),
        mesh: mesh_sample(&state.mesh.snapshot()),
        maps,
        vms,
        images: images.max(0) as usize,
        image_bytes: image_bytes.max(0) as u64,
        database_bytes: database_bytes.max(0) as u64,
    })
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn mesh_sample(s: &crate::mesh::Status) -> MeshSample {
    MeshSample {
        state: s.state.as_str(),
        last_handshake_age_seconds: s
            .last_handshake
            .map(|t| t.elapsed().map_or(0.0, |d| d.as_secs_f64())),
        stale: s.stale,
        rx_bytes: s.rx_bytes,
        tx_bytes: s.tx_bytes,
    }
}

/// Counts and times every request by method, route template and status. A stranger
/// chooses the path and the method, not the labels: an unknown route is `unmatched`, an
/// unusual method `other`.
pub async fn record(req: Request, next: Next) -> Response {
    let method = match *req.method() {
        Method::GET | Method::POST | Method::PUT | Method::DELETE | Method::HEAD => {
            req.method().as_str().to_owned()
        }
        _ => "other".to_owned(),
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    let m = metrics::global();
    m.http_duration
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}
