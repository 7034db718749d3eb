//! The reads: `GET /vms`, `/vms/{name}/status` and `/stats` answer from SQLite plus the
//! last observation of libvirt (`observed.rs`), never waiting behind a libvirt call
//! for longer than `observed::READ_WAIT`; the IP and the console ask libvirt.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::observed::{READ_WAIT, Seen, Snapshot};
use super::{IpSource, Pending, VmStatus, Vms};
use crate::model::{DesiredState, MacAddr, VmName, VmState};
use crate::store::Store;
use crate::store::audit::iso_utc;
use crate::store::vms::{self, VmRow};
use crate::vm::driver::{DomainEvent, EventKind, ipv4_of};
use crate::vm::{NoLease, NotFound, Unavailable, VmError};

impl Vms {
    /// The last observation, refreshed first when it is older than `observed::FRESH`
    /// (waiting for that at most `READ_WAIT`, counted from the listing's start). With no observation at all since the
    /// start there is nothing true to answer: 503, with why.
    async fn observation(&self) -> Result<Snapshot, VmError> {
        if self.observed.stale() {
            self.refresh_listing();
            self.observed.wait_listing(READ_WAIT).await;
        }
        let seen = self.observed.snapshot();
        if seen.listed_at.is_none() {
            return Err(Unavailable::NotObserved(seen.failure).into());
        }
        Ok(seen)
    }

    /// Starts a full listing of libvirt's domains unless one runs already. It waits for
    /// libvirt's answer however long that takes; one at most, so a frozen libvirtd holds
    /// one thread, not one per read.
    pub(super) fn refresh_listing(&self) {
        if !self.observed.begin_listing() {
            return;
        }
        let (driver, observed) = (self.driver.clone(), Arc::clone(&self.observed));
        let store = self.store.clone();
        tokio::spawn(async move {
            let started = SystemTime::now();
            let found = driver.work(|hv, call| hv.domains(call)).await;
            if let Err(e) = &found {
                tracing::debug!(error = %e, "listing libvirt's domains failed; reads show the last listing");
            }
            let listed = found.is_ok();
            observed.end_listing(started, found);
            if listed {
                let states = observed
                    .snapshot()
                    .domains
                    .iter()
                    .map(|(name, seen)| (name.clone(), seen.domain.state))
                    .collect();
                record_states(&store, States::Listing(states)).await;
            }
        });
    }

    /// Asks libvirt about one domain now and records the answer (after an operation, or
    /// an event). Failures leave the last observation as it was.
    pub(crate) async fn observe_one(&self, name: &str) {
        let n = name.to_string();
        let asked = SystemTime::now();
        match self.driver.ask(move |hv, call| hv.domain(call, &n)).await {
            Ok(seen) => {
                let state = seen.as_ref().map_or(VmState::Missing, |s| s.state);
                if self.observed.set(name, seen, asked) {
                    record_states(&self.store, States::One(name.to_string(), state)).await;
                }
            }
            Err(e) => tracing::debug!(vm = name, error = %e, "cannot observe the domain"),
        }
    }

    /// `GET /metrics`: every domain's statistics from one libvirt call, and their age.
    /// A sample older than `stats::MAX_AGE` starts a refresh, waited for at most
    /// `READ_WAIT`; a slow libvirt gets the last sample. `None` on a node where libvirt
    /// is not in use in this run (a port-map-only node never loads it).
    pub async fn metrics_sample(&self) -> Option<crate::metrics::sample::VmsSample> {
        if !self.driver.hypervisor().in_use() {
            return None;
        }
        if self.stats.begin_refresh() {
            let (driver, stats) = (self.driver.clone(), Arc::clone(&self.stats));
            tokio::spawn(async move {
                let found = driver.work(|hv, call| hv.stats(call)).await;
                if let Err(e) = &found {
                    tracing::debug!(error = %e, "reading libvirt's domain statistics failed; scrapes show the last sample");
                }
                stats.end_refresh(found.ok());
            });
        }
        self.stats.wait_refresh(READ_WAIT).await;
        let (domains, age) = self.stats.last()?;
        Some(crate::metrics::sample::VmsSample {
            age_seconds: age.as_secs_f64(),
            domains: domains.to_vec(),
        })
    }

