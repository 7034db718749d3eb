//! Benchmarks (m) and (n) of docs/benchmarks.md: `GET /metrics` with 100 VMs and 10,000
//! port maps (target <= 50 ms), the agent's idle RSS with an event stream open, and the
//! delay from an outside `virsh destroy` to its event on `GET /events` (target: within a
//! second).
//!
//! `#[ignore]`d, so the normal suite does not run them; scripts/bench.sh runs them as
//!
//! ```sh
//! NVA_AGENT_BIN=$PWD/target/release/node-vm-agent \
//!   cargo test --release --test bench_observe -- --ignored --nocapture
//! ```
//!
//! and reads the `BENCH obs-...` lines they print.
//!
//! - (m) the agent serves 10,000 maps (rows written before it starts) and 100 domains of
//!   libvirt's test driver (a node file of its own; the bulk statistics call is the same
//!   API a real libvirtd answers). BENCH_COLD_SCRAPES (default 10) scrapes 2.1 s apart,
//!   as Prometheus sees the agent (the kernel's counters and libvirt's statistics read
//!   again for each), then BENCH_SCRAPES (default 200) back to back, each timed from the
//!   client namespace to its last byte; then the same with 1,000 maps, the most that
//!   still get series of their own. Then the agent's VmRSS idle, and
//!   idle again with one `GET /events` stream open.
//! - (n) a real libvirtd and the tiny guest: BENCH_EVENT_RUNS (default 10) times, the
//!   VM is started, then destroyed with `virsh destroy` (outside the agent) while a
//!   stream is open; the delay is from virsh's return to the `vm.stopped` event's arrival.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use node_vm_agent::model::{PortMap, PortRule, Proto};
use node_vm_agent::store::{Store, StoreError, portmaps};
use support::events::EventStream;
use support::libvirt::{env, tiny_vm, virsh};
use support::measure::{env_or, ms, pct, sorted};
use support::*;

/// The two benchmarks take turns: neither's timings share the machine with the other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A libvirt test-driver node with `n` running domains.
fn test_node(dir: &std::path::Path, n: usize) -> String {
    let mut xml = String::from("<node>\n");
    for i in 0..n {
        xml.push_str(&format!(
            "<domain type='test'><name>vm{i:03}</name><memory>262144</memory><vcpu>1</vcpu>\
             <os><type>hvm</type></os></domain>\n"
        ));
    }
    xml.push_str("</node>\n");
    let path = dir.join("node.xml");
    std::fs::write(&path, xml).unwrap();
    format!("test://{}", path.display())
}

