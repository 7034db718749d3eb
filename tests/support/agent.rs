//! The real agent binary, run inside a topology's node namespace.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::client::Api;
use super::netns::{Netns, run_ok};
use super::topology::{API_PORT, EXTERNAL_IFACE, NODE_IP, Topology, VM_SUBNET, sa};

pub const BIN: &str = env!("CARGO_BIN_EXE_node-vm-agent");

/// The binary under test: NVA_AGENT_BIN overrides the one cargo built (e.g. to run the
/// suite against a release build).
pub fn agent_bin() -> String {
    std::env::var("NVA_AGENT_BIN").unwrap_or_else(|_| BIN.to_owned())
}

/// Settings the agent reads from the environment; cleared before each start so the
/// test process's own environment cannot leak into the agent.
const AGENT_ENV: &[&str] = &[
    "DATA_DIR",
    "NODE_API_PORT",
    "API_LISTEN",
    "API_TOKEN",
    "PORTMAP_TOKEN",
    "VMS_BRIDGE",
    "VM_SUBNET",
    "EXTERNAL_IFACE",
    "WG_IFACE",
    "RECONCILE_INTERVAL",
    "RESERVED_PORTS",
    "ALLOWED_TARGETS",
    "LOG_FORMAT",
    "CLEANUP_ON_EXIT",
    "CONTROLLER_URL",
    "JOIN_TOKEN",
    "NODE_ID",
    "WG_MODE",
    "WG_MTU",
    "WG_KEEPALIVE",
    "WG_STALE_AFTER",
    "WG_LISTEN_PORT",
    "JOIN_RETRY_INITIAL_MS",
    "JOIN_RETRY_MAX",
    "JOIN_REFRESH_INTERVAL",
    "JOIN_TIMEOUT",
    "TRUST_CONTROLLER_TUNNEL",
    "LIBVIRT_URI",
    "LIBVIRT_TIMEOUT",
    "VMS_WORK_DIR",
    "VMS_HOST_DIR",
    "VMS_NETWORK",
    "VMS_ARCH",
    "VMS_POOL",
    "VMS_DOMAIN_TYPE",
    "VMS_DEFAULT_IMAGE",
    "VMS_DEFAULT_IMAGE_URL",
    "SSH_AUTHORIZED_KEYS",
    "VM_MAX_MEMORY_MIB",
    "VM_MAX_VCPUS",
    "VM_MAX_DISK_GB",
    "VM_STOP_TIMEOUT",
    "AUDIT_RETENTION_DAYS",
    "AUDIT_MAX_ROWS",
    "HEADER_READ_TIMEOUT",
    "BODY_READ_TIMEOUT",
    "KEEPALIVE_TIMEOUT",
    "MAX_CONNECTIONS",
    "UPLOAD_MIN_BYTES",
    "UPLOAD_WINDOW",
    "METRICS_LISTEN",
    // systemd's, when the test itself runs as a service.
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Bounded wait for `/health`: 300 polls, 100 ms apart.
const HEALTH_POLLS: usize = 300;

/// Where an agent runs and how its API is reached.
struct Host<'a> {
    /// The namespace the agent runs in.
    node: &'a str,
    /// VMS_BRIDGE.
    bridge: &'a str,
    /// The namespace the test's client connects from, and the address it connects to.
    api_ns: &'a str,
    api_addr: std::net::SocketAddr,
}

pub struct Agent {
    node: String,
    data_dir: tempfile::TempDir,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    /// What `serve` is started through, after `ip netns exec` (e.g. `prlimit`).
    wrapper: Vec<String>,
    child: Option<Child>,
    pub token: String,
    /// The API as a remote client sees it: from the client namespace to the node.
    pub api: Api,
}

impl Agent {
    pub fn start(topo: &Topology) -> Agent {
        Agent::start_with(topo, &[])
    }

    /// Starts with the harness's settings plus `extra` (which override them; an empty
    /// value unsets the setting, e.g. `("API_TOKEN", "")` to let the agent make one).
    pub fn start_with(topo: &Topology, extra: &[(&str, &str)]) -> Agent {
        Agent::start_via(topo, &[], extra)
    }

