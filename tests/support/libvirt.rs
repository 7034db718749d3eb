//! A real libvirtd inside a test namespace (scripts/libvirt-netns.sh), the tiny guest
//! (scripts/build-tiny-guest.sh), and an agent that manages VMs through it.
//!
//! libvirtd's control socket is machine-wide: tests that use it take turns through
//! [`turn`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::agent::Agent;
use super::client::{Response, http_get};
use super::netns::{Netns, run_ok};
use super::topology::{NODE_IP, Topology, sa};
use std::net::Ipv4Addr;

static LIBVIRTD: Mutex<()> = Mutex::new(());
/// The machine-wide turn on libvirtd, for test binaries that run at the same time
/// (scripts/run-tests.sh runs two at once).
const LIBVIRTD_LOCK: &str = "/run/nva-libvirtd.lock";

/// A test's turn on the machine's one libvirtd (its control socket is machine-wide):
/// held until dropped, against the other tests of this binary and other test processes.
pub struct Turn {
    _file: nix::fcntl::Flock<std::fs::File>,
    _thread: std::sync::MutexGuard<'static, ()>,
}

/// Waits for, and takes, the turn on libvirtd.
pub fn turn() -> Turn {
    let thread = LIBVIRTD.lock().unwrap_or_else(|p| p.into_inner());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LIBVIRTD_LOCK)
        .unwrap_or_else(|e| panic!("open {LIBVIRTD_LOCK}: {e}"));
    let file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(f) => f,
        Err((file, _)) => {
            super::say("waiting for the turn on libvirtd (another test binary has it)");
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .unwrap_or_else(|(_, e)| panic!("flock {LIBVIRTD_LOCK}: {e}"))
        }
    };
    Turn {
        _file: file,
        _thread: thread,
    }
}

pub const URI: &str = "qemu:///system";
/// libvirtd in the topology's far namespace, over TCP from the node namespace.
pub const REMOTE_URI: &str = "qemu+tcp://10.77.3.2/system";
/// Bounds for a TCG guest on 2 shared cores; they only decide when a hung step fails.
/// The body of `POST /vms` for the tiny guest (scripts/build-tiny-guest.sh) named `name`:
/// its kernel and initrd booted directly, its disk backed by the `tiny` image.
pub fn tiny_vm(name: &str, kernel: &str, initrd: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "memory_mib": 256,
        "vcpus": 1,
        "disk_size_gb": 1,
        "network_name": "default",
        "os_arch": "x86_64",
        "image": "tiny",
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": "console=ttyS0 loglevel=4 panic=-1",
    })
}

pub const BOOT: Duration = Duration::from_secs(180);
/// How long one API call that goes through libvirt may take before the test gives up:
/// more than the agent's own LIBVIRT_TIMEOUT (120 s), so its 503 would come first.
pub const CALL: Duration = Duration::from_secs(180);
/// Deadline of a wait for something libvirt does (a redefinition, a download, a volume
/// made again): minutes, since a slow libvirtd is slow, not wrong.
pub const WAIT: Duration = Duration::from_secs(300);

