//! DHCP host entries of failed creates that libvirt may still hold: the create could not
//! take its entry away when it failed (libvirt was frozen, restarting or unreachable),
//! or its reserve was cut off and libvirt may carry it out late (a request that sat in
//! a frozen daemon's socket runs when it thaws, after the create was told it failed).
//! Left alone, such an entry stays in the network's persistent definition and takes
//! an address of its range for good.
//!
//! Each is remembered (in memory: an agent restart forgets it, and then only a create of
//! the same name replaces it) by its MAC, which a create draws fresh and no other VM
//! has, with the address it pins: until it is gone, no create is given that address
//! (`addresses::Holder::Stray`). Every reconcile pass removes the MAC's entry from its
//! network until two passes at least `attempts::SETTLE` apart found none; it is forgotten
//! at once when a VM row holds that MAC on that network (a recreate's VM: the reconcile
//! keeps that row's entry itself).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use super::attempts::Settling;
use crate::model::MacAddr;

struct Stray {
    network: String,
    ip: Ipv4Addr,
    settling: Settling,
}

#[derive(Default)]
pub struct StrayPins {
    by_mac: Mutex<HashMap<MacAddr, Stray>>,
}

impl StrayPins {
    fn lock(&self) -> MutexGuard<'_, HashMap<MacAddr, Stray>> {
        self.by_mac.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the entry of `mac` for `ip` on `network` as one to take away.
    pub fn add(&self, network: &str, mac: &MacAddr, ip: Ipv4Addr) {
        tracing::warn!(
            network,
            mac = %mac,
            ip = %ip,
            "a failed create's DHCP host entry may be left in libvirt; the reconcile removes it"
        );
        let stray = Stray {
            network: network.to_owned(),
            ip,
            settling: Settling::default(),
        };
        self.lock().insert(mac.clone(), stray);
    }

    /// The (MAC, network) pairs to look for.
    pub fn due(&self) -> Vec<(MacAddr, String)> {
        let m = self.lock();
        m.iter()
            .map(|(mac, s)| (mac.clone(), s.network.clone()))
            .collect()
    }

    /// The addresses such entries may hold on `network`, with their MACs.
    pub fn on(&self, network: &str) -> Vec<(Ipv4Addr, MacAddr)> {
        let m = self.lock();
        m.iter()
            .filter(|(_, s)| s.network == network)
            .map(|(mac, s)| (s.ip, mac.clone()))
            .collect()
    }

    /// Records a cleanup pass for `mac` (`removed`: an entry was there), forgetting it
    /// once settled.
    pub fn passed(&self, mac: &MacAddr, removed: bool) {
        let mut m = self.lock();
        if m.get_mut(mac).is_some_and(|s| s.settling.after(removed)) {
            m.remove(mac);
        }
    }

    /// Forgets `mac`: a VM row holds it, or its network is gone.
    pub fn forget(&self, mac: &MacAddr) {
        self.lock().remove(mac);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stray_entry_is_looked_for_until_two_quiet_passes() {
        let s = StrayPins::default();
        let mac = MacAddr::qemu([0, 0, 1]);
        let ip = Ipv4Addr::new(10, 0, 0, 9);
        s.add("default", &mac, ip);
        assert_eq!(s.due(), [(mac.clone(), "default".to_owned())]);
        assert_eq!(s.on("default"), [(ip, mac.clone())]);
        assert!(s.on("other").is_empty());
        s.passed(&mac, true);
        s.passed(&mac, false);
        assert_eq!(s.due().len(), 1, "one quiet pass is not enough");
        s.forget(&mac);
        assert!(s.due().is_empty());
    }
}