    /// As [`Agent::start_with`], every start of `serve` going through `wrapper` (e.g.
    /// `["prlimit", "--nofile=1024:1024"]`, systemd's default descriptor limit).
    pub fn start_via(topo: &Topology, wrapper: &[&str], extra: &[(&str, &str)]) -> Agent {
        let (mut agent, configured) = Agent::prepare(topo, extra);
        agent.wrapper = wrapper.iter().map(|w| w.to_string()).collect();
        agent.spawn_and_wait();
        match configured {
            Some(t) => agent.set_token(&t),
            None => {
                // /health needs no token, so the agent is up: it has written its own.
                let generated = std::fs::read_to_string(agent.data_dir().join("api.token"))
                    .unwrap_or_else(|e| panic!("no generated api.token: {e}"));
                agent.set_token(generated.trim());
            }
        }
        agent
    }

    /// The harness's settings plus `extra`, with a fresh data dir, not started (for
    /// starts that must fail: [`Agent::serve_expecting_exit`]).
    pub fn unstarted(topo: &Topology, extra: &[(&str, &str)]) -> Agent {
        Agent::prepare(topo, extra).0
    }

    /// Like [`Agent::start_with`], but returns as soon as the process is spawned, without
    /// waiting for `/health` (for timing the startup). The token must be configured
    /// (the harness sets API_TOKEN unless `extra` unsets it).
    pub fn spawn_with(topo: &Topology, extra: &[(&str, &str)]) -> Agent {
        let (mut agent, configured) = Agent::prepare(topo, extra);
        let token = configured.unwrap_or_else(|| panic!("spawn_with needs API_TOKEN"));
        agent.set_token(&token);
        agent.spawn();
        agent
    }

    /// Starts the process again on the same data dir and settings (after `stop`/`kill9`),
    /// without waiting for `/health`.
    pub fn spawn_again(&mut self) {
        self.spawn();
    }

    /// As [`Agent::spawn_with`], in a bare namespace of its own (a fleet's node: no
    /// client, bridge or VMs): its API is reached on the namespace's loopback, VMS_BRIDGE
    /// names a bridge that need not exist, and EXTERNAL_IFACE is the namespace's `eth0`.
    pub fn spawn_in(node: &Netns, extra: &[(&str, &str)]) -> Agent {
        let mut env: Vec<(&str, &str)> = vec![("EXTERNAL_IFACE", "eth0")];
        env.extend_from_slice(extra);
        let host = Host {
            node: node.name(),
            bridge: "nvafleetbr0",
            api_ns: node.name(),
            api_addr: sa(std::net::Ipv4Addr::LOCALHOST, API_PORT),
        };
        let (mut agent, configured) = Agent::prepare_on(&host, &env);
        let token = configured.unwrap_or_else(|| panic!("spawn_in needs API_TOKEN"));
        agent.set_token(&token);
        agent.spawn();
        agent
    }

    /// The agent's settings and fresh data dir, not started; plus the configured token.
    fn prepare(topo: &Topology, extra: &[(&str, &str)]) -> (Agent, Option<String>) {
        let host = Host {
            node: topo.node.name(),
            bridge: &topo.bridge,
            api_ns: topo.client.name(),
            api_addr: sa(NODE_IP, API_PORT),
        };
        Agent::prepare_on(&host, extra)
    }

