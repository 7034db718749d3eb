//! `POST /vms` in three steps: plan (the database and the request decide everything:
//! image, keys, seed, MAC), provision (libvirt builds it), persist (the row and its seed
//! inputs in one transaction, or libvirt's side taken away again).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use super::{Created, Pending, Vms};
use crate::cloudinit as seed;
use crate::model::{DesiredState, ImageState, VmName};
use crate::store::vms::{self, ImageRow, SeedInputs, VmRow};
use crate::vm::domain::{
    build_vm, check_guest_support, ensure_network, facts, lookup, random_mac, remove_vm,
};
use crate::vm::spec::CreateVm;
use crate::vm::{VmError, storage};

/// Everything a create decided before it asks libvirt for anything.
pub(super) struct Plan {
    row: VmRow,
    image: Option<ImageRow>,
    seed: Vec<u8>,
    inputs: SeedInputs,
    recreate: bool,
    had_row: bool,
    /// The request's `ip`: pinned exactly, or refused.
    requested_ip: Option<Ipv4Addr>,
    /// A recreated VM's address, kept when it is free.
    preferred_ip: Option<Ipv4Addr>,
    /// A recreated VM's network when the new one differs: its entry there goes.
    moved_from: Option<String>,
}

impl Vms {
    /// `POST /vms`: the VM is defined and started when this answers 200. A create that
    /// outlives `LIBVIRT_TIMEOUT` answers 504 and goes on; its row appears when it ends.
    pub async fn create(self: &Arc<Self>, req: CreateVm, by: &str) -> Result<Created, VmError> {
        let name = req.name.clone();
        let (claim, _ip, work) = self.begin_create(req, by).await?;
        let result = self
            .to_the_end(claim, format!("POST /vms {name}"), self.lv.timeout(), work)
            .await;
        if let Err(e) = &result
            && !matches!(e, VmError::Stalled(_))
        {
            // The client hears of the failure: nothing is left to show.
            self.set_pending(&name, None);
        }
        result
    }

    /// `POST /vms?wait=false`: checked and planned now (a bad request is refused as
    /// usual, and the address pinned); built in the background, shown as `creating`,
    /// then running, or `failed` with its error (and an audit row) if libvirt refuses.
    /// Returns the pinned address.
    pub async fn create_in_background(
        self: &Arc<Self>,
        req: CreateVm,
        by: &str,
    ) -> Result<Ipv4Addr, VmError> {
        let name = req.name.clone();
        let (claim, ip, work) = self.begin_create(req, by).await?;
        self.in_background(claim, format!("POST /vms {name} (wait=false)"), work);
        Ok(ip)
    }

    /// Validates, claims the name, plans and pins the address; returns the claim, the
    /// address and the rest of the create (provision, persist), which marks the name
    /// `creating` until it ends and takes the address's host entry away if it fails.
    async fn begin_create(
        self: &Arc<Self>,
        req: CreateVm,
        by: &str,
    ) -> Result<
        (
            crate::vm::claims::Claim,
            Ipv4Addr,
            impl std::future::Future<Output = Result<Created, VmError>> + Send + 'static,
        ),
        VmError,
    > {
        let name = req.validate(&self.cfg.limits)?;
        let claim = self.claim(&name).await?;
        // What an earlier create of this name left when libvirt cut it off: removed
        // first; while libvirt may still carry out what that one sent, this one would
        // race it.
        self.clean_abandoned(&name).await?;
        if self.abandoned.contains(&name) {
            return Err(VmError::Unavailable(format!(
                "an earlier create of {name} was cut off inside libvirt, which may still \
                 carry out what it sent; retry in {} s",
                crate::vm::abandoned::SETTLE.as_secs()
            )));
        }
        let mut plan = self.plan(&name, &req, by).await?;
        let pinned = self
            .pin(&plan.row, plan.requested_ip, plan.preferred_ip)
            .await?;
        plan.row.pinned_ip = Some(pinned.ip.to_string());
        self.set_pending(&name, Some(Pending::Creating));
        let this = Arc::clone(self);
        let (row, moved) = (plan.row.clone(), plan.moved_from.clone());
        let work = async move {
            let result = this.provision_and_persist(plan).await;
            match &result {
                Ok(_) => {
                    if let Some(old) = &moved {
                        this.unpin_from(old, &row).await;
                    }
                    this.set_pending(&name, None)
                }
                Err(e) => {
                    // Nothing of a failed create stays behind, its address neither.
                    this.unpin(&row, pinned).await;
                    this.set_pending(&name, Some(Pending::Failed(e.to_string())));
                }
            }
            this.observe_one(&name).await;
            result
        };
        Ok((claim, pinned.ip, work))
    }

