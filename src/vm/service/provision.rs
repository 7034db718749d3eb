//! A create's build in the hypervisor and its row: the host's checks (an architecture,
//! memory or vCPUs it cannot give is the request's fault, 400), the VM made from scratch
//! (never over a domain the agent did not create), and the row written only once the
//! domain runs, or the build taken away again.

use std::net::IpAddr;
use std::time::Instant;

use super::plan::Plan;
use super::{Created, Vms, attempts::Attempt, definition};
use crate::store::vms::{self, ImageRow};
use crate::vm::driver::{Backing, Call, Disk, Hypervisor, VmDefinition, volumes};
use crate::vm::{Conflict, Invalid, NotFound, VmError};

/// What a VM asks of the host.
pub(super) struct Needs {
    arch: String,
    domain_type: String,
    memory_mib: u32,
    vcpus: u32,
}

impl Needs {
    pub fn of(row: &vms::VmRow) -> Needs {
        Needs {
            arch: row.os_arch.clone(),
            domain_type: row.domain_type.clone(),
            memory_mib: row.memory_mib,
            vcpus: row.vcpus,
        }
    }

    /// Refuses (400) what the host cannot run (aarch64 without qemu-system-arm, kvm
    /// without a usable /dev/kvm, more memory than it has, more vCPUs than libvirt allows),
    /// before anything is made. Blocking.
    pub fn check(&self, hv: &dyn Hypervisor, call: &Call) -> Result<(), VmError> {
        let host = hv.host(call, &self.domain_type)?;
        let runs = |(a, t): &(String, String)| *a == self.arch && *t == self.domain_type;
        if !host.guests.iter().any(runs) {
            return Err(Invalid::Guest {
                arch: self.arch.clone(),
                domain_type: self.domain_type.clone(),
                offered: host.guests.clone(),
            }
            .into());
        }
        if u64::from(self.memory_mib) * 1024 > host.memory_kib {
            return Err(Invalid::HostMemory {
                asked: self.memory_mib,
                host_mib: host.memory_kib / 1024,
            }
            .into());
        }
        if let Some(max) = host.max_vcpus
            && self.vcpus > max
        {
            return Err(Invalid::HostVcpus {
                asked: self.vcpus,
                domain_type: self.domain_type.clone(),
                max,
            }
            .into());
        }
        Ok(())
    }
}

/// What the build needs, moved to its blocking thread.
struct Build {
    vm: VmDefinition,
    disk_size_gb: u32,
    image: Option<ImageRow>,
    pool: String,
    seed: Vec<u8>,
    recreate: bool,
    had_row: bool,
}

impl Vms {
    /// Makes the hypervisor hold the planned VM, running; true when it replaced one.
    /// Waits for the real answer however long it takes (the caller bounds its own wait).
    /// A build cut off inside libvirt (its connection died under it) may still be carried
    /// out: it is remembered, and what it made removed once settled (`attempts.rs`); a
    /// recreate's row is the old VM, which the reconcile restores instead.
    pub(super) async fn provision(&self, plan: &Plan) -> Result<bool, VmError> {
        let b = Build {
            vm: definition(&plan.row),
            disk_size_gb: plan.row.disk_size_gb,
            image: plan.image.clone(),
            pool: self.cfg.pool.clone(),
            seed: plan.seed.clone(),
            recreate: plan.recreate,
            had_row: plan.had_row,
        };
        let call = Call::new(None);
        let (attempt, marks) =
            Attempt::new(&plan.row.name, &plan.row.instance_id, call.reached_flag());
        let built = self
            .driver
            .work_as(call, move |hv, call| {
                // Dropped with the closure: run or not, this attempt is over then.
                let _marks = marks;
                build(hv, call, &b)
            })
            .await;
        match built {
            Err(e) if e.is_unavailable() && !plan.recreate => {
                self.abandoned.add(attempt);
                Err(e)
            }
            other => other,
        }
    }

