//! The conductor: the agent starts (checks, state, the kernel from SQLite, background
//! loops, the API), serves until SIGTERM/SIGINT, and shuts down in order.

use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ApiToken};
use crate::config::{Settings, VmSettings};
use crate::keys::{KeySource, NodeKeys};
use crate::mesh::{JoinState, Mesh, MeshStatus};
use crate::net::antispoof::TunnelGuard;
use crate::net::nft::NatSettings;
use crate::portmap::{self, Firewall, NftFirewall, Policy, PortMaps};
use crate::store::Store;
use crate::vm;

pub mod console_cli;
mod limits;
mod loops;

/// How often the counts of unauthenticated requests become rows of `refused_requests`.
const REFUSED_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Preflight(#[from] crate::preflight::PreflightError),
    #[error("cannot create DATA_DIR {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Token(#[from] crate::api::auth::TokenError),
    #[error("cannot apply the port maps to the kernel at startup: {0}")]
    Startup(crate::portmap::PortMapError),
    /// nftables could not be prepared, or refused what the agent asked.
    #[error(transparent)]
    Firewall(#[from] crate::portmap::FirewallError),
    /// The port maps could not be compared with the kernel (`node-vm-agent diff`).
    #[error(transparent)]
    PortMaps(crate::portmap::PortMapError),
    /// A blocking task of the startup (or of a command) panicked or was cancelled.
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    #[error(transparent)]
    Setting(#[from] crate::config::SettingError),
}

/// Opens the state every command needs: DATA_DIR (created 0700), the database, and the
/// one-time import of the original agent's portmap.json. Runs after the command's
/// preflight checks (`crate::preflight`).
pub fn open_state(settings: &Settings) -> Result<Store, AgentError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&settings.state.data_dir)
        .map_err(|source| AgentError::DataDir {
            path: settings.state.data_dir.display().to_string(),
            source,
        })?;
    let store = Store::open(&settings.state.db_path())?;
    let policy = Policy::from_settings(settings);
    if let Some(report) = portmap::import_original_state(&store, &policy, &settings.state.data_dir)?
    {
        tracing::info!(
            imported = report.imported.len(),
            skipped = ?report.skipped,
            "imported the original agent's portmap.json"
        );
    }
    Ok(store)
}

/// Runs the agent until SIGTERM/SIGINT: first every check that needs no change to the
/// machine and the locks that keep a second agent off this network namespace and
/// DATA_DIR, then the changes (IPv4 forwarding, DATA_DIR, the database, the token, the
/// key pair, nftables), then the API.
pub async fn run(settings: Settings) -> Result<(), AgentError> {
    let ready = crate::preflight::serve(&settings).await?;
    let fw = Arc::new(
        NftFirewall::from_settings(NatSettings::from_settings(
            &settings.portmaps,
            &settings.mesh,
        ))
        .await?,
    );
    // Held until the table's last change (CLEANUP_ON_EXIT included) is done.
    let _locks = ready.locks;
    let listeners = Listeners {
        api: ready.listener,
        metrics: ready.metrics_listener,
    };
    let agent = Agent::start(settings, fw.clone(), fw).await?;
    agent.serve(listeners, shutdown_signal()).await;
    Ok(())
}

