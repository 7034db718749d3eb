//! The conductor: startup order, background loops, shutdown.

use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, ApiToken};
use crate::config::{ApiSettings, Settings, VmSettings};
use crate::keys::{KeySource, NodeKeys};
use crate::mesh::{JoinState, Mesh, MeshStatus};
use crate::net::antispoof::TunnelGuard;
use crate::portmap::{self, Firewall, NftFirewall, PortMaps};
use crate::store::Store;
use crate::vm;

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
    let policy = settings.policy();
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
    let fw = Arc::new(NftFirewall::from_settings(settings.nat()).await?);
    // Held until the table's last change (CLEANUP_ON_EXIT included) is done.
    let _locks = ready.locks;
    serve(
        settings,
        fw.clone(),
        fw,
        ready.listener,
        ready.metrics_listener,
    )
    .await
}

/// `fw` carries the port maps, `guard` the mesh's anti-spoofing rule: in production the
/// same nftables table, so `guard`'s networks go in with `fw`'s next `apply_all`.
async fn serve(
    settings: Settings,
    fw: Arc<dyn Firewall>,
    guard: Arc<dyn TunnelGuard>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
) -> Result<(), AgentError> {
    let limits = connection_limits(&settings.api);
    let store = open_state(&settings)?;
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
    // The key pair is read (or made) even standalone: a node that joins later keeps
    // the identity it was given.
    let (keys, key_source) = NodeKeys::load_or_create(&settings.state.data_dir)?;
    tracing::info!(
        public_key = %keys.public_base64(),
        generated = key_source == KeySource::Generated,
        "WireGuard key pair ready ($DATA_DIR/node.key, node.pub)"
    );
    let joining = settings.mesh.join_settings()?.is_some();
    if !joining {
        tracing::info!(
            "standalone: CONTROLLER_URL, JOIN_TOKEN and NODE_ID are unset, so no mesh join and no tunnel"
        );
    }
    let mesh_status = Arc::new(MeshStatus::new(
        settings.mesh.trust_controller_tunnel,
        if joining {
            JoinState::Joining
        } else {
            JoinState::Standalone
        },
    ));
    let portmaps = Arc::new(PortMaps::new(store.clone(), fw.clone(), settings.policy()));

    // The kernel is rebuilt from SQLite in one transaction before the API opens, so the
    // first answer already reflects what is in force.
    let pm = portmaps.clone();
    let report = tokio::task::spawn_blocking(move || {
        let n = pm.restore()?;
        pm.reconcile().map(|r| (n, r))
    })
    .await?
    .map_err(AgentError::Startup)?;
    // Building the 10,000-element batch is the agent's largest allocation; give it back.
    crate::memory::release_free_heap();
    tracing::info!(
        maps = report.0,
        forward_accept = ?report.1.forward_accept,
        "port maps applied to the kernel"
    );

    // Bound by the preflight; connections waited in its backlog until now.
    let addr = settings.api.listen_addr();
    tracing::info!(%addr, "API listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let reconciler = tokio::spawn(reconcile_loop(
        portmaps.clone(),
        settings.reconcile_every(),
        stop_rx.clone(),
    ));

    // The join runs in the background: the API answers from the first second, whether
    // the controller is there or not.
    let mesh = tokio::spawn(
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
    );

    let (vms, images) = vm_layer(&settings.vms, &store, &portmaps);
    // libvirt may be slow or away at boot: the VM reconcile runs beside the API, never
    // before it.
    let vm_reconciler = tokio::spawn(vm_reconcile_loop(
        vms.clone(),
        images.clone(),
        settings.reconcile_every(),
        stop_rx.clone(),
    ));

    let pruner = tokio::spawn(audit_retention_loop(
        store.clone(),
        settings.state.audit_retention(),
        stop_rx.clone(),
    ));
    let refused = Arc::new(api::refused::RefusedRequests::default());
    let refused_flusher = tokio::spawn(refused.clone().flush_every(
        store.clone(),
        REFUSED_FLUSH_EVERY,
        stop_rx.clone(),
    ));
    let (app, metrics_app) = api::apps(
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
            stats_dir: stats_dir(&settings),
        },
    );
    // Event streams never end on their own: the bus closes them when the shutdown
    // begins, so the server can finish.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let service = crate::notify::Service::from_env();
    let watchdog = crate::notify::watchdog_interval()
        .map(|every| tokio::spawn(service.clone().watchdog(every, stop_rx.clone())));
    let metrics_server = metrics_listener.map(|l| {
        tracing::info!(addr = ?l.local_addr().ok(), "metrics listening (METRICS_LISTEN, GET /metrics only, no token)");
        let mut stopping = shutdown_rx.clone();
        tokio::spawn(api::server::serve(l, metrics_app, limits, async move {
            let _ = stopping.wait_for(|s| *s).await;
        }))
    });
    // The port maps are in the kernel and the listener was bound by the preflight
    // (connections wait in its backlog until `serve` accepts them): systemd may go on.
    service.ready(&format!("API on {addr}; {} port maps applied", report.0));
    let shutdown = async move {
        shutdown_signal().await;
        service.stopping();
        crate::events::bus().close();
        let _ = shutdown_tx.send(true);
    };
    api::server::serve(listener, app, limits, shutdown).await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }

    let _ = stop_tx.send(true);
    let _ = reconciler.await;
    let _ = vm_reconciler.await;
    let _ = refused_flusher.await;
    let _ = pruner.await;
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    let _ = mesh.await;
    if settings.portmaps.cleanup_on_exit {
        let pm = portmaps.clone();
        match tokio::task::spawn_blocking(move || pm.cleanup()).await {
            Ok(Ok(())) => tracing::info!("removed the agent's nftables table (CLEANUP_ON_EXIT)"),
            other => tracing::error!(result = ?other, "cleanup on exit failed"),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft descriptor limit to the hard one and says what it got: the limit
/// systemd gives a service (1,024) is what strangers' idle connections used to exhaust.
/// Returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    match crate::fdlimit::raise_nofile() {
        Ok(n) if n.soft > n.before => {
            tracing::info!(
                soft = n.soft,
                hard = n.hard,
                before = n.before,
                "file descriptors: soft RLIMIT_NOFILE raised to the hard limit"
            );
            n.soft
        }
        Ok(n) => {
            tracing::info!(
                soft = n.soft,
                hard = n.hard,
                "file descriptors: soft RLIMIT_NOFILE already at the hard limit"
            );
            n.soft
        }
        Err((n, error)) => {
            tracing::warn!(%error, soft = n.soft, hard = n.hard, "cannot raise RLIMIT_NOFILE; keeping it");
            n.soft
        }
    }
}

