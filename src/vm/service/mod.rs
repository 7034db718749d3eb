//! The VM service: SQLite holds each VM as the operator asked for it, the hypervisor is
//! made to match. Handlers call one method each; the service talks to the hypervisor
//! only through `driver::Hypervisor` (off the runtime, through `driver::Driver`) and to
//! SQLite through the store, never to libvirt. One file per job:
//!
//! - `create.rs`: `POST /vms`, as plan, address, provision, persist;
//! - `lifecycle.rs`: start, stop, reboot, delete;
//! - `queries.rs`: the reads, from SQLite and the last observation (`observed.rs`), never
//!   waiting behind a libvirt call; IP, console, statistics (`statscache.rs`);
//! - `addresses.rs` which address a VM gets (pure), `pinning.rs` choosing it and writing
//!   its DHCP host entry, `stray_pins.rs` the entries of failed creates;
//! - `reconcile.rs`: the hypervisor made to match the rows again; `abandoned.rs` and
//!   `attempts.rs` what creates cut off inside libvirt left; `serial.rs` a VM defined
//!   before the interactive console given a pty;
//! - `claims.rs`: one operation per VM at a time.
//!
//! An operation holds its VM's claim until its libvirt work has really ended; the request
//! waits for it at most `LIBVIRT_TIMEOUT` and then answers 504 while the work goes on and
//! records its outcome (see [`Vms::to_the_end`]).

mod abandoned;
mod address_book;
pub(crate) mod addresses;
mod attempts;
mod claims;
mod create;
mod lifecycle;
mod observed;
mod pinning;
mod plan;
mod provision;
mod queries;
mod reconcile;
mod serial;
mod statscache;
mod stray_pins;
#[cfg(test)]
pub(crate) mod tests;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

#[cfg(test)]
pub use observed::FRESH;

use self::address_book::AddressBook;
use self::claims::{Claim, Claims};
use self::observed::Observed;
use super::driver::{Driver, VmDefinition};
use super::images::Images;
use super::{Operation, VmConfig, VmError};
use crate::model::{DesiredState, VmState};
use crate::portmap::PortMaps;
use crate::store::vms::{self, VmRow};
use crate::store::{Store, audit};

/// What `POST /vms` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub name: String,
    pub uuid: String,
    pub mac: String,
    pub instance_id: String,
    pub hostname: String,
    pub image: Option<String>,
    pub recreated: bool,
    /// The address pinned for the VM in its network's DHCP range: its DHCP lease,
    /// from the first boot on.
    pub ip: IpAddr,
}

/// One VM as `GET /vms` and `/status` show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VmStatus {
    pub name: String,
    pub active: bool,
    pub state: VmState,
    pub uuid: String,
    /// The cloud-init instance-id in the VM's seed (`meta-data`), as `POST /vms` answered
    /// it: from the agent's row, else from the agent's metadata in the domain's XML;
    /// null for a domain the agent did not create.
    pub instance_id: Option<String>,
    /// Created (and so deletable) by this agent.
    pub managed: bool,
    /// The address a client can use, as `GET /vms/{name}/ip` answers it: the pinned
    /// address when the agent reserved one, else the one the VM's last DHCP lease gave
    /// (`GET /vms/{name}/ip` records it); null while neither is known.
    pub ip: Option<IpAddr>,
    /// Where `ip` comes from: `pinned` (the agent's reservation, known before the VM
    /// boots) or `lease` (the last DHCP lease seen); null with `ip`.
    pub ip_source: Option<IpSource>,
    /// The address the agent reserved for the VM (absent for VMs created before
    /// pinning, and for domains the agent did not create).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_ip: Option<IpAddr>,
    pub mac: Option<String>,
    pub network: Option<String>,
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub image: Option<String>,
    pub desired_state: Option<DesiredState>,
    pub created_at: Option<String>,
    /// When libvirt was last asked about this domain (ISO 8601, UTC, as the `*_at` columns); `null` when it
    /// has not answered since the agent started. Reads never wait behind libvirt, so
    /// this says how current `state` is.
    pub observed_at: Option<String>,
    /// Why a create failed after its request stopped waiting (state `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `GET /vms/{name}/status` only: the port maps whose target is the VM's pinned or
    /// last address, as `GET /ports` lists them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_maps: Option<Vec<VmPortMap>>,
}

