//! Port-map benchmarks that need Rust (run by `scripts/bench.sh`; see docs/benchmarks.md).
//!
//! `cargo bench --bench portmap -- <which> [options]`:
//!
//! - `apply`    (a) 10,000 maps: SQLite rows -> `Nft::apply_all` with the table already
//!   there, into no table, every map moved, a rebuild; next to `nft -f` loading the same
//!   ruleset, interleaved, in a private network namespace this process creates.
//! - `seed`     writes port-map rows into `$DATA_DIR/agent.db` before the agent starts.
//! - `post`     (b) sequential `POST /ports` on one keep-alive connection, from inside a
//!   named namespace (`ip netns add`), timing every request.
//! - `connrate` (c) TCP connections per second through the agent's DNAT table, 1 map vs
//!   10,000, alternated, across namespaces that `scripts/bench.sh` created.
//!
//! Every result line starts with `BENCH ` and is `key=value` pairs, for the script.
//! Timings gate nothing: the binary exits 0 whenever it could measure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use nix::sched::{CloneFlags, unshare};
use node_vm_agent::model::{AllowList, PortMap, PortRule, Proto};
use node_vm_agent::net::nft::{NatSettings, Nft, ruleset, sets};
use node_vm_agent::store::{Store, StoreError, portmaps};

#[path = "../tests/support/mod.rs"]
mod support;
use support::client::read_response;
use support::measure::{ms, pct, sorted};
use support::netns::{enter_netns, in_netns, run_ok};

