//! Start, stop, reboot and delete: each holds its VM's claim until libvirt has really
//! answered (`Vms::to_the_end`), and observes the VM when done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Deleted, Vms};
use crate::model::{DesiredState, PortMap, VmName};
use crate::store::audit;
use crate::store::vms;
use crate::vm::domain::{existing, facts, hairpin, lookup, remove_vm};
use crate::vm::{VmError, dhcp_hosts, leases};

impl Vms {
    /// `POST /vms/{name}/start`; true when it was already running.
    pub async fn start(self: &Arc<Self>, name: &VmName) -> Result<bool, VmError> {
        let claim = self.claim(name).await?;
        let this = Arc::clone(self);
        let n = name.to_string();
        self.to_the_end(
            claim,
            format!("POST /vms/{name}/start"),
            self.lv.timeout(),
            async move {
                let result = this.start_now(&n).await;
                this.observe_one(&n).await;
                result
            },
        )
        .await
    }

    async fn start_now(&self, name: &str) -> Result<bool, VmError> {
        let n = name.to_string();
        let cfg = self.cfg.clone();
        let was_running = self
            .lv
            .call_unbounded(move |conn| {
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
        self.set_desired(name, DesiredState::Running).await?;
        Ok(was_running)
    }

    /// `POST /vms/{name}/stop`: ACPI shutdown, forced off after VM_STOP_TIMEOUT (or at
    /// once with `force`). Returns whether it had to be forced.
    pub async fn stop(self: &Arc<Self>, name: &VmName, force: bool) -> Result<bool, VmError> {
        let claim = self.claim(name).await?;
        let this = Arc::clone(self);
        let n = name.to_string();
        self.to_the_end(
            claim,
            format!("POST /vms/{name}/stop"),
            self.lv.timeout() + self.cfg.stop_timeout,
            async move {
                let result = this.stop_now(&n, force).await;
                this.observe_one(&n).await;
                result
            },
        )
        .await
    }

    async fn stop_now(&self, name: &str, force: bool) -> Result<bool, VmError> {
        let n = name.to_string();
        let active = self
            .lv
            .call_unbounded(move |conn| {
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
                    .call_unbounded(move |conn| match lookup(conn, &n)? {
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
                        .call_unbounded(move |conn| {
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
        self.set_desired(name, DesiredState::Stopped).await?;
        Ok(forced)
    }

    /// `POST /vms/{name}/reboot` (ACPI; the guest decides how).
    pub async fn reboot(self: &Arc<Self>, name: &VmName) -> Result<(), VmError> {
        let claim = self.claim(name).await?;
        let this = Arc::clone(self);
        let n = name.to_string();
        self.to_the_end(
            claim,
            format!("POST /vms/{name}/reboot"),
            self.lv.timeout(),
            async move {
                let result = this.reboot_now(&n).await;
                this.observe_one(&n).await;
                result
            },
        )
        .await
    }

    async fn reboot_now(&self, name: &str) -> Result<(), VmError> {
        let n = name.to_string();
        self.lv
            .call_unbounded(move |conn| {
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
    pub async fn delete(
        self: &Arc<Self>,
        name: &VmName,
        delete_files: bool,
    ) -> Result<Deleted, VmError> {
        let claim = self.claim(name).await?;
        self.set_pending(name, None);
        let this = Arc::clone(self);
        let n = name.to_string();
        self.to_the_end(
            claim,
            format!("DELETE /vms/{name}"),
            self.lv.timeout(),
            async move {
                let result = this.delete_now(&n, delete_files).await;
                this.observe_one(&n).await;
                result
            },
        )
        .await
    }

    async fn delete_now(&self, name: &str, delete_files: bool) -> Result<Deleted, VmError> {
        let row = self.row(name).await?;
        let n = name.to_string();
        let cfg = self.cfg.clone();
        let had_row = row.is_some();
        let row_ip = row.as_ref().and_then(|r| r.last_ip.clone());
        let pinned = row.as_ref().and_then(super::pinning::pinned);
        let (mac, network) = match &row {
            Some(r) => (Some(r.mac.clone()), Some(r.network_name.clone())),
            None => (None, None),
        };
        let lease_ip = self
            .lv
            .call_unbounded(move |conn| {
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
                // Its reservation goes with it (a VM from before pinning has none).
                if let (Some(_), Some(mac), Some(net)) = (pinned, &mac, &network) {
                    match dhcp_hosts::network(conn, net) {
                        Ok(net) => drop(dhcp_hosts::remove(&net, mac)?),
                        // The network went first: so did the entry.
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(ip)
            })
            .await?;
        let n = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::delete(c, &n)))
            .await?;
        let mut targets: Vec<std::net::Ipv4Addr> = [row_ip, lease_ip]
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        targets.extend(pinned.filter(|p| !targets.contains(p)));
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
    async fn remove_port_maps_to(&self, vm: &str, targets: Vec<std::net::Ipv4Addr>) -> Vec<String> {
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
