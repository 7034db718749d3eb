//! systemd's service notifications (sd_notify(3)), for `Type=notify` with a watchdog
//! (packaging/node-vm-agent.service): `READY=1` once the kernel state is applied and the
//! API listens, `WATCHDOG=1` while the runtime is alive, `STOPPING=1` at shutdown.
//!
//! The protocol is one datagram per message to the unix socket named by NOTIFY_SOCKET
//! (a path, or `@name` for the abstract namespace), so it needs no library. Without
//! NOTIFY_SOCKET (not started by systemd) every call does nothing.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio::sync::watch;

/// The shortest ping interval the agent accepts, whatever WatchdogSec= says.
const MIN_PING: Duration = Duration::from_millis(100);

/// The socket systemd listens on for this service's notifications.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From NOTIFY_SOCKET; None when it is unset or empty (not under systemd). The
    /// variable is left in place: the agent starts no children that could misuse it.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(name) if !name.is_empty() => Notifier::connect(&name.to_string_lossy()).map(Some),
            _ => Ok(None),
        }
    }

    fn connect(name: &str) -> io::Result<Notifier> {
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abstract_name.as_bytes())?
            }
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET {name:?} is neither an absolute path nor @abstract"),
                ));
            }
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Sends one message of `KEY=value` lines.
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(|_| ())
    }
}

/// How often to ping, from WATCHDOG_USEC (half of it, as sd_watchdog_enabled(3)
/// advises); None when no watchdog is set for this process (WATCHDOG_PID names another).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_string_lossy().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| (Duration::from_micros(usec) / 2).max(MIN_PING))
}

/// What the agent tells systemd over its life; every method is a no-op without a socket.
/// A failed send is logged, never fatal: the agent serves whether systemd hears it or not.
#[derive(Clone, Default)]
pub struct Service {
    notifier: Option<std::sync::Arc<Notifier>>,
}

impl Service {
    /// From the environment; a NOTIFY_SOCKET that cannot be used is logged and ignored.
    pub fn from_env() -> Service {
        match Notifier::from_env() {
            Ok(n) => Service {
                notifier: n.map(std::sync::Arc::new),
            },
            Err(e) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET unusable: systemd will not hear READY");
                Service::default()
            }
        }
    }

    /// Startup is done: the kernel state is applied and the API listens.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// Shutdown began.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// Pings every `interval` until `stop` turns true. The pings come from a task on the
    /// async runtime, so they stop when the runtime can no longer run tasks.
    pub async fn watchdog(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        tracing::info!(
            every_ms = interval.as_millis() as u64,
            "systemd watchdog on (WATCHDOG_USEC)"
        );
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => self.send("WATCHDOG=1"),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    fn send(&self, message: &str) {
        if let Some(n) = &self.notifier
            && let Err(e) = n.send(message)
        {
            tracing::warn!(error = %e, message, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_and_path_sockets_receive_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.send("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("nva-notify-test-{}", std::process::id());
        let abstract_addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&abstract_addr).unwrap();
        let n = Notifier::connect(&format!("@{name}")).unwrap();
        n.send("WATCHDOG=1").unwrap();
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_relative_socket_name_is_refused() {
        let e = Notifier::connect("notify.sock").err().expect("refused");
        assert!(e.to_string().contains("absolute path"), "{e}");
    }
}
