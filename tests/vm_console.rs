//! The interactive console against a real libvirtd and the tiny guest (a shell on its
//! serial port), with clients nobody here wrote the WebSocket side of: Python's
//! `websockets` (tests/console_client.py) and, for `node-vm-agent console`, a real
//! pseudo-terminal (tests/console_pty.py).
//!
//! libvirtd's control socket is machine-wide, so the tests of this file take turns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::libvirt::{Env, Libvirtd, env, tiny_vm};
use support::*;

const PYTHON: &str = "/usr/bin/python3";

/// A console client running in the client namespace; its JSON lines as they come.
struct Client {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Client {
    fn start(e: &Env, vm: &str, args: &[&str]) -> Client {
        let api = &e.agent.api;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console_client.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &api.ns, PYTHON, script])
            .arg(api.addr.to_string())
            .arg(vm)
            .arg(&e.agent.token)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str(&l).unwrap_or(Value::String(l)));
            }
        });
        Client { child, lines }
    }

    /// The next line, within `within`.
    fn next(&self, within: Duration) -> Value {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("no line from the console client within {within:?}"))
    }

    /// Waits for its event `event`, failing on any other.
    fn expect(&self, event: &str, within: Duration) -> Value {
        let v = self.next(within);
        assert_eq!(v["event"], event, "{v}");
        v
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running tiny guest `name` whose console shows its READY marker.
fn booted(e: &Env, name: &str) {
    let (kernel, initrd) = e.scratch.guest();
    if !e.volumes().contains(&"image.tiny".to_owned()) {
        let r = e.upload_image("tiny", &vec![0u8; 4 << 20]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = e.agent.api.post("/vms", &tiny_vm(name, &kernel, &initrd));
    assert_eq!(r.status, 200, "{r:?}\n{}", e.agent.log());
    e.wait_ready(name, 1);
}

/// Console audit rows: (identity, parameters).
fn console_rows(e: &Env) -> Vec<(String, Value)> {
    let out = e.agent.sql(
        "SELECT identity, parameters FROM audit_log \
         WHERE action = 'GET /vms/{name}/console/attach' ORDER BY id",
    );
    out.lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(i, p)| (i.to_owned(), serde_json::from_str(p).unwrap_or(Value::Null)))
        .collect()
}

#[test]
fn a_real_client_types_into_the_guest_one_session_at_a_time() {
    let _turn = support::libvirt::turn();
    let e = env(&[]);
    booted(&e, "con1");

    // Attach through the token as a subprotocol (as a browser must), type, read.
    let a = Client::start(
        &e,
        "con1",
        &[
            "--subprotocol-token",
            "--send",
            "echo TYPED-$((6*7))\n",
            "--expect",
            "TYPED-42",
            "--hold",
            "120",
        ],
    );
    let open = a.expect("open", Duration::from_secs(30));
    assert_eq!(open["subprotocol"], "console.node-vm-agent", "{open}");
    a.expect("saw", Duration::from_secs(60));

    // A second attach is a JSON 409 before any upgrade, naming the holder.
    let probe = Client::start(&e, "con1", &["--probe"]);
    let r = probe.expect("refused", Duration::from_secs(30));
    assert_eq!(r["status"], 409, "{r}");
    let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    let msg = body["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        msg.contains("held by session") && msg.contains("since"),
        "{msg}"
    );
    // Not a WebSocket request at all: a JSON 400.
    let r = e.agent.api.get("/vms/con1/console/attach");
    assert_eq!(r.status, 400, "{r:?}");
    let r = e.agent.api.get("/vms/nope/console/attach");
    assert!(r.status == 404 || r.status == 400, "{r:?}");

    // A forced attach takes over; the first gets a close frame that says so.
    let b = Client::start(
        &e,
        "con1",
        &[
            "--force",
            "--send",
            "echo TAKEN-$((2+3))\n",
            "--expect",
            "TAKEN-5",
            "--hold",
            "120",
        ],
    );
    b.expect("open", Duration::from_secs(30));
    let closed = a.expect("closed", Duration::from_secs(10));
    assert_eq!(closed["code"], 4001, "{closed}");
    assert!(
        closed["reason"].as_str().unwrap().contains("taken over"),
        "{closed}"
    );
    b.expect("saw", Duration::from_secs(60));

    // Stopping the VM closes the session within 5 s of the stop's answer.
    let r = e.agent.api.post("/vms/con1/stop?force=true", &Value::Null);
    assert_eq!(r.status, 200, "{r:?}");
    let t = Instant::now();
    let closed = b.expect("closed", Duration::from_secs(10));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(closed["code"], 4003, "{closed}");

    // A stopped VM: 409 before any upgrade.
    let c = Client::start(&e, "con1", &[]);
    let refused = c.expect("refused", Duration::from_secs(30));
    assert_eq!(refused["status"], 409, "{refused}");

    // One audit row per session, who and how it ended, without what was typed.
    let rows = console_rows(&e);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].1["ended"], "forced", "{rows:?}");
    assert_eq!(rows[1].1["ended"], "vm-stopped", "{rows:?}");
    for (identity, p) in &rows {
        assert_eq!(identity, "token");
        assert!(
            p["bytes_in"].as_u64().unwrap() > 0 && p["bytes_out"].as_u64().unwrap() > 0,
            "{p}"
        );
    }
    // Events of both sessions, and the metrics.
    let mut ev = support::events::EventStream::open(
        &e.agent.api.ns,
        e.agent.api.addr,
        &e.agent.token,
        Some("0"),
    )
    .unwrap();
    let seen = ev.until(Duration::from_secs(5), |v| {
        v["kind"] == "console.detached" && v["detail"]["ended"] == "vm-stopped"
    });
    let kinds = |k: &str| seen.iter().filter(|v| v["kind"] == k).count();
    assert_eq!(
        (kinds("console.attached"), kinds("console.detached")),
        (2, 2),
        "{seen:#?}"
    );
    let metrics = e.agent.api.get("/metrics").body;
    assert!(
        metrics.contains("node_vm_agent_consoles_open 0"),
        "{metrics}"
    );
    let typed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("node_vm_agent_console_input_bytes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(typed.is_some_and(|n| n > 0.0), "{metrics}");
    let all = e.agent.sql("SELECT * FROM audit_log");
    let log = e.agent.log();
    for typed in ["$((6*7))", "$((2+3))"] {
        assert!(
            !all.contains(typed),
            "typed text in the audit trail:\n{all}"
        );
        assert!(!log.contains(typed), "typed text in the log:\n{log}");
    }
}

/// Open descriptors and threads of the agent, and its VmRSS in KiB.
fn footprint(pid: u32) -> (usize, usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    (fds, field("Threads:") as usize, field("VmRSS:"))
}

#[test]
fn fifty_sessions_and_a_frozen_libvirtd_leave_the_agent_as_it_was() {
    let _turn = support::libvirt::turn();
    // The API's own timeouts at their shortest: a console outlives them all.
    let mut e = env(&[
        ("CONSOLE_IDLE_TIMEOUT", "10"),
        ("HEADER_READ_TIMEOUT", "1"),
        ("KEEPALIVE_TIMEOUT", "1"),
        ("BODY_READ_TIMEOUT", "1"),
    ]);
    booted(&e, "con2");
    let pid = e.agent.pid().unwrap();
    let session = || {
        let c = Client::start(
            &e,
            "con2",
            &["--send", "echo CYCLE-$((1+1))\n", "--expect", "CYCLE-2"],
        );
        c.expect("open", Duration::from_secs(30));
        c.expect("saw", Duration::from_secs(60));
        let closed = c.expect("closed", Duration::from_secs(10));
        assert_eq!(closed["code"], 1000, "{closed}");
    };
    // Warm up (libvirt loaded, connections made), then measure.
    session();
    std::thread::sleep(Duration::from_secs(1));
    let before = footprint(pid);
    for _ in 0..50 {
        session();
    }
    // The runtime's blocking threads (closes, the store) exit after 10 s idle.
    let settled = Instant::now() + Duration::from_secs(20);
    let mut after = footprint(pid);
    while after.1 > before.1 + 2 && Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(500));
        after = footprint(pid);
    }
    say(format!(
        "50 sessions: (fds, threads, VmRSS KiB) before {before:?}, after {after:?}"
    ));
    assert!(
        after.0 <= before.0 + 2,
        "descriptors {before:?} -> {after:?}"
    );
    assert!(after.1 <= before.1 + 2, "threads {before:?} -> {after:?}");
    assert!(after.2 <= before.2 + 2048, "VmRSS {before:?} -> {after:?}");
    assert_eq!(console_rows(&e).len(), 51);

    // libvirtd frozen for 20 s during a session: the session closes (1011), the agent
    // stays up, and a new session works after the thaw.
    let c = Client::start(
        &e,
        "con2",
        &[
            "--send",
            "echo FROZEN-$((3+3))\n",
            "--expect",
            "FROZEN-6",
            "--hold",
            "120",
        ],
    );
    c.expect("open", Duration::from_secs(30));
    c.expect("saw", Duration::from_secs(60));
    let lpid = Libvirtd::pid().expect("libvirtd's pid");
    let thaw = Thaw(lpid);
    kill(lpid, "-STOP");
    let t = Instant::now();
    let closed = c.expect("closed", Duration::from_secs(20));
    let took = t.elapsed();
    say(format!(
        "frozen libvirtd: the session closed after {took:?}: {closed}"
    ));
    assert_eq!(closed["code"], 1011, "{closed}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    std::thread::sleep(Duration::from_secs(20).saturating_sub(t.elapsed()));
    assert_eq!(e.agent.api.get("/health").status, 200);
    drop(thaw);
    session_works_again(&e, "con2", "echo THAWED-$((4+4))\n", "THAWED-8");
    assert!(
        e.agent.pid().is_some(),
        "the agent died:\n{}",
        e.agent.log()
    );

    // libvirtd restarted during a session: the session closes (1011) within 5 s of the
    // kill, and a new one works once libvirtd is back (the guest lives on).
    let c = Client::start(
        &e,
        "con2",
        &[
            "--send",
            "echo KILLED-$((1+2))\n",
            "--expect",
            "KILLED-3",
            "--hold",
            "120",
        ],
    );
    c.expect("open", Duration::from_secs(30));
    c.expect("saw", Duration::from_secs(60));
    let t = Instant::now();
    e.libvirtd.kill();
    let closed = c.expect("closed", Duration::from_secs(10));
    say(format!(
        "libvirtd killed: the session closed {:?} after the kill began: {closed}",
        t.elapsed()
    ));
    assert_eq!(closed["code"], 1011, "{closed}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    e.libvirtd.revive();
    session_works_again(&e, "con2", "echo BACK-$((2+7))\n", "BACK-9");

    // A quiet session outlives the API's 1 s timeouts and ends at CONSOLE_IDLE_TIMEOUT.
    let quiet = Client::start(&e, "con2", &["--hold", "60"]);
    quiet.expect("open", Duration::from_secs(30));
    let t = Instant::now();
    let closed = quiet.expect("closed", Duration::from_secs(30));
    assert_eq!(closed["code"], 4002, "{closed}");
    assert!(t.elapsed() >= Duration::from_secs(9), "{:?}", t.elapsed());

    // The agent stopping closes an open session with 1001, then exits; it is started
    // again so that it deletes its VM.
    let last = Client::start(&e, "con2", &["--hold", "60"]);
    last.expect("open", Duration::from_secs(30));
    assert!(
        e.agent.stop(),
        "the agent did not exit on SIGTERM with a console open"
    );
    let closed = last.expect("closed", Duration::from_secs(10));
    assert_eq!(closed["code"], 1001, "{closed}");
    e.agent.start_again();
}

/// Attaches (retrying for up to a minute while libvirt comes back), types `send` and
/// waits for `expect`.
fn session_works_again(e: &Env, vm: &str, send: &str, expect: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = Client::start(e, vm, &["--send", send, "--expect", expect]);
        let first = c.next(Duration::from_secs(60));
        if first["event"] == "open" {
            c.expect("saw", Duration::from_secs(60));
            return;
        }
        assert!(Instant::now() < deadline, "no session on {vm}: {first}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        kill(self.0, "-CONT");
    }
}

fn kill(pid: i32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

#[test]
fn the_console_command_types_through_a_terminal_and_gives_it_back() {
    let _turn = support::libvirt::turn();
    let e = env(&[]);
    booted(&e, "con3");
    // A quiet session gets the agent's ping about 15 s in (raw frames: the client's
    // library would answer pings unseen).
    let quiet = Client::start(&e, "con3", &["--wait-ping", "25"]);
    quiet.expect("open", Duration::from_secs(30));
    let ping = quiet.expect("ping", Duration::from_secs(30));
    let at = ping["s"].as_f64().unwrap();
    assert!((14.0..17.0).contains(&at), "{ping}");
    drop(quiet);
    let api = &e.agent.api;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console_pty.py");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &api.ns,
            PYTHON,
            script,
            "CLI-12",
            "echo CLI-$((3*4))\r",
            "--",
        ])
        .arg("env")
        .arg(format!("API_TOKEN={}", e.agent.token))
        .arg(format!("API_LISTEN={}", api.addr.ip()))
        .arg(format!("NODE_API_PORT={}", api.addr.port()))
        .arg(env!("CARGO_BIN_EXE_node-vm-agent"))
        .args(["console", "con3"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["attached"], true, "{v}");
    assert_eq!(v["raw_while_attached"], true, "{v}");
    assert_eq!(v["saw"], true, "{v}");
    assert_eq!(v["status"], 0, "{v}");
    assert_eq!(v["restored"], true, "{v}");
    assert!(v["output"].as_str().unwrap().contains("detached"), "{v}");
    let rows = console_rows(&e);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1].1["ended"], "client", "{rows:?}");
}

