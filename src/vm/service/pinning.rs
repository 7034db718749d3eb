//! Pinned addresses: a create reserves its VM's address as a DHCP host entry of the
//! VM's network before the domain first boots, so the first lease is that address and
//! stays it; a delete takes the entry away, the reconcile puts back a vanished one.

use std::net::Ipv4Addr;
use std::sync::Arc;

use super::Vms;
use crate::store::vms::{self, VmRow};
use crate::vm::VmError;
use crate::vm::addresses::Taken;
use crate::vm::dhcp_hosts::{self, Pin, Reservation};

impl Vms {
    /// The pinned address of VM `name` (`None`: no such VM, or one created before
    /// pinning). For port maps that name a VM.
    pub async fn pinned_ip(&self, name: &str) -> Result<Option<Ipv4Addr>, VmError> {
        let n = name.to_string();
        Ok(self
            .store
            .run(move |s| s.with(|c| vms::pinned_ip(c, &n)))
            .await?)
    }

    /// Chooses `row`'s address (`requested` exactly, else `preferred` if free, else the
    /// lowest free one) and writes its host entry, under the agent's pinning lock: the
    /// lock travels into the libvirt call, so a request that stops waiting does not let
    /// another create choose before this one's entry is written.
    pub(super) async fn pin(
        &self,
        row: &VmRow,
        requested: Option<Ipv4Addr>,
        preferred: Option<Ipv4Addr>,
    ) -> Result<Reservation, VmError> {
        let wait = self.lv.timeout();
        let guard = tokio::time::timeout(wait, Arc::clone(&self.pinning).lock_owned())
            .await
            .map_err(|_| {
                VmError::Unavailable(format!(
                    "another create did not finish choosing its address within {} s",
                    wait.as_secs()
                ))
            })?;
        let (net, name) = (row.network_name.clone(), row.name.clone());
        let (pinned, macs) = self
            .store
            .run(move |s| {
                s.with(|c| {
                    Ok::<_, crate::store::StoreError>((
                        vms::pinned_on(c, &net, &name)?,
                        vms::macs(c)?,
                    ))
                })
            })
            .await?;
        let others: Taken = pinned
            .into_iter()
            .map(|(ip, vm)| (ip, format!("pinned for VM {vm}")))
            .collect();
        let row = row.clone();
        let (network, mac) = (row.network_name.clone(), row.mac.clone());
        let reserved = self
            .lv
            .call(move |conn| {
                let _held = guard;
                crate::vm::domain::ensure_network(conn, &row.network_name)?;
                let mut pin = pin_of(&row, requested, preferred, others);
                pin.known_macs = macs.into_iter().collect();
                dhcp_hosts::reserve(conn, &pin)
            })
            .await;
        if let Err(e) = &reserved
            && e.is_unavailable()
        {
            // Cut off: libvirt may still write the entry.
            self.stray_pins.add(&network, &mac);
        }
        reserved
    }

    /// Undoes [`Vms::pin`] after a create failed: the MAC's entry as it was before.
    /// A failure is logged, and the entry left to the reconcile (`vm::stray_pins`).
    pub(super) async fn unpin(&self, row: &VmRow, r: Reservation) {
        let owned = row.clone();
        let undone = self
            .lv
            .call_unbounded(move |conn| {
                dhcp_hosts::release(conn, &pin_of(&owned, None, None, Taken::new()), &r)
            })
            .await;
        if let Err(e) = undone {
            tracing::error!(error = %e, ip = %r.ip, "could not remove the DHCP host entry of a failed create");
            self.stray_pins.add(&row.network_name, &row.mac);
        }
    }

    /// Removes the DHCP host entries of failed creates that libvirt may still hold
    /// (`vm::stray_pins`); the reconcile's first step. Returns what it removed; an
    /// unavailable libvirt is the pass's error.
    pub(super) async fn clean_stray_pins(&self) -> Result<Vec<String>, VmError> {
        let mut removed = Vec::new();
        for (mac, network) in self.stray_pins.due() {
            let (m, n) = (mac.clone(), network.clone());
            let held = self
                .store
                .run(move |s| s.with(|c| vms::mac_on_network(c, &m, &n)))
                .await?;
            if held {
                self.stray_pins.forget(&mac);
                continue;
            }
            let (m, n) = (mac.clone(), network.clone());
            let gone = self
                .lv
                .call(move |conn| dhcp_hosts::remove(&dhcp_hosts::network(conn, &n)?, &m))
                .await;
            match gone {
                Ok(was_there) => {
                    self.stray_pins.passed(&mac, was_there);
                    if was_there {
                        removed.push(format!("{network}: DHCP host entry of {mac} removed"));
                        self.record_own_ok(
                            "remove a failed create's DHCP host entry",
                            serde_json::json!({"network": network, "mac": mac}),
                        )
                        .await;
                    }
                }
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) if e.is_not_found() => self.stray_pins.forget(&mac),
                Err(e) => {
                    tracing::error!(network, mac, error = %e, "cannot remove a failed create's DHCP host entry")
                }
            }
        }
        Ok(removed)
    }
}

impl Vms {
    /// Removes `row`'s MAC entry from `network`, where a recreate on another network
    /// left it. A failure is logged.
    pub(super) async fn unpin_from(&self, network: &str, row: &VmRow) {
        let (net, mac) = (network.to_string(), row.mac.clone());
        let undone = self
            .lv
            .call_unbounded(move |conn| dhcp_hosts::remove(&dhcp_hosts::network(conn, &net)?, &mac))
            .await;
        if let Err(e) = undone {
            tracing::error!(vm = %row.name, network, error = %e, "could not remove the DHCP host entry on the VM's old network");
            self.stray_pins.add(network, &row.mac);
        }
    }
}

fn pin_of(
    row: &VmRow,
    requested: Option<Ipv4Addr>,
    preferred: Option<Ipv4Addr>,
    others: Taken,
) -> Pin<'_> {
    Pin {
        network: &row.network_name,
        mac: &row.mac,
        name: &row.name,
        requested,
        preferred,
        others,
        known_macs: Default::default(),
    }
}

/// The address a VM's row pins, if any.
pub(super) fn pinned(row: &VmRow) -> Option<Ipv4Addr> {
    row.pinned_ip.as_deref().and_then(|i| i.parse().ok())
}

/// What a recreate keeps of the VM it replaces (`old`): the address to prefer (the one
/// pinned, or for a VM from before pinning the one its last lease gave), and the old
/// network when the new one differs and holds the old entry.
pub(super) fn kept(old: Option<&VmRow>, network: &str) -> (Option<Ipv4Addr>, Option<String>) {
    let Some(old) = old else {
        return (None, None);
    };
    let preferred = pinned(old).or_else(|| old.last_ip.as_deref()?.parse().ok());
    let moved =
        (old.pinned_ip.is_some() && old.network_name != network).then(|| old.network_name.clone());
    (preferred, moved)
}