/// The sockets the preflight bound: connections wait in their backlog until the agent
/// has started.
pub struct Listeners {
    pub api: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// A started agent: the kernel holds the port maps of SQLite, the background loops run,
/// and the API is ready to be served.
pub struct Agent {
    settings: Settings,
    portmaps: Arc<PortMaps>,
    apps: (axum::Router, axum::Router),
    limits: api::server::Limits,
    /// Maps written to the kernel at startup, for systemd's status line.
    maps_applied: usize,
    /// Closed with a reason when the agent stops.
    consoles: Arc<vm::console::Consoles>,
    /// Tells every background loop to stop.
    stop: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
    notify: crate::notify::Service,
}

impl Agent {
    /// Starts the agent on `fw` (the port maps) and `guard` (the mesh's anti-spoofing
    /// rule): in production the same nftables table, so `guard`'s networks go in with
    /// `fw`'s next `apply_all`.
    pub async fn start(
        settings: Settings,
        fw: Arc<dyn Firewall>,
        guard: Arc<dyn TunnelGuard>,
    ) -> Result<Agent, AgentError> {
        let limits = limits::connection_limits(&settings.api);
        let store = open_state(&settings)?;
        let token = api_token(&settings)?;
        let keys = node_keys(&settings)?;
        let mesh_status = mesh_status(&settings)?;
        let portmaps = Arc::new(PortMaps::new(
            store.clone(),
            fw,
            Policy::from_settings(&settings),
        ));
        let maps_applied = restore_maps(&portmaps).await?;
        let (stop, stop_rx) = watch::channel(false);
        let mut loops = vec![
            tokio::spawn(loops::reconcile_loop(
                portmaps.clone(),
                settings.reconcile_every(),
                stop_rx.clone(),
            )),
            // The join runs in the background: the API answers from the first second,
            // whether the controller is there or not.
            tokio::spawn(
                Mesh {
                    settings: settings.mesh.clone(),
                    data_dir: settings.state.data_dir.clone(),
                    store: store.clone(),
                    keys,
                    guard,
                    portmaps: portmaps.clone(),
                    status: mesh_status.clone(),
                }
                .run(stop_rx.clone()),
            ),
        ];
        let (vms, images, consoles) = vm_layer(&settings.vms, &store, &portmaps);
        let refused = Arc::new(api::refused::RefusedRequests::default());
        loops.extend(background(
            &settings, &store, &vms, &images, &refused, &stop_rx,
        ));
        let apps = api::apps(
            store,
            portmaps.clone(),
            api::Callers {
                token: Arc::new(token),
                mesh: mesh_status,
                refused,
            },
            api::VmApi {
                vms,
                images,
                consoles: consoles.clone(),
                stats_dir: stats_dir(&settings),
            },
        );
        let notify = crate::notify::Service::from_env();
        if let Some(every) = crate::notify::watchdog_interval() {
            loops.push(tokio::spawn(notify.clone().watchdog(every, stop_rx)));
        }
        Ok(Agent {
            settings,
            portmaps,
            apps,
            limits,
            maps_applied,
            consoles,
            stop,
            loops,
            notify,
        })
    }

    /// Serves the API (and METRICS_LISTEN) until `until` completes, then shuts down.
    pub async fn serve(self, listeners: Listeners, until: impl std::future::Future<Output = ()>) {
        let (app, metrics_app) = self.apps.clone();
        // Event streams never end on their own: the bus closes them when the shutdown
        // begins, so the server can finish.
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let metrics_server = listeners.metrics.map(|l| {
            tracing::info!(addr = ?l.local_addr().ok(), "metrics listening (METRICS_LISTEN, GET /metrics only, no token)");
            let mut stopping = shutdown_rx.clone();
            tokio::spawn(api::server::serve(l, metrics_app, self.limits, async move {
                let _ = stopping.wait_for(|s| *s).await;
            }))
        });
        let addr = self.settings.api.listen_addr();
        tracing::info!(%addr, "API listening");
        // The port maps are in the kernel and the listener was bound by the preflight
        // (connections wait in its backlog until `serve` accepts them): systemd may go on.
        self.notify.ready(&format!(
            "API on {addr}; {} port maps applied",
            self.maps_applied
        ));
        let notify = self.notify.clone();
        let consoles = self.consoles.clone();
        let shutdown = async move {
            until.await;
            notify.stopping();
            // Upgraded connections are outside the server's budget: closed here, each
            // with a close frame that says why.
            consoles.close_all(vm::console::EndReason::Shutdown).await;
            crate::events::bus().close();
            let _ = shutdown_tx.send(true);
        };
        api::server::serve(listeners.api, app, self.limits, shutdown).await;
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
        self.shutdown().await;
    }

    /// Stops the background loops and waits for them; with CLEANUP_ON_EXIT, removes the
    /// agent's nftables table and its accept rule.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.loops {
            let _ = task.await;
        }
        if self.settings.portmaps.cleanup_on_exit {
            match self.portmaps.cleanup().await {
                Ok(()) => tracing::info!("removed the agent's nftables table (CLEANUP_ON_EXIT)"),
                Err(e) => tracing::error!(error = %e, "cleanup on exit failed"),
            }
        }
        tracing::info!("stopped");
    }
}

/// The API token: from the settings, else read from or generated into DATA_DIR.
fn api_token(settings: &Settings) -> Result<ApiToken, AgentError> {
    let (token, source) =
        ApiToken::load_or_create(settings.api.configured_token(), &settings.state.data_dir)?;
    match &source {
        api::auth::TokenSource::Setting => tracing::info!("API token from API_TOKEN/PORTMAP_TOKEN"),
        api::auth::TokenSource::File(p) => {
            tracing::info!(path = %p.display(), "API token read from file")
        }
        api::auth::TokenSource::Generated(p) => {
            tracing::info!(path = %p.display(), "API token generated (mode 0600); clients send it as Authorization: Bearer")
        }
    }
    Ok(token)
}