/// Where a VM's listed address comes from.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IpSource {
    /// The address the agent reserved for the VM (a DHCP host entry).
    Pinned,
    /// The address of the VM's last DHCP lease.
    Lease,
}

impl IpSource {
    /// The address to list for a VM of the agent, and where it comes from: the pinned
    /// one first, since it is what the VM gets and is known before it boots.
    pub fn of(row: &crate::store::vms::VmRow) -> (Option<IpAddr>, Option<IpSource>) {
        match (row.pinned_ip, row.last_ip) {
            (Some(p), _) => (Some(p), Some(IpSource::Pinned)),
            (None, Some(l)) => (Some(l), Some(IpSource::Lease)),
            (None, None) => (None, None),
        }
    }
}

/// One port map to a VM, as `GET /ports` lists it (the row and its `rule_id`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VmPortMap {
    /// `tcp` or `udp`.
    pub proto: String,
    pub listen_port: u16,
    pub target_ip: String,
    pub target_port: u16,
    /// The VM the map names; null for a map to the VM's address.
    pub target_vm: Option<String>,
    /// Sources allowed to connect; empty: every source.
    pub allow_from: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
    pub created_by: String,
    pub updated_by: String,
    /// The map's key in `GET /ports` (`8080`, `8080/udp`).
    pub rule_id: String,
}

