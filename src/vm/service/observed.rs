//! What libvirt last said about each domain, and when. Reads (`GET /vms`, `/status`,
//! `/stats`) answer from here plus SQLite, so they never wait behind a libvirt call that
//! is stuck: a create inside a slow define, or a frozen libvirtd.
//!
//! Kept fresh three ways: libvirt's lifecycle events (one domain at a time, within a
//! second of an outside `virsh destroy`), a full listing when a read finds the last one
//! older than [`FRESH`] (at most one listing in flight; the read waits for it at most
//! [`READ_WAIT`]), and the agent's own operations, which observe their VM when done.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::vm::driver::{Domain, LibvirtFailure};

/// A full listing younger than this is served as it is.
pub const FRESH: Duration = Duration::from_secs(1);
/// How long a read waits for a full listing it asked for before it answers from the
/// last one (and says how old it is).
/// A listing that has run longer than this already is not waited for at all (libvirt is
/// stuck; the reads before found that out).
pub const READ_WAIT: Duration = Duration::from_millis(100);

/// One domain as libvirt last showed it, and when it was asked.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub domain: Domain,
    pub at: Option<SystemTime>,
}

#[derive(Default)]
struct Inner {
    /// When the last full listing started (what it says about a domain's absence is
    /// true as of then).
    listed_at: Option<SystemTime>,
    domains: BTreeMap<String, Arc<Seen>>,
    /// Domains seen gone one by one, and when: a listing that started before must not
    /// bring them back.
    gone: BTreeMap<String, SystemTime>,
    /// Since when a full listing runs, if one does.
    listing: Option<std::time::Instant>,
    /// Why the last full listing failed, if it did.
    failure: Option<Arc<LibvirtFailure>>,
}

/// The last observation of every domain.
#[derive(Default)]
pub struct Observed {
    inner: Mutex<Inner>,
    listed: tokio::sync::Notify,
}

/// What a read gets: every domain, and when the listing it comes from started.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub listed_at: Option<SystemTime>,
    pub domains: BTreeMap<String, Arc<Seen>>,
    /// Why the last listing failed (when it did).
    pub failure: Option<Arc<LibvirtFailure>>,
}

