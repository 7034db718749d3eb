//! Checks of the machine before the agent changes anything on it. A start that cannot
//! work fails here, saying why, before it has set a sysctl, created a database, written
//! a token or a key, or touched nftables. `serve` also takes its two locks here
//! (`crate::locks`): a second agent in this network namespace or on this DATA_DIR stops
//! before it could rewrite the first one's table or share its database.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nix::unistd::{AccessFlags, access};
use tokio::net::{TcpListener, TcpSocket};

use crate::config::{SettingError, Settings};
use crate::locks::{AgentLocks, DataDirLock, LockError, NETNS_LOCK_NAME, NetnsLock};

/// `CAP_NET_ADMIN` (linux/capability.h): nftables, the WireGuard link, routes.
const CAP_NET_ADMIN: u32 = 12;
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error("DATA_DIR {0} exists and is not a directory")]
    DataDirNotADirectory(PathBuf),
    #[error("DATA_DIR {path} cannot be created: {file} is not a directory")]
    DataDirBelowAFile { path: PathBuf, file: PathBuf },
    #[error("DATA_DIR {path} cannot be used: {path_checked} is not writable ({source})")]
    DataDirNotWritable {
        path: PathBuf,
        path_checked: PathBuf,
        source: nix::Error,
    },
    #[error(
        "no database {0}: `diff` compares an agent's database with the kernel; \
         point DATA_DIR at the directory of an agent that has run"
    )]
    NoDatabase(PathBuf),
    #[error(
        "EXTERNAL_IFACE={0:?}: no such interface in this network namespace; name an \
         existing interface, or leave it unset to use the default route's"
    )]
    NoExternalIface(String),
    #[error(
        "node-vm-agent {command} needs CAP_NET_ADMIN (run it as root, or grant the \
         capability, e.g. systemd's AmbientCapabilities=CAP_NET_ADMIN): it {why}"
    )]
    NoNetAdmin {
        command: &'static str,
        why: &'static str,
    },
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Capabilities(io::Error),
    #[error(
        "net.ipv4.ip_forward is 0 and this process cannot set it ({0}): port maps \
         need IPv4 forwarding; run the agent as root or set the sysctl before it starts"
    )]
    IpForward(nix::Error),
    #[error("cannot read {IP_FORWARD}: {0}")]
    IpForwardUnreadable(io::Error),
    #[error("cannot listen on {addr} (API_LISTEN, NODE_API_PORT): {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot listen on {addr} (METRICS_LISTEN): {source}")]
    MetricsListen { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// What a start that passed its checks holds: the API's bound socket and the locks,
/// both kept until `serve` returns.
pub struct Ready {
    pub listener: TcpListener,
    /// METRICS_LISTEN's socket, when it is set.
    pub metrics_listener: Option<TcpListener>,
    pub locks: AgentLocks,
}

/// Everything `serve` needs, checked without changing anything; the API's listening
/// socket is bound (a port in use is the most common failed start) and handed back
/// with the agent's locks.
pub async fn serve(settings: &Settings) -> Result<Ready, PreflightError> {
    settings.validate()?;
    check_data_dir(&settings.state.data_dir)?;
    check_net_admin(
        "serve",
        "writes an nftables table and brings up the WireGuard link",
    )?;
    check_ip_forward()?;
    if let Some(iface) = &settings.portmaps.external_iface {
        check_interface(iface)?;
    }
    // Before the bind: another agent here most likely has the same API port too, and
    // the holder is the more useful thing to name.
    let netns = NetnsLock::acquire(NETNS_LOCK_NAME)?;
    let addr = settings.api.listen_addr();
    let listener = listen(addr).map_err(|source| PreflightError::Listen { addr, source })?;
    let metrics_listener = settings
        .api
        .metrics_listen
        .map(|addr| listen(addr).map_err(|source| PreflightError::MetricsListen { addr, source }))
        .transpose()?;
    // Last, because it is the first change: it creates DATA_DIR and agent.lock when
    // they are missing.
    let data_dir = DataDirLock::acquire(&settings.state.data_dir)?;
    Ok(Ready {
        listener,
        metrics_listener,
        locks: AgentLocks { netns, data_dir },
    })
}

/// Connections the kernel queues for the agent to accept (capped by the namespace's
/// `net.core.somaxconn`, 4,096 by default). tokio's `bind` asks for 1,024: while
/// strangers re-open the connections the agent sheds, a queue shorter than their number
/// overflows and a fresh client's SYN is dropped, which TCP resends only after 1 s.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted agent binds again while its old
    // connections are in TIME-WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Everything `diff` needs: it reads an existing database and the kernel's tables. It
/// takes no lock: it changes nothing and may run beside a serving agent.
pub fn diff(settings: &Settings) -> Result<(), PreflightError> {
    settings.validate()?;
    let db = settings.state.db_path();
    if !db.is_file() {
        return Err(PreflightError::NoDatabase(db));
    }
    check_net_admin("diff", "reads the kernel's nftables tables")
}

/// DATA_DIR is a directory the agent may write, or can be created: the nearest existing
/// ancestor is a writable directory.
fn check_data_dir(path: &Path) -> Result<(), PreflightError> {
    let mut existing = path;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Err(if existing == path {
            PreflightError::DataDirNotADirectory(path.to_path_buf())
        } else {
            PreflightError::DataDirBelowAFile {
                path: path.to_path_buf(),
                file: existing.to_path_buf(),
            }
        });
    }
    access(existing, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|source| {
        PreflightError::DataDirNotWritable {
            path: path.to_path_buf(),
            path_checked: existing.to_path_buf(),
            source,
        }
    })
}