/// The API server's connection budget from the settings, with a cap that fits the
/// descriptor limit (logged, as a warning when it is below MAX_CONNECTIONS).
fn connection_limits(settings: &ApiSettings) -> api::server::Limits {
    let soft = raise_fd_limit();
    let configured = settings.configured_max_connections();
    let cap = crate::fdlimit::connection_cap(configured, soft);
    if cap < configured {
        tracing::warn!(
            cap,
            configured,
            nofile = soft,
            reserved = crate::fdlimit::RESERVED_FDS,
            "connection cap lowered below MAX_CONNECTIONS to fit the descriptor limit \
             (the agent keeps `reserved` descriptors for itself)"
        );
    } else {
        tracing::info!(
            cap,
            configured,
            nofile = soft,
            "connection cap (MAX_CONNECTIONS)"
        );
    }
    settings.limits(cap)
}

/// The VM service and the image store over one lazily opened libvirt connection.
fn vm_layer(
    settings: &VmSettings,
    store: &Store,
    portmaps: &Arc<PortMaps>,
) -> (Arc<vm::service::Vms>, Arc<vm::images::Images>) {
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
    let vms = vm::service::Vms::new(driver, store.clone(), cfg, Some(portmaps.clone()))
        .with_images(images.clone());
    let vms = Arc::new(vms);
    vms.watch_events();
    (vms, images)
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

/// At startup: unfinished image transfers are failed and, once libvirt answers, their
/// partial volumes removed; then, at startup and every interval, VMs whose domain
/// vanished from libvirt are defined again. A node without VM or transfer rows never
/// connects to libvirt here (a port-map-only node leaves its libvirtd alone).
async fn vm_reconcile_loop(
    vms: Arc<vm::service::Vms>,
    images: Arc<vm::images::Images>,
    every: std::time::Duration,
    stop: watch::Receiver<bool>,
) {
    let partial_volumes_due = match images.fail_interrupted().await {
        Ok(n) => {
            if n > 0 {
                tracing::warn!(
                    images = n,
                    "image transfers of the last run did not finish; marked failed"
                );
            }
            n > 0
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the image transfers of the last run");
            false
        }
    };
    let partial_volumes_due = Arc::new(std::sync::atomic::AtomicBool::new(partial_volumes_due));
    let woken = {
        let vms = vms.clone();
        move || {
            let vms = vms.clone();
            async move { vms.reconcile_asked().await }
        }
    };
    crate::periodic::every_or_woken(every, crate::periodic::First::Now, stop, woken, || {
        let (vms, images, due) = (vms.clone(), images.clone(), partial_volumes_due.clone());
        async move { vm_reconcile_pass(&vms, &images, &due).await }
    })
    .await;
}

/// One pass of [`vm_reconcile_loop`]: the partial volumes of the last run while they
/// are due, then the VMs.
async fn vm_reconcile_pass(
    vms: &vm::service::Vms,
    images: &vm::images::Images,
    partial_volumes_due: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    if partial_volumes_due.load(Ordering::Relaxed) {
        match images.remove_partial_volumes().await {
            Ok(n) => {
                partial_volumes_due.store(false, Ordering::Relaxed);
                if n > 0 {
                    tracing::warn!(
                        removed = n,
                        "removed unfinished image transfers of the last run"
                    );
                }
            }
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "libvirt unavailable; VM reconcile retries next interval");
                return;
            }
            Err(e) => {
                partial_volumes_due.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, "cleaning up image transfers failed");
            }
        }
    }
    match vms.reconcile().await {
        Ok(r) if !r.is_empty() => {
            crate::metrics::global().reconciled("vms", r.len());
            crate::events::publish(
                crate::events::Kind::ReconcileRepaired,
                "vms",
                serde_json::json!({ "repaired": r }),
            );
            tracing::warn!(repaired = ?r, "VM reconcile repaired libvirt")
        }
        Ok(_) => {
            crate::metrics::global().reconciled("vms", 0);
            tracing::debug!("VM reconcile: libvirt in sync")
        }
        Err(e) if e.is_unavailable() => {
            tracing::debug!(error = %e, "libvirt unavailable; VM reconcile retries next interval")
        }
        Err(e) => tracing::error!(error = %e, "VM reconcile failed"),
    }
}

