//! Which session holds each VM's console, within the node's budget of sessions: one
//! session per VM, reserved before its stream is opened and freed when it ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::reason::EndReason;
use crate::model::VmName;
use crate::store::audit;

/// Who attaches, for the holder's description and the audit row.
#[derive(Clone, Debug)]
pub struct Client {
    /// `token` or `controller-tunnel`.
    pub identity: String,
    /// The socket's peer.
    pub addr: Option<String>,
}

/// The session that holds a VM's console, as a refused attach is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub session: u64,
    pub identity: String,
    pub addr: Option<String>,
    /// ISO 8601, UTC.
    pub since: String,
}

/// A VM's console while a session holds it.
struct Held {
    holder: Holder,
    /// Tells the session's pump to end, and why.
    stop: watch::Sender<Option<EndReason>>,
    /// Closed when the session let go.
    released: watch::Receiver<bool>,
}

/// What a new session gets from its reservation: its id, the signal that ends it, and
/// what it sets when it let go.
pub struct Reserved {
    pub id: u64,
    pub stop: watch::Receiver<Option<EndReason>>,
    pub released: watch::Sender<bool>,
}

/// Why a reservation was refused.
pub enum Refusal {
    Held(Holder),
    Full(usize),
}

/// The held consoles.
#[derive(Default)]
pub struct Registry {
    held: Mutex<HashMap<VmName, Held>>,
    next_id: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<VmName, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Holds `vm`'s console for a new session of `client`, if free and within `max`.
    pub fn reserve(&self, vm: &VmName, client: &Client, max: usize) -> Result<Reserved, Refusal> {
        let mut held = self.lock();
        if let Some(h) = held.get(vm) {
            return Err(Refusal::Held(h.holder.clone()));
        }
        if held.len() >= max {
            return Err(Refusal::Full(max));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (stop, stop_rx) = watch::channel(None);
        let (released_tx, released) = watch::channel(false);
        let holder = Holder {
            session: id,
            identity: client.identity.clone(),
            addr: client.addr.clone(),
            since: audit::now_iso(),
        };
        held.insert(
            vm.clone(),
            Held {
                holder,
                stop,
                released,
            },
        );
        crate::metrics::global()
            .consoles_open
            .set(held.len() as i64);
        Ok(Reserved {
            id,
            stop: stop_rx,
            released: released_tx,
        })
    }

    /// Frees `vm`'s console if session `id` still holds it.
    pub fn release(&self, vm: &VmName, id: u64) {
        let mut held = self.lock();
        if held.get(vm).is_some_and(|h| h.holder.session == id) {
            held.remove(vm);
        }
        crate::metrics::global()
            .consoles_open
            .set(held.len() as i64);
    }

    /// Asks the session holding `vm`'s console (if any) to end; returns what tells when
    /// it let go.
    pub fn stop(&self, vm: &VmName, why: &EndReason) -> Option<watch::Receiver<bool>> {
        let held = self.lock();
        let h = held.get(vm)?;
        let _ = h.stop.send(Some(why.clone()));
        Some(h.released.clone())
    }

    /// Asks every session to end.
    pub fn stop_all(&self, why: &EndReason) -> Vec<watch::Receiver<bool>> {
        self.lock()
            .values()
            .map(|h| {
                let _ = h.stop.send(Some(why.clone()));
                h.released.clone()
            })
            .collect()
    }
}