impl Observed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            listed_at: inner.listed_at,
            domains: inner.domains.clone(),
            failure: inner.failure.clone(),
        }
    }

    /// Whether the last full listing is older than [`FRESH`] (or there was none).
    pub fn stale(&self) -> bool {
        let inner = self.lock();
        inner
            .listed_at
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age > FRESH)
    }

    /// Claims the one full listing that may run at a time: false when one already runs.
    pub fn begin_listing(&self) -> bool {
        let mut inner = self.lock();
        if inner.listing.is_some() {
            return false;
        }
        inner.listing = Some(std::time::Instant::now());
        true
    }

    /// Ends the listing claimed by [`Observed::begin_listing`]: what it `found`
    /// replaces what was known, except domains observed one by one since the listing
    /// started, which are newer; a failure keeps what was known, and says why.
    pub fn end_listing(
        &self,
        started: SystemTime,
        found: Result<Vec<(String, Domain)>, LibvirtFailure>,
    ) {
        let mut inner = self.lock();
        inner.listing = None;
        let found = found.map_err(Arc::new);
        inner.failure = found.as_ref().err().cloned();
        if let Ok(found) = found {
            let mut fresh: BTreeMap<String, Arc<Seen>> = found
                .into_iter()
                .map(|(n, domain)| {
                    let seen = Seen {
                        domain,
                        at: Some(started),
                    };
                    (n, Arc::new(seen))
                })
                .collect();
            for (name, seen) in &inner.domains {
                if seen.at.is_some_and(|t| t > started) {
                    fresh.insert(name.clone(), Arc::clone(seen));
                }
            }
            for (name, when) in std::mem::take(&mut inner.gone) {
                if when > started {
                    fresh.remove(&name);
                }
            }
            inner.domains = fresh;
            inner.listed_at = Some(started);
        }
        drop(inner);
        self.listed.notify_waiters();
    }

    /// Waits for the running listing to end, at most until it has run for `wait`.
    pub async fn wait_listing(&self, wait: Duration) {
        let ended = self.listed.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        let Some(since) = self.lock().listing else {
            return;
        };
        let left = wait.saturating_sub(since.elapsed());
        if !left.is_zero() {
            let _ = tokio::time::timeout(left, ended).await;
        }
    }

    /// One domain as libvirt showed it when asked at `asked`: `None` when libvirt no
    /// longer had it. An observation older than the one kept (two lookups of a domain
    /// racing, an event's against an operation's) is dropped: returns whether it was
    /// kept.
    pub fn set(&self, name: &str, seen: Option<Domain>, asked: SystemTime) -> bool {
        let mut inner = self.lock();
        let newer_known = inner
            .domains
            .get(name)
            .and_then(|s| s.at)
            .into_iter()
            .chain(inner.gone.get(name).copied())
            .any(|t| t > asked);
        if newer_known {
            return false;
        }
        match seen {
            Some(domain) => {
                inner.gone.remove(name);
                let s = Seen {
                    domain,
                    at: Some(asked),
                };
                inner.domains.insert(name.to_owned(), Arc::new(s));
            }
            None => {
                inner.domains.remove(name);
                if inner.listing.is_some() {
                    inner.gone.insert(name.to_owned(), asked);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::VmState;
    use crate::vm::driver::{Cause, LibvirtFailure};

    fn seen(state: VmState) -> Domain {
        Domain {
            active: state == VmState::Running,
            state,
            uuid: String::new(),
            instance_id: None,
            nics: Vec::new(),
            serial: crate::vm::driver::SerialPort::Pty,
        }
    }

    #[test]
    fn a_listing_does_not_undo_what_an_event_said_after_it_started() {
        let o = Observed::default();
        assert!(o.stale());
        assert!(o.begin_listing());
        assert!(!o.begin_listing(), "one listing at a time");
        let started = SystemTime::now() - Duration::from_millis(10);
        // Events while the listing runs: vm1 destroyed, vm3 defined, vm4 undefined.
        let now = SystemTime::now();
        o.set("vm1", Some(seen(VmState::Shutoff)), now);
        o.set("vm3", Some(seen(VmState::Shutoff)), now);
        o.set("vm4", None, now);
        o.end_listing(
            started,
            Ok(vec![
                ("vm1".into(), seen(VmState::Running)),
                ("vm2".into(), seen(VmState::Running)),
                ("vm4".into(), seen(VmState::Running)),
            ]),
        );
        let s = o.snapshot();
        assert_eq!(s.domains["vm1"].domain.state, VmState::Shutoff);
        assert_eq!(s.domains["vm2"].domain.state, VmState::Running);
        assert!(s.domains.contains_key("vm3"));
        assert!(!s.domains.contains_key("vm4"));
        assert_eq!(s.listed_at, Some(started));
        assert!(o.begin_listing(), "the listing ended");
        // A failed listing keeps what was known.
        let away = LibvirtFailure::unavailable(Cause::NoAnswer(Duration::from_secs(3)));
        o.end_listing(SystemTime::now(), Err(away));
        assert_eq!(o.snapshot().domains.len(), 3);
        let failure = o.snapshot().failure.unwrap();
        assert_eq!(failure.reason(), "libvirt did not answer within 3 s");
        o.set("vm2", None, SystemTime::now());
        assert!(!o.snapshot().domains.contains_key("vm2"));
        // Two lookups racing: the one asked later wins, whichever ends last.
        let (early, late) = (
            SystemTime::now(),
            SystemTime::now() + Duration::from_millis(5),
        );
        assert!(o.set("vm5", Some(seen(VmState::Shutoff)), late));
        assert!(!o.set("vm5", Some(seen(VmState::Running)), early));
        assert_eq!(o.snapshot().domains["vm5"].domain.state, VmState::Shutoff);
        assert!(
            !o.set("vm5", None, early),
            "an older lookup does not remove it"
        );
    }
}
