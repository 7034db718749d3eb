//! Test helpers: every kernel test runs in network namespaces it creates itself, so
//! nothing ever touches the machine's root namespace and tests can run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CloneFlags, setns, unshare};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique across this process and concurrent test processes.
pub fn unique(tag: &str) -> String {
    format!(
        "nva{}-{}-{}",
        tag,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `f` on a fresh thread moved into a new, private network namespace, on a
/// current-thread runtime: the netlink sockets `f` opens, and the processes it
/// starts, all live in that namespace. Panics in `f` fail the calling test.
pub fn in_private_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let handle = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        run("ip link set lo up");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(f());
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `f` on a thread that joined the named namespace `ns`.
pub fn spawn_in_named<T, F>(ns: &str, f: F) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open named netns");
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// Runs a command (split on whitespace); panics with its stderr if it fails.
pub fn run(cmd: &str) -> String {
    run_with_input(cmd, None)
}

/// Like [`run`], feeding `input` on stdin (`nft -f -`).
pub fn run_with_input(cmd: &str, input: Option<&str>) -> String {
    let mut parts = cmd.split_whitespace();
    let program = parts.next().expect("empty command");
    let mut child = Command::new(program)
        .args(parts)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named namespace (`ip netns add`), deleted when dropped, also on panic.
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        run(&format!("ip netns add {name}"));
        Self { name }
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &str) -> String {
        run(&format!("ip netns exec {} {cmd}", self.name))
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