/// Through a remote LIBVIRT_URI (qemu+tcp to another namespace's libvirtd) the console
/// works the same, and deleting the VM ends its session (4003, `vm-deleted`).
#[test]
fn a_console_works_through_a_remote_libvirt_uri_and_ends_when_its_vm_is_deleted() {
    let _turn = support::libvirt::turn();
    let e = support::libvirt::remote_env(&[]);
    booted(&e, "con4");
    let c = Client::start(
        &e,
        "con4",
        &[
            "--send",
            "echo REMOTE-$((5*5))\n",
            "--expect",
            "REMOTE-25",
            "--hold",
            "120",
        ],
    );
    c.expect("open", Duration::from_secs(30));
    c.expect("saw", Duration::from_secs(60));
    let r = e.agent.api.delete("/vms/con4");
    assert_eq!(r.status, 200, "{r:?}");
    let closed = c.expect("closed", Duration::from_secs(10));
    assert_eq!(closed["code"], 4003, "{closed}");
    let rows = console_rows(&e);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].1["ended"], "vm-deleted", "{rows:?}");
}

/// The agent's RssAnon in KiB.
fn rss_anon(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// Benchmark (p) of docs/benchmarks.md, run by scripts/bench.sh: keystroke-to-echo
/// round trips through the agent's WebSocket (Python's `websockets`) and through
/// `virsh console` (in a pseudo-terminal) to the same guest's shell, interleaved; then
/// the agent's memory per idle session (RssAnon with 3 idle sessions open, against
/// before).
#[test]
#[ignore = "a benchmark: scripts/bench.sh runs it"]
fn bench_console() {
    let _turn = support::libvirt::turn();
    let e = env(&[]);
    for vm in ["bench1", "bench2", "bench3"] {
        booted(&e, vm);
    }
    let pid = e.agent.pid().unwrap();
    let cold = idle_cost(&e, pid);
    let (mut agent_ms, mut virsh_ms) = (Vec::new(), Vec::new());
    let rtt_script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console_rtt_pty.py");
    for _ in 0..2 {
        let c = Client::start(
            &e,
            "bench1",
            &["--send", "\n", "--expect", "#", "--rtt", "100"],
        );
        c.expect("open", Duration::from_secs(30));
        c.expect("saw", Duration::from_secs(60));
        let r = c.expect("rtt", Duration::from_secs(120));
        agent_ms.extend(
            r["ms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap()),
        );
        c.expect("closed", Duration::from_secs(10));
        let out = Command::new(PYTHON)
            .args([
                rtt_script,
                "100",
                "Escape character",
                "--",
                "virsh",
                "-c",
                "qemu:///system",
                "console",
                "bench1",
                "--force",
            ])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)));
        virsh_ms.extend(
            v["ms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap()),
        );
    }
    let (before, with) = idle_cost(&e, pid);
    let (a50, v50) = (percentile(&agent_ms, 0.5), percentile(&virsh_ms, 0.5));
    println!(
        "BENCH console n={} agent_p50_ms={a50:.2} agent_p90_ms={:.2} agent_max_ms={:.2} virsh_p50_ms={v50:.2} virsh_p90_ms={:.2} virsh_max_ms={:.2} ratio_p50={:.2} rss_anon_before_kib={before} rss_anon_3_idle_kib={with} per_idle_session_kib={} first_sessions_rss_anon_before_kib={} first_sessions_rss_anon_3_idle_kib={} first_sessions_per_idle_session_kib={}",
        agent_ms.len(),
        percentile(&agent_ms, 0.9),
        percentile(&agent_ms, 1.0),
        percentile(&virsh_ms, 0.9),
        percentile(&virsh_ms, 1.0),
        a50 / v50,
        (with.saturating_sub(before)) / 3,
        cold.0,
        cold.1,
        (cold.1.saturating_sub(cold.0)) / 3,
    );
}