type Opts = HashMap<String, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` appends `--bench`; ignore it and anything cargo adds.
    let args: Vec<String> = args.into_iter().filter(|a| a != "--bench").collect();
    let Some(which) = args.first().cloned() else {
        // A bare `cargo bench` (or `cargo test --all-targets`) lands here: the
        // measurements need namespaces and an agent that scripts/bench.sh sets up.
        eprintln!(
            "usage: portmap <apply|seed|post|connrate|flood> [--key value ...]; \
             scripts/bench.sh runs them all"
        );
        return;
    };
    let mut opts = Opts::new();
    let mut it = args[1..].iter();
    while let Some(k) = it.next() {
        let key = k.trim_start_matches("--").to_string();
        let val = it.next().cloned().unwrap_or_default();
        opts.insert(key, val);
    }
    match which.as_str() {
        "apply" => apply(&opts),
        "seed" => seed(&opts),
        "post" => post(&opts),
        "connrate" => connrate(&opts),
        "flood" => flood(&opts),
        other => {
            eprintln!("unknown benchmark {other:?}");
            std::process::exit(2);
        }
    }
}

fn opt<T: std::str::FromStr>(o: &Opts, key: &str, default: T) -> T {
    match o.get(key) {
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("--{key} {v:?} does not parse")),
        None => default,
    }
}

fn opt_str(o: &Opts, key: &str) -> String {
    o.get(key)
        .cloned()
        .unwrap_or_else(|| panic!("--{key} is required"))
}

/// The maps every benchmark uses: TCP listen ports `first..first+n`, targets spread over
/// hosts .2 to .251 of the VM subnet.
fn maps(n: usize, first: u16, subnet: Ipv4Network) -> Vec<PortMap> {
    let base = u32::from(subnet.network());
    (0..n)
        .map(|i| PortMap {
            proto: Proto::Tcp,
            listen_port: first + i as u16,
            target_ip: Ipv4Addr::from(base + 2 + (i as u32 % 250)),
            target_port: 80 + (i % 1000) as u16,
        })
        .collect()
}

fn write_rows(store: &Store, maps: &[PortMap]) {
    store
        .transaction(|tx| {
            for m in maps {
                portmaps::upsert(tx, &PortRule::from(*m), None, "bench")?;
            }
            Ok::<_, StoreError>(())
        })
        .expect("write rows");
}

/// What the NAT rules of a benchmark's table need.
fn nat_settings(bridge: &str, subnet: Ipv4Network, external_iface: Option<&str>) -> NatSettings {
    NatSettings {
        vms_bridge: bridge.into(),
        vm_subnet: subnet,
        wg_iface: Some("wg0".into()),
        external_iface: external_iface.map(str::to_string),
        tunnel_sources: vec![],
    }
}

/// The agent's nftables driver in the calling thread's namespace, on a runtime of its
/// own (nlink registers its socket with the runtime it is created in).
fn nft_driver(settings: NatSettings) -> (tokio::runtime::Runtime, Nft) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let nft = {
        let _guard = rt.enter();
        Nft::new(settings).expect("nft socket")
    };
    (rt, nft)
}

/// Moves the calling thread (one this benchmark spawned) into namespace `ns`.
fn enter(ns: &str) {
    enter_netns(ns).unwrap_or_else(|e| panic!("netns {ns}: {e}"));
}

// ---------------------------------------------------------------------------------------
// (a) apply_all from SQLite vs nft -f

/// The agent's table in nft syntax, with the same maps, chains, rules and comments.
fn nft_script(settings: &NatSettings, maps: &[PortMap]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(64 + maps.len() * 32);
    // `destroy table` needs nft >= 1.0.8: create-then-delete makes the file replace the
    // table in one transaction whether it exists or not, as apply_all does.
    writeln!(
        s,
        "table ip {0}\ndelete table ip {0}\ntable ip {0} {{",
        ruleset::TABLE
    )
    .unwrap();
    // The sets in apply_all's order (docs/decisions/22-allow-lists-and-counters-as-set-elements.md); no allow-lists here.
    for proto in Proto::ALL {
        let name = ruleset::map_name(proto);
        writeln!(
            s,
            "  map {name} {{\n    type inet_service : ipv4_addr . inet_service\n    counter"
        )
        .unwrap();
        let mine: Vec<&PortMap> = maps.iter().filter(|m| m.proto == proto).collect();
        let elems: Vec<String> = mine
            .iter()
            .map(|m| format!("{} : {} . {}", m.listen_port, m.target_ip, m.target_port))
            .collect();
        if !elems.is_empty() {
            writeln!(s, "    elements = {{ {} }}", elems.join(",\n      ")).unwrap();
        }
        writeln!(s, "  }}").unwrap();
        let flows: Vec<String> = mine.iter().map(|m| m.listen_port.to_string()).collect();
        for (kind, decl, elems) in [
            (sets::Kind::Flows, "type inet_service\n    counter", flows),
            (
                sets::Kind::Restricted,
                "type inet_service\n    flags dynamic",
                vec![],
            ),
            (
                sets::Kind::Allow,
                "type inet_service . ipv4_addr\n    flags interval",
                vec![],
            ),
            (sets::Kind::Drops, "type inet_service\n    counter", vec![]),
        ] {
            writeln!(s, "  set {} {{\n    {decl}", sets::name(kind, proto)).unwrap();
            if !elems.is_empty() {
                writeln!(s, "    elements = {{ {} }}", elems.join(",\n      ")).unwrap();
            }
            writeln!(s, "  }}").unwrap();
        }
    }
    for chain in ruleset::chains(settings) {
        let hook = match chain.name {
            ruleset::CHAIN_PREROUTING => "type nat hook prerouting priority dstnat",
            ruleset::CHAIN_OUTPUT => "type nat hook output priority -100",
            ruleset::CHAIN_FORWARD => "type filter hook forward priority filter",
            ruleset::CHAIN_POSTROUTING => "type nat hook postrouting priority srcnat",
            ruleset::CHAIN_ANTISPOOF => "type filter hook prerouting priority raw",
            other => panic!("unknown chain {other}"),
        };
        writeln!(s, "  chain {} {{\n    {hook}; policy accept;", chain.name).unwrap();
        for rule in &chain.rules {
            writeln!(s, "    {} comment \"{}\"", rule.nft, ruleset::RULE_TAG).unwrap();
        }
        writeln!(s, "  }}").unwrap();
    }
    writeln!(s, "}}").unwrap();
    s
}

/// After a table is replaced or deleted, the kernel frees its elements (20,000 per-CPU
/// counters) in a worker, on one of the cores the next timed run needs. A restart or a
/// boot does not come right after a rebuild: let the worker finish first.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

fn list_table() -> String {
    run_ok(Command::new("nft").args(["list", "table", "ip", ruleset::TABLE]))
}

fn apply(o: &Opts) {
    let n: usize = opt(o, "maps", 10_000);
    let runs: usize = opt(o, "runs", 20);
    // Before any thread exists, so the runtime and every child process live in it.
    unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));

    let subnet: Ipv4Network = "10.77.0.0/24".parse().unwrap();
    let settings = nat_settings("vmbr0", subnet, Some("eth0"));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("agent.db")).expect("store");
    let want = maps(n, 10_000, subnet);
    write_rows(&store, &want);

    let script_path = dir.path().join("ruleset.nft");
    std::fs::write(&script_path, nft_script(&settings, &want)).unwrap();

    let (rt, nft) = nft_driver(settings.clone());

    // One SQLite read + apply_all: what restore does (portmaps::list_rules, then apply_all).
    let agent_once = || -> (Duration, Duration) {
        let t0 = Instant::now();
        let rows: Vec<PortRule> = store.with(portmaps::list_rules).expect("list");
        let t1 = Instant::now();
        rt.block_on(nft.apply_all(&rows)).expect("apply_all");
        let t2 = Instant::now();
        assert_eq!(rows.len(), n);
        (t1 - t0, t2 - t1)
    };
    let nft_once = || -> Duration {
        let t0 = Instant::now();
        run_ok(Command::new("nft").arg("-f").arg(&script_path));
        t0.elapsed()
    };

    // Equivalence check: both ways produce the same listing.
    let (_, first_into_empty) = agent_once();
    let by_agent = list_table();
    nft_once();
    let by_nft = list_table();
    let equal = by_agent == by_nft;
    if !equal {
        let a: Vec<&str> = by_agent.lines().collect();
        let b: Vec<&str> = by_nft.lines().collect();
        let differing =
            a.iter().zip(&b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len());
        eprintln!("nft listings differ in {differing} lines; first differences:");
        for (x, y) in a.iter().zip(&b).filter(|(x, y)| x != y).take(5) {
            eprintln!("  agent: {x}\n  nft:   {y}");
        }
    }
    // " : " also appears once in each map's type line (an element's counter comes
    // before its " : ").
    let elements_listed = by_nft.matches(" : ").count() - Proto::ALL.len();

    // The other cases, on the rules as restore reads them. `moved`: every map to
    // another target (10,000 maps changed in place). `rebuild`: other anti-spoofing
    // networks, so other rules: the table is built again and carries the counters.
    let rows: Vec<PortRule> = store.with(portmaps::list_rules).expect("list");
    let moved: Vec<PortRule> = rows
        .iter()
        .map(|r| {
            let mut m = r.clone();
            m.map.target_port += 1;
            m
        })
        .collect();
    let timed = |rules: &[PortRule]| -> f64 {
        let t = Instant::now();
        rt.block_on(nft.apply_all(rules)).expect("apply_all");
        ms(t.elapsed())
    };
    let sources = [
        "10.99.0.0/24".parse().unwrap(),
        "10.98.0.0/24".parse().unwrap(),
    ];

    // Interleaved so that drift on a noisy machine hits every case alike. `total` is a
    // restore with the table already holding these maps (what a restart does).
    let mut runs_of: [Vec<f64>; 7] = Default::default();
    for i in 0..runs {
        runs_of[3].push(ms(nft_once()));
        // nft compiles some rules otherwise (no `meta l4proto` before `tcp dport`), so
        // the agent builds its own table again before the restore is timed.
        timed(&rows);
        settle();
        let (r, a) = agent_once();
        runs_of[0].push(ms(r));
        runs_of[1].push(ms(a));
        runs_of[2].push(ms(r + a));
        // A boot: no table yet. SQLite read included, as in `total`.
        rt.block_on(nft.delete_table()).expect("delete table");
        settle();
        let (r, a) = agent_once();
        runs_of[4].push(ms(r + a));
        runs_of[5].push(timed(&moved));
        runs_of[5].push(timed(&rows));
        nft.set_tunnel_sources(vec![sources[i % 2]]);
        runs_of[6].push(timed(&rows));
        // Back to the settings of the `nft -f` file, so `total` stays a restore.
        nft.set_tunnel_sources(vec![]);
        timed(&rows);
    }
    let [read, apply_only, total, nft_f, empty, moved, rebuild] = runs_of.map(sorted);
    println!(
        "BENCH apply maps={n} runs={runs} total_p50_ms={:.2} total_p90_ms={:.2} total_min_ms={:.2} \
         read_p50_ms={:.2} apply_p50_ms={:.2} apply_p90_ms={:.2} nft_f_p50_ms={:.2} nft_f_p90_ms={:.2} \
         nft_f_min_ms={:.2} into_empty_p50_ms={:.2} into_empty_p90_ms={:.2} all_moved_p50_ms={:.2} \
         rebuild_p50_ms={:.2} rebuild_p90_ms={:.2} first_into_empty_ms={:.2} listings_equal={equal} \
         elements_listed={elements_listed}",
        pct(&total, 50.0),
        pct(&total, 90.0),
        total[0],
        pct(&read, 50.0),
        pct(&apply_only, 50.0),
        pct(&apply_only, 90.0),
        pct(&nft_f, 50.0),
        pct(&nft_f, 90.0),
        nft_f[0],
        pct(&empty, 50.0),
        pct(&empty, 90.0),
        pct(&moved, 50.0),
        pct(&rebuild, 50.0),
        pct(&rebuild, 90.0),
        ms(first_into_empty),
    );
    rt.block_on(nft.delete_table()).ok();
}

// ---------------------------------------------------------------------------------------
// seed

fn seed(o: &Opts) {
    let db = opt_str(o, "db");
    let n: usize = opt(o, "maps", 10_000);
    let first: u16 = opt(o, "first-port", 10_000);
    let subnet: Ipv4Network = opt_str(o, "subnet").parse().expect("--subnet");
    let mut want = maps(n, first, subnet);
    // Optionally point one listen port at a given VM (the connection-rate target).
    if let (Some(port), Some(ip)) = (o.get("special-port"), o.get("special-target")) {
        let port: u16 = port.parse().unwrap();
        let (ip, tport) = ip.split_once(':').expect("--special-target ip:port");
        for m in want.iter_mut().filter(|m| m.listen_port == port) {
            m.target_ip = ip.parse().unwrap();
            m.target_port = tport.parse().unwrap();
        }
    }
    let store = Store::open(std::path::Path::new(&db)).expect("open db");
    write_rows(&store, &want);
    println!("BENCH seed db={db} maps={n}");
}

// ---------------------------------------------------------------------------------------
// (b) POST /ports latency

/// One HTTP/1.1 request on a keep-alive connection; returns (status, body).
fn http(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).expect("send");
    let r = read_response(reader).expect("response");
    (r.status, r.body)
}

fn post(o: &Opts) {
    let ns = opt_str(o, "ns");
    let addr: SocketAddr = opt_str(o, "addr").parse().unwrap();
    let token = opt_str(o, "token");
    let n: usize = opt(o, "n", 500);
    let first: u16 = opt(o, "first-port", 30_000);
    let target = opt_str(o, "target");
    let (present, lat, failures) = in_netns(&ns, || {
        let mut stream = TcpStream::connect(addr).expect("connect to the agent");
        stream.set_nodelay(true).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let (status, body) = http(&mut stream, &mut reader, "GET", "/ports", &token, "");
        assert_eq!(status, 200, "{body}");
        let present = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["rules"].as_object().map(|o| o.len()))
            .unwrap_or(0);
        let mut lat = Vec::with_capacity(n);
        let mut failures = 0usize;
        for i in 0..n {
            let body = format!(
                r#"{{"listen_port":{},"target_ip":"{target}","target_port":80}}"#,
                first as usize + i
            );
            let t0 = Instant::now();
            let (status, resp) = http(&mut stream, &mut reader, "POST", "/ports", &token, &body);
            lat.push(ms(t0.elapsed()));
            if status != 200 || !resp.contains(r#""result":"created""#) {
                failures += 1;
                if failures <= 3 {
                    eprintln!("POST {i}: {status} {resp}");
                }
            }
        }
        (present, lat, failures)
    });
    let lat = sorted(lat);
    println!(
        "BENCH post present_before={present} n={n} failures={failures} p50_ms={:.3} p90_ms={:.3} \
         p99_ms={:.3} max_ms={:.3} min_ms={:.3}",
        pct(&lat, 50.0),
        pct(&lat, 90.0),
        pct(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN),
        lat.first().copied().unwrap_or(f64::NAN),
    );
}

// ---------------------------------------------------------------------------------------
// (j) a flood of unauthenticated POST /ports

/// `--n` requests (4 KiB body, no or a wrong token) from `--threads` threads in `--ns`
/// within `--secs`, one connection each (a refused request closes its connection).
fn flood(o: &Opts) {
    let ns = opt_str(o, "ns");
    let addr: SocketAddr = opt_str(o, "addr").parse().unwrap();
    let n: u64 = opt(o, "n", 150_000);
    let secs: f64 = opt(o, "secs", 30.0);
    let threads: u64 = opt(o, "threads", 2);
    let body = format!(
        r#"{{"listen_port":8080,"target_ip":"10.77.0.3","target_port":80,"pad":"{}"}}"#,
        "x".repeat(4000)
    );
    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (ns, body) = (ns.clone(), body.clone());
            let (sent, refused, other) = (sent.clone(), refused.clone(), other.clone());
            std::thread::spawn(move || {
                enter(&ns);
                let auth = if t % 2 == 0 {
                    String::new()
                } else {
                    "Authorization: Bearer wrong-token-0123456789\r\n".to_string()
                };
                let req = format!(
                    "POST /ports HTTP/1.1\r\nHost: flood\r\n{auth}Content-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let mut line = String::new();
                while Instant::now() < deadline && sent.fetch_add(1, Ordering::Relaxed) < n {
                    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                        other.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    set_linger_zero(&s);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    line.clear();
                    let ok = s.write_all(req.as_bytes()).is_ok()
                        && BufReader::new(&s).read_line(&mut line).is_ok();
                    if ok && line.starts_with("HTTP/1.1 401") {
                        refused.fetch_add(1, Ordering::Relaxed);
                    } else {
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("flood thread");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (r, x) = (
        refused.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    println!(
        "BENCH flood requests={} refused_401={r} other={x} secs={elapsed:.1} per_s={:.0}",
        r + x,
        (r + x) as f64 / elapsed
    );
}

// ---------------------------------------------------------------------------------------
// (c) connection rate through DNAT

fn set_linger_zero(s: &impl AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(s, sockopt::Linger, &l).expect("SO_LINGER");
}

/// Connects to `addr` from `threads` threads in `ns` for `secs`; returns connects/s.
fn measure_rate(ns: &str, addr: SocketAddr, threads: usize, secs: f64) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ns, ok, errors, stop) = (ns.to_string(), ok.clone(), errors.clone(), stop.clone());
            std::thread::spawn(move || {
                enter(&ns);
                let mut mine = 0u64;
                // Bounded by time; also by count, as a safety net.
                for i in 0..50_000_000u64 {
                    if i % 64 == 0 && (Instant::now() >= deadline || stop.load(Ordering::Relaxed)) {
                        break;
                    }
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                        Ok(s) => {
                            // RST on close: no TIME_WAIT, so client ports come back at once.
                            set_linger_zero(&s);
                            drop(s);
                            mine += 1;
                        }
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("connect: {e}");
                            }
                        }
                    }
                }
                ok.fetch_add(mine, Ordering::Relaxed);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let elapsed = start.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / elapsed,
        errors.load(Ordering::Relaxed),
    )
}

fn connrate(o: &Opts) {
    let client_ns = opt_str(o, "client-ns");
    let node_ns = opt_str(o, "node-ns");
    let vm_ns = opt_str(o, "vm-ns");
    let node_addr: Ipv4Addr = opt_str(o, "node-addr").parse().unwrap();
    let vm_ip: Ipv4Addr = opt_str(o, "vm-ip").parse().unwrap();
    let vm_port: u16 = opt(o, "vm-port", 8080);
    let subnet: Ipv4Network = opt_str(o, "subnet").parse().unwrap();
    let bridge = opt_str(o, "bridge");
    let n: usize = opt(o, "maps", 10_000);
    let port: u16 = opt(o, "port", 15_000);
    let secs: f64 = opt(o, "secs", 5.0);
    let rounds: usize = opt(o, "rounds", 3);
    let threads: usize = opt(o, "threads", 2);
    // `--allow 10.0.0.0/8`: every one of the many maps is restricted to this network
    // (which must hold the client); the single map stays open. Counters are always on.
    let allow = o
        .get("allow")
        .map(|a| AllowList::parse(&[a.as_str()]).expect("--allow"));

    // The VM: accept and close at once, on blocking threads in the vm namespace,
    // with a deep accept queue so that the server is not what limits the rate.
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let vm_addr = SocketAddr::from((vm_ip, vm_port));
    let listener = Arc::new(in_netns(&vm_ns, || {
        let l = TcpListener::bind(vm_addr).expect("bind the VM server");
        // listen() again on a listening socket changes its backlog.
        nix::sys::socket::listen(&l, nix::sys::socket::Backlog::new(4096).unwrap())
            .expect("listen backlog");
        l
    }));
    let servers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, accepted, l) = (stop.clone(), accepted.clone(), listener.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((s, _)) = l.accept() {
                        // A plain close (FIN): a RST from here could reach the client
                        // before its connect() returns and turn a completed connection
                        // into ECONNRESET. The client's RST then frees this side at once.
                        drop(s);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    // The node: the agent's driver in the node namespace, on its own thread.
    let settings = nat_settings(&bridge, subnet, None);
    let (req_tx, req_rx) = std::sync::mpsc::channel::<Vec<PortRule>>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(Duration, u64)>();
    let node = {
        let node_ns = node_ns.clone();
        std::thread::spawn(move || {
            enter(&node_ns);
            let (rt, nft) = nft_driver(settings);
            for rules in req_rx {
                // The connections counted on the measured map by the run just ended
                // (read before the table is rebuilt; a new rule set restarts it).
                let counted = rt
                    .block_on(nft.counters())
                    .ok()
                    .and_then(|c| c.get(&(Proto::Tcp, port)).map(|c| c.connections))
                    .unwrap_or(0);
                let t0 = Instant::now();
                rt.block_on(nft.apply_all(&rules)).expect("apply_all");
                done_tx.send((t0.elapsed(), counted)).unwrap();
            }
            rt.block_on(nft.delete_table()).ok();
        })
    };

    let special = PortMap {
        proto: Proto::Tcp,
        listen_port: port,
        target_ip: vm_ip,
        target_port: vm_port,
    };
    let mut many = maps(n, port - (n / 2) as u16, subnet);
    for m in many.iter_mut().filter(|m| m.listen_port == port) {
        *m = special;
    }
    assert!(many.contains(&special));
    let many: Vec<PortRule> = many
        .into_iter()
        .map(|map| PortRule {
            map,
            allow_from: allow.clone().unwrap_or_default(),
        })
        .collect();
    let one = vec![PortRule::from(special)];
    let addr = SocketAddr::from((node_addr, port));

    let mut one_rates = vec![];
    let mut many_rates = vec![];
    let mut total_errors = 0;
    // A short warm-up through one map (ARP, caches).
    req_tx.send(one.clone()).unwrap();
    done_rx.recv().unwrap();
    let (warm, warm_err) = measure_rate(&client_ns, addr, threads, 1.0);
    eprintln!("warm-up: {warm:.0} conn/s, {warm_err} errors");
    for round in 0..rounds {
        for (label, set) in [("1", one.clone()), ("10k", many.clone())] {
            req_tx.send(set).unwrap();
            let (took, counted) = done_rx.recv().unwrap();
            if round > 0 || label != "1" {
                eprintln!("  (the run before counted {counted} connections on port {port})");
            }
            std::thread::sleep(Duration::from_millis(300));
            let (rate, errors) = measure_rate(&client_ns, addr, threads, secs);
            total_errors += errors;
            eprintln!(
                "round {round} maps={label}: {rate:.0} conn/s, {errors} errors (apply {:.1} ms)",
                ms(took)
            );
            println!(
                "BENCH connrate_run round={round} maps={label} rate={rate:.0} errors={errors}"
            );
            if label == "1" {
                one_rates.push(rate);
            } else {
                many_rates.push(rate);
            }
        }
    }
    // A last apply reports the last run's count.
    req_tx.send(one.clone()).unwrap();
    let (_, counted) = done_rx.recv().unwrap();
    eprintln!("  (the run before counted {counted} connections on port {port})");
    drop(req_tx);
    node.join().expect("node thread");
    stop.store(true, Ordering::Relaxed);
    // Wake the blocked accepts (from inside the vm namespace, to the VM's own address).
    in_netns(&vm_ns, || {
        for _ in 0..servers.len() {
            let _ = TcpStream::connect_timeout(&vm_addr, Duration::from_secs(1));
        }
    });
    for h in servers {
        h.join().expect("server thread");
    }

    let fmt = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (one, many_s) = (sorted(one_rates.clone()), sorted(many_rates.clone()));
    let (m1, mk) = (pct(&one, 50.0), pct(&many_s, 50.0));
    // Each 10k run over the 1-map run just before it: drift between rounds cancels out.
    let pairs = sorted(
        one_rates
            .iter()
            .zip(&many_rates)
            .map(|(a, b)| b / a)
            .collect(),
    );
    println!(
        "BENCH connrate threads={threads} secs={secs} rounds={rounds} maps={n} port={port} allow={} \
         one_runs={} many_runs={} one_median={m1:.0} many_median={mk:.0} ratio={:.3} pair_ratio_median={:.3} \
         errors={total_errors} accepted={}",
        allow
            .as_ref()
            .map_or("none".to_string(), ToString::to_string),
        fmt(&one_rates),
        fmt(&many_rates),
        mk / m1,
        pct(&pairs, 50.0),
        accepted.load(Ordering::Relaxed)
    );
}
