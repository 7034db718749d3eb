//! Pinned addresses: the agent chooses a VM's address from what it knows (SQLite, the
//! network as libvirt last showed it, the creates in flight: no libvirt call when it has
//! seen the network), answers with it, and writes the DHCP host entry with the rest of
//! the create's work, after checking the network as it is then. A delete takes the entry
//! away, the reconcile puts back a vanished one (docs/decisions/27-the-address-is-the-agents.md).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use super::Vms;
use super::address_book::AddressBook;
use super::addresses::{self, Holder};
use crate::model::MacAddr;
use crate::store::vms::{self, VmRow};
use crate::vm::driver::{Call, HostEntry, Hypervisor, LibvirtFailure, Network};
use crate::vm::{Conflict, Invalid, VmError};

/// What a create's entry write needs: whose entry, and the MACs of the agent's VMs (an
/// entry of the name with another MAC is a leftover only if no VM has that MAC).
pub struct Pin {
    pub network: String,
    pub entry: HostEntry,
    pub known_macs: BTreeSet<MacAddr>,
}

impl Vms {
    /// Chooses `row`'s address: `requested` exactly, else `preferred` if free, else the
    /// lowest free one; from SQLite, the network as last seen and the creates in flight,
    /// under the agent's choosing lock. The create holds it until it ends.
    pub(super) async fn choose_address(
        &self,
        row: &VmRow,
        requested: Option<Ipv4Addr>,
        preferred: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, VmError> {
        let network = row.network_name.clone();
        let seen = self.network_facts(&network).await?;
        let _choosing = self.addresses.choosing.lock().await;
        // The agent's own holders first, SQLite after: a create that ends in between
        // wrote its row before it let go of its address (or left a stray entry).
        let ours = self.addresses.held_by_agent(&network, &row.name, &row.mac);
        let (net, name) = (network.clone(), row.name.to_string());
        let pinned = self
            .store
            .run(move |s| s.with(|c| vms::pinned_on(c, &net, &name)))
            .await?;
        let mut taken = addresses::held_in(&seen, &row.mac);
        for (ip, by) in ours {
            taken.insert(ip, by);
        }
        for (ip, vm) in pinned {
            if let IpAddr::V4(ip) = ip {
                taken.insert(ip, Holder::Vm(vm));
            }
        }
        let subnet = addresses::dhcp_subnet(&network, &seen.subnets)?;
        let ip = addresses::choose(&network, subnet, &taken, requested, preferred)?;
        self.addresses.hold(&row.name, &network, ip);
        Ok(ip)
    }

    /// The network as libvirt last showed it; asked now (bounded by LIBVIRT_TIMEOUT)
    /// only when the agent has not seen it since it started.
    async fn network_facts(&self, network: &str) -> Result<Network, VmError> {
        if let Some(seen) = self.addresses.known(network) {
            return Ok(seen);
        }
        let n = network.to_string();
        let seen = self
            .driver
            .ask(move |hv, call| hv.network(call, &n))
            .await
            .map_err(|e| no_network(network, e))?;
        self.addresses.saw(network, &seen);
        Ok(seen)
    }

    /// Runs `before` (the host's checks), then writes the create's host entry (see
    /// [`write_entry`]), waiting for libvirt's real answer; an entry whose write was cut
    /// off (libvirt may still carry it out) is remembered as a stray. Returns the address
    /// the MAC's entry had before (a recreate's).
    pub(super) async fn pin(
        &self,
        pin: Pin,
        before: impl FnOnce(&dyn Hypervisor, &Call) -> Result<(), VmError> + Send + 'static,
    ) -> Result<Option<Ipv4Addr>, VmError> {
        let (network, mac, ip) = (pin.network.clone(), pin.entry.mac.clone(), pin.entry.ip);
        let book = std::sync::Arc::clone(&self.addresses);
        let written = self
            .driver
            .work(move |hv, call| {
                before(hv, call)?;
                write_entry(hv, call, &pin, &book)
            })
            .await;
        if let Err(e) = &written
            && e.is_unavailable()
        {
            self.addresses.strays.add(&network, &mac, ip);
        }
        written
    }

    /// Undoes [`Vms::pin`] after a create failed: the MAC's entry as it was before
    /// (`previous`). A failure is logged, and the entry left to the reconcile.
    pub(super) async fn unpin(&self, row: &VmRow, ip: Ipv4Addr, previous: Option<Ipv4Addr>) {
        if previous == Some(ip) {
            return;
        }
        let (net, mac, name) = (row.network_name.clone(), row.mac.clone(), row.name.clone());
        let undone = self
            .driver
            .work(move |hv, call| match previous {
                Some(p) => {
                    let entry = HostEntry { mac, name, ip: p };
                    hv.put_host_entry(call, &net, &entry).map(drop)
                }
                None => hv.remove_host_entry(call, &net, &mac).map(drop),
            })
            .await;
        if let Err(e) = undone {
            tracing::error!(error = %e, ip = %ip, "could not remove the DHCP host entry of a failed create");
            self.addresses.strays.add(&row.network_name, &row.mac, ip);
        }
    }

    /// Removes `row`'s MAC entry (for `ip`) from `network`, where a recreate on another
    /// network left it. A failure is logged, and the entry left to the reconcile.
    pub(super) async fn unpin_from(&self, network: &str, row: &VmRow, ip: Ipv4Addr) {
        let (net, mac) = (network.to_string(), row.mac.clone());
        let undone = self
            .driver
            .work(move |hv, call| hv.remove_host_entry(call, &net, &mac))
            .await;
        if let Err(e) = undone {
            tracing::error!(vm = %row.name, network, error = %e, "could not remove the DHCP host entry on the VM's old network");
            self.addresses.strays.add(network, &row.mac, ip);
        }
    }

    /// Removes the DHCP host entries of failed creates that libvirt may still hold
    /// (`stray_pins.rs`); the reconcile's first step. Returns what it removed; an
    /// unavailable libvirt is the pass's error.
    pub(super) async fn clean_stray_pins(&self) -> Result<Vec<String>, VmError> {
        let mut removed = Vec::new();
        for (mac, network) in self.addresses.strays.due() {
            let (m, n) = (mac.clone(), network.clone());
            let held = self
                .store
                .run(move |s| s.with(|c| vms::mac_on_network(c, &m, &n)))
                .await?;
            if held {
                self.addresses.strays.forget(&mac);
                continue;
            }
            let (m, n) = (mac.clone(), network.clone());
            let gone = self
                .driver
                .ask(move |hv, call| hv.remove_host_entry(call, &n, &m))
                .await;
            match gone {
                Ok(was_there) => {
                    self.addresses.strays.passed(&mac, was_there);
                    if was_there {
                        removed.push(format!("{network}: DHCP host entry of {mac} removed"));
                        self.record_own_ok(
                            "remove a failed create's DHCP host entry",
                            serde_json::json!({"network": network, "mac": mac}),
                        )
                        .await;
                    }
                }
                Err(e) if e.is_unavailable() => return Err(e.into()),
                Err(e) if e.is_not_found() => self.addresses.strays.forget(&mac),
                Err(e) => {
                    tracing::error!(network, mac = %mac, error = %e, "cannot remove a failed create's DHCP host entry")
                }
            }
        }
        Ok(removed)
    }
}

/// A network libvirt does not have, as a create's error: the request named it (400).
pub(super) fn no_network(network: &str, e: LibvirtFailure) -> VmError {
    if e.is_not_found() {
        Invalid::NoNetwork(network.to_owned()).into()
    } else {
        e.into()
    }
}

/// Writes `pin`'s host entry. The network is started first, then read as it is now: the
/// address, chosen from what the agent knew, must still be free (else the create fails,
/// with who holds it: the VM never gets another address than the one it was given), and
/// an entry of the VM's name that an earlier, cut-off create left is removed. Blocking.
fn write_entry(
    hv: &dyn Hypervisor,
    call: &Call,
    pin: &Pin,
    book: &AddressBook,
) -> Result<Option<Ipv4Addr>, VmError> {
    let (network, entry) = (&pin.network, &pin.entry);
    hv.ensure_network(call, network)
        .map_err(|e| no_network(network, e))?;
    let now = hv.network(call, network)?;
    book.saw(network, &now);
    if let Err(why) = addresses::still_free(&now, entry.ip, &entry.mac) {
        return Err(Conflict::AddressLost {
            name: entry.name.to_string(),
            ip: IpAddr::V4(entry.ip),
            network: network.clone(),
            why,
        }
        .into());
    }
    if let Some(mac) = addresses::leftover(&now, &entry.name, &entry.mac, &pin.known_macs) {
        tracing::warn!(vm = %entry.name, mac = %mac, "removing the DHCP host entry a cut-off create of this name left");
        hv.remove_host_entry(call, network, &mac)?;
    }
    Ok(hv.put_host_entry(call, network, entry)?)
}

/// What a recreate keeps of the VM it replaces (`old`): the address to prefer (the one
/// pinned, or for a VM from before pinning the one its last lease gave), and the old
/// network with its address when the new network differs and holds the old entry.
pub(super) fn kept(
    old: Option<&VmRow>,
    network: &str,
) -> (Option<Ipv4Addr>, Option<(String, Ipv4Addr)>) {
    let Some(old) = old else {
        return (None, None);
    };
    let v4 = |ip: Option<IpAddr>| match ip {
        Some(IpAddr::V4(ip)) => Some(ip),
        _ => None,
    };
    let pinned = v4(old.pinned_ip);
    let preferred = pinned.or_else(|| v4(old.last_ip));
    let moved = pinned
        .filter(|_| old.network_name != network)
        .map(|ip| (old.network_name.clone(), ip));
    (preferred, moved)
}