/// The agent's RssAnon (KiB) before and with an idle session open on each of the three
/// VMs (3 s after they opened).
fn idle_cost(e: &Env, pid: u32) -> (u64, u64) {
    std::thread::sleep(Duration::from_secs(2));
    let before = rss_anon(pid);
    let idle: Vec<Client> = ["bench1", "bench2", "bench3"]
        .iter()
        .map(|vm| Client::start(e, vm, &["--hold", "60"]))
        .collect();
    for c in &idle {
        c.expect("open", Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(3));
    let with = rss_anon(pid);
    drop(idle);
    std::thread::sleep(Duration::from_secs(1));
    (before, with)
}

/// A client that stops reading while the guest writes without end (`yes`) is closed
/// (its row says `slow-client`), and the agent holds no more than bounded queues
/// meanwhile: what the client could not take is dropped and counted (libvirt's client
/// queued it without bound before: RssAnon +10 MiB in this test).
#[test]
fn a_client_that_stops_reading_is_closed_and_costs_bounded_memory() {
    let _turn = support::libvirt::turn();
    let e = env(&[]);
    booted(&e, "con5");
    let pid = e.agent.pid().unwrap();
    let before = rss_anon(pid);
    let c = Client::start(&e, "con5", &["--stall", "60", "--send", "yes\n"]);
    c.expect("open", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut peak = before;
    loop {
        peak = peak.max(rss_anon(pid));
        let rows = console_rows(&e);
        if rows.first().is_some_and(|r| r.1["ended"] == "slow-client") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not closed as a slow client: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    say(format!(
        "stalled reader: RssAnon {before} KiB before, at most {peak} KiB until it was closed"
    ));
    assert!(peak < before + 4096, "RssAnon {before} -> {peak} KiB");
    let row = &console_rows(&e)[0].1;
    assert!(row["bytes_dropped"].as_u64().unwrap() > 0, "{row}");
}
