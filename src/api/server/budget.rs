//! The connection budget: what each connection is doing (and so when it may be closed),
//! and the set of open connections, capped, from which idle ones are shed.
//!
//! A connection is *busy* from the moment its request's headers are complete until
//! hyper has taken the last bytes of the response; otherwise it is idle, waiting for its
//! first request's headers, kept alive between requests, or receiving the next
//! request's headers. Only idle connections are closed by a timeout or shed for a newer
//! one; a request in progress is bounded by the body rules (`timed_body`) and by its
//! handler's own timeouts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Waiting for the first request's headers (counted from the accept).
const NEW: u8 = 0;
/// Kept alive after a response, nothing of the next request yet.
const IDLE: u8 = 1;
/// Kept alive, the next request's headers arriving (counted from their first byte).
const HEAD: u8 = 2;
/// A request in progress.
const BUSY: u8 = 3;
/// Chosen to be shed for a newer connection; its task closes it.
const SHED: u8 = 4;

/// The two connection-level timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub header_read: Duration,
    pub keepalive: Duration,
}

impl Timeouts {
    /// How often an open connection's task looks at its state when no deadline is
    /// nearer. Every deadline a state change sets is at least this far in the future,
    /// so changes never need to wake the task (only shedding and shutdown do).
    fn check_every(&self) -> Duration {
        self.header_read.min(self.keepalive)
    }
}

/// Milliseconds since the registry was made, so that times fit in atomics.
#[derive(Clone, Copy, Debug)]
struct Clock(Instant);

impl Clock {
    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.0).as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Why a connection's task closes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// No complete request headers within HEADER_READ_TIMEOUT.
    HeaderTimeout,
    /// Kept alive without a new request for KEEPALIVE_TIMEOUT.
    KeepaliveTimeout,
    /// Shed: the cap was reached and this one had been idle longest.
    Shed,
}

impl Close {
    pub fn as_str(self) -> &'static str {
        match self {
            Close::HeaderTimeout => "header read timeout (HEADER_READ_TIMEOUT)",
            Close::KeepaliveTimeout => "keep-alive idle timeout (KEEPALIVE_TIMEOUT)",
            Close::Shed => "shed: connection cap reached, idle longest",
        }
    }
}

/// One connection's state, shared by its task (which changes it) and the acceptor
/// (which may shed it).
#[derive(Debug)]
pub struct ConnState {
    phase: AtomicU8,
    /// Since when the connection has had no request in progress: its age as a shedding
    /// candidate. Not moved by the bytes of a dribbled header.
    idle_since: AtomicU64,
    /// When an idle connection is closed.
    deadline: AtomicU64,
    /// Wakes the connection's task when it was shed.
    shed: Notify,
    clock: Clock,
    timeouts: Timeouts,
}

impl ConnState {
    fn new(clock: Clock, timeouts: Timeouts, now: Instant) -> Self {
        let t = clock.ms(now);
        Self {
            phase: AtomicU8::new(NEW),
            idle_since: AtomicU64::new(t),
            deadline: AtomicU64::new(t.saturating_add(ms(timeouts.header_read))),
            shed: Notify::new(),
            clock,
            timeouts,
        }
    }

