//! Connections to LIBVIRT_URI, opened lazily and replaced after libvirtd goes away. Every
//! call runs on a blocking thread (`driver::Driver`) and its caller's wait is bounded by
//! LIBVIRT_TIMEOUT where it asked for that, so a dead or hung daemon gives the caller a
//! 503, never a hung request or a stalled runtime.
//!
//! **One call at a time per connection.** A connection is checked out by one call, used
//! by that call's thread alone, and handed back (or closed, if it died) by that same
//! thread when the call returns; calls that run at once use different connections (at
//! most [`MAX_CONNECTIONS`]). libvirt's client allows several threads on one connection,
//! but libvirt 9.0's (Debian 12) RPC loop is not safe for it (CVE-2024-4418, fixed in
//! libvirt 10.4, not in Debian 12's 9.0.0-4+deb12u2): the thread that waits for
//! the socket leaves a watch with a pointer to its own stack attached to the connection
//! whenever another thread wakes it (a second call, a keepalive probe, a close), and the
//! next thread to wait on that connection runs the watch when data arrives, reading a
//! stack frame that is gone. A libvirtd frozen for seconds with requests in flight made
//! that certain: every queued call woke the waiting one, and at the thaw another thread
//! ran the stale watches and the agent died with SIGSEGV in `virNetClientIOEventFD`
//! (issue 11; `tests/libvirt_freeze.rs`). With one thread per connection the watches it
//! leaves point into the frame that is still waiting, and are gone before it returns
//! (the reply that ends the call makes all of them fire), or the connection is closed
//! for good (keepalive) and never waited on again. What is left: libvirt's event thread
//! sends keepalive probes through the same loop, so a call that starts on an idle
//! connection in the microseconds while a probe is being written can still meet a watch
//! of the event thread's; only a fixed libvirt closes that.
//!
//! It follows that a connection is never closed or replaced while a call on it runs: a
//! dead one is closed by the thread of its last call, after that call returned, and a new
//! call simply takes (or opens) another. Closures get `&Connect` and must return plain
//! data: every libvirt object they make (Domain, Network, StoragePool, StorageVol,
//! Stream) is dropped inside the closure, on the connection's own thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use virt::connect::Connect;

use crate::vm::driver::{Call, Cause, LibvirtFailure};

/// Seconds between keepalive probes (LIBVIRT_KEEPALIVE's default), and probes missed
/// before libvirt closes the connection: a daemon that stops answering is noticed
/// (KEEPALIVE_COUNT + 1) intervals after its last packet, 20 s by default (libvirt gives
/// up at the first timer after the third unanswered probe).
pub const KEEPALIVE_INTERVAL_S: u32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// Connections in use at once (each by one call). A frozen daemon holds at most this
/// many calls (and threads) inside libvirt; later calls wait for one to come back, until
/// their LIBVIRT_TIMEOUT, without touching libvirt. libvirtd allows 5000 clients.
pub const MAX_CONNECTIONS: usize = 8;
/// Open connections kept while nobody uses them; the rest are closed when their call
/// returns.
const MAX_IDLE: usize = 2;

static EVENT_LOOP: Once = Once::new();

/// libvirt's client needs an event loop for keepalive and to notice a closed socket
/// (which is what turns `is_alive` false when libvirtd exits). One thread per process.
/// Its keepalive timer is also what ends a call stuck on a frozen daemon: it marks the
/// connection closed and wakes the call's thread, which fails the call and closes the
/// socket (no close callback is registered: the next checkout sees `is_alive` false).
fn start_event_loop() {
    EVENT_LOOP.call_once(|| {
        // libvirt's default handler prints every error (a lookup of a missing object
        // included) to stderr; the agent reports errors itself, with context.
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(error = %e, "libvirt event loop unavailable; a dead daemon is noticed only on the next failed call");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = %e, "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the libvirt event thread");
        }
    });
}

