//! What a create chooses its address from, besides SQLite: the networks as libvirt last
//! showed them, the creates in flight, and the failed creates' entries libvirt may still
//! hold (`pinning.rs` chooses).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use super::addresses::{Holder, Taken};
use super::stray_pins::StrayPins;
use crate::model::{MacAddr, VmName};
use crate::vm::driver::Network;

/// What a create chooses its address from, besides SQLite's pinned addresses.
#[derive(Default)]
pub struct AddressBook {
    /// Each network as libvirt last showed it (every create's entry write and every
    /// reconcile pass read it again).
    networks: Mutex<HashMap<String, Network>>,
    /// The addresses chosen for creates in flight, by VM: (network, address).
    in_flight: Mutex<BTreeMap<VmName, (String, Ipv4Addr)>>,
    /// DHCP host entries of failed creates that libvirt may still hold.
    pub(super) strays: StrayPins,
    /// Held while a create chooses: two creates never choose at once.
    pub(super) choosing: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AddressBook {
    /// Keeps what libvirt just said of `network`.
    pub fn saw(&self, network: &str, seen: &Network) {
        lock(&self.networks).insert(network.to_owned(), seen.clone());
    }

    pub(super) fn known(&self, network: &str) -> Option<Network> {
        lock(&self.networks).get(network).cloned()
    }

    /// The create of `vm` holds `ip` on `network` until [`AddressBook::release`].
    pub(super) fn hold(&self, vm: &VmName, network: &str, ip: Ipv4Addr) {
        lock(&self.in_flight).insert(vm.clone(), (network.to_owned(), ip));
    }

    /// The create of `vm` ended: its row holds the address now, or nobody does.
    pub fn release(&self, vm: &str) {
        lock(&self.in_flight).remove(vm);
    }

    /// What the agent itself holds on `network` against a create of `vm` (with `mac`):
    /// other creates in flight and failed creates' entries.
    pub(super) fn held_by_agent(&self, network: &str, vm: &VmName, mac: &MacAddr) -> Taken {
        let mut taken = Taken::new();
        for (other, (net, ip)) in lock(&self.in_flight).iter() {
            if net == network && other != vm {
                taken.insert(*ip, Holder::Creating(other.clone()));
            }
        }
        for (ip, stray) in self.strays.on(network) {
            if &stray != mac {
                taken.entry(ip).or_insert(Holder::Stray(stray));
            }
        }
        taken
    }
}
