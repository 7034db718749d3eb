//! libvirtd frozen (SIGSTOP) and thawed (SIGCONT) with the agent's calls in flight,
//! again and again (issue 11: the agent died with a segfault inside libvirt.so within
//! seconds of a thaw). libvirtd runs inside the test topology's node namespace
//! (scripts/libvirt-netns.sh); the guests are the tiny TCG guest of
//! scripts/build-tiny-guest.sh.
//!
//! One VM ("base") lives through the whole test. Each cycle first creates a VM ("dN")
//! while libvirtd runs; then, with `GET /vms`, `GET /vms/base/status` and `GET /metrics`
//! back to back,
//! two creates of one new name ("cN"), one more create ("xN") and deletes of "dN" (and of
//! earlier ones still there, and of the last cycle's "cN"/"xN") in flight, libvirtd is
//! stopped, continued, and the requests go on for [`AFTER_THAW`]; a change that was not
//! done (503, or 504: its work goes on inside the agent) is asked again. Reads never wait
//! behind libvirt: every one is answered 200 from the last observation. Each freeze lasts
//! [`FREEZE`]: longer than the agent's libvirt keepalive needs to give the connection up
//! (LIBVIRT_KEEPALIVE=1: probes 1 s apart, 3 unanswered; libvirt declares the daemon dead
//! at the first timer after the third probe, 4 s after the last packet it received, the
//! default's 20 s scaled down), so every cycle has changes that time out (504 after
//! LIBVIRT_TIMEOUT), calls that were still running on the connection when libvirt closed
//! it, and calls that wait for a new one until the daemon answers again.
//!
//! A second test stops libvirtd once and creates a VM without waiting: the answer, with
//! the VM's address, must not wait for libvirt (decisions §27).
//!
//! libvirtd's control socket is machine-wide: the libvirt tests take turns
//! (`support::libvirt::turn`, a lock across test processes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::libvirt::{Env, Libvirtd, WAIT, env, libvirtd_speed, tiny_vm};
use support::say;

/// How many freeze/thaw cycles (the crash came within the first one).
const CYCLES: usize = 10;
/// The agent's LIBVIRT_KEEPALIVE: probes this many seconds apart, 3 unanswered.
const KEEPALIVE: &str = "1";
/// How long libvirtd stays stopped: past the 4 s after which the keepalive (1 s x 3)
/// closes the connection, with 3 s to spare for its 1 s timer granularity and a slow
/// machine, and past LIBVIRT_TIMEOUT.
const FREEZE: Duration = Duration::from_secs(7);
/// Requests keep coming this long after the thaw, on the connection that comes back.
const AFTER_THAW: Duration = Duration::from_secs(2);
/// How long a create or delete that was not done waits before it asks again.
const RETRY: Duration = Duration::from_millis(250);
/// LIBVIRT_TIMEOUT of the agent (the issue had 5 s; shorter than [`FREEZE`], so that
/// changes in flight time out while libvirtd is stopped).
const LIBVIRT_TIMEOUT: &str = "3";

fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

/// What the kernel said about segfaults lately (the only trace of the crash).
fn kernel_segfaults() -> String {
    let out = Command::new("dmesg").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("segfault") || l.contains("traps:"))
        .collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Panics, with the agent's log and the kernel's word on it, if the agent has exited.