/// How long libvirtd takes to answer `virsh version` right now, for failure messages:
/// a slow libvirtd, not the agent, is the usual reason a VM call times out.
pub fn libvirtd_speed() -> String {
    let t = Instant::now();
    // Bounded: a stopped (SIGSTOP) or hung libvirtd must not hang the failure message.
    let ok = Command::new("timeout")
        .args(["60", "virsh", "-c", URI, "version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let took = t.elapsed().as_secs_f64();
    if ok {
        format!("libvirtd answered virsh version in {took:.1} s")
    } else {
        format!("libvirtd did not answer virsh version (gave up after {took:.1} s)")
    }
}

/// Waits until `ok()` holds, up to [`WAIT`]; the panic says what was awaited, how long,
/// how fast libvirtd answers, and `context()` (e.g. the agent's log).
pub fn wait_until(what: &str, mut ok: impl FnMut() -> bool, context: impl Fn() -> String) {
    let start = Instant::now();
    if !ok() {
        super::say(format!("waiting for {what} (at most {} s)", WAIT.as_secs()));
    }
    while !ok() {
        assert!(
            start.elapsed() < WAIT,
            "{what}: not within {} s; {}\n{}",
            WAIT.as_secs(),
            libvirtd_speed(),
            context()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("virsh: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// libvirtd (and virtlogd) inside the node namespace; stopped on Drop, which also
/// destroys every domain and network of that daemon.
pub struct Libvirtd {
    ns: String,
    /// What scripts/libvirt-netns.sh said while it started the daemon.
    pub setup_log: String,
}

impl Libvirtd {
    pub fn start(ns: &Netns) -> Libvirtd {
        Libvirtd::start_serving(ns, false)
    }

    /// With `tcp`, libvirtd also serves its RPC on TCP port 16509 (no authentication),
    /// on the addresses of `ns` only: [`REMOTE_URI`] from the node namespace.
    pub fn start_serving(ns: &Netns, tcp: bool) -> Libvirtd {
        let out = Command::new(script("libvirt-netns.sh"))
            .args(["start", ns.name()])
            .env("LIBVIRT_TCP", if tcp { "1" } else { "0" })
            .output()
            .unwrap_or_else(|e| panic!("spawn libvirt-netns.sh: {e}"));
        let setup_log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "libvirt-netns.sh start {} failed ({}):\n{setup_log}",
            ns.name(),
            out.status
        );
        Libvirtd {
            ns: ns.name().to_owned(),
            setup_log,
        }
    }

    pub fn pid() -> Option<i32> {
        std::fs::read_to_string("/var/run/libvirtd.pid")
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// Kills libvirtd (not virtlogd, not the guests) and waits until it is gone.
    pub fn kill(&self) {
        if let Some(pid) = Libvirtd::pid() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Starts libvirtd again in the same namespace and waits until it answers.
    pub fn revive(&self) {
        run_ok(Command::new("ip").args(["netns", "exec", &self.ns, "libvirtd", "-d"]));
        wait_until(
            "libvirtd answering again after a restart",
            || {
                Command::new("virsh")
                    .args(["-c", URI, "version"])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            },
            || "see /var/log/libvirt".to_owned(),
        );
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = Command::new(script("libvirt-netns.sh"))
            .args(["stop", &self.ns])
            .status();
    }
}

/// A world-traversable scratch directory: libvirt's QEMU runs as another user and must
/// reach the pool and the guest's kernel.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("nva-vmtest-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
        Scratch { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The tiny guest's kernel and initramfs, copied here (libvirt chowns what it boots).
    pub fn guest(&self) -> (String, String) {
        let built = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tiny-guest");
        run_ok(Command::new(script("build-tiny-guest.sh")).arg(&built));
        let boot = self.path("boot");
        std::fs::create_dir_all(&boot).unwrap_or_else(|e| panic!("mkdir: {e}"));
        for f in ["vmlinuz", "initramfs.cpio.gz"] {
            std::fs::copy(built.join(f), boot.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
        }
        (
            boot.join("vmlinuz").to_string_lossy().into_owned(),
            boot.join("initramfs.cpio.gz")
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Everything one test needs: topology, libvirtd (in the node namespace, or in the far
/// one for a remote URI), the agent in the node namespace.
/// On drop, the agent's VMs are deleted through it first ([`Env::delete_agents_vms`]);
/// then field order is drop order: agent, libvirtd, then the namespaces.
pub struct Env {
    pub agent: Agent,
    pub libvirtd: Libvirtd,
    pub scratch: Scratch,
    pub pool: String,
    /// The namespace of libvirtd, its network and its guests.
    pub guest_ns: String,
    pub topo: Topology,
}

/// libvirtd in the node namespace, reached through its local socket.
pub fn env(extra: &[(&str, &str)]) -> Env {
    env_at(false, extra)
}

/// libvirtd on another host (the far namespace), reached only through
/// [`REMOTE_URI`]: the agent shares no network, bridge or lease file with it.
pub fn remote_env(extra: &[(&str, &str)]) -> Env {
    env_at(true, extra)
}

fn env_at(remote: bool, extra: &[(&str, &str)]) -> Env {
    let topo = Topology::new();
    let scratch = Scratch::new();
    let host = if remote { &topo.far } else { &topo.node };
    let libvirtd = Libvirtd::start_serving(host, remote);
    let guest_ns = host.name().to_owned();
    let pool = format!(
        "nva-test-{}-{}",
        std::process::id(),
        super::netns::unique_id()
    );
    let pool_dir = scratch.path("pool");
    let pool_dir = pool_dir.to_string_lossy().into_owned();
    // Remote: the pool's directory is the libvirt host's path (VMS_HOST_DIR); the
    // agent's own VMS_WORK_DIR does not even exist.
    let missing = scratch.path("not-on-the-agent-host");
    let missing = missing.to_string_lossy().into_owned();
    let mut settings: Vec<(&str, &str)> = vec![
        ("LIBVIRT_URI", if remote { REMOTE_URI } else { URI }),
        ("VMS_DOMAIN_TYPE", "qemu"),
        ("VMS_WORK_DIR", if remote { &missing } else { &pool_dir }),
        ("VMS_POOL", &pool),
        ("VMS_BRIDGE", "virbr0"),
        ("VM_SUBNET", "192.168.122.0/24"),
        ("VMS_DEFAULT_IMAGE", "tiny"),
        ("VM_STOP_TIMEOUT", "60"),
    ];
    if remote {
        settings.push(("VMS_HOST_DIR", &pool_dir));
    }
    settings.extend_from_slice(extra);
    let mut agent = Agent::start_with(&topo, &settings);
    agent.api.timeout = CALL;
    agent.api.diagnose = Some(libvirtd_speed);
    Env {
        agent,
        libvirtd,
        scratch,
        pool,
        guest_ns,
        topo,
    }
}

impl Env {
    /// Deletes every VM the agent has, through the agent (with its files, its DHCP host
    /// entry and its port maps), as an operator would: what a test made in libvirt's
    /// persistent state (the `default` network's host entries live in the machine's
    /// /etc/libvirt) must not outlive it. Retries a busy or unavailable answer for up
    /// to [`WAIT`]; returns what could not be deleted, with why.
    pub fn delete_agents_vms(&mut self) -> Vec<String> {
        // Stopped by the test (no process any more), or exited on its own.
        if self.agent.pid().is_none() || self.agent.exited().is_some() {
            return vec!["the agent is not running: any VM it still had stays".into()];
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let failed = match self.managed_vms() {
                Ok(names) if names.is_empty() => return Vec::new(),
                Ok(names) => names
                    .iter()
                    .filter_map(|name| self.delete_vm(name).err())
                    .collect(),
                Err(why) => vec![why],
            };
            if Instant::now() > deadline {
                return failed;
            }
            if !failed.is_empty() {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    /// The names of the VMs the agent manages, as `GET /vms` lists them.
    fn managed_vms(&self) -> Result<Vec<String>, String> {
        let api = &self.agent.api;
        match api.request("GET", "/vms", Some(&api.token), None) {
            Ok(r) if r.status == 200 => Ok(r.json()["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["managed"] == true)
                .filter_map(|v| v["name"].as_str().map(str::to_owned))
                .collect()),
            other => Err(format!("GET /vms: {other:?}")),
        }
    }

    fn delete_vm(&self, name: &str) -> Result<(), String> {
        eprintln!("cleanup: deleting VM {name} through the agent");
        let api = &self.agent.api;
        let path = format!("/vms/{name}?delete_files=true");
        match api.request("DELETE", &path, Some(&api.token), None) {
            Ok(r) if r.status == 200 || r.status == 404 => Ok(()),
            other => Err(format!("DELETE {path}: {other:?}")),
        }
    }

    pub fn volumes(&self) -> Vec<String> {
        let _ = virsh(&["pool-refresh", &self.pool]);
        virsh(&["vol-list", &self.pool])
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    pub fn domains(&self) -> Vec<String> {
        virsh(&["list", "--all", "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Uploads `bytes` as image `name` through `POST /images/{name}`.
    pub fn upload_image(&self, name: &str, bytes: &[u8]) -> Response {
        self.agent
            .api
            .request_bytes(
                "POST",
                &format!("/images/{name}"),
                Some(&self.agent.token),
                Some(bytes),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "POST /images/{name} ({} bytes): {e}; {}",
                    bytes.len(),
                    libvirtd_speed()
                )
            })
    }

    pub fn console(&self, vm: &str) -> String {
        let r = self
            .agent
            .api
            .get(&format!("/vms/{vm}/console?bytes=65536"));
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["console"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the console shows `n` READY markers; returns the last one's fields.
    pub fn wait_ready(&self, vm: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + BOOT;
        super::say(format!(
            "waiting for {vm} to boot (READY marker {n} on its console; at most {} s)",
            BOOT.as_secs()
        ));
        loop {
            let c = self.console(vm);
            let mut markers = super::ready_markers(&c);
            if markers.len() >= n {
                return markers.swap_remove(n - 1);
            }
            assert!(
                Instant::now() < deadline,
                "{vm}: {n} READY markers not seen within {BOOT:?}; {}; console:\n{c}\nagent log:\n{}",
                libvirtd_speed(),
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn state(&self, vm: &str) -> String {
        let r = self.agent.api.get(&format!("/vms/{vm}/status"));
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["status"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// `GET path` of the guest's HTTP server at `ip`, from libvirtd's host (retried for
    /// up to [`BOOT`]).
    pub fn guest_http(&self, ip: Ipv4Addr, path: &str) -> String {
        http_retrying(&self.guest_ns, sa(ip, 80), path)
    }

    /// `GET path` from the client namespace to the node's `port` (a port map).
    pub fn via_node_port(&self, port: u16, path: &str) -> String {
        http_retrying(self.topo.client.name(), sa(NODE_IP, port), path)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let left = self.delete_agents_vms();
        if !left.is_empty() {
            eprintln!(
                "cleanup: VMs left in libvirt (their DHCP host entries stay in the machine's \
                 network definition; scripts/test.sh's leak check will name them): {left:?}"
            );
        }
    }
}

/// `GET path` from `ns` to `addr`, retried for up to [`BOOT`] (a guest still booting, a
/// lease or map not yet in place).
fn http_retrying(ns: &str, addr: std::net::SocketAddr, path: &str) -> String {
    let deadline = Instant::now() + BOOT;
    loop {
        match http_get(ns, addr, path) {
            Ok(b) => return b,
            Err(e) if Instant::now() > deadline => panic!("HTTP {addr}{path} from {ns}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}