    /// Follows libvirt's lifecycle events: each names a domain, observed again at once.
    /// Call once, inside the runtime; it subscribes every connection made from now on.
    pub fn watch_events(self: &Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<DomainEvent>(EVENTS_QUEUE);
        self.driver.hypervisor().subscribe(tx);
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let Some(vms) = this.upgrade() else { return };
                tracing::debug!(vm = %event.domain, event = ?event.kind, "libvirt domain event");
                if let Some(kind) = event.kind {
                    let (kind, detail) = published(kind);
                    crate::events::publish(kind, event.domain.clone(), detail);
                }
                if event.may_need_repair() {
                    vms.reconcile_due.notify_one();
                }
                vms.observe_one(&event.domain).await;
            }
        });
    }

    /// `GET /vms`: the agent's VMs and every other domain libvirt knows.
    pub async fn list(&self) -> Result<Vec<VmStatus>, VmError> {
        let rows = self.store.run(|s| s.with(vms::list)).await?;
        let seen = self.observation().await?;
        let mut result: Vec<VmStatus> = seen
            .domains
            .iter()
            .map(|(name, s)| status_of(name, s, rows.iter().find(|r| r.name == name.as_str())))
            .collect();
        for r in &rows {
            if !seen.domains.contains_key(r.name.as_str()) {
                result.push(missing_status(r, seen.listed_at));
            }
        }
        for (name, p) in self.pending_all() {
            match result.iter_mut().find(|s| s.name == name) {
                Some(s) if matches!(p, Pending::Creating) => s.state = VmState::Creating,
                Some(_) => {}
                None => result.push(pending_status(&name, &p)),
            }
        }
        result.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(result)
    }

    /// `GET /vms/{name}/status`.
    pub async fn status(&self, name: &VmName) -> Result<VmStatus, VmError> {
        let row = self.row(name).await?;
        let seen = self.observation().await?;
        let pending = self.pending_of(name);
        let mut status = match (seen.domains.get(name.as_str()), &row, &pending) {
            (Some(s), row, _) => status_of(name, s, row.as_ref()),
            (None, Some(row), _) => missing_status(row, seen.listed_at),
            (None, None, Some(p)) => pending_status(name, p),
            (None, None, None) => return Err(NotFound::Vm(name.to_string()).into()),
        };
        if matches!(pending, Some(Pending::Creating)) {
            status.state = VmState::Creating;
        }
        let last_lease = row.as_ref().and_then(|r| r.last_ip);
        let targets = [status.pinned_ip, status.ip, last_lease]
            .into_iter()
            .flatten()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        status.port_maps = Some(self.port_maps_to(name.as_str(), targets).await?);
        Ok(status)
    }

    /// `GET /vms/{name}/ip`: waits (without holding a thread) until the network's DHCP
    /// server has a lease for the VM's MAC, up to `timeout`.
    pub async fn ip(
        &self,
        name: &VmName,
        network: Option<String>,
        timeout: Duration,
    ) -> Result<IpAddr, VmError> {
        let row = self.row(name).await?;
        // A pinned VM's address is known before it boots: no lease to wait for.
        if let Some(r) = &row
            && let Some(ip) = r.pinned_ip
            && network.as_ref().is_none_or(|n| *n == r.network_name)
        {
            return Ok(ip);
        }
        let (mac, net) = match &row {
            Some(r) => (
                r.mac.clone(),
                network.unwrap_or_else(|| r.network_name.clone()),
            ),
            None => {
                let (mac, nic_net) = self.nic_of(name).await?;
                (mac, network.unwrap_or(nic_net))
            }
        };
        crate::vm::spec::check_name("network", &net)?;
        let ip = self.wait_for_lease(name, &mac, &net, timeout).await?;
        if row.is_some() {
            let n = name.to_string();
            let _ = self
                .store
                .run(move |s| s.with(|c| vms::set_last_ip(c, &n, ip)))
                .await;
        }
        Ok(ip)
    }

    /// The first NIC of a domain the agent has no row for.
    async fn nic_of(&self, name: &VmName) -> Result<(MacAddr, String), VmError> {
        let n = name.to_string();
        let domain = self
            .driver
            .ask(move |hv, call| hv.domain(call, &n))
            .await?
            .ok_or_else(|| NotFound::Vm(name.to_string()))?;
        let nic = domain
            .nics
            .into_iter()
            .next()
            .ok_or_else(|| NotFound::NoInterface(name.to_string()))?;
        Ok((nic.mac, nic.network))
    }

    /// Asks for `mac`'s lease every `lease_poll` until there is one or `timeout` ran out.
    async fn wait_for_lease(
        &self,
        name: &VmName,
        mac: &MacAddr,
        net: &str,
        timeout: Duration,
    ) -> Result<IpAddr, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let (m, n) = (mac.clone(), net.to_string());
            let found = self
                .driver
                .ask(move |hv, call| Ok::<_, VmError>(ipv4_of(&hv.leases(call, &n, &m)?, &m)))
                .await
                .map_err(|e| match e {
                    VmError::Libvirt(f) if f.is_not_found() => {
                        NotFound::Network(net.to_owned()).into()
                    }
                    e => e,
                })?;
            if let Some(ip) = found {
                return Ok(IpAddr::V4(ip));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::Timeout(NoLease {
                    name: name.to_string(),
                    mac: mac.to_string(),
                    network: net.to_owned(),
                    waited: timeout,
                }));
            }
            tokio::time::sleep(self.cfg.lease_poll.min(deadline - now)).await;
        }
    }

    /// The port maps that name VM `vm` or whose target is one of `targets`, as
    /// `GET /ports` lists them (without counters). Rows are streamed and filtered: a node
    /// with 10,000 maps does not copy them all.
    async fn port_maps_to(
        &self,
        vm: &str,
        targets: Vec<Ipv4Addr>,
    ) -> Result<Vec<super::VmPortMap>, VmError> {
        let vm = vm.to_owned();
        let found = self
            .store
            .run(move |s| {
                s.with(|c| {
                    let mut out = Vec::new();
                    crate::store::portmaps::for_each(c, |r| {
                        if targets.contains(&r.map.target_ip)
                            || r.target_vm.as_deref() == Some(vm.as_str())
                        {
                            out.push(super::VmPortMap::from(r.clone()));
                        }
                        Ok(())
                    })?;
                    Ok::<_, crate::store::StoreError>(out)
                })
            })
            .await?;
        Ok(found)
    }

    /// `GET /vms/{name}/console`: the last `max` bytes of the serial console log.
    pub async fn console(&self, name: &VmName, max: u64) -> Result<String, VmError> {
        if self.row(name).await?.is_none() {
            return Err(NotFound::ManagedVm(name.to_string()).into());
        }
        let n = name.to_string();
        let bytes = self
            .driver
            .ask(move |hv, call| hv.console_tail(call, &n, max))
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// (total, running) domains, for `GET /stats`, from the last observation.
    pub async fn counts(&self) -> Result<(usize, usize), VmError> {
        let seen = self.observation().await?;
        let running = seen.domains.values().filter(|s| s.domain.active).count();
        Ok((seen.domains.len(), running))
    }
}

