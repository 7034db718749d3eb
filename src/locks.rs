//! One serving agent per network namespace and per DATA_DIR.
//!
//! Two agents in one network namespace rewrite each other's nftables table at every
//! reconcile and delete each other's port maps; two agents on one DATA_DIR share a
//! database. `serve` takes both locks in its preflight, before it changes anything, and
//! holds them until it returns. Both are kernel objects that die with the process, so a
//! `kill -9` never leaves a stale lock behind.
//!
//! - **The network namespace:** an abstract unix socket, `@node-vm-agent/nft`. Abstract
//!   names are scoped to the network namespace, exactly like the nftables table, and
//!   vanish when the last descriptor closes. A second agent's bind fails with
//!   EADDRINUSE; it then connects and reads the holder's pid with SO_PEERCRED (the
//!   kernel's answer, translated into the reader's PID namespace).
//! - **DATA_DIR:** an exclusive `flock` on `$DATA_DIR/agent.lock`. The file holds the
//!   holder's pid for the message only; the lock, not the file, is the truth (the file
//!   stays after the agent exits and is taken over by the next one).
//!
//! `node-vm-agent diff` changes nothing and may run beside a serving agent, so it takes
//! neither.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket, sockopt,
};

/// The abstract socket name (without the leading NUL) that marks a network namespace's
/// agent.
pub const NETNS_LOCK_NAME: &str = "node-vm-agent/nft";
/// The lock file in DATA_DIR.
pub const DATA_DIR_LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another node-vm-agent ({holder}) already serves this network namespace and owns \
         its nftables table ip node_vm_agent (it holds the abstract socket @{name}); two \
         agents would rewrite each other's table and delete each other's port maps: stop \
         that agent first, or run this one in its own network namespace"
    )]
    NetnsHeld { holder: Holder, name: String },
    #[error(
        "DATA_DIR {dir} is in use by another node-vm-agent ({holder}, which holds the \
         lock on {file}); two agents would share its database: stop that agent first, or \
         give this one its own DATA_DIR"
    )]
    DataDirHeld {
        dir: PathBuf,
        file: PathBuf,
        holder: Holder,
    },
    #[error("cannot take this network namespace's agent lock (abstract socket @{name}): {source}")]
    Netns { name: String, source: io::Error },
    #[error("cannot take DATA_DIR's lock {file}: {source}")]
    DataDir { file: PathBuf, source: io::Error },
}

/// Who holds a lock, as far as this process can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Pid(i32),
    /// The holder's pid could not be read; the reason.
    Unknown(String),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Pid(pid) => write!(f, "pid {pid}"),
            Holder::Unknown(why) => write!(f, "pid unknown: {why}"),
        }
    }
}

/// Marks this network namespace as served by this process until dropped.
pub struct NetnsLock {
    /// Accepts and drops the connections of agents that asked who holds the name, so
    /// they never pile up in the backlog; owns the listening socket.
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for NetnsLock {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl NetnsLock {
    /// Binds `@name` in this process's network namespace, or says who has it. Must be
    /// called on the tokio runtime (the socket is served by a task).
    pub fn acquire(name: &str) -> Result<NetnsLock, LockError> {
        let err = |source| LockError::Netns {
            name: name.to_owned(),
            source,
        };
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
        let listener = match UnixListener::bind_addr(&addr) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(LockError::NetnsHeld {
                    holder: netns_holder(name),
                    name: name.to_owned(),
                });
            }
            Err(e) => return Err(err(e)),
        };
        listener.set_nonblocking(true).map_err(err)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(err)?;
        let acceptor = tokio::spawn(async move {
            loop {
                // The asker only reads our credentials, which the kernel recorded at
                // connect time; nothing is sent. An error (EMFILE) must not spin.
                if listener.accept().await.is_err() {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        });
        Ok(NetnsLock { acceptor })
    }
}

/// The pid of the process listening on `@name`, from SO_PEERCRED. The connect does not
/// block: a holder that stopped accepting must not hang this start.
fn netns_holder(name: &str) -> Holder {
    let ask = || -> nix::Result<i32> {
        let sock = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        connect(sock.as_raw_fd(), &UnixAddr::new_abstract(name.as_bytes())?)?;
        Ok(getsockopt(&sock, sockopt::PeerCredentials)?.pid())
    };
    match ask() {
        // The kernel gives 0 for a process outside this PID namespace (a container).
        Ok(0) => Holder::Unknown("it runs in another PID namespace".into()),
        Ok(pid) => Holder::Pid(pid),
        // Bound but not listening: an agent between its bind and its listen, or some
        // other program that took the name.
        Err(Errno::ECONNREFUSED) => Holder::Unknown("it does not answer on the socket".into()),
        Err(e) => Holder::Unknown(format!("cannot ask it: {e}")),
    }
}

/// Holds `$DATA_DIR/agent.lock` until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: Flock<File>,
}

impl DataDirLock {
    /// Locks `dir` (created mode 0700 when missing: by now every check has passed and
    /// the start is making its first change), writing this process's pid into the file.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
        let path = dir.join(DATA_DIR_LOCK_FILE);
        let err = |source| LockError::DataDir {
            file: path.clone(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                return Err(LockError::DataDirHeld {
                    dir: dir.to_path_buf(),
                    holder: pid_in(&mut file),
                    file: path,
                });
            }
            Err((_, e)) => return Err(err(e.into())),
        };
        // The previous holder's pid may still be there (it was killed): replace it.
        locked.set_len(0).map_err(err)?;
        locked
            .write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(err)?;
        Ok(DataDirLock { _file: locked })
    }
}

