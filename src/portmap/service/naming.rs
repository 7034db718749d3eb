//! Maps that name a VM (`target_vm`): resolved to the VM's address when made, checked
//! again in the commit, moved when a recreate gives the VM another address, removed with
//! the VM. The VM's row in SQLite is the only source: the port-map service never asks
//! libvirt.

use std::net::Ipv4Addr;

use super::{NewMap, PortMapError, PortMaps, Target, key};
use crate::events::Kind;
use crate::model::{PortMap, PortRule, VmName};
use crate::portmap::policy::PolicyError;
use crate::store::audit::{self, Entry};
use crate::store::{portmaps, vms};

impl PortMaps {
    /// The rule `new` asks for: its target resolved (a VM's address now), checked
    /// against the policy and the node's own addresses.
    pub(super) async fn resolve(&self, new: &NewMap) -> Result<PortRule, PortMapError> {
        let target_ip = match &new.target {
            Target::Ip(ip) => *ip,
            Target::Vm(vm) => {
                let name = vm.to_string();
                let found = self
                    .store
                    .run(move |s| s.with(|c| vms::map_address(c, &name)))
                    .await?;
                resolved(vm, found)?
            }
        };
        let rule = PortRule {
            map: PortMap {
                proto: new.proto,
                listen_port: new.listen_port,
                target_ip,
                target_port: new.target_port,
            },
            allow_from: new.allow_from.clone(),
        };
        self.policy.check(&rule.map)?;
        if self.fw.is_local_address(target_ip).await? {
            return Err(PolicyError::TargetIsNode {
                ip: target_ip.to_string(),
            }
            .into());
        }
        Ok(rule)
    }

    /// Points the maps that name `vm` at its address now (a recreate with another `ip`
    /// gave it a new one): each map switched in the kernel as a replace, then one SQLite
    /// transaction with an audit row per map moved (`audit(old, new)`). Returns the maps
    /// as they are now. Nothing to do when the VM has no address.
    pub async fn follow_vm(
        &self,
        vm: &str,
        audit: impl Fn(&PortMap, &PortMap) -> Entry,
    ) -> Result<Vec<PortMap>, PortMapError> {
        let _one = self.writer.lock().await;
        let name = vm.to_owned();
        let (ip, rows) = self
            .store
            .run(move |s| {
                s.with(|c| {
                    Ok::<_, PortMapError>((
                        vms::map_address(c, &name)?,
                        portmaps::naming(c, &name)?,
                    ))
                })
            })
            .await?;
        let Some(Some(ip)) = ip else {
            return Ok(Vec::new());
        };
        let mut moves = Vec::new();
        for row in rows.into_iter().filter(|r| r.map.target_ip != ip) {
            let old = PortRule {
                map: row.map,
                allow_from: row.allow_from,
            };
            let new = PortRule {
                map: PortMap {
                    target_ip: ip,
                    ..old.map
                },
                allow_from: old.allow_from.clone(),
            };
            self.policy.check(&new.map)?;
            moves.push((old, new));
        }
        if moves.is_empty() {
            return Ok(Vec::new());
        }
        let mut repair = None;
        for (old, new) in &moves {
            let all: Vec<PortRule> = moves.iter().map(|(_, n)| n.clone()).collect();
            repair = self
                .change_kernel(self.fw.replace(old, new), move |rules| {
                    rules.retain(|r| !all.iter().any(|n| key(n) == key(r)));
                    rules.extend(all);
                })
                .await?;
            // A rewrite made every move at once.
            if repair.is_some() {
                break;
            }
        }
        let rows: Vec<(Entry, PortRule)> = moves
            .iter()
            .map(|(old, new)| (audit(&old.map, &new.map), new.clone()))
            .collect();
        let name = vm.to_owned();
        self.commit(repair, move |tx| {
            for (entry, new) in &rows {
                portmaps::upsert(tx, new, Some(&name), "agent")?;
                audit::record(tx, entry)?;
            }
            Ok(())
        })
        .await?;
        let moved: Vec<PortMap> = moves.into_iter().map(|(_, n)| n.map).collect();
        for m in &moved {
            super::publish(Kind::PortMapAdded, m, serde_json::Value::Null);
        }
        Ok(moved)
    }

    /// Removes every map that targets one of `targets` or names VM `vm`: one kernel
    /// transaction, then one SQLite transaction holding each map's audit row (`audit`
    /// says it). Returns the maps removed.
    pub async fn delete_targeting(
        &self,
        targets: &[Ipv4Addr],
        vm: Option<&str>,
        audit: impl Fn(&PortMap) -> Entry,
    ) -> Result<Vec<PortMap>, PortMapError> {
        let _one = self.writer.lock().await;
        let (targets, vm_name) = (targets.to_vec(), vm.map(str::to_owned));
        let gone: Vec<PortRule> = self
            .store
            .run(move |s| s.with(portmaps::list))
            .await?
            .into_iter()
            .filter(|r| {
                targets.contains(&r.map.target_ip)
                    || vm_name
                        .as_deref()
                        .is_some_and(|v| r.target_vm.as_deref() == Some(v))
            })
            .map(|r| PortRule {
                map: r.map,
                allow_from: r.allow_from,
            })
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<_> = gone.iter().map(key).collect();
        let repair = self
            .change_kernel(self.fw.remove(&gone), move |rules| {
                rules.retain(|r| !keys.contains(&key(r)))
            })
            .await?;
        let rows: Vec<(Entry, PortMap)> = gone.iter().map(|r| (audit(&r.map), r.map)).collect();
        self.commit(repair, move |tx| {
            for (entry, m) in &rows {
                audit::record(tx, entry)?;
                portmaps::delete(tx, m.proto, m.listen_port)?;
            }
            Ok(())
        })
        .await?;
        let maps: Vec<PortMap> = gone.into_iter().map(|r| r.map).collect();
        for m in &maps {
            super::publish(Kind::PortMapRemoved, m, serde_json::Value::Null);
        }
        Ok(maps)
    }
}

/// In a create's commit: `vm` still exists and still has `ip`.
pub(super) fn check_vm_address(
    tx: &rusqlite::Connection,
    vm: &VmName,
    ip: Ipv4Addr,
) -> Result<(), PortMapError> {
    match resolved(vm, vms::map_address(tx, vm.as_str())?)? {
        now if now == ip => Ok(()),
        _ => Err(PortMapError::VmMoved(vm.clone())),
    }
}

/// What [`vms::map_address`] found, as the error a client gets.
fn resolved(vm: &VmName, found: Option<Option<Ipv4Addr>>) -> Result<Ipv4Addr, PortMapError> {
    match found {
        None => Err(PortMapError::UnknownVm(vm.clone())),
        Some(None) => Err(PortMapError::VmWithoutAddress(vm.clone())),
        Some(Some(ip)) => Ok(ip),
    }
}