fn write_maps(db: &std::path::Path, n: usize) {
    let store = Store::open(db).unwrap();
    store
        .transaction(|tx| {
            for i in 0..n {
                let m = PortMap {
                    proto: Proto::Tcp,
                    listen_port: 20_000 + i as u16,
                    target_ip: std::net::Ipv4Addr::new(10, 77, 2, 2 + (i % 250) as u8),
                    target_port: 80,
                };
                portmaps::upsert(tx, &PortRule::from(m), None, "bench")?;
            }
            Ok::<_, StoreError>(())
        })
        .unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Scrape timings (ms, sorted), the last scrape's series count and size; `pause`
/// before each.
fn scrapes(api: &Api, n: usize, pause: Duration) -> (Vec<f64>, usize, usize) {
    let mut times = Vec::with_capacity(n);
    let mut last = String::new();
    for _ in 0..n {
        std::thread::sleep(pause);
        let t = Instant::now();
        let r = api.get("/metrics");
        times.push(ms(t.elapsed()));
        assert_eq!(r.status, 200);
        last = r.body;
    }
    let series = last.lines().filter(|l| !l.starts_with('#')).count();
    (sorted(times), series, last.len())
}

#[test]
#[ignore]
fn bench_scrape_and_idle_rss() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let runs: usize = env_or("BENCH_SCRAPES", 200);
    let cold: usize = env_or("BENCH_COLD_SCRAPES", 10);
    let mut fields = Vec::new();
    for maps in [10_000, 1_000] {
        let topo = Topology::new();
        let dir = tempfile::tempdir().unwrap();
        let uri = test_node(dir.path(), 100);
        let mut agent = Agent::unstarted(&topo, &[("LIBVIRT_URI", &uri)]);
        write_maps(&agent.data_dir().join("agent.db"), maps);
        agent.start_again();
        // The first VM call loads libvirt; from then on a scrape has the vm_* series.
        // (503 until libvirt's first listing is in: loading libvirt takes longer than a
        // read waits.)
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent.api.get("/vms").status != 200 {
            assert!(Instant::now() < deadline, "GET /vms never answered 200");
            std::thread::sleep(Duration::from_millis(100));
        }
        let warm = agent.api.get("/metrics").body;
        assert!(
            warm.contains(r#"node_vm_agent_vm_state{vm="vm099"} 1"#),
            "{warm}"
        );
        // The statistics are sampled at most every 2 s: make sure this run has one.
        std::thread::sleep(Duration::from_millis(300));
        let tag = if maps == 10_000 { "m10k" } else { "m1k" };
        // Cold: as Prometheus (every 15 s or so) sees it, the kernel's counters (kept
        // 1 s) and libvirt's statistics (2 s) are read again for the scrape. Warm: back
        // to back, from what the last scrape read.
        for (kind, n, pause) in [
            ("cold", cold, Duration::from_millis(2100)),
            ("warm", runs, Duration::ZERO),
        ] {
            let (t, series, bytes) = scrapes(&agent.api, n, pause);
            eprintln!(
                "{kind} scrape, {maps} maps, 100 VMs, n={n}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {series} series, {bytes} bytes",
                pct(&t, 50.0),
                pct(&t, 99.0),
                t[t.len() - 1]
            );
            fields.push(format!(
                "{tag}_{kind}_p50_ms={:.2} {tag}_{kind}_p99_ms={:.2} {tag}_{kind}_max_ms={:.2} {tag}_series={series} {tag}_bytes={bytes}",
                pct(&t, 50.0),
                pct(&t, 99.0),
                t[t.len() - 1]
            ));
        }
        if maps == 10_000 {
            let pid = agent.pid().unwrap();
            std::thread::sleep(Duration::from_secs(3));
            let idle = rss_kib(pid);
            let stream = EventStream::open(
                topo.client.name(),
                sa(NODE_IP, API_PORT),
                &agent.token,
                None,
            )
            .unwrap();
            assert_eq!(stream.status(), 200);
            std::thread::sleep(Duration::from_secs(3));
            let with_stream = rss_kib(pid);
            drop(stream);
            eprintln!("idle VmRSS {idle} KiB; with one event stream open {with_stream} KiB");
            fields.push(format!("idle_rss_kib={idle} stream_rss_kib={with_stream}"));
        }
    }
    println!(
        "BENCH obs-scrape warm_runs={runs} cold_runs={cold} {}",
        fields.join(" ")
    );
}

#[test]
#[ignore]
fn bench_event_latency_of_an_outside_destroy() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let _turn = support::libvirt::turn();
    let runs: usize = env_or("BENCH_EVENT_RUNS", 10);
    let e = env(&[]);
    let (kernel, initrd) = e.scratch.guest();
    assert_eq!(e.upload_image("tiny", &vec![0u8; 4 << 20]).status, 200);
    let mut events = EventStream::open(
        e.topo.client.name(),
        sa(NODE_IP, API_PORT),
        &e.agent.token,
        None,
    )
    .unwrap();
    let r = e.agent.api.post("/vms", &tiny_vm("ev1", &kernel, &initrd));
    assert_eq!(r.status, 200, "{r:?}");
    events.until(Duration::from_secs(10), |ev| {
        ev["kind"] == "vm.started" && ev["subject"] == "ev1"
    });
    let (mut after_return, mut whole) = (Vec::new(), Vec::new());
    for i in 0..runs {
        if i > 0 {
            virsh(&["start", "ev1"]);
            events.until(Duration::from_secs(10), |ev| {
                ev["kind"] == "vm.started" && ev["subject"] == "ev1"
            });
            // Let QEMU settle into the guest before it is destroyed again.
            std::thread::sleep(Duration::from_millis(500));
        }
        let t = Instant::now();
        virsh(&["destroy", "ev1"]);
        let returned = Instant::now();
        events.until(Duration::from_secs(10), |ev| {
            ev["kind"] == "vm.stopped" && ev["subject"] == "ev1"
        });
        after_return.push(ms(returned.elapsed()));
        whole.push(ms(t.elapsed()));
        eprintln!(
            "run {i}: event {:.2} ms after virsh destroy returned, {:.1} ms after it started",
            after_return[i], whole[i]
        );
    }
    let (a, w) = (sorted(after_return), sorted(whole));
    println!(
        "BENCH obs-events runs={runs} after_return_p50_ms={:.2} after_return_max_ms={:.2} from_start_p50_ms={:.1} from_start_max_ms={:.1}",
        pct(&a, 50.0),
        a[a.len() - 1],
        pct(&w, 50.0),
        w[w.len() - 1]
    );
}