/// The pid the holder wrote into its lock file.
fn pid_in(file: &mut File) -> Holder {
    let mut text = String::new();
    match file.read_to_string(&mut text) {
        Ok(_) => match text.trim().parse::<i32>() {
            Ok(pid) if pid > 0 => Holder::Pid(pid),
            // It locks before it writes: an empty file is a holder in its first moments.
            _ if text.trim().is_empty() => {
                Holder::Unknown("it has not written it yet, it is starting".into())
            }
            _ => Holder::Unknown(format!("the file holds {:?}", text.trim())),
        },
        Err(e) => Holder::Unknown(format!("cannot read the file: {e}")),
    }
}

/// Both locks of a serving agent, held for the life of `serve`.
pub struct AgentLocks {
    pub netns: NetnsLock,
    pub data_dir: DataDirLock,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_data_dir_names_the_holder_and_a_dropped_one_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("new/data");
        let first = DataDirLock::acquire(&data).unwrap();
        let me = std::process::id();
        assert_eq!(
            std::fs::read_to_string(data.join(DATA_DIR_LOCK_FILE)).unwrap(),
            format!("{me}\n")
        );
        // flock conflicts between open file descriptions, also within one process.
        let e = DataDirLock::acquire(&data).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "DATA_DIR {} is in use by another node-vm-agent (pid {me}, which holds the lock on {}",
                data.display(),
                data.join(DATA_DIR_LOCK_FILE).display()
            )),
            "{e}"
        );
        drop(first);
        // The file stays, with a pid in it; only the lock counts.
        std::fs::write(data.join(DATA_DIR_LOCK_FILE), "999999\n").unwrap();
        let _again = DataDirLock::acquire(&data).unwrap();
        assert_eq!(
            std::fs::read_to_string(data.join(DATA_DIR_LOCK_FILE)).unwrap(),
            format!("{me}\n")
        );
    }

    #[test]
    fn an_unreadable_pid_is_said_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "").unwrap();
        assert!(
            matches!(pid_in(&mut File::open(&path).unwrap()), Holder::Unknown(w) if w.contains("starting"))
        );
        std::fs::write(&path, "x").unwrap();
        assert_eq!(
            pid_in(&mut File::open(&path).unwrap()),
            Holder::Unknown("the file holds \"x\"".into())
        );
    }

    #[tokio::test]
    async fn a_second_netns_lock_names_the_holder_and_a_dropped_one_is_free_again() {
        // A name of this test process only, so that no agent (or parallel test run) is
        // disturbed: the unit tests run in the machine's own network namespace.
        let name = format!("node-vm-agent-test/{}/netns-lock", std::process::id());
        let first = NetnsLock::acquire(&name).unwrap();
        let me = std::process::id() as i32;
        for _ in 0..3 {
            match NetnsLock::acquire(&name) {
                Err(LockError::NetnsHeld { holder, .. }) => assert_eq!(holder, Holder::Pid(me)),
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a second lock was granted"),
            }
        }
        drop(first);
        // The acceptor task (and with it the socket) goes once the runtime has seen the
        // abort; bounded wait.
        let mut again = None;
        for _ in 0..100 {
            tokio::task::yield_now().await;
            if let Ok(l) = NetnsLock::acquire(&name) {
                again = Some(l);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(again.is_some(), "the name was not freed");
    }
}
