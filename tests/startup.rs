//! A start that cannot work fails before it changes anything, and says why once: the
//! real agent binary in the test topology's node namespace, with settings, privileges
//! and a machine that are wrong in one way each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::TcpListener;
use std::path::Path;

use support::netns::in_netns;
use support::*;

/// `net.ipv4.ip_forward` of the node namespace.
fn ip_forward(topo: &Topology) -> String {
    topo.node
        .exec_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"])
        .trim()
        .to_owned()
}

/// What is in `dir` (names only).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Starts an agent with `extra` (through `wrapper`), expects it to stop with exit status
/// 2 saying `says` exactly once, and checks that nothing was changed: forwarding still
/// off, no nftables table, nothing in the data dir, no colour codes in the output.
fn refused(topo: &Topology, extra: &[(&str, &str)], wrapper: &[&str], says: &str) -> Agent {
    topo.node
        .exec_ok(&["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"]);
    let agent = Agent::unstarted(topo, extra);
    let (code, out) = agent.serve_via_expecting_exit(wrapper);
    assert_eq!(code, 2, "{extra:?}: {out}");
    assert_eq!(out.matches(says).count(), 1, "{extra:?}: said once? {out}");
    assert!(
        !out.contains('\u{1b}'),
        "colour codes without a terminal: {out:?}"
    );
    assert_eq!(ip_forward(topo), "0", "{extra:?} turned forwarding on");
    assert!(
        !table_exists(&topo.node, "ip", "node_vm_agent"),
        "{extra:?} wrote the nftables table"
    );
    assert_eq!(
        entries(agent.data_dir()),
        Vec::<String>::new(),
        "{extra:?} left files in DATA_DIR"
    );
    agent
}

#[test]
fn bad_settings_stop_the_agent_before_it_changes_anything() {
    let topo = Topology::new();
    let file = tempfile::NamedTempFile::new().unwrap();
    let file_path = file.path().to_string_lossy().into_owned();
    let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (
            vec![("DATA_DIR", &file_path)],
            format!("DATA_DIR {file_path} exists and is not a directory"),
        ),
        (
            vec![("VM_SUBNET", "10.0.0.5/8")],
            "invalid VM_SUBNET=\"10.0.0.5/8\": host bits are set; the network is 10.0.0.0/8".into(),
        ),
        (
            vec![("EXTERNAL_IFACE", "nosuchif0")],
            "EXTERNAL_IFACE=\"nosuchif0\": no such interface in this network namespace".into(),
        ),
        (
            vec![("VMS_WORK_DIR", "relative/dir")],
            "invalid VMS_WORK_DIR=\"relative/dir\": must be an absolute path".into(),
        ),
        (
            vec![("LIBVIRT_URI", "banana")],
            "invalid LIBVIRT_URI=\"banana\": not a libvirt URI".into(),
        ),
        (
            vec![("RESERVED_PORTS", "abc")],
            "\"abc\" is not a port number (1..65535)".into(),
        ),
        (
            vec![("CONTROLLER_URL", "http://10.77.1.2:5000")],
            "CONTROLLER_URL is set but JOIN_TOKEN and NODE_ID are not".into(),
        ),
        (
            vec![("METRICS_LISTEN", "127.0.0.1")],
            "invalid value '127.0.0.1' for '--metrics-listen <METRICS_LISTEN>'".into(),
        ),
    ];
    for (extra, says) in &cases {
        refused(&topo, extra, &[], says);
    }

    // The API port taken by another process: the agent finds out before acting.
    let _taken = in_netns(topo.node.name(), || {
        TcpListener::bind(("0.0.0.0", API_PORT))
    })
    .unwrap();
    refused(
        &topo,
        &[],
        &[],
        &format!("cannot listen on 0.0.0.0:{API_PORT} (API_LISTEN, NODE_API_PORT)"),
    );
    drop(_taken);
    // METRICS_LISTEN's port taken: the same, naming that setting.
    let _taken = in_netns(topo.node.name(), || TcpListener::bind(("127.0.0.1", 9101))).unwrap();
    refused(
        &topo,
        &[("METRICS_LISTEN", "127.0.0.1:9101")],
        &[],
        "cannot listen on 127.0.0.1:9101 (METRICS_LISTEN)",
    );
}

#[test]
fn without_cap_net_admin_the_agent_says_so_and_creates_nothing() {
    let topo = Topology::new();
    let agent = Agent::unstarted(&topo, &[("API_TOKEN", "")]);
    // A data dir the unprivileged user owns, so that only the missing capability can
    // stop it (before, it created agent.db, api.token and node.key, then failed).
    std::os::unix::fs::chown(agent.data_dir(), Some(65534), Some(65534)).unwrap();
    refused(
        &topo,
        &[("DATA_DIR", &agent.data_dir().to_string_lossy())],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        "node-vm-agent serve needs CAP_NET_ADMIN (run it as root, or grant the capability",
    );
}