/// The node's WireGuard key pair, read (or made) even standalone: a node that joins
/// later keeps the identity it was given.
fn node_keys(settings: &Settings) -> Result<NodeKeys, AgentError> {
    let (keys, key_source) = NodeKeys::load_or_create(&settings.state.data_dir)?;
    tracing::info!(
        public_key = %keys.public_base64(),
        generated = key_source == KeySource::Generated,
        "WireGuard key pair ready ($DATA_DIR/node.key, node.pub)"
    );
    Ok(keys)
}

/// The mesh's status as the API shows it: joining, or standalone without the settings.
fn mesh_status(settings: &Settings) -> Result<Arc<MeshStatus>, AgentError> {
    let joining = settings.mesh.join_settings()?.is_some();
    if !joining {
        tracing::info!(
            "standalone: CONTROLLER_URL, JOIN_TOKEN and NODE_ID are unset, so no mesh join and no tunnel"
        );
    }
    Ok(Arc::new(MeshStatus::new(
        settings.mesh.trust_controller_tunnel,
        if joining {
            JoinState::Joining
        } else {
            JoinState::Standalone
        },
    )))
}

/// The kernel rebuilt from SQLite in one transaction before the API opens, so the first
/// answer already reflects what is in force; returns the number of maps.
async fn restore_maps(portmaps: &PortMaps) -> Result<usize, AgentError> {
    let n = portmaps.restore().await.map_err(AgentError::Startup)?;
    let report = portmaps.reconcile().await.map_err(AgentError::Startup)?;
    // Building the 10,000-element batch is the agent's largest allocation; give it back.
    crate::memory::release_free_heap();
    tracing::info!(
        maps = n,
        forward_accept = ?report.forward_accept,
        "port maps applied to the kernel"
    );
    Ok(n)
}

/// The loops beside the API: the VM reconcile (libvirt may be slow or away at boot: it
/// runs beside the API, never before it), the audit trail's pruning, and the refused
/// requests' flush.
fn background(
    settings: &Settings,
    store: &Store,
    vms: &Arc<vm::service::Vms>,
    images: &Arc<vm::images::Images>,
    refused: &Arc<api::refused::RefusedRequests>,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(loops::vm_reconcile_loop(
            vms.clone(),
            images.clone(),
            settings.reconcile_every(),
            stop.clone(),
        )),
        tokio::spawn(loops::audit_retention_loop(
            store.clone(),
            crate::store::retention::Retention::from_settings(&settings.state),
            stop.clone(),
        )),
        tokio::spawn(
            refused
                .clone()
                .flush_every(store.clone(), REFUSED_FLUSH_EVERY, stop.clone()),
        ),
    ]
}

/// The VM service and the image store over one lazily opened libvirt connection.
fn vm_layer(
    settings: &VmSettings,
    store: &Store,
    portmaps: &Arc<PortMaps>,
) -> (
    Arc<vm::service::Vms>,
    Arc<vm::images::Images>,
    Arc<vm::console::Consoles>,
) {
    use vm::driver::libvirt::{Libvirt, LibvirtHypervisor, Place, is_local_uri};
    let lv = Libvirt::with_keepalive(
        settings.libvirt_uri.clone(),
        settings.libvirt_timeout(),
        settings.libvirt_keepalive,
    );
    let place = Place {
        pool: settings.vms_pool.clone(),
        pool_dir: settings.pool_dir().to_string_lossy().into_owned(),
        local: is_local_uri(&settings.libvirt_uri),
    };
    let hv = Arc::new(LibvirtHypervisor::new(lv, place));
    let driver = vm::driver::Driver::new(hv, settings.libvirt_timeout());
    let cfg = vm::VmConfig::from(settings);
    let images = vm::images::Images::new(
        driver.clone(),
        store.clone(),
        cfg.limits.max_disk_gb * vm::driver::volumes::GIB,
    );
    let consoles = vm::console::Consoles::new(
        driver.clone(),
        store.clone(),
        vm::console::ConsoleSettings {
            max_sessions: settings.console_max_sessions as usize,
            idle_timeout: std::time::Duration::from_secs(settings.console_idle_timeout),
            input_rate: settings.console_input_rate,
        },
    );
    let vms = vm::service::Vms::new(driver, store.clone(), cfg, Some(portmaps.clone()))
        .with_images(images.clone())
        .with_consoles(consoles.clone());
    let vms = Arc::new(vms);
    vms.watch_events();
    (vms, images, consoles)
}

/// `GET /stats` reports the filesystem of VMS_WORK_DIR when the agent can see it (the
/// pool's directory in the usual setup), else of DATA_DIR.
fn stats_dir(settings: &Settings) -> std::path::PathBuf {
    if settings.vms.vms_work_dir.is_dir() {
        settings.vms.vms_work_dir.clone()
    } else {
        settings.state.data_dir.clone()
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