/// What an observation says of the agent's VMs.
enum States {
    /// A full listing: the state of every domain; a VM not in it is `missing`.
    Listing(std::collections::BTreeMap<String, VmState>),
    /// One domain, observed on its own (`missing`: libvirt has no such domain).
    One(String, VmState),
}

/// Keeps `vms.last_state` as the last observation (the reads answer from memory; this
/// is for those who audit the node with `sqlite3`). Only changed rows are written.
async fn record_states(store: &Store, states: States) {
    let written = store
        .run(move |s| {
            s.with(|c| {
                let pairs = match states {
                    States::One(name, state) => vec![(name, state)],
                    States::Listing(seen) => vms::list(c)?
                        .into_iter()
                        .map(|r| {
                            let state = seen
                                .get(r.name.as_str())
                                .copied()
                                .unwrap_or(VmState::Missing);
                            (r.name.to_string(), state)
                        })
                        .collect(),
                };
                vms::set_last_states(c, &pairs)
            })
        })
        .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot record the VMs' observed states");
    }
}

/// Events waiting to be handled; more at once are dropped (a read's listing, at most
/// `observed::FRESH` old, covers what a dropped event would have said).
const EVENTS_QUEUE: usize = 1024;

/// The event stream's kind for a domain's event, and its detail.
fn published(kind: EventKind) -> (crate::events::Kind, serde_json::Value) {
    use crate::events::Kind;
    let plain = |k| (k, serde_json::Value::Null);
    match kind {
        EventKind::Defined => plain(Kind::VmDefined),
        EventKind::Undefined => plain(Kind::VmUndefined),
        EventKind::Started => plain(Kind::VmStarted),
        EventKind::Suspended => plain(Kind::VmSuspended),
        EventKind::Resumed => plain(Kind::VmResumed),
        EventKind::Stopped(reason) => (Kind::VmStopped, serde_json::json!({ "reason": reason })),
        EventKind::Shutdown => plain(Kind::VmShutdown),
        EventKind::PmSuspended => plain(Kind::VmPmSuspended),
        EventKind::Crashed => plain(Kind::VmCrashed),
    }
}

