//! One long-lived connection to LIBVIRT_URI, opened lazily and reopened after libvirtd
//! goes away. Every call runs on a blocking thread and is bounded by LIBVIRT_TIMEOUT, so
//! a dead or hung daemon gives the caller a 503, never a hung request or a stalled
//! runtime.

use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use virt::connect::Connect;

use super::VmError;

/// Seconds between keepalive probes, and probes missed before libvirt closes the
/// connection: a daemon that stops answering is noticed in about 15 s.
const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

static EVENT_LOOP: Once = Once::new();

/// libvirt's client needs an event loop for keepalive and to notice a closed socket
/// (which is what turns `is_alive` false when libvirtd exits). One thread per process.
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

/// Runs on every new connection (subscriptions that live as long as it).
type OnConnect = Box<dyn Fn(&Connect) + Send + Sync>;

pub struct Libvirt {
    uri: String,
    timeout: Duration,
    cached: Mutex<Option<Connect>>,
    on_connect: std::sync::OnceLock<OnConnect>,
}

impl Libvirt {
    pub fn new(uri: impl Into<String>, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            uri: uri.into(),
            timeout,
            cached: Mutex::new(None),
            on_connect: std::sync::OnceLock::new(),
        })
    }

    /// Sets what runs on each new connection, before any call uses it (once; later
    /// calls are ignored).
    pub fn set_on_connect(&self, f: impl Fn(&Connect) + Send + Sync + 'static) {
        let _ = self.on_connect.set(Box::new(f));
    }

    /// How long one call may take (`LIBVIRT_TIMEOUT`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The open connection, or a new one when there is none or the old one died.
    /// Blocking.
    fn connection(&self) -> Result<Connect, VmError> {
        let mut cached = self
            .cached
            .lock()
            .map_err(|_| VmError::Unavailable("connection lock poisoned".into()))?;
        if let Some(conn) = cached.as_ref() {
            if conn.is_alive().unwrap_or(false) {
                return Ok(conn.clone());
            }
            tracing::warn!(uri = %self.uri, "libvirt connection lost; reconnecting");
            *cached = None;
        }
        super::libvirt_so::ensure_loaded().map_err(VmError::Unavailable)?;
        start_event_loop();
        let conn = Connect::open(Some(&self.uri)).map_err(|e| {
            VmError::Unavailable(format!("cannot connect to {}: {}", self.uri, e.message()))
        })?;
        // Local drivers (test:///, qemu:///embed) have no keepalive; that is fine.
        if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
            tracing::debug!(error = %e.message(), "libvirt keepalive not available on this connection");
        }
        if let Some(hook) = self.on_connect.get() {
            hook(&conn);
        }
        tracing::info!(uri = %self.uri, "connected to libvirt");
        *cached = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `f` with the connection, on the calling (blocking) thread. When `f` fails and
    /// the connection turns out dead, the failure is reported as `Unavailable` and the
    /// next call reconnects.
    pub fn call_blocking<T>(
        &self,
        f: impl FnOnce(&Connect) -> Result<T, VmError>,
    ) -> Result<T, VmError> {
        let conn = self.connection()?;
        match f(&conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                if !conn.is_alive().unwrap_or(false) {
                    if let Ok(mut cached) = self.cached.lock() {
                        *cached = None;
                    }
                    return Err(VmError::Unavailable(e.to_string()));
                }
                Err(e)
            }
        }
    }

    /// Runs `f` with the connection on a blocking thread, bounded by LIBVIRT_TIMEOUT.
    pub async fn call<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connect) -> Result<T, VmError> + Send + 'static,
    ) -> Result<T, VmError> {
        let this = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || this.call_blocking(f));
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(VmError::Libvirt(format!("libvirt call failed: {join}"))),
            Err(_) => Err(VmError::Unavailable(format!(
                "libvirt did not answer within {} s",
                self.timeout.as_secs()
            ))),
        }
    }

    /// Like `call`, without the time bound: for streams whose length depends on the
    /// caller (image transfers), where the caller bounds the work itself.
    pub async fn call_unbounded<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connect) -> Result<T, VmError> + Send + 'static,
    ) -> Result<T, VmError> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.call_blocking(f))
            .await
            .map_err(|join| VmError::Libvirt(format!("libvirt call failed: {join}")))?
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
    use super::is_local_uri;

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