/// One open connection. Owned by the pool while idle and by exactly one call's thread
/// while checked out; its `Connect` (the only handle the agent keeps) is closed when the
/// session is dropped, which only its current owner can do.
struct Session {
    conn: Connect,
    /// For the log: which connection (1, 2, ...) a message is about.
    id: u64,
}

impl Session {
    fn alive(&self) -> bool {
        // virConnectIsAlive only reads the client's state under its lock: no RPC.
        self.conn.is_alive().unwrap_or(false)
    }
}

#[derive(Default)]
struct Pool {
    /// Open connections nobody is using, newest last.
    idle: Vec<Session>,
    /// Connections checked out: in a call, or being opened for one.
    busy: usize,
}

/// Runs on the events connection each time one is opened (subscriptions that live as
/// long as it).
type OnConnect = Box<dyn Fn(&Connect) + Send + Sync>;

pub struct Libvirt {
    uri: String,
    /// LIBVIRT_TIMEOUT, for saying how long a call waited for a connection.
    timeout: Duration,
    /// Seconds between keepalive probes on every connection.
    keepalive_s: i32,
    pool: Mutex<Pool>,
    /// What subscribes a new events connection ([`Libvirt::set_on_connect`]).
    on_connect: std::sync::OnceLock<OnConnect>,
    /// A connection only for libvirt's events, never used for a call: nothing but
    /// libvirt's event thread ever waits on it (calls sharing a connection are what
    /// libvirt 9.0's CVE-2024-4418 needs).
    events: Mutex<Option<Connect>>,
    /// Signalled (to all waiters: one may have given up) whenever a checked-out connection
    /// comes back or its slot is freed.
    returned: Condvar,
    opened: AtomicU64,
}

/// A checked-out session; handed back (or closed) by `Drop`, on the thread that used it,
/// however the call ended (a panic in the closure included).
struct Checkout<'a> {
    lv: &'a Libvirt,
    session: Option<Session>,
    /// Why the connection is believed dead, for the log.
    failure: Option<String>,
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            self.lv.check_in(s, self.failure.take());
        }
    }
}

impl Libvirt {
    /// With the default keepalive (tests; the agent sets LIBVIRT_KEEPALIVE).
    #[cfg(test)]
    pub fn new(uri: impl Into<String>, timeout: Duration) -> Arc<Self> {
        Self::with_keepalive(uri, timeout, KEEPALIVE_INTERVAL_S)
    }

