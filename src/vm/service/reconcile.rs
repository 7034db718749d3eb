//! The VM reconcile: a VM whose domain vanished from the hypervisor is defined again (and
//! started if it should run), a pinned address whose DHCP host entry vanished is
//! reserved again; domains the agent did not create are never touched.

use std::net::IpAddr;
use std::sync::Arc;

use super::{Vms, definition};
use crate::cloudinit as seed;
use crate::model::{DesiredState, ImageState};
use crate::store::vms::{self, ImageRow, SeedInputs, VmRow};
use crate::vm::driver::{Backing, Call, Disk, HostEntry, Hypervisor, volumes};
use crate::vm::{NotFound, VmError};

impl Vms {
    /// Makes the hypervisor match the rows: a VM whose domain vanished is defined again
    /// (its volumes re-created if they vanished too) and started if it should run.
    /// Domains the agent did not create are never touched. Returns what was repaired.
    pub async fn reconcile(&self) -> Result<Vec<String>, VmError> {
        for name in self.abandoned.ready() {
            let Some(_claim) = self.claims.for_reconcile(&name) else {
                continue;
            };
            match self.clean_abandoned(&name).await {
                Ok(()) => {}
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "cannot remove what an abandoned create made")
                }
            }
        }
        let mut repaired = self.clean_stray_pins().await?;
        let rows = self.store.run(|s| s.with(vms::list)).await?;
        // A node without VMs leaves libvirt alone (and never loads it).
        if !rows.is_empty() {
            self.refresh_listing();
        }
        let images = Arc::new(self.store.run(|s| s.with(vms::images)).await?);
        for row in rows {
            // A VM with an operation in flight is that operation's business; holding the
            // claim keeps a create or delete from starting while this repairs the row.
            let Some(_claim) = self.claims.for_reconcile(&row.name) else {
                continue;
            };
            let name = row.name.to_string();
            match self.reconcile_row(&name, Arc::clone(&images)).await {
                Ok(done) if done.is_empty() => {}
                Ok(done) => {
                    tracing::warn!(vm = %name, repaired = ?done, "libvirt did not match the database; repaired");
                    // The operator did not ask for this: the audit trail says what the
                    // agent did on its own.
                    self.record_own_ok(
                        "reconcile VM",
                        serde_json::json!({"vm": name, "repaired": done}),
                    )
                    .await;
                    repaired.extend(done.iter().map(|d| format!("{name}: {d}")));
                }
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => tracing::error!(vm = %name, error = %e, "cannot restore the VM's domain"),
            }
        }
        Ok(repaired)
    }

    /// One row, read again under its claim (a delete that finished since the listing
    /// must not be undone); waits for libvirt's real answer: the claim lives as long as
    /// the work.
    async fn reconcile_row(
        &self,
        name: &str,
        images: Arc<Vec<ImageRow>>,
    ) -> Result<Vec<&'static str>, VmError> {
        let n = name.to_string();
        let fresh = self
            .store
            .run(move |s| {
                s.with(|c| Ok::<_, crate::store::StoreError>((vms::get(c, &n)?, vms::seed(c, &n)?)))
            })
            .await?;
        let (Some(row), inputs) = fresh else {
            return Ok(Vec::new());
        };
        let keys = self.cfg.default_keys.clone();
        let book = Arc::clone(&self.addresses);
        self.driver
            .work(move |hv, call| {
                // The reservation first: a domain started here gets its address on its
                // first lease.
                let mut done = match reassert_pin(hv, call, &row, &book) {
                    Ok(done) => done,
                    Err(e) if e.is_unavailable() => return Err(e),
                    // The domain is still worth restoring (a network defined anew later
                    // gets the entry at the next pass).
                    Err(e) => {
                        tracing::error!(vm = %row.name, error = %e, "cannot restore the VM's DHCP host entry");
                        Vec::new()
                    }
                };
                let seed_inputs = inputs.unwrap_or(SeedInputs {
                    ssh_authorized_keys: keys,
                    ..SeedInputs::default()
                });
                done.extend(restore(hv, call, &row, &seed_inputs, &images)?);
                Ok(done)
            })
            .await
    }
}

/// Puts back the DHCP host entry of a VM with a pinned address when the network lacks it
/// (someone ran `virsh net-update ... delete`, or the network was defined anew). Keeps
/// what it read of the network for the next create's choice. Blocking.
fn reassert_pin(
    hv: &dyn Hypervisor,
    call: &Call,
    row: &VmRow,
    book: &super::address_book::AddressBook,
) -> Result<Vec<&'static str>, VmError> {
    let Some(IpAddr::V4(ip)) = row.pinned_ip else {
        return Ok(Vec::new());
    };
    let net = hv.network(call, &row.network_name)?;
    book.saw(&row.network_name, &net);
    let has = net
        .subnets
        .iter()
        .flat_map(|s| &s.hosts)
        .any(|h| h.mac.as_ref() == Some(&row.mac) && h.ip == Some(ip));
    if has {
        return Ok(Vec::new());
    }
    let entry = HostEntry {
        mac: row.mac.clone(),
        name: row.name.clone(),
        ip,
    };
    hv.put_host_entry(call, &row.network_name, &entry)?;
    Ok(vec!["DHCP host entry added again"])
}

