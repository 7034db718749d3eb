//! Maps that name a VM (`target_vm`): resolved to the VM's address when made, checked
//! again inside the transaction, and moved when a recreate gives the VM another address.
//! The VM's row in SQLite is the only source: the port-map service never asks libvirt.

use std::net::Ipv4Addr;

use super::{PortMapError, PortMaps};
use crate::model::{PortMap, PortRule};
use crate::store::audit::{self, Entry};
use crate::store::{portmaps, vms};

impl PortMaps {
    /// The address a map naming `vm` goes to now: its pinned address, else its last
    /// seen one.
    pub fn vm_address(&self, vm: &str) -> Result<Ipv4Addr, PortMapError> {
        let found = self.store.with(|c| vms::map_address(c, vm))?;
        resolved(vm, found)
    }

    /// Inside a create's transaction: `vm` still exists and still has `ip`.
    pub(super) fn check_vm_address(
        &self,
        tx: &rusqlite::Connection,
        vm: &str,
        ip: Ipv4Addr,
    ) -> Result<(), PortMapError> {
        match resolved(vm, vms::map_address(tx, vm)?)? {
            now if now == ip => Ok(()),
            _ => Err(PortMapError::VmMoved(vm.to_owned())),
        }
    }

    /// Points the maps that name `vm` at its address now (a recreate with another `ip`
    /// gave it a new one): one SQLite transaction with an audit row per map moved
    /// (`audit(old, new)`), each map switched in the kernel as a replace. Returns the
    /// maps as they are now. Nothing to do when the VM has no address.
    pub fn follow_vm(
        &self,
        vm: &str,
        audit: impl Fn(&PortMap, &PortMap) -> Entry,
    ) -> Result<Vec<PortMap>, PortMapError> {
        let moved = self.store.transaction(|tx| {
            let Some(Some(ip)) = vms::map_address(tx, vm)? else {
                return Ok(Vec::new());
            };
            let mut moved = Vec::new();
            for row in portmaps::naming(tx, vm)? {
                if row.map.target_ip == ip {
                    continue;
                }
                let old = PortRule {
                    map: row.map,
                    allow_from: row.allow_from,
                };
                let new = PortRule {
                    map: PortMap {
                        target_ip: ip,
                        ..row.map
                    },
                    allow_from: old.allow_from.clone(),
                };
                self.policy.check(&new.map)?;
                portmaps::upsert(tx, &new, Some(vm), "agent")?;
                audit::record(tx, &audit(&old.map, &new.map))?;
                self.change_kernel(tx, || self.fw.replace(&old, &new))?;
                moved.push(new.map);
            }
            Ok(moved)
        });
        self.after_bulk_change(moved, super::Kind::PortMapAdded)
    }
}

/// What [`vms::map_address`] found, as the error a client gets.
fn resolved(vm: &str, found: Option<Option<Ipv4Addr>>) -> Result<Ipv4Addr, PortMapError> {
    match found {
        None => Err(PortMapError::UnknownVm(vm.to_owned())),
        Some(None) => Err(PortMapError::VmWithoutAddress(vm.to_owned())),
        Some(Some(ip)) => Ok(ip),
    }
}