fn assert_alive(e: &mut Env, when: &str) {
    if let Some(status) = e.agent.exited() {
        panic!(
            "the agent died {when}: {status}\nkernel:\n{}\nagent log (tail):\n{}",
            kernel_segfaults(),
            tail(&e.agent.log(), 60)
        );
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The names libvirt has (running or not).
fn libvirt_names(e: &Env) -> BTreeSet<String> {
    e.domains().into_iter().collect()
}

/// The MACs of the `default` network's DHCP host entries.
fn host_entry_macs() -> BTreeSet<String> {
    support::libvirt::virsh(&["net-dumpxml", "default"])
        .lines()
        .filter(|l| l.trim_start().starts_with("<host "))
        .filter_map(|l| {
            l.split("mac='")
                .nth(1)?
                .split('\'')
                .next()
                .map(str::to_owned)
        })
        .collect()
}

/// The names of the agent's SQLite rows.
fn sqlite_names(e: &Env) -> BTreeSet<String> {
    e.agent
        .sql("select name from vms order by name")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `POST /vms` of `name` while libvirtd runs (retried on 503/504 for up to a minute: the
/// last thaw's leftovers may still be settling).
fn create_before_the_freeze(e: &Env, body: &str, name: &str) {
    let api = &e.agent.api;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = api.call("POST", "/vms", Some(body));
        // 409 after a 504: the create that answered 504 finished in the meantime.
        if r.status == 200 || (r.status == 409 && r.body.contains("already exists")) {
            return;
        }
        assert!(
            [503, 504].contains(&r.status) && Instant::now() < deadline,
            "POST /vms {name}: {r:?}\n{}",
            tail(&e.agent.log(), 40)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// How many libvirt connections the agent has logged as lost so far.
fn connections_lost(e: &Env) -> usize {
    e.agent.log().matches("libvirt connection lost").count()
}

/// Statuses seen by the request threads of one cycle, by request kind.
#[derive(Default)]
struct Seen {
    answers: Vec<(String, u16)>,
    /// Requests the agent did not answer at all (connection refused or reset).
    unanswered: Vec<String>,
}

#[test]
fn the_agent_survives_ten_libvirtd_freezes_with_creates_deletes_and_reads_in_flight() {
    let _turn = support::libvirt::turn();
    let started = Instant::now();
    let mut e = env(&[
        ("LIBVIRT_TIMEOUT", LIBVIRT_TIMEOUT),
        ("LIBVIRT_KEEPALIVE", KEEPALIVE),
        ("RECONCILE_INTERVAL", "3"),
    ]);
    let (kernel, initrd) = e.scratch.guest();
    let r = e.upload_image("tiny", &vec![0u8; 4 << 20]);
    assert_eq!(r.status, 200, "{r:?}");
    let r = e.agent.api.post("/vms", &tiny_vm("base", &kernel, &initrd));
    assert_eq!(r.status, 200, "{r:?}\n{}", e.agent.log());
    assert_eq!(e.state("base"), "running");
    let pid = Libvirtd::pid().expect("libvirtd's pid file");
    eprintln!(
        "setup took {:.0} s; {}",
        started.elapsed().as_secs_f64(),
        libvirtd_speed()
    );

    for cycle in 0..CYCLES {
        let t0 = Instant::now();
        let lost_before = connections_lost(&e);
        let api = e.agent.api.clone();
        let stop = AtomicBool::new(false);
        let seen = Mutex::new(Seen::default());
        let record = |what: String, r: std::io::Result<support::Response>| {
            let mut s = seen.lock().unwrap();
            match r {
                Ok(r) => s.answers.push((what, r.status)),
                Err(err) => s.unanswered.push(format!("{what}: {err}")),
            }
        };
        let body = |name: &str| tiny_vm(name, &kernel, &initrd).to_string();
        let (new_a, new_b) = (format!("c{cycle}"), format!("x{cycle}"));
        // A VM of this cycle's own, made while libvirtd runs, to be deleted in flight.
        let doomed = format!("d{cycle}");
        create_before_the_freeze(&e, &body(&doomed), &doomed);
        // With those of earlier cycles whose delete has not gone through yet.
        let mut old: Vec<String> = sqlite_names(&e)
            .into_iter()
            .filter(|n| n.starts_with('d'))
            .collect();
        if cycle > 0 {
            old.extend([format!("c{}", cycle - 1), format!("x{}", cycle - 1)]);
        }
        std::thread::scope(|s| {
            // Reads, back to back.
            // A scrape is a read too: libvirt's statistics come from the last sample.
            for path in ["/vms", "/vms/base/status", "/metrics"] {
                let (api, stop, record) = (&api, &stop, &record);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        record(
                            format!("GET {path}"),
                            api.request("GET", path, Some(&api.token), None),
                        );
                    }
                });
            }
            // Two creates of one new name at once, one more create, and deletes of the
            // last cycle's VMs: each again after it was answered, until the cycle ends.
            for (name, copies) in [(&new_a, 2), (&new_b, 1)] {
                for _ in 0..copies {
                    let (api, stop, record) = (&api, &stop, &record);
                    let b = body(name);
                    s.spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let r = api.request("POST", "/vms", Some(&api.token), Some(&b));
                            let done = matches!(&r, Ok(r) if r.status == 200 || r.status == 409);
                            record(format!("POST /vms {name}"), r);
                            if done {
                                break;
                            }
                            std::thread::sleep(RETRY);
                        }
                    });
                }
            }
            for name in &old {
                let (api, stop, record) = (&api, &stop, &record);
                s.spawn(move || {
                    let path = format!("/vms/{name}");
                    while !stop.load(Ordering::Relaxed) {
                        let r = api.request("DELETE", &path, Some(&api.token), None);
                        let done = matches!(&r, Ok(r) if r.status == 200 || r.status == 404);
                        record(format!("DELETE {path}"), r);
                        if done {
                            break;
                        }
                        std::thread::sleep(RETRY);
                    }
                });
            }
            // Let the requests reach libvirt, then freeze it with them in flight.
            std::thread::sleep(Duration::from_millis(700));
            say(format!(
                "cycle {cycle}: libvirtd frozen for {} s, then {} s of requests after the thaw",
                FREEZE.as_secs(),
                AFTER_THAW.as_secs()
            ));
            signal(pid, "-STOP");
            std::thread::sleep(FREEZE);
            signal(pid, "-CONT");
            std::thread::sleep(AFTER_THAW);
            stop.store(true, Ordering::Relaxed);
        });
        let seen = seen.into_inner().unwrap();
        assert_alive(&mut e, &format!("in cycle {cycle}"));
        // The freeze outlasted the keepalive: libvirt gave up at least one connection
        // that had a call in flight, and the agent closed it after that call returned.
        let lost = connections_lost(&e) - lost_before;
        let count = |what: &str, status: u16| {
            seen.answers
                .iter()
                .filter(|(w, s)| w.starts_with(what) && *s == status)
                .count()
        };
        eprintln!(
            "cycle {cycle}: {:.0} s; connections lost: {lost}; GET 200/other: {}/{}, \
             POST 200/409/503/504: {}/{}/{}/{}, DELETE 200/404/503/504: {}/{}/{}/{}, unanswered: {}",
            t0.elapsed().as_secs_f64(),
            count("GET", 200),
            seen.answers
                .iter()
                .filter(|(w, s)| w.starts_with("GET") && *s != 200)
                .count(),
            count("POST", 200),
            count("POST", 409),
            count("POST", 503),
            count("POST", 504),
            count("DELETE", 200),
            count("DELETE", 404),
            count("DELETE", 503),
            count("DELETE", 504),
            seen.unanswered.len(),
        );
        assert!(
            seen.unanswered.is_empty(),
            "cycle {cycle}: requests the agent never answered: {:?}\nkernel:\n{}\nagent log (tail):\n{}",
            seen.unanswered,
            kernel_segfaults(),
            tail(&e.agent.log(), 60)
        );
        // Reads never waited behind the frozen daemon: every one answered 200.
        let reads_failed: Vec<_> = seen
            .answers
            .iter()
            .filter(|(w, s)| w.starts_with("GET") && *s != 200)
            .collect();
        assert!(reads_failed.is_empty(), "cycle {cycle}: {reads_failed:?}");
        // The freeze was felt: changes timed out (504) or found libvirt away (503).
        assert!(
            count("POST", 504) + count("POST", 503) + count("DELETE", 504) + count("DELETE", 503)
                > 0,
            "cycle {cycle}: no change was held up by the freeze"
        );
        let odd: Vec<_> = seen
            .answers
            .iter()
            .filter(|(_, s)| ![200, 404, 409, 503, 504].contains(s))
            .collect();
        assert!(odd.is_empty(), "cycle {cycle}: unexpected answers {odd:?}");
        assert!(
            lost > 0,
            "cycle {cycle}: the keepalive closed no connection during a {} s freeze\n{}",
            FREEZE.as_secs(),
            tail(&e.agent.log(), 40)
        );
    }

    // The agent died within 10 s of a thaw: give the last one that long.
    say("10 s after the last thaw: the issue's agent died within that");
    std::thread::sleep(Duration::from_secs(10));
    assert_alive(&mut e, "after the last thaw");
    assert_eq!(e.agent.api.get("/health").status, 200);

    // SQLite and libvirt agree: every row has its domain (the reconcile redefines one
    // that a timed-out delete removed after its caller gave up), and no domain exists
    // that the agent has no row for (a create that finished after its 503).
    let deadline = Instant::now() + WAIT;
    loop {
        let (rows, doms) = (sqlite_names(&e), libvirt_names(&e));
        if rows == doms && rows.contains("base") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SQLite and libvirt disagree after {} s: rows {rows:?}, domains {doms:?}\n{}",
            WAIT.as_secs(),
            tail(&e.agent.log(), 60)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // The network's DHCP host entries are the VMs' own: those of creates that failed
    // under a freeze (their removal cut off, or their reserve carried out after the
    // thaw) are taken away by the reconcile, not left in the network's definition.
    let deadline = Instant::now() + WAIT;
    loop {
        let macs: BTreeSet<String> = e
            .agent
            .sql("select mac from vms order by mac")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let entries = host_entry_macs();
        if entries == macs {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the default network's DHCP host entries {entries:?} are not the VMs' MACs {macs:?}\n{}",
            tail(&e.agent.log(), 60)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let r = e.agent.api.get("/vms");
    assert_eq!(r.status, 200, "{r:?}");
    for vm in r.json()["vms"].as_array().unwrap() {
        assert_eq!(vm["managed"], true, "{vm}");
        assert_ne!(vm["state"], "missing", "{vm}");
    }
    assert_alive(&mut e, "at the end");
    eprintln!("total {:.0} s", started.elapsed().as_secs_f64());
}

/// Sends SIGCONT to libvirtd when dropped: a failed assertion must not leave the
/// machine's libvirtd stopped.
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// The address is the agent's choice: with libvirtd stopped, `POST /vms?wait=false`
/// answers 202 with the VM's address at once, not after LIBVIRT_TIMEOUT (the agent saw
/// the network with the first create), the VM shows as `creating` meanwhile; after the
/// thaw it runs, its DHCP host entry holds that address, and its first lease is that
/// address.
#[test]
fn a_create_without_waiting_answers_its_address_while_libvirtd_is_frozen() {
    let _turn = support::libvirt::turn();
    let e = env(&[("LIBVIRT_TIMEOUT", "5")]);
    let (kernel, initrd) = e.scratch.guest();
    let r = e.upload_image("tiny", &vec![0u8; 4 << 20]);
    assert_eq!(r.status, 200, "{r:?}");
    let api = &e.agent.api;
    let r = api.post("/vms", &tiny_vm("seen", &kernel, &initrd));
    assert_eq!(r.status, 200, "{r:?}\n{}", e.agent.log());
    assert_eq!(api.get("/vms").status, 200);
    let pid = Libvirtd::pid().expect("libvirtd's pid file");

    say("libvirtd stopped; creating a VM without waiting");
    signal(pid, "-STOP");
    let thaw = Thaw(pid);
    let t0 = Instant::now();
    let body = tiny_vm("frozen1", &kernel, &initrd).to_string();
    let r = api.call("POST", "/vms?wait=false", Some(&body));
    let took = t0.elapsed();
    assert_eq!(r.status, 202, "{r:?}\n{}", tail(&e.agent.log(), 40));
    // Not a timing target (the "within a second" is the figure said below): an
    // answer that waited for the stopped libvirtd would come only when the agent's
    // LIBVIRT_TIMEOUT ran out, and as a 503.
    assert!(
        took < Duration::from_secs(5),
        "the 202 took {took:?}, as long as a libvirt call may wait"
    );
    let ip: std::net::Ipv4Addr = r.json()["ip"].as_str().unwrap().parse().unwrap();
    say(format!(
        "202 with {ip} after {:.1} ms, libvirtd stopped",
        took.as_secs_f64() * 1000.0
    ));
    let status = api.get("/vms/frozen1/status");
    assert_eq!(status.status, 200, "{status:?}");
    assert_eq!(status.json()["status"]["state"], "creating", "{status:?}");
    std::thread::sleep(Duration::from_secs(2));
    drop(thaw);
    say("libvirtd continued; waiting for frozen1 to run");

    let deadline = Instant::now() + WAIT;
    while e.state("frozen1") != "running" {
        assert!(
            Instant::now() < deadline,
            "frozen1 never ran\n{}",
            tail(&e.agent.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let status = api.get("/vms/frozen1/status").json()["status"].clone();
    assert_eq!(status["pinned_ip"], ip.to_string(), "{status}");
    let mac = status["mac"].as_str().unwrap().to_owned();
    let entry = format!("<host mac='{mac}' name='frozen1' ip='{ip}'/>");
    let net = support::libvirt::virsh(&["net-dumpxml", "default"]);
    assert!(net.contains(&entry), "{entry} not in\n{net}");
    e.wait_ready("frozen1", 1);
    let lease = support::libvirt::virsh(&["net-dhcp-leases", "default", "--mac", &mac]);
    assert!(lease.contains(&format!("{ip}/")), "{lease}");
    assert_eq!(e.guest_http(ip, "/hostname").trim(), "frozen1");
}