impl From<crate::store::portmaps::PortMapRow> for VmPortMap {
    fn from(r: crate::store::portmaps::PortMapRow) -> Self {
        Self {
            rule_id: r.map.rule_id(),
            proto: r.map.proto.to_string(),
            listen_port: r.map.listen_port,
            target_ip: r.map.target_ip.to_string(),
            target_port: r.map.target_port,
            target_vm: r.target_vm,
            allow_from: r
                .allow_from
                .networks()
                .iter()
                .map(|n| n.to_string())
                .collect(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            created_by: r.created_by,
            updated_by: r.updated_by,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Deleted {
    pub name: String,
    pub deleted_files: bool,
    /// Port maps that targeted the VM's address, removed with it (see docs/decisions/09-vms-through-libvirt-api.md).
    pub removed_port_maps: Vec<String>,
}

pub struct Vms {
    driver: Driver,
    store: Store,
    cfg: VmConfig,
    portmaps: Option<Arc<PortMaps>>,
    images: Option<Arc<Images>>,
    /// Told first when a VM is deleted, so its console session says why it ends.
    consoles: Option<Arc<crate::vm::console::Consoles>>,
    /// Names with an operation in progress: a second request gets 409 instead of
    /// racing; a request waits for the reconcile's look at the VM.
    claims: Arc<Claims>,
    /// Creates whose libvirt work was cut off (a keepalive close during a freeze), whose
    /// leftovers the reconcile removes (`attempts.rs`).
    abandoned: attempts::Abandoned,
    /// The networks as libvirt last showed them, the addresses of creates in flight and
    /// the DHCP host entries of failed creates: what a create chooses its address from.
    addresses: Arc<AddressBook>,
    /// What libvirt last said about each domain; the reads answer from it.
    observed: Arc<Observed>,
    /// libvirt's last statistics of every domain, for `GET /metrics`.
    stats: Arc<statscache::StatsCache>,
    /// Woken by libvirt's events that may need a repair (a domain undefined, stopped or
    /// crashed): the VM reconcile runs at once instead of at its next interval.
    reconcile_due: Arc<tokio::sync::Notify>,
    /// Creates in flight (shown as `creating`) and creates that failed after their
    /// request stopped waiting (shown as `failed`, with the error), by VM name.
    pending: std::sync::Mutex<std::collections::BTreeMap<String, Pending>>,
}

/// How long libvirt must be quiet after an event before the reconcile it asked for runs.
pub const SETTLE: Duration = Duration::from_secs(1);
/// The longest an event's reconcile waits for libvirt to be quiet.
pub const SETTLE_MAX: Duration = Duration::from_secs(5);

/// A create the database does not hold yet.
#[derive(Clone, Debug)]
enum Pending {
    Creating,
    /// With its error, as the status shows it.
    Failed(String),
}

impl Vms {
    /// The bounds of a new VM (VM_MAX_*).
    pub fn limits(&self) -> &crate::vm::spec::Limits {
        &self.cfg.limits
    }

    pub fn new(
        driver: Driver,
        store: Store,
        cfg: VmConfig,
        portmaps: Option<Arc<PortMaps>>,
    ) -> Self {
        Self {
            driver,
            store,
            cfg,
            portmaps,
            images: None,
            consoles: None,
            claims: Arc::new(Claims::default()),
            abandoned: Default::default(),
            addresses: Default::default(),
            observed: Arc::new(Observed::default()),
            stats: Default::default(),
            reconcile_due: Default::default(),
            pending: Default::default(),
        }
    }

    /// Lets `create` fetch the default image on first use.
    pub fn with_images(mut self, images: Arc<Images>) -> Self {
        self.images = Some(images);
        self
    }

    /// Lets a delete end the VM's console session with its own reason.
    pub fn with_consoles(mut self, consoles: Arc<crate::vm::console::Consoles>) -> Self {
        self.consoles = Some(consoles);
        self
    }

    /// Resolves when an event asked for a reconcile (`agent::vm_reconcile_loop`) and
    /// libvirt has since been quiet for [`SETTLE`] (at most [`SETTLE_MAX`] after the
    /// ask): changes made by hand come in steps (`virsh undefine`, then `vol-delete` of
    /// the seed), and a repair made between two of them would see half of them.
    pub async fn reconcile_asked(&self) {
        self.reconcile_due.notified().await;
        let latest = tokio::time::Instant::now() + SETTLE_MAX;
        loop {
            let quiet = tokio::time::sleep(SETTLE);
            tokio::select! {
                _ = self.reconcile_due.notified() => {}
                _ = quiet => return,
                _ = tokio::time::sleep_until(latest) => return,
            }
        }
    }

    /// Claims `name` for a request: refused while another request works on it, waits
    /// (up to one libvirt call's timeout) while the reconcile looks at it.
    async fn claim(&self, name: &str) -> Result<Claim, VmError> {
        self.claims.for_request(name, self.driver.timeout()).await
    }

    async fn row(&self, name: &str) -> Result<Option<VmRow>, VmError> {
        let name = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::get(c, &name)))
            .await
            .map_err(VmError::from)
    }

    fn set_pending(&self, name: &str, pending: Option<Pending>) {
        let mut all = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending {
            Some(p) => all.insert(name.to_owned(), p),
            None => all.remove(name),
        };
    }

    fn pending_of(&self, name: &str) -> Option<Pending> {
        let all = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        all.get(name).cloned()
    }

    fn pending_all(&self) -> Vec<(String, Pending)> {
        let all = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().map(|(n, p)| (n.clone(), p.clone())).collect()
    }

    async fn set_desired(&self, name: &str, state: DesiredState) -> Result<(), VmError> {
        let n = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::set_desired_state(c, &n, state)))
            .await
            .map_err(VmError::from)
    }

