//! Start, stop, reboot and delete: each holds its VM's claim until the hypervisor has
//! really answered (`Vms::to_the_end`), and observes the VM when done.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Deleted, Vms};
use crate::model::{DesiredState, MacAddr, PortMap, VmName};
use crate::store::audit;
use crate::store::vms;
use crate::vm::driver::{Call, Hypervisor, Network, ipv4_of};
use crate::vm::{Conflict, NotFound, Operation, VmError};

impl Vms {
    /// `POST /vms/{name}/start`; true when it was already running.
    pub async fn start(self: &Arc<Self>, name: &VmName) -> Result<bool, VmError> {
        let claim = self.claim(name).await?;
        let this = Arc::clone(self);
        let n = name.to_string();
        let operation = Operation::Start(n.clone());
        self.to_the_end(claim, operation, self.driver.timeout(), async move {
            let result = this.start_now(&n).await;
            this.observe_one(&n).await;
            result
        })
        .await
    }

    async fn start_now(&self, name: &str) -> Result<bool, VmError> {
        let n = name.to_string();
        let row = self.store.run(move |s| s.with(|c| vms::get(c, &n))).await?;
        let vm = row.as_ref().map(super::definition);
        let n = name.to_string();
        let was_running = self
            .driver
            .work(move |hv, call| {
                if let Some(vm) = &vm
                    && let Some(d) = hv.domain(call, &n)?
                {
                    super::serial::give_a_pty(hv, call, vm, &d, true)?;
                }
                hv.start(call, &n)
            })
            .await?
            .ok_or_else(|| NotFound::Vm(name.to_owned()))?;
        self.set_desired(name, DesiredState::Running).await?;
        Ok(was_running)
    }

    /// `POST /vms/{name}/stop`: ACPI shutdown, forced off after VM_STOP_TIMEOUT (or at
    /// once with `force`). Returns whether it had to be forced.
    pub async fn stop(self: &Arc<Self>, name: &VmName, force: bool) -> Result<bool, VmError> {
        let claim = self.claim(name).await?;
        let this = Arc::clone(self);
        let n = name.to_string();
        let wait = self.driver.timeout() + self.cfg.stop_timeout;
        self.to_the_end(claim, Operation::Stop(n.clone()), wait, async move {
            let result = this.stop_now(&n, force).await;
            this.observe_one(&n).await;
            result
        })
        .await
    }

    async fn stop_now(&self, name: &str, force: bool) -> Result<bool, VmError> {
        let n = name.to_string();
        let active = self
            .driver
            .work(move |hv, call| match hv.domain(call, &n)? {
                None => Err(VmError::from(NotFound::Vm(n.clone()))),
                Some(d) if d.active && !force => Ok(hv.shutdown(call, &n)?.unwrap_or(false)),
                Some(d) => Ok(d.active),
            })
            .await?;
        let forced = active && self.wait_for_power_off(name, force).await?;
        self.set_desired(name, DesiredState::Stopped).await?;
        Ok(forced)
    }

