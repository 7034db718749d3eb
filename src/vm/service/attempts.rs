//! Creates whose client got a 503 while their libvirt work was cut off halfway or went on
//! without them, and the cleanup that makes libvirt agree with SQLite again.
//!
//! `POST /vms` builds the VM in libvirt first and writes its row after (docs/decisions/
//! 09-vms-through-libvirt-api.md). When that libvirt call ends in `Unavailable` (LIBVIRT_TIMEOUT ran out, or
//! libvirt's keepalive gave the connection up while the daemon was frozen), what libvirt
//! holds is unknown: only volumes, a domain defined but not started, or one started after
//! the client was answered. The row is never written, and the create's own undo could
//! not reach libvirt either. Worse, requests that sat in a frozen daemon's socket are
//! still carried out when it thaws, after the client gave the connection up: a domain
//! can be defined seconds after the create failed. Such a domain carries the agent's
//! metadata, so before this a retried create of the name met a 409 ("already exists")
//! for a VM that `GET /vms` did not list as the agent's, and nothing ever removed it.
//!
//! Each such create is remembered here (in memory: an agent restart forgets it) with its
//! instance-id. Once its closure has returned (or was dropped without running), each
//! reconcile pass, and a create of the same name, removes what it made: its domain, only
//! while that carries its instance-id, and the name's volumes (a create always starts
//! from fresh ones). It is forgotten once two passes at least [`SETTLE`] apart found
//! nothing left, so that what the daemon carried out late is removed too; until then a
//! create of the name gets a 503. A create that never started made nothing and is
//! forgotten at once. Recreates are not tracked: their row (the old VM) stays, and the
//! reconcile repairs toward it. The cleanup itself is `abandoned.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long after a cleanup pass that found nothing another must still find nothing
/// before the create is forgotten.
pub const SETTLE: Duration = Duration::from_secs(10);

/// One create, as the async side sees it.
pub struct Attempt {
    name: String,
    instance_id: String,
    /// Set by the driver once the create's libvirt work asked libvirt for something.
    started: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    settling: Settling,
}

/// When something that may still show up late is gone for good: after two cleanup
/// passes at least [`SETTLE`] apart that found nothing of it.
#[derive(Default)]
pub struct Settling {
    /// Since when cleanup passes have found nothing.
    quiet_since: Option<Instant>,
}

impl Settling {
    /// Records one cleanup pass; true when what it looks for can be forgotten.
    pub fn after(&mut self, removed_something: bool) -> bool {
        if removed_something {
            self.quiet_since = None;
            return false;
        }
        match self.quiet_since {
            Some(t) => t.elapsed() >= SETTLE,
            None => {
                self.quiet_since = Some(Instant::now());
                false
            }
        }
    }
}

/// Moved into the create's closure: says (by being dropped, with the closure or at its
/// end) that it finished or will never run.
pub struct Marks {
    finished: Arc<AtomicBool>,
}

impl Drop for Marks {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Release);
    }
}

impl Attempt {
    /// A create of `name` whose call sets `started` once it reaches libvirt
    /// (`driver::Call::reached_flag`).
    pub fn new(name: &str, instance_id: &str, started: Arc<AtomicBool>) -> (Attempt, Marks) {
        let finished = Arc::new(AtomicBool::new(false));
        (
            Attempt {
                name: name.to_owned(),
                instance_id: instance_id.to_owned(),
                started,
                finished: Arc::clone(&finished),
                settling: Settling::default(),
            },
            Marks { finished },
        )
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Whether its closure ever ran (if not, it sent libvirt nothing).
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Whether its closure is done (or will never run).
    fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Records one cleanup pass; true when the attempt can be forgotten.
    pub fn settled_after(&mut self, removed_something: bool) -> bool {
        self.settling.after(removed_something)
    }
}

/// The abandoned creates, by VM name (a later abandoned create of the name replaces an
/// earlier one: it started by removing what the earlier one made).
#[derive(Default)]
pub struct Abandoned {
    by_name: Mutex<HashMap<String, Attempt>>,
}

impl Abandoned {
    pub fn add(&self, attempt: Attempt) {
        tracing::warn!(
            vm = %attempt.name,
            started = attempt.started(),
            "create answered 503 with its libvirt work unfinished; what it made is removed once that work has returned"
        );
        if let Ok(mut m) = self.by_name.lock() {
            m.insert(attempt.name.clone(), attempt);
        }
    }

    /// Whether an abandoned create of `name` is remembered (still working in libvirt,
    /// or not yet settled).
    pub fn contains(&self, name: &str) -> bool {
        self.by_name
            .lock()
            .map(|m| m.contains_key(name))
            .unwrap_or(false)
    }

    /// The names whose abandoned create has returned, ready for a cleanup pass.
    pub fn ready(&self) -> Vec<String> {
        self.by_name
            .lock()
            .map(|m| {
                m.values()
                    .filter(|a| a.finished())
                    .map(|a| a.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Takes `name`'s entry if its create has returned (the caller holds the name's
    /// claim, and puts it back unless it is settled).
    pub fn take_ready(&self, name: &str) -> Option<Attempt> {
        let mut m = self.by_name.lock().ok()?;
        if m.get(name).is_some_and(Attempt::finished) {
            m.remove(name)
        } else {
            None
        }
    }

    /// Back after a pass that did not settle it, unless a newer attempt took its place.
    pub fn put_back(&self, attempt: Attempt) {
        if let Ok(mut m) = self.by_name.lock() {
            m.entry(attempt.name.clone()).or_insert(attempt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_is_forgotten_after_two_quiet_passes_settle_apart() {
        let started = Arc::new(AtomicBool::new(false));
        let (mut a, marks) = Attempt::new("vm1", "iid-1", Arc::clone(&started));
        let abandoned = Abandoned::default();
        assert!(!a.started());
        started.store(true, Ordering::Release);
        assert!(a.started());
        let (a2, marks2) = Attempt::new("vm2", "iid-2", Arc::default());
        abandoned.add(a2);
        assert!(
            abandoned.ready().is_empty(),
            "vm2's closure has not returned"
        );
        assert!(abandoned.take_ready("vm2").is_none());
        assert!(abandoned.contains("vm2"));
        drop(marks2);
        assert_eq!(abandoned.ready(), vec!["vm2".to_owned()]);
        let a2 = abandoned.take_ready("vm2").unwrap();
        assert!(!a2.started());
        assert!(!abandoned.contains("vm2"));
        drop(marks);
        assert!(a.finished());
        // Something removed: not settled; a quiet pass starts the clock.
        assert!(!a.settled_after(true));
        assert!(!a.settled_after(false));
        assert!(!a.settled_after(false));
        a.settling.quiet_since = Some(Instant::now() - SETTLE);
        assert!(a.settled_after(false));
        // Something showed up late: the clock starts again.
        a.settling.quiet_since = Some(Instant::now() - SETTLE);
        assert!(!a.settled_after(true));
        assert!(a.settling.quiet_since.is_none());
    }
}