    async fn provision_and_persist(&self, plan: Plan) -> Result<Created, VmError> {
        let (attempt, marks) =
            crate::vm::abandoned::Attempt::new(&plan.row.name, &plan.row.instance_id);
        let recreated = match self.provision(&plan, marks).await {
            Ok(r) => r,
            // Cut off inside libvirt (the connection died under it): libvirt may still
            // carry out what it sent; remembered, and undone once settled. A recreate's
            // row is the old VM, which the reconcile restores instead.
            Err(e) if e.is_unavailable() && !plan.recreate => {
                self.abandoned.add(attempt);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.persist(plan, recreated).await
    }

    /// The image row of `name`, fetching the default image on first use.
    async fn ready_image(&self, name: &str) -> Result<ImageRow, VmError> {
        let n = name.to_string();
        let row = self
            .store
            .run(move |s| s.with(|c| vms::image(c, &n)))
            .await?;
        match row {
            Some(r) if r.state == ImageState::Ready => Ok(r),
            Some(r) if r.state == ImageState::Downloading => Err(VmError::Conflict(format!(
                "image {name} is still downloading; see GET /images"
            ))),
            _ if name == self.cfg.default_image
                && !self.cfg.default_image_url.is_empty()
                && self.images.is_some() =>
            {
                if let Some(images) = &self.images {
                    images
                        .download(name, &self.cfg.default_image_url, None, "agent (first use)")
                        .await?;
                }
                Err(VmError::Unavailable(format!(
                    "the default image {name} is being downloaded from {}; retry when GET /images shows it ready",
                    self.cfg.default_image_url
                )))
            }
            _ => Err(VmError::NotFound(format!(
                "image {name} is not available; add it with POST /images (see GET /images)"
            ))),
        }
    }

    /// A MAC no other VM row has (a recreated VM keeps its own).
    async fn fresh_mac(&self) -> Result<String, VmError> {
        let mut mac = random_mac();
        for _ in 0..16 {
            let m = mac.clone();
            let used = self
                .store
                .run(move |s| s.with(|c| vms::mac_in_use(c, &m)))
                .await?;
            if !used {
                break;
            }
            mac = random_mac();
        }
        Ok(mac)
    }

    /// Decides the VM from the request and the database; touches nothing.
    async fn plan(&self, name: &VmName, req: &CreateVm, by: &str) -> Result<Plan, VmError> {
        let existing = self.row(name).await?;
        if existing.is_some() && !req.recreate {
            return Err(already_exists(name));
        }
        let image_name = match (&req.image, &req.kernel) {
            (Some(i), _) => Some(i.clone()),
            (None, Some(_)) => None,
            (None, None) => Some(self.cfg.default_image.clone()),
        };
        if self.cfg.local {
            check_boot_files(req).await?;
        }
        let image = match &image_name {
            Some(n) => Some(self.ready_image(n).await?),
            None => None,
        };
        let keys = req
            .ssh_authorized_keys
            .clone()
            .unwrap_or_else(|| self.cfg.default_keys.clone());
        let uuid = uuid::Uuid::new_v4().to_string();
        let instance_id = format!("iid-{uuid}");
        let hostname = req.effective_hostname();
        let seed = seed::build(&seed::SeedSpec {
            instance_id: &instance_id,
            hostname: &hostname,
            ssh_authorized_keys: &keys,
            user_data: req.user_data.as_deref(),
            network_config: req.network_config.as_deref(),
        })
        .map_err(|e| VmError::Internal(e.to_string()))?;
        // A recreated VM keeps its MAC, so DHCP gives it its address again and the
        // port maps that point at it keep working; everything else is new.
        let mac = match existing.as_ref().filter(|_| req.recreate) {
            Some(r) => r.mac.clone(),
            None => self.fresh_mac().await?,
        };
        let network_name = req
            .network_name
            .clone()
            .unwrap_or_else(|| self.cfg.default_network.clone());
        // ... and its address, when free.
        let (preferred_ip, moved_from) = super::pinning::kept(existing.as_ref(), &network_name);
        let row = VmRow {
            name: name.to_string(),
            uuid,
            instance_id,
            hostname,
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            disk_size_gb: req.disk_size_gb,
            network_name,
            os_arch: req
                .os_arch
                .clone()
                .unwrap_or_else(|| self.cfg.default_arch.clone()),
            domain_type: self.cfg.domain_type.clone(),
            image: image_name,
            mac,
            kernel: req.kernel.clone(),
            initrd: req.initrd.clone(),
            cmdline: req.cmdline.clone(),
            ssh_keys: keys.len() as u32,
            user_data: req.user_data.is_some(),
            disk_volume: storage::disk_volume(name),
            seed_volume: storage::seed_volume(name),
            desired_state: DesiredState::Running,
            last_state: None,
            last_ip: None,
            last_ip_at: None,
            pinned_ip: None,
            created_at: String::new(),
            updated_at: String::new(),
            created_by: by.to_string(),
        };
        Ok(Plan {
            row,
            image,
            seed,
            inputs: SeedInputs {
                ssh_authorized_keys: keys,
                user_data: req.user_data.clone(),
                network_config: req.network_config.clone(),
            },
            recreate: req.recreate,
            had_row: existing.is_some(),
            requested_ip: req.ip,
            preferred_ip,
            moved_from,
        })
    }

    /// Makes libvirt hold the planned VM, running; true when it replaced one. Waits
    /// for libvirt's real answer however long it takes (the caller bounds its own wait).
    async fn provision(
        &self,
        plan: &Plan,
        marks: crate::vm::abandoned::Marks,
    ) -> Result<bool, VmError> {
        let cfg = self.cfg.clone();
        let (row, image, seed) = (plan.row.clone(), plan.image.clone(), plan.seed.clone());
        let (recreate, had_row) = (plan.recreate, plan.had_row);
        self.lv
            .call_unbounded(move |conn| {
                // Dropped with the closure: run or not, this attempt is over then.
                marks.started();
                check_guest_support(conn, &row.os_arch, &row.domain_type)?;
                ensure_network(conn, &row.network_name)?;
                check_host_fits(conn, &row)?;
                let t0 = Instant::now();
                let dom = lookup(conn, &row.name)?;
                let ours = match &dom {
                    Some(d) => had_row || facts(d)?.instance_id.is_some(),
                    None => had_row,
                };
                let exists = dom.is_some() || had_row;
                if exists && !recreate {
                    return Err(already_exists(&row.name));
                }
                if dom.is_some() && !ours {
                    return Err(VmError::Conflict(format!(
                        "domain {} was not created by this agent; it is never replaced or deleted by it",
                        row.name
                    )));
                }
                // Fresh disk and seed, always: leftovers of a VM deleted without its
                // files, or of the VM being recreated, must not be reused.
                remove_vm(conn, &cfg, &row.name, dom, true)?;
                let t1 = Instant::now();
                build_vm(conn, &cfg, &row, image.as_ref(), &seed, true)?;
                tracing::debug!(
                    clear_ms = (t1 - t0).as_secs_f64() * 1000.0,
                    build_ms = t1.elapsed().as_secs_f64() * 1000.0,
                    "VM create steps"
                );
                Ok(exists)
            })
            .await
    }

    /// Writes the row and its seed inputs; when the database refuses, libvirt's side is
    /// taken away again so both agree.
    async fn persist(&self, plan: Plan, recreated: bool) -> Result<Created, VmError> {
        let (row, inputs) = (plan.row.clone(), plan.inputs);
        let saved = self
            .store
            .run(move |s| s.transaction(|tx| vms::upsert(tx, &row, &inputs)))
            .await;
        let row = plan.row;
        if let Err(e) = saved {
            let cfg = self.cfg.clone();
            let name = row.name.clone();
            let _ = self
                .lv
                .call_unbounded(move |conn| {
                    let dom = lookup(conn, &name)?;
                    remove_vm(conn, &cfg, &name, dom, true)
                })
                .await;
            return Err(e.into());
        }
        tracing::info!(vm = %row.name, uuid = %row.uuid, mac = %row.mac, recreated, "VM created");
        if recreated {
            self.follow_port_maps(&row.name).await;
        }
        Ok(Created {
            name: row.name,
            uuid: row.uuid,
            mac: row.mac,
            instance_id: row.instance_id,
            hostname: row.hostname,
            image: row.image,
            recreated,
            ip: row.pinned_ip.unwrap_or_default(),
        })
    }
}

fn already_exists(name: &str) -> VmError {
    VmError::Conflict(format!(
        "VM {name} already exists; pass \"recreate\": true to replace it with a fresh one"
    ))
}

/// The request's `kernel` and `initrd` are regular files this host can read.
///
/// With LIBVIRT_URI on this host, libvirtd reads the same files, so a missing or
/// unreadable one is the request's fault (400), found before anything is defined. Only
/// then: a remote libvirtd's files cannot be seen from here, and its refusal stays
/// libvirt's own error (which names the file).
async fn check_boot_files(req: &CreateVm) -> Result<(), VmError> {
    let files = [("kernel", &req.kernel), ("initrd", &req.initrd)];
    for (field, path) in files {
        let Some(path) = path else { continue };
        let refused = |why: String| {
            VmError::Invalid(format!(
                "{field} {path}: {why} (kernel and initrd must be files the libvirt host can read)"
            ))
        };
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| refused(e.to_string()))?;
        if !meta.is_file() {
            return Err(refused("not a regular file".into()));
        }
        tokio::fs::File::open(path)
            .await
            .map_err(|e| refused(e.to_string()))?;
    }
    Ok(())
}

/// The host has the memory, and libvirt allows the vCPUs, the row asks for.
fn check_host_fits(conn: &virt::connect::Connect, row: &VmRow) -> Result<(), VmError> {
    let node = conn
        .node_info()
        .map_err(|e| VmError::libvirt("host memory", e))?;
    if u64::from(row.memory_mib) * 1024 > node.memory {
        return Err(VmError::Invalid(format!(
            "memory_mib {} is more than the host has ({} MiB)",
            row.memory_mib,
            node.memory / 1024
        )));
    }
    if let Ok(max) = conn.max_vcpus(Some(&row.domain_type))
        && row.vcpus > max
    {
        return Err(VmError::Invalid(format!(
            "vcpus {} is more than libvirt allows for {} domains ({max})",
            row.vcpus, row.domain_type
        )));
    }
    Ok(())
}