/// One row's domain and volumes, restored:
///
/// - The domain exists: only a vanished seed volume is made again (the next boot needs
///   it); a running domain's tap gets hairpin mode again.
/// - The domain vanished, its disk is there: the disk is the VM's data and is kept; the
///   seed is made again if it vanished; the domain is defined, and started if it should
///   run.
/// - The disk vanished too: a new disk from the image, with the same seed.
///
/// The seed is the create's: same instance-id (so cloud-init does not run again on a
/// disk it already set up), keys, user-data and network-config; a VM created before they
/// were kept gets the default keys. Blocking.
fn restore(
    hv: &dyn Hypervisor,
    call: &Call,
    row: &VmRow,
    inputs: &SeedInputs,
    images: &[ImageRow],
) -> Result<Vec<&'static str>, VmError> {
    let seed_bytes = || {
        seed::build(&seed::SeedSpec {
            instance_id: &row.instance_id,
            hostname: &row.hostname,
            ssh_authorized_keys: &inputs.ssh_authorized_keys,
            user_data: inputs.user_data.as_deref(),
            network_config: inputs.network_config.as_deref(),
        })
    };
    let vm = definition(row);
    let has_seed = hv.volume(call, &row.seed_volume)?.is_some();
    if let Some(d) = hv.domain(call, &row.name)? {
        let mut repaired = Vec::new();
        let autostart = row.desired_state == DesiredState::Running;
        if super::serial::give_a_pty(hv, call, &vm, &d, autostart)? {
            repaired.push("defined again with a pty for its serial port");
        }
        if !has_seed {
            hv.put_seed(call, &vm, &seed_bytes()?)?;
            repaired.push("seed volume made again");
        }
        // A domain started by someone else gets a new tap without hairpin.
        if d.active {
            hv.hairpin(call, &row.name)?;
        }
        return Ok(repaired);
    }
    let start = row.desired_state == DesiredState::Running;
    let (disk, mut repaired) = if hv.volume(call, &row.disk_volume)?.is_none() {
        hv.delete_volumes(call, &row.name)?;
        let disk = new_disk(row, images)?;
        (disk, vec!["disk and seed made again from the image"])
    } else {
        let made = (!has_seed).then_some("seed volume made again");
        (Disk::Keep, made.into_iter().collect())
    };
    let seed = match (&disk, has_seed) {
        (Disk::Keep, true) => None,
        _ => Some(seed_bytes()?),
    };
    hv.define(call, &vm, &disk, seed.as_deref(), start)?;
    repaired.push("domain defined again");
    if start {
        start_restored(hv, call, row, &disk)?;
        repaired.push("domain started");
    }
    Ok(repaired)
}

/// A disk from the row's image (blank for a direct kernel boot).
fn new_disk(row: &VmRow, images: &[ImageRow]) -> Result<Disk, VmError> {
    let image = row.image.as_ref().and_then(|n| {
        images
            .iter()
            .find(|i| &i.name == n && i.state == ImageState::Ready)
    });
    if row.image.is_some() && image.is_none() {
        return Err(NotFound::ImageGone(row.image.clone()).into());
    }
    Ok(Disk::New {
        size_bytes: u64::from(row.disk_size_gb) * volumes::GIB,
        backing: image.map(|i| Backing {
            volume: i.volume.clone(),
            format: i.format.clone().unwrap_or_else(|| "qcow2".into()),
        }),
    })
}

/// Starts a restored domain. A restore is whole or not at all: a domain left defined but
/// stopped would look repaired to every later pass (they start nothing that exists), so
/// the VM would never run again. Undefined, the next pass tries again (a seed deleted by
/// hand just after the undefine this repairs, say, is made again then); a disk this pass
/// made goes with it.
fn start_restored(
    hv: &dyn Hypervisor,
    call: &Call,
    row: &VmRow,
    disk: &Disk,
) -> Result<(), VmError> {
    let Err(e) = hv.start(call, &row.name) else {
        return Ok(());
    };
    if let Err(u) = hv.undefine(call, &row.name) {
        tracing::warn!(vm = %row.name, error = %u, "cannot undefine the domain whose restore failed to start");
    }
    if matches!(disk, Disk::New { .. }) {
        let _ = hv.delete_volumes(call, &row.name);
    }
    Err(e.into())
}