    /// With keepalive probes every `keepalive_s` seconds (LIBVIRT_KEEPALIVE).
    pub fn with_keepalive(
        uri: impl Into<String>,
        timeout: Duration,
        keepalive_s: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            uri: uri.into(),
            timeout,
            keepalive_s: i32::try_from(keepalive_s).unwrap_or(i32::MAX),
            pool: Mutex::new(Pool::default()),
            returned: Condvar::new(),
            opened: AtomicU64::new(0),
            on_connect: std::sync::OnceLock::new(),
            events: Mutex::new(None),
        })
    }

    /// Sets what subscribes the events connection, which is opened beside the first
    /// call's connection and again after it died (once; later calls are ignored).
    pub fn set_on_connect(&self, f: impl Fn(&Connect) + Send + Sync + 'static) {
        let _ = self.on_connect.set(Box::new(f));
    }

    /// Opens the events connection when there is a subscriber and none is alive.
    /// Blocking; called after a call's connection opened (libvirtd answers then).
    fn ensure_events_connection(&self) {
        let Some(hook) = self.on_connect.get() else {
            return;
        };
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events
            .as_ref()
            .is_some_and(|c| c.is_alive().unwrap_or(false))
        {
            return;
        }
        match Connect::open(Some(&self.uri)) {
            Ok(conn) => {
                if let Err(e) = conn.set_keep_alive(self.keepalive_s, KEEPALIVE_COUNT) {
                    tracing::debug!(error = %e.message(), "libvirt keepalive not available on the events connection");
                }
                hook(&conn);
                // The dead one (if any) goes here: no call ever ran on it.
                *events = Some(conn);
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), "cannot open libvirt's events connection; outside changes show at the next listing")
            }
        }
    }

    /// The pool, also after a panic elsewhere (nothing panics while holding it, and its
    /// state is two counters and a list, consistent at every step).
    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection with keepalive. Blocking (against a frozen daemon, until it
    /// answers again).
    fn open(&self) -> Result<Session, LibvirtFailure> {
        let conn = self.open_dedicated((self.keepalive_s, KEEPALIVE_COUNT))?;
        let id = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(uri = %self.uri, connection = id, "connected to libvirt");
        self.ensure_events_connection();
        Ok(Session { conn, id })
    }

    /// A new connection, probing every `keepalive.0` seconds and closed after
    /// `keepalive.1` probes unanswered; outside the pool, for one user alone (a console
    /// session), unless [`Libvirt::open`] made it for the pool. Blocking (against a
    /// frozen daemon, until it answers again).
    pub fn open_dedicated(&self, keepalive: (i32, u32)) -> Result<Connect, LibvirtFailure> {
        super::loader::ensure_loaded()
            .map_err(|e| LibvirtFailure::unavailable(Cause::NotLoaded(e)))?;
        start_event_loop();
        let conn = Connect::open(Some(&self.uri)).map_err(|source| {
            LibvirtFailure::unavailable(Cause::Connect {
                uri: self.uri.clone(),
                source,
            })
        })?;
        // Local drivers (test:///, qemu:///embed) have no keepalive; that is fine.
        if let Err(e) = conn.set_keep_alive(keepalive.0, keepalive.1) {
            tracing::debug!(error = %e.message(), "libvirt keepalive not available on this connection");
        }
        Ok(conn)
    }

    /// Takes an idle connection, or opens one while fewer than [`MAX_CONNECTIONS`] are
    /// in use, or waits for one to come back until the call's deadline. Gives up as soon
    /// as the call's caller did. Blocking.
    fn check_out(&self, call: &Call) -> Result<Session, LibvirtFailure> {
        let mut pool = self.lock();
        loop {
            if call.gave_up() {
                return Err(self.too_late());
            }
            if let Some(s) = pool.idle.pop() {
                if s.alive() {
                    pool.busy += 1;
                    return Ok(s);
                }
                // It died while idle (keepalive, daemon restart): nobody uses it, so it
                // is closed here, outside the lock.
                drop(pool);
                self.close(s, None);
                pool = self.lock();
                continue;
            }
            if pool.busy < MAX_CONNECTIONS {
                pool.busy += 1;
                drop(pool);
                return self.open().inspect_err(|_| self.free_slot());
            }
            pool = match call.deadline() {
                None => self.returned.wait(pool).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(LibvirtFailure::unavailable(Cause::Busy {
                            connections: MAX_CONNECTIONS,
                            waited: self.timeout,
                        }));
                    }
                    self.returned
                        .wait_timeout(pool, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// A connection's call returned: keep it for the next call, or close it (dead, or
    /// more idle ones than [`MAX_IDLE`]). On the thread of that call, after it.
    fn check_in(&self, s: Session, failure: Option<String>) {
        let alive = s.alive();
        let surplus = {
            let mut pool = self.lock();
            pool.busy = pool.busy.saturating_sub(1);
            let surplus = if alive && pool.idle.len() < MAX_IDLE {
                pool.idle.push(s);
                None
            } else {
                Some(s)
            };
            self.returned.notify_all();
            surplus
        };
        if let Some(s) = surplus {
            if alive {
                // virConnectClose sends libvirtd a close: still this thread's call.
                drop(s);
            } else {
                self.close(s, failure);
            }
        }
    }

    /// An open that failed frees its slot.
    fn free_slot(&self) {
        let mut pool = self.lock();
        pool.busy = pool.busy.saturating_sub(1);
        self.returned.notify_all();
    }

    /// Closes a dead connection (libvirt already closed its socket: no RPC); `why` is the
    /// failure of its last call, if that is how it was found dead.
    fn close(&self, s: Session, why: Option<String>) {
        tracing::warn!(
            uri = %self.uri,
            connection = s.id,
            error = why.as_deref().unwrap_or("found dead while idle"),
            "libvirt connection lost; closed after its last call, the next call opens another"
        );
        drop(s);
    }

    fn too_late(&self) -> LibvirtFailure {
        LibvirtFailure::unavailable(Cause::NoAnswer(self.timeout))
    }

    /// Runs `f` on a connection of its own, on the calling (blocking) thread, once one
    /// is free before the call's deadline and unless its caller gave up by then. When `f`
    /// fails and the connection turns out dead, the failure is reported as unavailable and
    /// the connection is closed after `f` returned.
    pub fn run<T>(
        &self,
        call: &Call,
        f: impl FnOnce(&Connect) -> Result<T, LibvirtFailure>,
    ) -> Result<T, LibvirtFailure> {
        let session = self.check_out(call)?;
        let mut held = Checkout {
            lv: self,
            session: Some(session),
            failure: None,
        };
        // An open that waited for a frozen daemon may finish long after the caller
        // stopped waiting: then the request's work must not start any more (a create
        // the client was told failed would be made after all).
        if call.gave_up() {
            return Err(self.too_late());
        }
        let Some(s) = held.session.as_ref() else {
            return Err(self.too_late());
        };
        call.reach();
        match f(&s.conn) {
            Ok(v) => Ok(v),
            Err(e) if !s.alive() => {
                held.failure = Some(e.reason());
                Err(e.connection_lost())
            }
            Err(e) => Err(e),
        }
    }

    /// Connections (in use, idle), for tests.
    #[cfg(test)]
    fn connections(&self) -> (usize, usize) {
        let pool = self.lock();
        (pool.busy, pool.idle.len())
    }
}

/// Whether `uri` reaches a libvirtd on this host (no host part, or a loopback one):
/// only then are its domains' taps network devices the agent can see, and touch.
/// `qemu:///system`, `qemu+unix:///system?socket=/run/x` (a mounted socket) are local;
/// `qemu+ssh://node2/system`, `qemu+tcp://10.0.0.2/system` are not.
pub fn is_local_uri(uri: &str) -> bool {
    let Some((_, rest)) = uri.split_once("://") else {
        // No authority at all ("test:///default" has one, empty): local.
        return true;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    matches!(host, "" | "localhost" | "127.0.0.1" | "::1")
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use virt::connect::Connect;

    use super::{Libvirt, MAX_CONNECTIONS, MAX_IDLE, is_local_uri};
    use crate::vm::driver::{Call, LibvirtFailure, Op, bounded, error::OrLibvirt, unbounded};

    /// `f` on a connection of `lv`, its caller waiting at most `lv`'s timeout.
    async fn call<T: Send + 'static>(
        lv: &Arc<Libvirt>,
        f: impl FnOnce(&Connect) -> Result<T, LibvirtFailure> + Send + 'static,
    ) -> Result<T, LibvirtFailure> {
        let lv = Arc::clone(lv);
        let timeout = lv.timeout;
        bounded(timeout, move |call| lv.run(call, f)).await
    }

    /// Which libvirt connection `conn` is (its C pointer, as a number).
    fn id(conn: &Connect) -> usize {
        #[allow(unsafe_code)]
        // SAFETY: only the pointer's value is read, never dereferenced.
        let ptr = unsafe { conn.as_ptr() };
        ptr as usize
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_at_the_same_time_never_share_a_connection() {
        let lv = Libvirt::new("test:///default", Duration::from_secs(30));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut calls = Vec::new();
        for _ in 0..4 {
            let (lv, seen) = (Arc::clone(&lv), Arc::clone(&seen));
            calls.push(tokio::spawn(async move {
                call(&lv, move |conn| {
                    seen.lock().unwrap().push(id(conn));
                    // Still running while the others start.
                    std::thread::sleep(Duration::from_millis(300));
                    conn.num_of_domains()
                        .or_libvirt(|| Op::new("counting domains"))
                })
                .await
            }));
        }
        for c in calls {
            c.await.unwrap().unwrap();
        }
        let seen: Vec<usize> = seen.lock().unwrap().clone();
        let distinct: HashSet<usize> = seen.iter().copied().collect();
        assert_eq!(distinct.len(), 4, "{seen:?}");
        // Handed back when they returned; only MAX_IDLE stay open.
        assert_eq!(lv.connections(), (0, MAX_IDLE));
        // The next call takes one of those.
        let next = call(&lv, |conn| Ok(id(conn))).await.unwrap();
        assert!(distinct.contains(&next));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_whose_call_timed_out_is_not_used_until_that_call_returns() {
        let lv = Libvirt::new("test:///default", Duration::from_millis(200));
        let slow = Arc::new(Mutex::new(None));
        let s = Arc::clone(&slow);
        let r = call(&lv, move |conn| {
            *s.lock().unwrap() = Some(id(conn));
            std::thread::sleep(Duration::from_millis(800));
            Ok(())
        })
        .await;
        assert!(
            r.as_ref().is_err_and(LibvirtFailure::is_unavailable),
            "{r:?}"
        );
        let slow = slow.lock().unwrap().unwrap();
        // The slow call still runs on its connection: the next call gets another.
        let other = call(&lv, |conn| Ok(id(conn))).await.unwrap();
        assert_ne!(other, slow);
        assert_eq!(lv.connections().0, 1, "the slow call keeps its connection");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(lv.connections().0, 0, "handed back once it returned");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_got_no_connection_in_time_never_runs() {
        let lv = Libvirt::new("test:///default", Duration::from_millis(300));
        // Every connection busy for longer than the other call waits.
        let mut busy = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let lv = Arc::clone(&lv);
            busy.push(tokio::spawn(async move {
                unbounded(Call::new(None), move |call| {
                    lv.run(call, |_| {
                        std::thread::sleep(Duration::from_millis(1200));
                        Ok::<_, LibvirtFailure>(())
                    })
                })
                .await
            }));
        }
        while lv.connections().0 < MAX_CONNECTIONS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ran = Arc::new(AtomicBool::new(false));
        let r2 = Arc::clone(&ran);
        let t = std::time::Instant::now();
        let r = call(&lv, move |_| {
            r2.store(true, Ordering::SeqCst);
            Ok(())
        })
        .await;
        assert!(
            r.as_ref().is_err_and(LibvirtFailure::is_unavailable),
            "{r:?}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        for b in busy {
            b.await.unwrap().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!ran.load(Ordering::SeqCst), "ran after its caller gave up");
        assert_eq!(lv.connections(), (0, MAX_IDLE));
    }

    #[test]
    fn a_uri_with_a_remote_host_is_not_local() {
        for uri in [
            "qemu:///system",
            "qemu:///session",
            "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
            "test:///default",
            "qemu+ssh://root@localhost/system",
            "qemu+tcp://127.0.0.1:16509/system",
            "qemu+tls://[::1]/system",
        ] {
            assert!(is_local_uri(uri), "{uri}");
        }
        for uri in [
            "qemu+ssh://root@node2/system",
            "qemu+ssh://node2:2222/system?keyfile=/k",
            "qemu+tcp://10.77.3.2/system",
            "qemu+tls://[fd00::2]:16514/system",
        ] {
            assert!(!is_local_uri(uri), "{uri}");
        }
    }
}