#[test]
fn diff_without_a_database_says_so_and_creates_none() {
    let topo = Topology::new();
    let agent = Agent::unstarted(&topo, &[]);
    let (code, out) = agent.diff();
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no database"), "{out}");
    assert_eq!(out.matches("no database").count(), 1, "{out}");
    assert_eq!(entries(agent.data_dir()), Vec::<String>::new());
}

/// A node that maps ports and has no VMs (the demo's `--no-vm`) never connects to
/// libvirt; its log is plain text on stderr, and stdout stays free for `diff`'s answer.
#[test]
fn a_port_map_node_leaves_libvirt_alone_and_logs_plain_text_to_stderr() {
    let topo = Topology::new();
    let mut agent = Agent::start_with(&topo, &[("RECONCILE_INTERVAL", "1")]);
    let r = agent.api.post(
        "/ports",
        &serde_json::json!({"listen_port": 8080, "target_ip": VM_IP.to_string(), "target_port": 80}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    // A few reconcile passes.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(agent.stop(), "the agent exits on SIGTERM");
    let log = agent.log();
    assert!(log.contains("API listening"), "{log}");
    assert!(!log.contains("connected to libvirt"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file: {log:?}"
    );
    let (code, stdout, stderr) = agent.diff_streams();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout, "in sync\n", "{stderr}");
}

/// A serving agent with two port maps (TCP and UDP); returns it and what its node's
/// kernel holds.
fn serving_with_maps(topo: &Topology) -> (Agent, std::collections::BTreeSet<MapEntry>) {
    let agent = Agent::start(topo);
    for (port, proto, target) in [(8080, "tcp", 80), (5353, "udp", 53)] {
        let r = agent.api.post(
            "/ports",
            &serde_json::json!({"listen_port": port, "target_ip": VM_IP.to_string(),
                                "target_port": target, "proto": proto}),
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
    let maps = nft_maps(&topo.node);
    assert_eq!(maps.len(), 2, "{maps:?}");
    (agent, maps)
}

/// The agent's table as `nft` prints it (element order and all).
fn table_text(topo: &Topology) -> String {
    topo.node
        .exec_ok(&["nft", "list", "table", "ip", "node_vm_agent"])
}

/// The first agent still serves what it served: its API lists `maps`, the kernel holds
/// them, and the table reads as `table` did.
fn still_intact(
    agent: &Agent,
    topo: &Topology,
    maps: &std::collections::BTreeSet<MapEntry>,
    table: &str,
) {
    let r = agent.api.get("/ports");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(&api_maps(r.json()), maps, "the first agent's database");
    assert_eq!(
        &nft_maps(&topo.node),
        maps,
        "the first agent's maps in the kernel"
    );
    assert_eq!(table_text(topo), table, "the first agent's table");
}

/// Two agents in one network namespace would rewrite each other's table at every
/// reconcile: the second stops in its preflight, naming the first, and changes nothing
/// (not even its own, different, DATA_DIR).
#[test]
fn a_second_agent_in_the_same_namespace_is_refused_and_changes_nothing() {
    let topo = Topology::new();
    let (first, maps) = serving_with_maps(&topo);
    let table = table_text(&topo);
    let pid = first.pid().unwrap();

    let second = Agent::unstarted(&topo, &[("NODE_API_PORT", "8001")]);
    let (code, out) = second.serve_expecting_exit();
    assert_eq!(code, 2, "{out}");
    let says = format!(
        "another node-vm-agent (pid {pid}) already serves this network namespace and owns \
         its nftables table ip node_vm_agent"
    );
    assert_eq!(out.matches(&says).count(), 1, "{out}");
    assert_eq!(
        entries(second.data_dir()),
        Vec::<String>::new(),
        "the refused agent created files"
    );
    still_intact(&first, &topo, &maps, &table);
    // The same again with the first agent's API port: the holder is named, not the port.
    let third = Agent::unstarted(&topo, &[]);
    let (code, out) = third.serve_expecting_exit();
    assert_eq!(code, 2, "{out}");
    assert_eq!(out.matches(&says).count(), 1, "{out}");
    still_intact(&first, &topo, &maps, &table);
}

/// Two agents on one DATA_DIR would share its database, wherever they run: the second,
/// in another network namespace, stops naming the holder and writes nothing, neither in
/// its own namespace nor in the shared database.
#[test]
fn a_second_agent_on_the_same_data_dir_is_refused() {
    let topo = Topology::new();
    let (first, maps) = serving_with_maps(&topo);
    let table = table_text(&topo);
    let pid = first.pid().unwrap();
    let audit_rows = first.sql("select count(*) from audit_log");

    let elsewhere = Topology::new();
    let dir = first.data_dir().to_string_lossy().into_owned();
    let second = Agent::unstarted(&elsewhere, &[("DATA_DIR", &dir)]);
    let (code, out) = second.serve_expecting_exit();
    assert_eq!(code, 2, "{out}");
    let says = format!(
        "DATA_DIR {dir} is in use by another node-vm-agent (pid {pid}, which holds the lock \
         on {dir}/agent.lock); two agents would share its database"
    );
    assert_eq!(out.matches(&says).count(), 1, "{out}");
    assert!(
        !table_exists(&elsewhere.node, "ip", "node_vm_agent"),
        "the refused agent wrote a table in its namespace"
    );
    assert_eq!(first.sql("select count(*) from audit_log"), audit_rows);
    still_intact(&first, &topo, &maps, &table);
}

/// The locks die with the process: after `kill -9` (no shutdown code runs) a new agent
/// takes the same namespace and DATA_DIR at once, although the old lock file, with the
/// dead agent's pid, is still there.
#[test]
fn after_kill_9_a_new_agent_starts_at_once() {
    let topo = Topology::new();
    let (mut first, maps) = serving_with_maps(&topo);
    let old_pid = first.pid().unwrap();
    let second = Agent::unstarted(&topo, &[("NODE_API_PORT", "8001")]);
    let (code, out) = second.serve_expecting_exit();
    assert_eq!(code, 2, "refused while the first runs: {out}");
    assert!(out.contains(&format!("(pid {old_pid})")), "{out}");

    first.kill9();
    let lock_file = first.data_dir().join("agent.lock");
    assert_eq!(
        std::fs::read_to_string(&lock_file).unwrap(),
        format!("{old_pid}\n")
    );
    // Same namespace, same DATA_DIR, no wait: start_again fails if the process exits.
    first.start_again();
    let new_pid = first.pid().unwrap();
    assert_eq!(
        std::fs::read_to_string(&lock_file).unwrap(),
        format!("{new_pid}\n")
    );
    let r = first.api.get("/ports");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api_maps(r.json()), maps);
    assert_eq!(nft_maps(&topo.node), maps);
    // And the new agent holds the namespace in turn.
    let (code, out) = second.serve_expecting_exit();
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&format!("(pid {new_pid})")), "{out}");
}

/// `diff` changes nothing, so it takes no lock: it runs beside a serving agent (same
/// namespace, same DATA_DIR), and the agent keeps serving and holding its locks.
#[test]
fn diff_runs_beside_a_serving_agent() {
    let topo = Topology::new();
    let (first, maps) = serving_with_maps(&topo);
    let table = table_text(&topo);
    for _ in 0..2 {
        let (code, stdout, stderr) = first.diff_streams();
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert_eq!(stdout, "in sync\n", "{stderr}");
    }
    topo.node
        .nft_apply("flush map ip node_vm_agent udp_ports\n");
    let (code, stdout, stderr) = first.diff_streams();
    assert_eq!(code, 1, "drift is seen beside the agent: {stdout}{stderr}");
    // Put back through the agent, which still owns the table.
    let r = first.api.post("/ports/restore", &serde_json::json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    still_intact(&first, &topo, &maps, &table);
    let second = Agent::unstarted(&topo, &[("NODE_API_PORT", "8001")]);
    assert_eq!(
        second.serve_expecting_exit().0,
        2,
        "the agent lost its lock"
    );
}

/// The path of libvirt's shared object as mapped by `pid`, if it is.
fn libvirt_mapped(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libvirt.so.0"))
        .map(str::to_owned)
}

/// libvirt and the ~30 libraries it needs (about 12 MB resident) are mapped when the agent
/// first talks to libvirt, not at start: a node that only maps ports never carries them,
/// and a node without libvirt installed still starts and maps ports, its VM routes
/// answering 503 with what is missing.
#[test]
fn libvirt_is_loaded_on_first_use_and_a_node_without_it_still_maps_ports() {
    let topo = Topology::new();
    let body =
        serde_json::json!({"listen_port": 8080, "target_ip": VM_IP.to_string(), "target_port": 80});
    let mut agent = Agent::start(&topo);
    let pid = agent.pid().unwrap();
    assert_eq!(agent.api.post("/ports", &body).status, 200);
    assert_eq!(agent.api.get("/ports").status, 200);
    assert_eq!(
        libvirt_mapped(pid),
        None,
        "libvirt loaded by an agent that only maps ports: is a libvirt function missing \
         from the list in src/vm/driver/libvirt/loader.rs? (`nm -D --undefined-only` of the binary)"
    );
    let vms = agent.api.get("/vms");
    assert_eq!(vms.status, 200, "{}", vms.body);
    let library = libvirt_mapped(pid).expect("libvirt loaded for GET /vms");
    assert!(agent.log().contains("libvirt loaded"), "{}", agent.log());
    assert!(agent.stop());

    // The same node with libvirt's library unreadable (an empty file in its place, in a
    // mount namespace of the agent's own).
    let script = format!("mount --bind /dev/null {library} && exec \"$@\"");
    let without = Agent::start_via(&topo, &["unshare", "-m", "sh", "-c", &script, "sh"], &[]);
    assert_eq!(without.api.post("/ports", &body).status, 200);
    let ports = without.api.get("/ports");
    assert!(
        ports.body.contains("\"listen_port\":8080"),
        "{}",
        ports.body
    );
    let vms = without.api.get("/vms");
    assert_eq!(vms.status, 503, "{}", vms.body);
    let error = vms.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("cannot load libvirt.so.0") && error.contains("libvirt0"),
        "{error}"
    );
}
