//! DHCP host entries of failed creates that libvirt may still hold: the create could not
//! take its entry away when it failed (libvirt was frozen, restarting or unreachable),
//! or its reserve was cut off and libvirt may carry it out late (a request that sat in
//! a frozen daemon's socket runs when it thaws, after the create was told it failed).
//! Left alone, such an entry stays in the network's persistent definition and takes
//! an address of its range for good.
//!
//! Each is remembered (in memory: an agent restart forgets it, and then only a create of
//! the same name replaces it) by its MAC, which a create draws fresh and no other VM
//! has. Every reconcile pass removes the MAC's entry from its network until two passes
//! at least `abandoned::SETTLE` apart found none; it is forgotten at once when a VM row
//! holds that MAC on that network (a recreate's VM: the reconcile keeps that row's
//! entry itself).

use std::collections::HashMap;
use std::sync::Mutex;

use super::abandoned::Settling;

#[derive(Default)]
pub struct StrayPins {
    /// By MAC: the network, and how long passes have found nothing.
    by_mac: Mutex<HashMap<String, (String, Settling)>>,
}

impl StrayPins {
    /// Remembers the entry of `mac` on `network` as one to take away.
    pub fn add(&self, network: &str, mac: &str) {
        tracing::warn!(
            network,
            mac,
            "a failed create's DHCP host entry may be left in libvirt; the reconcile removes it"
        );
        if let Ok(mut m) = self.by_mac.lock() {
            m.insert(mac.to_owned(), (network.to_owned(), Settling::default()));
        }
    }

    /// The (MAC, network) pairs to look for.
    pub fn due(&self) -> Vec<(String, String)> {
        self.by_mac
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(mac, (n, _))| (mac.clone(), n.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records a cleanup pass for `mac` (`removed`: an entry was there), forgetting it
    /// once settled.
    pub fn passed(&self, mac: &str, removed: bool) {
        if let Ok(mut m) = self.by_mac.lock()
            && let Some((_, settling)) = m.get_mut(mac)
            && settling.after(removed)
        {
            m.remove(mac);
        }
    }

    /// Forgets `mac`: a VM row holds it, or its network is gone.
    pub fn forget(&self, mac: &str) {
        if let Ok(mut m) = self.by_mac.lock() {
            m.remove(mac);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stray_entry_is_looked_for_until_two_quiet_passes() {
        let s = StrayPins::default();
        s.add("default", "52:54:00:00:00:01");
        assert_eq!(
            s.due(),
            [("52:54:00:00:00:01".to_owned(), "default".to_owned())]
        );
        s.passed("52:54:00:00:00:01", true);
        s.passed("52:54:00:00:00:01", false);
        assert_eq!(s.due().len(), 1, "one quiet pass is not enough");
        s.forget("52:54:00:00:00:01");
        assert!(s.due().is_empty());
    }
}