    /// Writes the row and its seed inputs; when the database refuses, the hypervisor's
    /// side is taken away again so both agree.
    pub(super) async fn persist(
        &self,
        plan: Plan,
        recreated: bool,
        ip: IpAddr,
    ) -> Result<Created, VmError> {
        let (row, inputs) = (plan.row.clone(), plan.inputs);
        let saved = self
            .store
            .run(move |s| s.transaction(|tx| vms::upsert(tx, &row, &inputs)))
            .await;
        let row = plan.row;
        if let Err(e) = saved {
            let name = row.name.to_string();
            let _ = self
                .driver
                .work(move |hv, call| {
                    hv.undefine(call, &name)?;
                    hv.delete_volumes(call, &name).map(drop)
                })
                .await;
            return Err(e.into());
        }
        tracing::info!(vm = %row.name, uuid = %row.uuid, mac = %row.mac, recreated, "VM created");
        if recreated {
            self.follow_port_maps(&row.name).await;
        }
        Ok(Created {
            name: row.name.to_string(),
            uuid: row.uuid,
            mac: row.mac.to_string(),
            instance_id: row.instance_id,
            hostname: row.hostname,
            image: row.image,
            recreated,
            ip,
        })
    }
}

/// The disk the VM gets: a new one backed by its image, which must fit in it.
fn disk(hv: &dyn Hypervisor, call: &Call, b: &Build) -> Result<Disk, VmError> {
    let size_bytes = u64::from(b.disk_size_gb) * volumes::GIB;
    let Some(img) = &b.image else {
        return Ok(Disk::New {
            size_bytes,
            backing: None,
        });
    };
    let capacity = hv
        .volume(call, &img.volume)?
        .ok_or_else(|| NotFound::ImageVolume {
            image: img.name.clone(),
            volume: img.volume.clone(),
            pool: b.pool.clone(),
        })?;
    if capacity > size_bytes {
        return Err(Invalid::DiskSmallerThanImage {
            disk_gb: b.disk_size_gb,
            image: img.name.clone(),
            image_gib: capacity.div_ceil(volumes::GIB),
        }
        .into());
    }
    let backing = Backing {
        volume: img.volume.clone(),
        format: img.format.clone().unwrap_or_else(|| "qcow2".into()),
    };
    Ok(Disk::New {
        size_bytes,
        backing: Some(backing),
    })
}

/// The build: the name must be free (or the agent's own VM, being recreated); whatever
/// is there goes (a fresh disk and seed, always: leftovers of a VM deleted without its
/// files must not be reused); then define and start, or take it all away again.
/// Blocking.
fn build(hv: &dyn Hypervisor, call: &Call, b: &Build) -> Result<bool, VmError> {
    let name = b.vm.name.as_str();
    let t0 = Instant::now();
    let dom = hv.domain(call, name)?;
    let ours = match &dom {
        Some(d) => b.had_row || d.instance_id.is_some(),
        None => b.had_row,
    };
    let exists = dom.is_some() || b.had_row;
    if exists && !b.recreate {
        return Err(Conflict::Exists(name.to_owned()).into());
    }
    if dom.is_some() && !ours {
        return Err(Conflict::NotOurs(name.to_owned()).into());
    }
    let disk = disk(hv, call, b)?;
    hv.undefine(call, name)?;
    hv.delete_volumes(call, name)?;
    let t1 = Instant::now();
    hv.define(call, &b.vm, &disk, Some(&b.seed), true)?;
    let started = match hv.start(call, name) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(NotFound::Vm(name.to_owned()).into()),
        Err(e) => Err(VmError::from(e)),
    };
    if let Err(e) = started {
        // A start that failed may have opened the console log: its volumes go too.
        let _ = hv.undefine(call, name);
        let _ = hv.delete_volumes(call, name);
        return Err(e);
    }
    tracing::debug!(
        clear_ms = (t1 - t0).as_secs_f64() * 1000.0,
        build_ms = t1.elapsed().as_secs_f64() * 1000.0,
        "VM create steps"
    );
    Ok(exists)
}
