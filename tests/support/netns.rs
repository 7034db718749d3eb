//! Network namespaces owned by one test: created with `ip netns add`, deleted on Drop
//! (also when the test panics), so nothing is left in the machine's root namespace.

use std::fs::File;
use std::io::{self, Write};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A number unique within this test process; with the pid it makes names unique on the
/// machine, so several test binaries and topologies can run at once.
pub fn unique_id() -> usize {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// Runs `f` on a fresh thread that has joined namespace `name`.
///
/// `setns(CLONE_NEWNET)` changes only the calling thread, and a socket keeps the
/// namespace it was created in, so a socket made here can be used from any thread
/// afterwards. The test's own thread never changes namespace.
pub fn in_netns<R: Send, F: FnOnce() -> R + Send>(name: &str, f: F) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(name).unwrap_or_else(|e| panic!("setns into {name}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Moves the calling thread into namespace `name`. Only for threads the harness spawned.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{name}"))?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs a command and panics with its output if it fails: setup steps must not fail
/// silently, or a later assertion would blame the agent.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a fresh thread moved into a new, private network namespace (no name, no
/// `ip netns` entry: it goes with the thread), on a current-thread runtime: the netlink
/// sockets `f` opens, and the processes it starts, all live in that namespace. Panics in
/// `f` fail the calling test.
pub fn in_private_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
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

/// Runs a command (split on whitespace) in the calling thread's namespace; panics with
/// its stderr if it fails.
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

pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `nva-<pid>-<n>-<role>` with its loopback up.
    pub fn new(role: &str) -> Netns {
        let name = format!("nva-{}-{}-{}", std::process::id(), unique_id(), role);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`, to be completed by the caller.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut c = self.cmd(args[0]);
        c.args(&args[1..]);
        c.output()
            .unwrap_or_else(|e| panic!("spawn {args:?} in {}: {e}", self.name))
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let mut c = self.cmd(args[0]);
        c.args(&args[1..]);
        run_ok(&mut c)
    }

    /// Runs a command with `stdin` fed to it (e.g. `nft -f -`).
    pub fn exec_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut c = self.cmd(args[0]);
        c.args(&args[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?} in {}: {e}", self.name));
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin.as_bytes())
                .unwrap_or_else(|e| panic!("write stdin of {args:?}: {e}"));
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("wait {args:?}: {e}"))
    }

    /// `nft -f -` with `ruleset`, panicking on error.
    pub fn nft_apply(&self, ruleset: &str) {
        let out = self.exec_stdin(&["nft", "-f", "-"], ruleset);
        if !out.status.success() {
            panic!(
                "nft -f - in {} failed: {}\n{ruleset}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// A command line (split on whitespace) inside the namespace; panics if it fails.
    pub fn sh(&self, cmd: &str) -> String {
        self.exec_ok(&cmd.split_whitespace().collect::<Vec<_>>())
    }

    /// Runs `f` on a thread of its own inside this namespace, returning at once.
    pub fn spawn<T, F>(&self, f: F) -> std::thread::JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter_netns(&name).unwrap_or_else(|e| panic!("setns into {name}: {e}"));
            f()
        })
    }

    /// Runs `f` on a thread inside this namespace (see [`in_netns`]).
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        in_netns(&self.name, f)
    }

    /// Whether `ip netns list` still shows `name`.
    pub fn exists(name: &str) -> bool {
        std::path::Path::new(&format!("/run/netns/{name}")).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veths (and their peers in other test
        // namespaces) and bridges; processes still inside keep it alive unnamed, which
        // is why Agent guards are dropped before the topology.
        match Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns delete {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: ip netns delete {}: {e}", self.name),
        }
    }
}