    /// Runs `work` to its end on a task of its own, holding `claim` until then. The
    /// caller waits at most `wait`: after that it gets a 504, while the work goes on,
    /// keeps the VM claimed, and records its own outcome (the row, the cleanup, and an
    /// audit row saying how it ended).
    async fn to_the_end<T: Send + 'static>(
        self: &Arc<Self>,
        claim: Claim,
        operation: Operation,
        wait: Duration,
        work: impl Future<Output = Result<T, VmError>> + Send + 'static,
    ) -> Result<T, VmError> {
        let (mut task, detached) = self.launch(claim, operation.clone(), work);
        match tokio::time::timeout(wait, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(source)) => Err(super::Internal::Task { operation, source }.into()),
            Err(_) => {
                detached.store(true, Ordering::Release);
                Err(VmError::Stalled(super::Stalled {
                    operation,
                    waited: wait,
                }))
            }
        }
    }

    /// Like [`Vms::to_the_end`] with nobody waiting (`wait=false`): the outcome is
    /// recorded when the work ends.
    fn in_background<T: Send + 'static>(
        self: &Arc<Self>,
        claim: Claim,
        operation: Operation,
        work: impl Future<Output = Result<T, VmError>> + Send + 'static,
    ) {
        let (_task, detached) = self.launch(claim, operation, work);
        detached.store(true, Ordering::Release);
    }

    /// Spawns `work` holding `claim`; once it ends, an audit row records its outcome if
    /// the returned flag says nobody waits for it any more.
    fn launch<T: Send + 'static>(
        self: &Arc<Self>,
        claim: Claim,
        operation: Operation,
        work: impl Future<Output = Result<T, VmError>> + Send + 'static,
    ) -> (tokio::task::JoinHandle<Result<T, VmError>>, Arc<AtomicBool>) {
        let detached = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&detached);
        let this = Arc::clone(self);
        let task = tokio::spawn(async move {
            let result = work.await;
            // The name is free as soon as the work ended (its status already shows how):
            // a client that saw `failed` and deletes at once must not meet the claim.
            drop(claim);
            if flag.load(Ordering::Acquire) {
                this.record_late_outcome(&operation, result.as_ref().err())
                    .await;
            }
            result
        });
        (task, detached)
    }

    /// The audit row of an operation whose request stopped waiting for it.
    async fn record_late_outcome(&self, operation: &Operation, error: Option<&VmError>) {
        let what = operation.to_string();
        match error {
            None => tracing::info!(
                operation = what,
                "operation finished after its request stopped waiting"
            ),
            Some(e) => {
                tracing::error!(operation = what, error = %e, "operation failed after its request stopped waiting")
            }
        }
        let entry = audit::Entry {
            outcome: if error.is_none() {
                audit::Outcome::Ok
            } else {
                audit::Outcome::Failed
            },
            error: error.map(|e| crate::logging::escape_str(&e.to_string()).into_owned()),
            ..audit::Entry::by_agent(format!("{what} (finished after the answer)"), None)
        };
        self.record_own(entry).await;
    }

    /// An audit row for something the agent did on its own (nobody asked for it, so no
    /// request's transaction carries it); a failure to write it is logged.
    async fn record_own(&self, entry: audit::Entry) {
        let written = self
            .store
            .run(move |s| s.with(|c| audit::record(c, &entry)))
            .await;
        if let Err(e) = written {
            tracing::error!(error = %e, "could not write the audit row");
        }
    }

    /// [`Vms::record_own`] of a successful `action` with its `parameters`.
    async fn record_own_ok(&self, action: &str, parameters: serde_json::Value) {
        self.record_own(audit::Entry::by_agent(action, Some(parameters.to_string())))
            .await;
    }
}

/// What the hypervisor is to hold for a VM row.
fn definition(row: &VmRow) -> VmDefinition {
    VmDefinition {
        name: row.name.clone(),
        uuid: row.uuid.clone(),
        instance_id: row.instance_id.clone(),
        domain_type: row.domain_type.clone(),
        arch: row.os_arch.clone(),
        memory_mib: row.memory_mib,
        vcpus: row.vcpus,
        network: row.network_name.clone(),
        mac: row.mac.clone(),
        disk_volume: row.disk_volume.clone(),
        seed_volume: row.seed_volume.clone(),
        kernel: row.kernel.clone(),
        initrd: row.initrd.clone(),
        cmdline: row.cmdline.clone(),
    }
}