    /// Bytes came in. On a kept-alive connection the first of them start the next
    /// request's header timeout.
    pub fn bytes_arrived(&self) {
        if self.phase.load(Ordering::Relaxed) != IDLE {
            return;
        }
        let now = self.clock.ms(Instant::now());
        self.deadline.store(
            now.saturating_add(ms(self.timeouts.header_read)),
            Ordering::Relaxed,
        );
        // Fails only when the acceptor shed it meanwhile; then the deadline is moot.
        let _ = self
            .phase
            .compare_exchange(IDLE, HEAD, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// A request's headers are complete. A connection shed a moment ago serves it all
    /// the same: its client has done nothing wrong, and the cap is exceeded by one for
    /// as long as the request lasts.
    pub fn request_started(&self) {
        self.phase.store(BUSY, Ordering::Release);
    }

    /// hyper has taken the last bytes of the response: idle until the next request.
    pub fn response_finished(&self) {
        let now = self.clock.ms(Instant::now());
        self.idle_since.store(now, Ordering::Relaxed);
        self.deadline.store(
            now.saturating_add(ms(self.timeouts.keepalive)),
            Ordering::Relaxed,
        );
        self.phase.store(IDLE, Ordering::Release);
    }

    pub fn is_busy(&self) -> bool {
        self.phase.load(Ordering::Acquire) == BUSY
    }

    /// Whether the connection must be closed now, and why.
    pub fn verdict(&self, now: Instant) -> Option<Close> {
        let phase = self.phase.load(Ordering::Acquire);
        match phase {
            SHED => Some(Close::Shed),
            BUSY => None,
            _ if self.clock.ms(now) < self.deadline.load(Ordering::Relaxed) => None,
            IDLE => Some(Close::KeepaliveTimeout),
            _ => Some(Close::HeaderTimeout),
        }
    }

    /// When the connection's task should look again: its deadline, but no later than
    /// [`Timeouts::check_every`] from now.
    pub fn next_check(&self, now: Instant) -> Instant {
        let periodic = now + self.timeouts.check_every();
        if self.is_busy() {
            return periodic;
        }
        let deadline = self.clock.at(self.deadline.load(Ordering::Relaxed));
        deadline.min(periodic)
    }

    /// Resolves when the acceptor sheds this connection.
    pub async fn shed_requested(&self) {
        self.shed.notified().await;
    }

    /// Marks an idle connection (as seen in `phase`) to be shed; false when it has
    /// changed since.
    fn try_shed(&self, phase: u8) -> bool {
        let won = self
            .phase
            .compare_exchange(phase, SHED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if won {
            self.shed.notify_one();
        }
        won
    }

    /// Idle (sheddable) since when, or None while busy or already shed.
    fn idle_for_shedding(&self) -> Option<(u8, u64)> {
        match self.phase.load(Ordering::Acquire) {
            p @ (NEW | IDLE | HEAD) => Some((p, self.idle_since.load(Ordering::Relaxed))),
            _ => None,
        }
    }
}

/// The open connections, at most `cap` of them (plus those just shed, until their tasks
/// have closed them).
#[derive(Debug)]
pub struct Registry {
    cap: usize,
    clock: Clock,
    timeouts: Timeouts,
    inner: Mutex<Inner>,
    /// Signalled when the last connection is gone (for shutdown).
    emptied: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    open: HashMap<u64, Arc<ConnState>>,
}

/// What the acceptor does with a new connection.
pub enum Admission {
    /// Serve it (under the cap, or an idle connection was shed for it).
    Admitted {
        registration: Registration,
        shed: bool,
    },
    /// At the cap and every connection busy.
    Refused,
}

/// A connection's place in the registry; dropping it (when the connection's task ends)
/// frees the place.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    pub state: Arc<ConnState>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        inner.open.remove(&self.id);
        if inner.open.is_empty() {
            self.registry.emptied.notify_waiters();
        }
    }
}

/// Shedding retries this many times when the chosen connection started a request just
/// before it could be marked.
const SHED_TRIES: usize = 3;

impl Registry {
    pub fn new(cap: usize, timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Self {
            cap,
            clock: Clock(Instant::now()),
            timeouts,
            inner: Mutex::new(Inner::default()),
            emptied: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection; at the cap, first sheds the connection idle longest.
    pub fn admit(self: &Arc<Self>) -> Admission {
        let mut inner = self.lock();
        let shed = inner.open.len() >= self.cap;
        if shed && !shed_longest_idle(&inner.open) {
            return Admission::Refused;
        }
        let state = Arc::new(ConnState::new(self.clock, self.timeouts, Instant::now()));
        let id = inner.next_id;
        inner.next_id += 1;
        inner.open.insert(id, state.clone());
        Admission::Admitted {
            registration: Registration {
                registry: self.clone(),
                id,
                state,
            },
            shed,
        }
    }

    /// Sheds the connection idle longest, whatever the count (the kernel ran out of
    /// descriptors); false when every connection is busy.
    pub fn shed_one(&self) -> bool {
        shed_longest_idle(&self.lock().open)
    }

    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// Resolves once no connection is open.
    pub async fn emptied(&self) {
        loop {
            let notified = self.emptied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().open.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// Marks the idle connection with the oldest `idle_since` to be shed. A linear scan,
/// done only at the cap: requests themselves never take the registry's lock.
fn shed_longest_idle(open: &HashMap<u64, Arc<ConnState>>) -> bool {
    for _ in 0..SHED_TRIES {
        let oldest = open
            .values()
            .filter_map(|c| c.idle_for_shedding().map(|(p, since)| (since, p, c)))
            .min_by_key(|(since, _, _)| *since);
        match oldest {
            None => return false,
            Some((_, phase, conn)) if conn.try_shed(phase) => return true,
            Some(_) => continue,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header_read: Duration::from_secs(10),
        keepalive: Duration::from_secs(60),
    };

    fn admitted(r: &Arc<Registry>) -> (Registration, bool) {
        match r.admit() {
            Admission::Admitted {
                registration, shed, ..
            } => (registration, shed),
            Admission::Refused => panic!("refused"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_follow_the_connections_phase() {
        let r = Registry::new(10, T);
        let (reg, _) = admitted(&r);
        let c = &reg.state;
        let t0 = Instant::now();
        // First request: the header timeout counts from the accept, bytes or not.
        c.bytes_arrived();
        assert_eq!(c.verdict(t0 + Duration::from_millis(9_999)), None);
        assert_eq!(
            c.verdict(t0 + Duration::from_secs(10)),
            Some(Close::HeaderTimeout)
        );
        c.request_started();
        assert_eq!(c.verdict(t0 + Duration::from_secs(3600)), None);
        tokio::time::advance(Duration::from_secs(20)).await;
        c.response_finished();
        let t1 = Instant::now();
        assert_eq!(c.verdict(t1 + Duration::from_secs(59)), None);
        assert_eq!(
            c.verdict(t1 + Duration::from_secs(60)),
            Some(Close::KeepaliveTimeout)
        );
        // The next request's first byte starts its own header timeout.
        tokio::time::advance(Duration::from_secs(5)).await;
        c.bytes_arrived();
        let t2 = Instant::now();
        assert_eq!(c.verdict(t2 + Duration::from_millis(9_999)), None);
        assert_eq!(
            c.verdict(t2 + Duration::from_secs(10)),
            Some(Close::HeaderTimeout)
        );
        // The task never sleeps past check_every, so later deadlines need no wake-up.
        assert!(c.next_check(t2) <= t2 + Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_connection_idle_longest_is_shed() {
        let r = Registry::new(3, T);
        let (a, _) = admitted(&r);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (b, _) = admitted(&r);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (c, _) = admitted(&r);
        // a is busy, b has waited longest of the idle ones.
        a.state.request_started();
        let (_d, shed) = admitted(&r);
        assert!(shed);
        assert_eq!(b.state.verdict(Instant::now()), Some(Close::Shed));
        assert_eq!(c.state.verdict(Instant::now()), None);
        assert_eq!(a.state.verdict(Instant::now()), None);
        // b's task closes it: its place is free again.
        drop(b);
        assert_eq!(r.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_is_as_old_as_its_last_response() {
        let r = Registry::new(2, T);
        let (a, _) = admitted(&r);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (b, _) = admitted(&r);
        a.state.request_started();
        tokio::time::advance(Duration::from_secs(1)).await;
        a.state.response_finished();
        // b (idle since 1 s) is older than a (idle since 2 s), even as a dribbles.
        a.state.bytes_arrived();
        let (_c, shed) = admitted(&r);
        assert!(shed);
        assert_eq!(b.state.verdict(Instant::now()), Some(Close::Shed));
        assert_eq!(a.state.verdict(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_connection_busy_a_new_one_is_refused() {
        let r = Registry::new(2, T);
        let (a, _) = admitted(&r);
        let (b, _) = admitted(&r);
        a.state.request_started();
        b.state.request_started();
        assert!(matches!(r.admit(), Admission::Refused));
        assert!(!r.shed_one());
        b.state.response_finished();
        assert!(r.shed_one());
        assert_eq!(b.state.verdict(Instant::now()), Some(Close::Shed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shed_connection_that_just_got_a_request_serves_it() {
        let r = Registry::new(1, T);
        let (a, _) = admitted(&r);
        let (_b, shed) = admitted(&r);
        assert!(shed);
        a.state.request_started();
        assert_eq!(a.state.verdict(Instant::now()), None);
    }

    #[tokio::test]
    async fn emptied_resolves_when_the_last_connection_goes() {
        let r = Registry::new(2, T);
        let (a, _) = admitted(&r);
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.emptied().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