fn check_net_admin(command: &'static str, why: &'static str) -> Result<(), PreflightError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(PreflightError::Capabilities)?;
    let effective = effective_capabilities(&status)
        .ok_or_else(|| PreflightError::Capabilities(io::Error::other("no CapEff line")))?;
    if effective & (1 << CAP_NET_ADMIN) == 0 {
        return Err(PreflightError::NoNetAdmin { command, why });
    }
    Ok(())
}

/// The `CapEff:` bit set of a `/proc/<pid>/status` text.
fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Forwarding is on already, or this process may turn it on (the agent does so later).
fn check_ip_forward() -> Result<(), PreflightError> {
    let current =
        std::fs::read_to_string(IP_FORWARD).map_err(PreflightError::IpForwardUnreadable)?;
    if current.trim() == "1" {
        return Ok(());
    }
    access(IP_FORWARD, AccessFlags::W_OK).map_err(PreflightError::IpForward)
}

/// The interface exists in this process's network namespace (`if_nametoindex`, so not
/// the root namespace's /sys when the agent runs in another one).
fn check_interface(name: &str) -> Result<(), PreflightError> {
    nix::net::if_::if_nametoindex(name)
        .map(|_| ())
        .map_err(|_| PreflightError::NoExternalIface(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_capabilities_come_from_the_capeff_line() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t0000000000001000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(1 << CAP_NET_ADMIN));
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
    }

    #[test]
    fn a_data_dir_that_is_a_file_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data");
        std::fs::write(&file, "").unwrap();
        let e = check_data_dir(&file).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("DATA_DIR {} exists and is not a directory", file.display())
        );
        // A directory below a file cannot be created either; the file is named.
        let e = check_data_dir(&file.join("sub")).unwrap_err().to_string();
        assert!(
            e.contains("cannot be created")
                && e.ends_with(&format!("{} is not a directory", file.display())),
            "{e}"
        );
        check_data_dir(&dir.path().join("new/deeper")).unwrap();
        check_data_dir(dir.path()).unwrap();
    }

    #[test]
    fn a_missing_interface_is_refused_by_name() {
        let e = check_interface("nosuchif0").unwrap_err().to_string();
        assert!(
            e.starts_with("EXTERNAL_IFACE=\"nosuchif0\": no such interface"),
            "{e}"
        );
        check_interface("lo").unwrap();
    }
}