    /// As [`Agent::prepare`], on any host.
    fn prepare_on(host: &Host, extra: &[(&str, &str)]) -> (Agent, Option<String>) {
        let data_dir = tempfile::Builder::new()
            .prefix("nva-agent-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let log_path = data_dir.path().join("agent.log");
        let token = format!("{:032x}", rand::random::<u128>());
        let mut env: Vec<(String, String)> = [
            ("DATA_DIR", data_dir.path().to_string_lossy().as_ref()),
            ("NODE_API_PORT", &API_PORT.to_string()),
            ("API_LISTEN", "0.0.0.0"),
            ("API_TOKEN", &token),
            ("VMS_BRIDGE", host.bridge),
            ("VM_SUBNET", VM_SUBNET),
            ("EXTERNAL_IFACE", EXTERNAL_IFACE),
            ("LOG_FORMAT", "text"),
            ("RUST_LOG", "info"),
            // libvirt's in-process test driver: agents of tests that are not about VMs
            // never touch the machine's (test) libvirtd.
            ("LIBVIRT_URI", "test:///default"),
            ("VMS_DEFAULT_IMAGE_URL", ""),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            if !v.is_empty() {
                env.push((k.to_string(), v.to_string()));
            }
        }
        let configured = ["API_TOKEN", "PORTMAP_TOKEN"]
            .iter()
            .find_map(|t| env.iter().find(|(k, _)| k == t).map(|(_, v)| v.clone()));
        let agent = Agent {
            node: host.node.to_owned(),
            data_dir,
            log_path,
            env,
            wrapper: Vec::new(),
            child: None,
            api: Api::new(host.api_ns, host.api_addr, &token),
            token,
        };
        (agent, configured)
    }

    /// Sets (or replaces) one setting for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    fn set_token(&mut self, token: &str) {
        self.token = token.to_owned();
        self.api.token = token.to_owned();
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    fn command(&self, sub: &str) -> Command {
        self.command_via(&[], sub)
    }

    /// `ip netns exec <node> [wrapper...] node-vm-agent <sub>` with the agent's settings.
    fn command_via(&self, wrapper: &[&str], sub: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.node]);
        c.args(wrapper);
        c.args([agent_bin().as_str(), sub]);
        for k in AGENT_ENV {
            c.env_remove(k);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn log_file(&self) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()))
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = self.log_file();
        let log2 = log.try_clone().unwrap_or_else(|e| panic!("dup log: {e}"));
        // `ip netns exec` execs the agent (as a wrapper such as prlimit does), so the
        // child's pid is the agent's own.
        let wrapper: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        let child = self
            .command_via(&wrapper, "serve")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn agent: {e}"));
        self.child = Some(child);
    }

    fn spawn_and_wait(&mut self) {
        self.spawn();
        for _ in 0..HEALTH_POLLS {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "agent exited during startup ({status}); log:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = self.api.request("GET", "/health", None, None)
                && r.status == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("agent not healthy after bounded wait; log:\n{}", self.log());
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown code runs, the kernel table stays as it was.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and a bounded wait (then SIGKILL); returns whether it exited by itself.
    pub fn stop(&mut self) -> bool {
        self.stop_within(Duration::from_secs(10))
    }

    /// SIGTERM, then SIGKILL if it has not exited within `bound`; returns whether it
    /// exited by itself.
    pub fn stop_within(&mut self, bound: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let start = std::time::Instant::now();
        while start.elapsed() < bound {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Starts again on the same data dir and settings (stopping it first if running).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait();
    }

    /// Starts again after `kill9`/`stop`.
    pub fn start_again(&mut self) {
        self.spawn_and_wait();
    }

    /// `node-vm-agent serve` with the same settings, for a start that must fail: waits
    /// (bounded) for it to exit; (exit code, stdout + stderr), code -1 if it kept running.
    pub fn serve_expecting_exit(&self) -> (i32, String) {
        self.serve_via_expecting_exit(&[])
    }

    /// As [`Agent::serve_expecting_exit`], started through `wrapper` (e.g. `setpriv` to
    /// drop root). The output goes to a file outside the data dir, which the start
    /// must leave as it found it.
    pub fn serve_via_expecting_exit(&self, wrapper: &[&str]) -> (i32, String) {
        let out_path = std::env::temp_dir().join(format!(
            "nva-failed-start-{}-{}.log",
            std::process::id(),
            super::netns::unique_id()
        ));
        let out = File::create(&out_path).unwrap();
        let mut child = self
            .command_via(wrapper, "serve")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn serve: {e}"));
        let mut code = -1;
        for _ in 0..200 {
            if let Ok(Some(status)) = child.try_wait() {
                code = status.code().unwrap_or(-1);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if code == -1 {
            let _ = child.kill();
            let _ = child.wait();
        }
        let said = std::fs::read_to_string(&out_path).unwrap_or_default();
        let _ = std::fs::remove_file(&out_path);
        (code, said)
    }

    /// `node-vm-agent diff` with the same settings: (exit code, stdout + stderr).
    pub fn diff(&self) -> (i32, String) {
        let (code, stdout, stderr) = self.diff_streams();
        (code, format!("{stdout}{stderr}"))
    }

    /// `node-vm-agent diff`: (exit code, stdout, stderr).
    pub fn diff_streams(&self) -> (i32, String, String) {
        let out = self
            .command("diff")
            .output()
            .unwrap_or_else(|e| panic!("spawn diff: {e}"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `sqlite3 agent.db QUERY` (tests only, for the audit trail).
    pub fn sql(&self, query: &str) -> String {
        let db = self.data_dir.path().join("agent.db");
        run_ok(Command::new("sqlite3").arg(db).arg(query))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let clean = self.stop();
        if std::thread::panicking() || !clean {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(150).collect();
            eprintln!(
                "---- agent log (last {} lines, exited on SIGTERM: {clean}) ----",
                tail.len()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}
