//! The VM lifecycle: SQLite holds each VM as the operator asked for it, libvirt is made
//! to match. Handlers call one method each; every libvirt call runs through `Libvirt`
//! (off the runtime, bounded, reconnecting).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::abandoned::{self, Abandoned, Attempt};
use super::claims::{Claim, Claims};
use super::domain::{
    build_vm, check_guest_support, domain_state, ensure_network, existing, facts, hairpin, lookup,
    random_mac, reconcile_one, remove_vm,
};
use super::images::Images;
use super::spec::{CreateVm, Limits};
use super::{Libvirt, VmError, leases, seed, storage, xml};
use crate::portmap::PortMaps;
use crate::store::vms::{self, SeedInputs, VmRow};
use crate::store::{Store, audit};

/// The settings the VM layer needs, taken from `Settings` once.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub pool: String,
    /// The pool's directory as the libvirt host sees it.
    pub pool_dir: String,
    pub domain_type: String,
    pub default_network: String,
    pub default_arch: String,
    pub default_image: String,
    /// Where the default image comes from on first use ("" = never downloaded).
    pub default_image_url: String,
    pub default_keys: Vec<String>,
    pub limits: Limits,
    pub stop_timeout: Duration,
    /// How often `/ip` asks libvirt for the lease while waiting.
    pub lease_poll: Duration,
    /// LIBVIRT_URI reaches a libvirtd on this host ([`super::conn::is_local_uri`]), so
    /// the domains' taps may be bridge ports here (hairpin mode is set on them).
    pub local: bool,
}

/// What `POST /vms` answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Created {
    pub name: String,
    pub uuid: String,
    pub mac: String,
    pub instance_id: String,
    pub hostname: String,
    pub image: Option<String>,
    pub recreated: bool,
}

/// One VM as `GET /vms` and `/status` show it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct VmStatus {
    pub name: String,
    pub active: bool,
    pub state: String,
    pub uuid: String,
    /// Created (and so deletable) by this agent.
    pub managed: bool,
    pub ip: Option<String>,
    pub mac: Option<String>,
    pub network: Option<String>,
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub image: Option<String>,
    pub desired_state: Option<String>,
    pub created_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Deleted {
    pub name: String,
    pub deleted_files: bool,
    /// Port maps that targeted the VM's address, removed with it (see docs/decisions.md).
    pub removed_port_maps: Vec<String>,
}

pub struct Vms {
    lv: Arc<Libvirt>,
    store: Store,
    cfg: VmConfig,
    portmaps: Option<Arc<PortMaps>>,
    images: Option<Arc<Images>>,
    /// Names with an operation in progress: a second request gets 409 instead of
    /// racing; a request waits for the reconcile's look at the VM.
    claims: Claims,
    /// Creates answered 503 while their libvirt work was unfinished (`abandoned.rs`).
    abandoned: Abandoned,
}

/// Releases a claimed name when the operation ends, however it ends.
impl Vms {
    /// The bounds of a new VM (VM_MAX_*).
    pub fn limits(&self) -> &crate::vm::spec::Limits {
        &self.cfg.limits
    }

    pub fn new(
        lv: Arc<Libvirt>,
        store: Store,
        cfg: VmConfig,
        portmaps: Option<Arc<PortMaps>>,
    ) -> Self {
        Self {
            lv,
            store,
            cfg,
            portmaps,
            images: None,
            claims: Claims::default(),
            abandoned: Abandoned::default(),
        }
    }

    /// Lets `create` fetch the default image on first use.
    pub fn with_images(mut self, images: Arc<Images>) -> Self {
        self.images = Some(images);
        self
    }

    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    pub fn libvirt(&self) -> &Arc<Libvirt> {
        &self.lv
    }