fn status_of(name: &str, seen: &Seen, row: Option<&VmRow>) -> VmStatus {
    let d = &seen.domain;
    let nic = d.nics.first();
    let (ip, ip_source) = row.map(IpSource::of).unwrap_or_default();
    VmStatus {
        name: name.to_string(),
        active: d.active,
        state: d.state,
        uuid: if d.uuid.is_empty() {
            row.map(|r| r.uuid.clone()).unwrap_or_default()
        } else {
            d.uuid.clone()
        },
        instance_id: row
            .map(|r| r.instance_id.clone())
            .or_else(|| d.instance_id.clone()),
        managed: row.is_some(),
        ip,
        ip_source,
        pinned_ip: row.and_then(|r| r.pinned_ip),
        mac: nic
            .map(|n| n.mac.to_string())
            .or_else(|| row.map(|r| r.mac.to_string())),
        network: nic
            .map(|n| n.network.clone())
            .or_else(|| row.map(|r| r.network_name.clone())),
        memory_mib: row.map(|r| r.memory_mib),
        vcpus: row.map(|r| r.vcpus),
        image: row.and_then(|r| r.image.clone()),
        desired_state: row.map(|r| r.desired_state),
        created_at: row.map(|r| r.created_at.clone()),
        observed_at: seen.at.map(iso_utc),
        error: None,
        port_maps: None,
    }
}

/// A row whose domain the last listing did not show: `missing` (the reconcile defines
/// it again).
fn missing_status(r: &VmRow, listed_at: Option<SystemTime>) -> VmStatus {
    let (ip, ip_source) = IpSource::of(r);
    VmStatus {
        name: r.name.to_string(),
        active: false,
        state: VmState::Missing,
        uuid: r.uuid.clone(),
        instance_id: Some(r.instance_id.clone()),
        managed: true,
        ip,
        ip_source,
        pinned_ip: r.pinned_ip,
        mac: Some(r.mac.to_string()),
        network: Some(r.network_name.clone()),
        memory_mib: Some(r.memory_mib),
        vcpus: Some(r.vcpus),
        image: r.image.clone(),
        desired_state: Some(r.desired_state),
        created_at: Some(r.created_at.clone()),
        observed_at: listed_at.map(iso_utc),
        error: None,
        port_maps: None,
    }
}

/// A create the database does not hold yet: `creating`, or `failed` after its request
/// stopped waiting.
fn pending_status(name: &str, pending: &Pending) -> VmStatus {
    VmStatus {
        name: name.to_string(),
        active: false,
        state: match pending {
            Pending::Creating => VmState::Creating,
            Pending::Failed(_) => VmState::Failed,
        },
        uuid: String::new(),
        instance_id: None,
        managed: true,
        ip: None,
        ip_source: None,
        mac: None,
        network: None,
        memory_mib: None,
        vcpus: None,
        image: None,
        desired_state: Some(DesiredState::Running),
        created_at: None,
        observed_at: None,
        error: match pending {
            Pending::Creating => None,
            Pending::Failed(e) => Some(e.clone()),
        },
        pinned_ip: None,
        port_maps: None,
    }
}