    /// Waits for the domain to stop (at most VM_STOP_TIMEOUT, not at all with `force`),
    /// then forces it off; true when it had to.
    async fn wait_for_power_off(&self, name: &str, force: bool) -> Result<bool, VmError> {
        let wait = if force {
            Duration::ZERO
        } else {
            self.cfg.stop_timeout
        };
        let deadline = Instant::now() + wait;
        loop {
            let n = name.to_string();
            let still = self
                .driver
                .work(move |hv, call| {
                    Ok::<_, VmError>(hv.domain(call, &n)?.is_some_and(|d| d.active))
                })
                .await?;
            if !still {
                return Ok(false);
            }
            if Instant::now() >= deadline {
                let n = name.to_string();
                self.driver
                    .work(move |hv, call| hv.destroy(call, &n))
                    .await?;
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `POST /vms/{name}/reboot` (ACPI; the guest decides how).
    pub async fn reboot(self: &Arc<Self>, name: &VmName) -> Result<(), VmError> {
        let claim = self.claim(name).await?;
        let this = Arc::clone(self);
        let n = name.to_string();
        let operation = Operation::Reboot(n.clone());
        self.to_the_end(claim, operation, self.driver.timeout(), async move {
            let result = this.reboot_now(&n).await;
            this.observe_one(&n).await;
            result
        })
        .await
    }

    async fn reboot_now(&self, name: &str) -> Result<(), VmError> {
        let n = name.to_string();
        match self
            .driver
            .work(move |hv, call| hv.reboot(call, &n))
            .await?
        {
            Some(true) => Ok(()),
            Some(false) => Err(Conflict::NotRunning(name.to_owned()).into()),
            None => Err(NotFound::Vm(name.to_owned()).into()),
        }
    }

    /// `DELETE /vms/{name}`. Domains the agent did not create are refused.
    pub async fn delete(
        self: &Arc<Self>,
        name: &VmName,
        delete_files: bool,
    ) -> Result<Deleted, VmError> {
        let claim = self.claim(name).await?;
        self.set_pending(name, None);
        if let Some(consoles) = &self.consoles {
            consoles.end(name, crate::vm::console::EndReason::VmDeleted);
        }
        let this = Arc::clone(self);
        let n = name.to_string();
        let operation = Operation::Delete(n.clone());
        self.to_the_end(claim, operation, self.driver.timeout(), async move {
            let result = this.delete_now(&n, delete_files).await;
            this.observe_one(&n).await;
            result
        })
        .await
    }

    async fn delete_now(&self, name: &str, delete_files: bool) -> Result<Deleted, VmError> {
        let row = self.row(name).await?;
        let gone = Gone {
            name: name.to_string(),
            had_row: row.is_some(),
            nic: row
                .as_ref()
                .map(|r| (r.mac.clone(), r.network_name.clone())),
            pinned: row.as_ref().is_some_and(|r| r.pinned_ip.is_some()),
            files: delete_files,
        };
        let (lease_ip, network) = self
            .driver
            .work(move |hv, call| remove(hv, call, &gone))
            .await?;
        // The VM's lease outlives it (dnsmasq keeps it until it expires): the next
        // create must see it, or it would choose this address and find it leased.
        if let Some((net, seen)) = network {
            self.addresses.saw(&net, &seen);
        }
        let n = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::delete(c, &n)))
            .await?;
        let mut targets: Vec<Ipv4Addr> = Vec::new();
        let known = row
            .as_ref()
            .map(|r| [r.last_ip, r.pinned_ip])
            .unwrap_or_default();
        for ip in known.into_iter().flatten() {
            if let IpAddr::V4(ip) = ip {
                targets.push(ip);
            }
        }
        targets.extend(lease_ip.filter(|ip| !targets.contains(ip)));
        let removed = self.remove_port_maps_to(name, targets).await;
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

    /// Moves the port maps that name a recreated VM to its address, if the recreate gave
    /// it another (an `ip` of its own). A failure is logged: the VM is there either way,
    /// and the maps keep their old target until the next recreate or a replace.
    pub(super) async fn follow_port_maps(&self, vm: &str) {
        let Some(pm) = self.portmaps.clone() else {
            return;
        };
        let moved = pm
            .follow_vm(vm, |old, new| {
                map_entry("POST /ports (VM readdressed)", vm, new, Some(old))
            })
            .await;
        match moved {
            Ok(maps) if !maps.is_empty() => {
                tracing::info!(
                    vm,
                    moved = maps.len(),
                    "port maps naming the VM follow its new address"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(vm, error = %e, "could not move the port maps naming the recreated VM")
            }
        }
    }

    /// Removes the port maps that target the deleted VM's addresses or name it: one call of the
    /// port-map service (one SQLite transaction with each map's audit row, one kernel
    /// transaction). A failure is logged; the VM is gone either way, and the maps'
    /// reconcile keeps kernel and database agreeing.
    async fn remove_port_maps_to(&self, vm: &str, targets: Vec<Ipv4Addr>) -> Vec<String> {
        let Some(pm) = self.portmaps.clone() else {
            return Vec::new();
        };
        // The operator asked for the VM's deletion, not for this: the audit trail says
        // why each map went.
        let gone = pm
            .delete_targeting(&targets, Some(vm), |m| {
                map_entry("DELETE /ports (VM deleted)", vm, m, None)
            })
            .await;
        match gone {
            Ok(maps) => maps
                .iter()
                .map(|m| {
                    format!(
                        "{}/{} -> {}:{}",
                        m.listen_port, m.proto, m.target_ip, m.target_port
                    )
                })
                .collect(),
            Err(e) => {
                tracing::error!(vm, error = %e, "could not remove the port maps of the deleted VM");
                Vec::new()
            }
        }
    }
}

/// The audit row of a change the agent made to port map `m` because of what happened to
/// VM `vm`; `from` is the map before, when it was moved.
fn map_entry(action: &str, vm: &str, m: &PortMap, from: Option<&PortMap>) -> audit::Entry {
    let mut parameters = serde_json::json!({
        "vm": vm,
        "listen_port": m.listen_port,
        "proto": m.proto.to_string(),
        "target": format!("{}:{}", m.target_ip, m.target_port),
    });
    if let Some(old) = from {
        parameters["from"] = format!("{}:{}", old.target_ip, old.target_port).into();
    }
    audit::Entry::by_agent(action, Some(parameters.to_string()))
}

/// What a delete takes away.
struct Gone {
    name: String,
    had_row: bool,
    /// The VM's MAC and network (from its row).
    nic: Option<(MacAddr, String)>,
    /// Whether the VM has a host entry to remove (a VM from before pinning has none).
    pinned: bool,
    files: bool,
}

/// Stops and undefines the domain, with `files` deletes its volumes, and removes its
/// host entry; returns the address the VM holds now (its lease), so port maps to it can
/// go with it; returns the VM's last leased address and its network as libvirt shows it
/// afterwards. Blocking.
fn remove(hv: &dyn Hypervisor, call: &Call, g: &Gone) -> Result<Removed, VmError> {
    let dom = hv.domain(call, &g.name)?;
    if dom.is_none() && !g.had_row {
        return Err(NotFound::Vm(g.name.clone()).into());
    }
    let ours = g.had_row || dom.as_ref().is_some_and(|d| d.instance_id.is_some());
    if !ours {
        return Err(Conflict::NotOurs(g.name.clone()).into());
    }
    let ip = match &g.nic {
        Some((mac, net)) => hv
            .leases(call, net, mac)
            .ok()
            .and_then(|l| ipv4_of(&l, mac)),
        None => None,
    };
    hv.undefine(call, &g.name)?;
    if g.files {
        hv.delete_volumes(call, &g.name)?;
    }
    if let (true, Some((mac, net))) = (g.pinned, &g.nic) {
        match hv.remove_host_entry(call, net, mac) {
            // The network went first: so did the entry.
            Err(e) if e.is_not_found() => {}
            other => drop(other?),
        }
    }
    let network = g
        .nic
        .as_ref()
        .and_then(|(_, net)| Some((net.clone(), hv.network(call, net).ok()?)));
    Ok((ip, network))
}

/// What [`remove`] returns: the VM's last leased address, and its network afterwards.
type Removed = (Option<Ipv4Addr>, Option<(String, Network)>);