/// Keeps the audit tables within AUDIT_RETENTION_DAYS and AUDIT_MAX_ROWS: every minute,
/// one small batch at a time with a pause between, so requests are never held up.
async fn audit_retention_loop(
    store: Store,
    retention: crate::store::retention::Retention,
    stop: watch::Receiver<bool>,
) {
    let every = std::time::Duration::from_secs(60);
    let stopping = stop.clone();
    crate::periodic::every(every, crate::periodic::First::Now, stop, || {
        let (store, stopping) = (store.clone(), stopping.clone());
        async move { prune_audit(&store, retention, &stopping).await }
    })
    .await;
}

/// One pass of [`audit_retention_loop`]: batches until nothing is left to prune.
async fn prune_audit(
    store: &Store,
    retention: crate::store::retention::Retention,
    stop: &watch::Receiver<bool>,
) {
    let mut total = 0;
    loop {
        let st = store.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            st.with(|c| crate::store::retention::prune_batch(c, &retention))
        })
        .await;
        match pruned {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not prune the audit trail");
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "audit pruning task failed");
                break;
            }
        }
        if *stop.borrow() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if total > 0 {
        tracing::info!(
            rows = total,
            "pruned the audit trail (AUDIT_RETENTION_DAYS, AUDIT_MAX_ROWS)"
        );
    }
}

/// Compares the kernel with the database every `every` and repairs drift.
async fn reconcile_loop(
    portmaps: Arc<PortMaps>,
    every: std::time::Duration,
    stop: watch::Receiver<bool>,
) {
    crate::periodic::every(every, crate::periodic::First::AfterInterval, stop, || {
        let pm = portmaps.clone();
        async move {
            match tokio::task::spawn_blocking(move || pm.reconcile()).await {
                Ok(Ok(r)) if r.changed() => {
                    crate::metrics::global().reconciled("portmaps", 1);
                    crate::events::publish(
                        crate::events::Kind::PortMapRepaired,
                        "portmaps",
                        serde_json::json!({
                            "drift": r.drift,
                            "forward_accept": r.forward_accept,
                            "maps": r.maps,
                        }),
                    );
                    tracing::warn!(
                        drift = ?r.drift,
                        rewritten = r.rewritten,
                        forward_accept = ?r.forward_accept,
                        maps = r.maps,
                        "reconcile repaired drift"
                    )
                }
                Ok(Ok(_)) => {
                    crate::metrics::global().reconciled("portmaps", 0);
                    tracing::debug!("reconcile: kernel in sync")
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reconcile failed; retrying next interval")
                }
                Err(e) => tracing::error!(error = %e, "reconcile task failed"),
            }
        }
    })
    .await;
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