    /// Claims `name` for a request: refused while another request works on it, waits
    /// (up to one libvirt call's timeout) while the reconcile looks at it.
    async fn claim(&self, name: &str) -> Result<Claim<'_>, VmError> {
        self.claims.for_request(name, self.lv.timeout()).await
    }

    async fn row(&self, name: &str) -> Result<Option<VmRow>, VmError> {
        let name = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::get(c, &name)))
            .await
            .map_err(VmError::from)
    }

    /// `POST /vms`.
    pub async fn create(&self, req: CreateVm, by: &str) -> Result<Created, VmError> {
        req.validate(&self.cfg.limits)?;
        let _claim = self.claim(&req.name).await?;
        let existing = self.row(&req.name).await?;
        if existing.is_some() && !req.recreate {
            return Err(VmError::Conflict(format!(
                "VM {} already exists; pass \"recreate\": true to replace it with a fresh one",
                req.name
            )));
        }
        let image_name = match (&req.image, &req.kernel) {
            (Some(i), _) => Some(i.clone()),
            (None, Some(_)) => None,
            (None, None) => Some(self.cfg.default_image.clone()),
        };
        let image = match &image_name {
            None => None,
            Some(n) => {
                let n2 = n.clone();
                let row = self
                    .store
                    .run(move |s| s.with(|c| vms::image(c, &n2)))
                    .await?;
                match row {
                    Some(r) if r.state == "ready" => Some(r),
                    Some(r) if r.state == "downloading" => {
                        return Err(VmError::Conflict(format!(
                            "image {n} is still downloading; see GET /images"
                        )));
                    }
                    _ if *n == self.cfg.default_image
                        && !self.cfg.default_image_url.is_empty()
                        && self.images.is_some() =>
                    {
                        if let Some(images) = &self.images {
                            images
                                .download(n, &self.cfg.default_image_url, None, "agent (first use)")
                                .await?;
                        }
                        return Err(VmError::Unavailable(format!(
                            "the default image {n} is being downloaded from {}; retry when GET /images shows it ready",
                            self.cfg.default_image_url
                        )));
                    }
                    _ => {
                        return Err(VmError::NotFound(format!(
                            "image {n} is not available; add it with POST /images (see GET /images)"
                        )));
                    }
                }
            }
        };
        let keys = req
            .ssh_authorized_keys
            .clone()
            .unwrap_or_else(|| self.cfg.default_keys.clone());
        let uuid = uuid::Uuid::new_v4().to_string();
        let instance_id = format!("iid-{uuid}");
        let hostname = req.effective_hostname();
        let seed_bytes = seed::build(&seed::SeedSpec {
            instance_id: &instance_id,
            hostname: &hostname,
            ssh_authorized_keys: &keys,
            user_data: req.user_data.as_deref(),
            network_config: req.network_config.as_deref(),
        })
        .map_err(|e| VmError::Libvirt(e.to_string()))?;
        // A recreated VM keeps its MAC, so DHCP gives it its address again and the
        // port maps that point at it keep working; everything else is new.
        let keep_mac = existing
            .as_ref()
            .filter(|_| req.recreate)
            .map(|r| r.mac.clone());
        let mut mac = keep_mac.clone().unwrap_or_else(random_mac);
        if keep_mac.is_none() {
            let store = self.store.clone();
            for _ in 0..16 {
                let m = mac.clone();
                let s = store.clone();
                let used = tokio::task::spawn_blocking(move || s.with(|c| vms::mac_in_use(c, &m)))
                    .await
                    .map_err(|e| VmError::Libvirt(e.to_string()))??;
                if !used {
                    break;
                }
                mac = random_mac();
            }
        }
        let row = VmRow {
            name: req.name.clone(),
            uuid: uuid.clone(),
            instance_id: instance_id.clone(),
            hostname: hostname.clone(),
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            disk_size_gb: req.disk_size_gb,
            network_name: req
                .network_name
                .clone()
                .unwrap_or_else(|| self.cfg.default_network.clone()),
            os_arch: req
                .os_arch
                .clone()
                .unwrap_or_else(|| self.cfg.default_arch.clone()),
            domain_type: self.cfg.domain_type.clone(),
            image: image_name.clone(),
            mac: mac.clone(),
            kernel: req.kernel.clone(),
            initrd: req.initrd.clone(),
            cmdline: req.cmdline.clone(),
            ssh_keys: keys.len() as u32,
            user_data: req.user_data.is_some(),
            disk_volume: storage::disk_volume(&req.name),
            seed_volume: storage::seed_volume(&req.name),
            desired_state: "running".into(),
            last_state: None,
            last_ip: None,
            last_ip_at: None,
            created_at: String::new(),
            updated_at: String::new(),
            created_by: by.to_string(),
        };
        let cfg = self.cfg.clone();
        let recreate = req.recreate;
        let had_row = existing.is_some();
        let row2 = row.clone();
        // What an earlier create of this name left when its client got a 503: removed
        // first; while that one still works in libvirt (or may, see abandoned.rs), this
        // one would race it.
        self.clean_abandoned(&req.name).await?;
        if self.abandoned.contains(&req.name) {
            return Err(VmError::Unavailable(format!(
                "an earlier create of {} got a 503 and libvirt may still carry out what it \
                 sent; retry in {} s",
                req.name,
                abandoned::SETTLE.as_secs()
            )));
        }
        let (attempt, marks) = Attempt::new(&req.name, &instance_id);
        let recreated = self
            .lv
            .call(move |conn| {
                // Dropped with the closure: run or not, this attempt is over then.
                marks.started();
                check_guest_support(conn, &row2.os_arch, &row2.domain_type)?;
                ensure_network(conn, &row2.network_name)?;
                let node = conn.node_info().map_err(|e| VmError::libvirt("host memory", e))?;
                if u64::from(row2.memory_mib) * 1024 > node.memory {
                    return Err(VmError::Invalid(format!(
                        "memory_mib {} is more than the host has ({} MiB)",
                        row2.memory_mib,
                        node.memory / 1024
                    )));
                }
                if let Ok(max) = conn.max_vcpus(Some(&row2.domain_type))
                    && row2.vcpus > max
                {
                    return Err(VmError::Invalid(format!(
                        "vcpus {} is more than libvirt allows for {} domains ({max})",
                        row2.vcpus, row2.domain_type
                    )));
                }
                let t0 = Instant::now();
                let dom = lookup(conn, &row2.name)?;
                let ours = match &dom {
                    Some(d) => had_row || facts(d)?.instance_id.is_some(),
                    None => had_row,
                };
                let exists = dom.is_some() || had_row;
                if exists && !recreate {
                    return Err(VmError::Conflict(format!(
                        "VM {} already exists; pass \"recreate\": true to replace it with a fresh one",
                        row2.name
                    )));
                }
                if dom.is_some() && !ours {
                    return Err(VmError::Conflict(format!(
                        "domain {} was not created by this agent; it is never replaced or deleted by it",
                        row2.name
                    )));
                }
                // Fresh disk and seed, always: leftovers of a VM deleted without its
                // files, or of the VM being recreated, must not be reused.
                remove_vm(conn, &cfg, &row2.name, dom, true)?;
                let t1 = Instant::now();
                build_vm(conn, &cfg, &row2, image.as_ref(), &seed_bytes, true)?;
                tracing::debug!(
                    clear_ms = (t1 - t0).as_secs_f64() * 1000.0,
                    build_ms = t1.elapsed().as_secs_f64() * 1000.0,
                    "VM create steps"
                );
                Ok(exists)
            })
            .await;
        let recreated = match recreated {
            // Cut off or still running in libvirt: remembered, and undone once it has
            // returned (a recreate's row is the old VM, which the reconcile restores).
            Err(e @ VmError::Unavailable(_)) if !recreate => {
                self.abandoned.add(attempt);
                return Err(e);
            }
            r => r.map_err(|e| blame_boot_files(e, &row))?,
        };
        let row3 = row.clone();
        let inputs = SeedInputs {
            ssh_authorized_keys: keys,
            user_data: req.user_data.clone(),
            network_config: req.network_config.clone(),
        };
        let saved = self
            .store
            .run(move |s| s.transaction(|tx| vms::upsert(tx, &row3, &inputs)))
            .await;
        if let Err(e) = saved {
            // The database refused: take the VM away again so both agree.
            let cfg = self.cfg.clone();
            let name = row.name.clone();
            let _ = self
                .lv
                .call(move |conn| {
                    let dom = lookup(conn, &name)?;
                    remove_vm(conn, &cfg, &name, dom, true)
                })
                .await;
            return Err(e.into());
        }
        tracing::info!(vm = %row.name, uuid = %uuid, mac = %mac, recreated, "VM created");
        Ok(Created {
            name: row.name,
            uuid,
            mac,
            instance_id,
            hostname,
            image: image_name,
            recreated,
        })
    }

    /// `GET /vms`: the agent's VMs and every other domain libvirt knows.
    pub async fn list(&self) -> Result<Vec<VmStatus>, VmError> {
        let rows = self.store.run(|s| s.with(vms::list)).await?;
        let listed = self
            .lv
            .call(|conn| {
                let doms = conn
                    .list_all_domains(0)
                    .map_err(|e| VmError::libvirt("listing domains", e))?;
                let mut out = Vec::new();
                for d in doms {
                    let name = d.name().map_err(|e| VmError::libvirt("domain name", e))?;
                    let (active, state) = domain_state(&d)?;
                    let f = facts(&d).unwrap_or_default();
                    out.push((name, active, state, f));
                }
                Ok(out)
            })
            .await?;
        let mut result = Vec::new();
        for (name, active, state, f) in listed {
            let row = rows.iter().find(|r| r.name == name);
            result.push(status_of(&name, active, state, &f, row));
        }
        for r in &rows {
            if !result.iter().any(|s| s.name == r.name) {
                result.push(missing_status(r));
            }
        }
        result.sort_by(|a, b| a.name.cmp(&b.name));
        let store = self.store.clone();
        let seen: Vec<(String, String)> = result
            .iter()
            .filter(|s| s.managed)
            .map(|s| (s.name.clone(), s.state.clone()))
            .collect();
        let _ = store
            .run(move |s| {
                s.with(|c| {
                    for (n, st) in &seen {
                        vms::set_last_state(c, n, st)?;
                    }
                    Ok::<_, crate::store::StoreError>(())
                })
            })
            .await;
        Ok(result)
    }

    /// `GET /vms/{name}/status`.
    pub async fn status(&self, name: &str) -> Result<VmStatus, VmError> {
        let row = self.row(name).await?;
        let n = name.to_string();
        let found = self
            .lv
            .call(move |conn| match lookup(conn, &n)? {
                Some(d) => {
                    let (active, state) = domain_state(&d)?;
                    Ok(Some((active, state, facts(&d).unwrap_or_default())))
                }
                None => Ok(None),
            })
            .await?;
        match (found, row) {
            (Some((active, state, f)), row) => Ok(status_of(name, active, state, &f, row.as_ref())),
            (None, Some(row)) => Ok(missing_status(&row)),
            (None, None) => Err(VmError::NotFound(format!("no VM named {name}"))),
        }
    }

    async fn set_desired(&self, name: &str, state: &'static str) -> Result<(), VmError> {
        let n = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::set_desired_state(c, &n, state)))
            .await
            .map_err(VmError::from)
    }

    /// `POST /vms/{name}/start`; true when it was already running.
    pub async fn start(&self, name: &str) -> Result<bool, VmError> {
        let _claim = self.claim(name).await?;
        let n = name.to_string();
        let cfg = self.cfg.clone();
        let was_running = self
            .lv
            .call(move |conn| {
                let d = existing(conn, &n)?;
                if d.is_active()
                    .map_err(|e| VmError::libvirt("domain state", e))?
                {
                    return Ok(true);
                }
                d.create()
                    .map_err(|e| VmError::libvirt(format!("starting {n}"), e))?;
                hairpin(&cfg, &d);
                Ok(false)
            })
            .await?;
        self.set_desired(name, "running").await?;
        Ok(was_running)
    }

    /// `POST /vms/{name}/stop`: ACPI shutdown, forced off after VM_STOP_TIMEOUT (or at
    /// once with `force`). Returns whether it had to be forced.
    pub async fn stop(&self, name: &str, force: bool) -> Result<bool, VmError> {
        let _claim = self.claim(name).await?;
        let n = name.to_string();
        let active = self
            .lv
            .call(move |conn| {
                let d = existing(conn, &n)?;
                let active = d
                    .is_active()
                    .map_err(|e| VmError::libvirt("domain state", e))?;
                if active && !force {
                    d.shutdown()
                        .map_err(|e| VmError::libvirt(format!("shutting {n} down"), e))?;
                }
                Ok(active)
            })
            .await?;
        let mut forced = false;
        if active {
            let deadline = Instant::now()
                + if force {
                    Duration::ZERO
                } else {
                    self.cfg.stop_timeout
                };
            loop {
                let n = name.to_string();
                let still = self
                    .lv
                    .call(move |conn| match lookup(conn, &n)? {
                        Some(d) => d
                            .is_active()
                            .map_err(|e| VmError::libvirt("domain state", e)),
                        None => Ok(false),
                    })
                    .await?;
                if !still {
                    break;
                }
                if Instant::now() >= deadline {
                    let n = name.to_string();
                    self.lv
                        .call(move |conn| {
                            if let Some(d) = lookup(conn, &n)?
                                && d.is_active().unwrap_or(false)
                            {
                                d.destroy()
                                    .map_err(|e| VmError::libvirt(format!("forcing {n} off"), e))?;
                            }
                            Ok(())
                        })
                        .await?;
                    forced = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        self.set_desired(name, "stopped").await?;
        Ok(forced)
    }

    /// `POST /vms/{name}/reboot` (ACPI; the guest decides how).
    pub async fn reboot(&self, name: &str) -> Result<(), VmError> {
        let _claim = self.claim(name).await?;
        let n = name.to_string();
        self.lv
            .call(move |conn| {
                let d = existing(conn, &n)?;
                if !d
                    .is_active()
                    .map_err(|e| VmError::libvirt("domain state", e))?
                {
                    return Err(VmError::Conflict(format!(
                        "{n} is not running; start it instead"
                    )));
                }
                d.reboot(0)
                    .map_err(|e| VmError::libvirt(format!("rebooting {n}"), e))
            })
            .await
    }

    /// `DELETE /vms/{name}`. Domains the agent did not create are refused.
    pub async fn delete(&self, name: &str, delete_files: bool) -> Result<Deleted, VmError> {
        let _claim = self.claim(name).await?;
        let row = self.row(name).await?;
        let n = name.to_string();
        let cfg = self.cfg.clone();
        let had_row = row.is_some();
        let row_ip = row.as_ref().and_then(|r| r.last_ip.clone());
        let (mac, network) = match &row {
            Some(r) => (Some(r.mac.clone()), Some(r.network_name.clone())),
            None => (None, None),
        };
        let lease_ip = self
            .lv
            .call(move |conn| {
                let dom = lookup(conn, &n)?;
                let ours = match &dom {
                    Some(d) => had_row || facts(d)?.instance_id.is_some(),
                    None => had_row,
                };
                if dom.is_none() && !had_row {
                    return Err(VmError::NotFound(format!("no VM named {n}")));
                }
                if !ours {
                    return Err(VmError::Conflict(format!(
                        "domain {n} was not created by this agent; it is never deleted by it"
                    )));
                }
                // The address it holds now, so port maps to it can go with it.
                let mut ip = None;
                if let (Some(mac), Some(net)) = (&mac, &network)
                    && let Ok(net) = conn.lookup_network_by_name(net)
                {
                    ip = leases::leases(&net, Some(mac))
                        .ok()
                        .and_then(|l| leases::ipv4_of(&l, mac));
                }
                remove_vm(conn, &cfg, &n, dom, delete_files)?;
                Ok(ip)
            })
            .await?;
        let n = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::delete(c, &n)))
            .await?;
        let mut removed = Vec::new();
        if let Some(pm) = &self.portmaps {
            let ips: Vec<String> = [row_ip, lease_ip].into_iter().flatten().collect();
            if !ips.is_empty() {
                let pm = Arc::clone(pm);
                let vm = name.to_string();
                removed = tokio::task::spawn_blocking(move || {
                    let mut removed = Vec::new();
                    for m in pm.list().unwrap_or_default() {
                        if !ips.contains(&m.map.target_ip.to_string()) {
                            continue;
                        }
                        // The operator asked for the VM's deletion, not for this: the
                        // audit trail says why the map went, in the map's own transaction.
                        let entry = audit::Entry {
                            client_addr: None,
                            identity: "agent".into(),
                            action: "DELETE /ports (VM deleted)".into(),
                            parameters: Some(
                                serde_json::json!({
                                    "vm": vm,
                                    "listen_port": m.map.listen_port,
                                    "proto": m.map.proto.to_string(),
                                    "target": format!("{}:{}", m.map.target_ip, m.map.target_port),
                                })
                                .to_string(),
                            ),
                            outcome: audit::Outcome::Ok,
                            status: None,
                            error: None,
                        };
                        match pm.delete(m.map.proto, m.map.listen_port, Some(&entry)) {
                            Ok(Some(gone)) => removed.push(format!(
                                "{}/{} -> {}:{}",
                                gone.listen_port, gone.proto, gone.target_ip, gone.target_port
                            )),
                            Ok(None) => {}
                            Err(e) => tracing::error!(
                                vm = %vm, map = %m.map.rule_id(), error = %e,
                                "could not remove a port map of the deleted VM"
                            ),
                        }
                    }
                    removed
                })
                .await
                .unwrap_or_default();
            }
        }
        tracing::info!(
            vm = name,
            delete_files,
            removed_port_maps = removed.len(),
            "VM deleted"
        );
        Ok(Deleted {
            name: name.to_string(),
            deleted_files: delete_files,
            removed_port_maps: removed,
        })
    }

    /// `GET /vms/{name}/ip`: waits (without holding a thread) until the network's DHCP
    /// server has a lease for the VM's MAC, up to `timeout`.
    pub async fn ip(
        &self,
        name: &str,
        network: Option<String>,
        timeout: Duration,
    ) -> Result<String, VmError> {
        let row = self.row(name).await?;
        let (mac, net) = match &row {
            Some(r) => (
                r.mac.clone(),
                network.unwrap_or_else(|| r.network_name.clone()),
            ),
            None => {
                let n = name.to_string();
                let f = self
                    .lv
                    .call(move |conn| {
                        let d = existing(conn, &n)?;
                        facts(&d)
                    })
                    .await?;
                let (mac, fnet) =
                    f.interfaces.first().cloned().ok_or_else(|| {
                        VmError::NotFound(format!("{name} has no network interface"))
                    })?;
                (mac, network.unwrap_or(fnet))
            }
        };
        super::spec::check_name("network", &net)?;
        let deadline = Instant::now() + timeout;
        loop {
            let (m, n) = (mac.clone(), net.clone());
            let found = self
                .lv
                .call(move |conn| {
                    let netw = conn.lookup_network_by_name(&n).map_err(|e| {
                        let e = VmError::libvirt(format!("network {n}"), e);
                        if e.is_not_found() {
                            VmError::NotFound(format!("no network named {n}"))
                        } else {
                            e
                        }
                    })?;
                    Ok(leases::ipv4_of(&leases::leases(&netw, Some(&m))?, &m))
                })
                .await?;
            if let Some(ip) = found {
                if row.is_some() {
                    let (n, i) = (name.to_string(), ip.clone());
                    let _ = self
                        .store
                        .run(move |s| s.with(|c| vms::set_last_ip(c, &n, &i)))
                        .await;
                }
                return Ok(ip);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::Timeout(format!(
                    "no DHCP lease for {name} ({mac}) on network {net} within {} s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(self.cfg.lease_poll.min(deadline - now)).await;
        }
    }

    /// `GET /vms/{name}/console`: the last `max` bytes of the serial console log.
    pub async fn console(&self, name: &str, max: u64) -> Result<String, VmError> {
        let n = name.to_string();
        let cfg = self.cfg.clone();
        let row = self.row(name).await?;
        if row.is_none() {
            return Err(VmError::NotFound(format!(
                "no VM named {name} managed by this agent"
            )));
        }
        let bytes = self
            .lv
            .call(move |conn| {
                let pool = storage::ensure_pool(conn, &cfg.pool, &cfg.pool_dir)?;
                let _ = pool.refresh(0);
                match storage::find_volume(&pool, &storage::console_volume(&n))? {
                    Some(v) => storage::tail(conn, &v, max),
                    None => Ok(Vec::new()),
                }
            })
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// (total, running) domains, for `GET /stats`.
    pub async fn counts(&self) -> Result<(usize, usize), VmError> {
        self.lv
            .call(|conn| {
                let doms = conn
                    .list_all_domains(0)
                    .map_err(|e| VmError::libvirt("listing domains", e))?;
                let running = doms
                    .iter()
                    .filter(|d| d.is_active().unwrap_or(false))
                    .count();
                Ok((doms.len(), running))
            })
            .await
    }

    /// Makes libvirt match the rows: a VM whose domain vanished is defined again (its
    /// volumes re-created if they vanished too) and started if it should run. Domains
    /// the agent did not create are never touched. Returns what was repaired.
    pub async fn reconcile(&self) -> Result<Vec<String>, VmError> {
        for name in self.abandoned.ready() {
            let Some(_claim) = self.claims.for_reconcile(&name) else {
                continue;
            };
            match self.clean_abandoned(&name).await {
                Ok(()) => {}
                Err(e @ VmError::Unavailable(_)) => return Err(e),
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "cannot remove what an abandoned create made")
                }
            }
        }
        let rows = self.store.run(|s| s.with(vms::list)).await?;
        let images = Arc::new(self.store.run(|s| s.with(vms::images)).await?);
        let mut repaired = Vec::new();
        for row in rows {
            // A VM with an operation in flight is that operation's business; holding the
            // claim keeps a create or delete from starting while this repairs the row.
            let Some(_claim) = self.claims.for_reconcile(&row.name) else {
                continue;
            };
            // Read again under the claim: a delete that finished since the list above
            // must not be undone.
            let name = row.name.clone();
            let n = name.clone();
            let fresh = self
                .store
                .run(move |s| {
                    s.with(|c| {
                        Ok::<_, crate::store::StoreError>((vms::get(c, &n)?, vms::seed(c, &n)?))
                    })
                })
                .await?;
            let (Some(row), seed) = fresh else {
                continue;
            };
            let cfg = self.cfg.clone();
            let images = Arc::clone(&images);
            let result = self
                .lv
                .call(move |conn| reconcile_one(conn, &cfg, &row, seed.as_ref(), &images))
                .await;
            match result {
                Ok(done) if done.is_empty() => {}
                Ok(done) => {
                    tracing::warn!(vm = %name, repaired = ?done, "libvirt did not match the database; repaired");
                    // The operator did not ask for this: the audit trail says what the
                    // agent did on its own.
                    let entry = audit::Entry {
                        client_addr: None,
                        identity: "agent".into(),
                        action: "reconcile VM".into(),
                        parameters: Some(
                            serde_json::json!({"vm": name, "repaired": done}).to_string(),
                        ),
                        outcome: audit::Outcome::Ok,
                        status: None,
                        error: None,
                    };
                    let written = self
                        .store
                        .run(move |s| s.with(|c| audit::record(c, &entry)))
                        .await;
                    if let Err(e) = written {
                        tracing::error!(error = %e, "could not write the audit row");
                    }
                    repaired.extend(done.iter().map(|d| format!("{name}: {d}")));
                }
                Err(e @ VmError::Unavailable(_)) => return Err(e),
                Err(e) => tracing::error!(vm = %name, error = %e, "cannot restore the VM's domain"),
            }
        }
        Ok(repaired)
    }
}

impl Vms {
    /// One cleanup pass over what an abandoned create of `name` made, once its libvirt
    /// work has returned (`abandoned.rs`). The caller holds the name's claim.
    async fn clean_abandoned(&self, name: &str) -> Result<(), VmError> {
        let Some(mut attempt) = self.abandoned.take_ready(name) else {
            return Ok(());
        };
        if !attempt.started() {
            return Ok(());
        }
        // A row: a later create (a recreate) of the name succeeded; it removed what this
        // one made before it built its own.
        let row = match self.row(name).await {
            Ok(r) => r,
            Err(e) => {
                self.abandoned.put_back(attempt);
                return Err(e);
            }
        };
        if row.is_some() {
            return Ok(());
        }
        let (cfg, n, iid) = (
            self.cfg.clone(),
            name.to_string(),
            attempt.instance_id().to_string(),
        );
        let removed = match self
            .lv
            .call(move |conn| abandoned::clean(conn, &cfg, &n, &iid))
            .await
        {
            Ok(abandoned::Cleaned::NotOurs) => return Ok(()),
            Ok(abandoned::Cleaned::Removed(r)) => r,
            Err(e) => {
                self.abandoned.put_back(attempt);
                return Err(e);
            }
        };
        if !attempt.settled_after(!removed.is_empty()) {
            self.abandoned.put_back(attempt);
        }
        if removed.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            vm = name,
            ?removed,
            "removed what a create answered with 503 had made"
        );
        // The operator did not ask for this: the audit trail says what the agent did.
        let entry = audit::Entry {
            client_addr: None,
            identity: "agent".into(),
            action: "remove abandoned create".into(),
            parameters: Some(serde_json::json!({"vm": name, "removed": removed}).to_string()),
            outcome: audit::Outcome::Ok,
            status: None,
            error: None,
        };
        if let Err(e) = self
            .store
            .run(move |s| s.with(|c| audit::record(c, &entry)))
            .await
        {
            tracing::error!(error = %e, "could not write the audit row");
        }
        Ok(())
    }
}

/// A libvirt failure that names the request's `kernel` or `initrd` (libvirt could not
/// stat or read it) is the request's fault: 400, not 500.
fn blame_boot_files(e: VmError, row: &VmRow) -> VmError {
    match e {
        VmError::Libvirt(m)
            if [&row.kernel, &row.initrd]
                .into_iter()
                .flatten()
                .any(|p| m.contains(p.as_str())) =>
        {
            VmError::Invalid(format!(
                "{m} (kernel and initrd must be files the libvirt host can read)"
            ))
        }
        e => e,
    }
}

fn status_of(
    name: &str,
    active: bool,
    state: &str,
    f: &xml::DomainFacts,
    row: Option<&VmRow>,
) -> VmStatus {
    let iface = f.interfaces.first();
    VmStatus {
        name: name.to_string(),
        active,
        state: state.to_string(),
        uuid: if f.uuid.is_empty() {
            row.map(|r| r.uuid.clone()).unwrap_or_default()
        } else {
            f.uuid.clone()
        },
        managed: row.is_some(),
        ip: row.and_then(|r| r.last_ip.clone()),
        mac: iface
            .map(|i| i.0.clone())
            .or_else(|| row.map(|r| r.mac.clone())),
        network: iface
            .map(|i| i.1.clone())
            .or_else(|| row.map(|r| r.network_name.clone())),
        memory_mib: row.map(|r| r.memory_mib),
        vcpus: row.map(|r| r.vcpus),
        image: row.and_then(|r| r.image.clone()),
        desired_state: row.map(|r| r.desired_state.clone()),
        created_at: row.map(|r| r.created_at.clone()),
    }
}

fn missing_status(r: &VmRow) -> VmStatus {
    VmStatus {
        name: r.name.clone(),
        active: false,
        state: "missing".into(),
        uuid: r.uuid.clone(),
        managed: true,
        ip: r.last_ip.clone(),
        mac: Some(r.mac.clone()),
        network: Some(r.network_name.clone()),
        memory_mib: Some(r.memory_mib),
        vcpus: Some(r.vcpus),
        image: r.image.clone(),
        desired_state: Some(r.desired_state.clone()),
        created_at: Some(r.created_at.clone()),
    }
}
