//! Benchmark (i) of docs/benchmarks.md: fresh authenticated `GET /health` requests while
//! strangers hold 2,000 idle, 200 slowloris and 200 slow-body connections against an
//! agent limited to 1,024 descriptors (target: at least 99% answered, p99 at most
//! 100 ms), against a baseline of the same request loop without the hostile load, in
//! the same run.
//!
//! `#[ignore]`d, so the normal suite does not run it; scripts/bench.sh runs it as
//!
//! ```sh
//! NVA_AGENT_BIN=$PWD/target/release/node-vm-agent \
//!   cargo test --release --test bench_conn -- --ignored --nocapture
//! ```
//!
//! and reads the one `BENCH conn ...` line it prints. Knobs: BENCH_CONN_SECS (length of
//! each phase, default 60), BENCH_CONN_EVERY_MS (one fresh request every, default 20).
//!
//! The agent runs under `prlimit --nofile=1024:1024` in the node namespace of a test
//! [`Topology`] with its default timeouts and cap; every client runs in the client
//! namespace. The hostile connections are held by one thread (a single-threaded tokio
//! runtime): a connection the agent closes (shed, or timed out) is opened again at once,
//! so the attacker keeps 2,400 connections in play for the whole phase.
//! - idle: connects and sends nothing;
//! - slowloris: sends a request line, then one header line a second, never the end;
//! - slow body: sends `POST /ports` headers promising 1,000 bytes and one byte of them.
//!
//! The fresh requests come from another thread, one every 20 ms on a new connection
//! (`Connection: close`), each timed from before the connect to the end of the answer;
//! one that fails or takes longer than 2 s counts as not answered (and as infinitely
//! slow in the percentiles).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::measure::{env_or, status_field};
use support::netns::enter_netns;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IDLE: usize = 2000;
const SLOWLORIS: usize = 200;
const SLOW_BODY: usize = 200;
/// A fresh request that takes longer than this is not answered.
const ANSWER_BOUND: Duration = Duration::from_secs(2);

fn raise_own_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard > 4000,
        "the load needs more than 4,000 descriptors; hard limit {hard}"
    );
}

/// Latencies of the answered requests, and how many were sent.
struct Loop {
    sent: usize,
    answered_ms: Vec<f64>,
}

impl Loop {
    fn answered_pct(&self) -> f64 {
        100.0 * self.answered_ms.len() as f64 / self.sent.max(1) as f64
    }

    /// The p-th percentile over every request sent, unanswered ones being infinitely
    /// slow.
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.answered_ms.clone();
        v.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * self.sent as f64).ceil() as usize;
        v.get(rank.saturating_sub(1))
            .copied()
            .unwrap_or(f64::INFINITY)
    }

    fn max(&self) -> f64 {
        if self.answered_ms.len() < self.sent {
            return f64::INFINITY;
        }
        self.answered_ms.iter().copied().fold(0.0, f64::max)
    }

    fn fields(&self, prefix: &str) -> String {
        format!(
            "{prefix}_sent={} {prefix}_answered={} {prefix}_answered_pct={:.2} \
             {prefix}_p50_ms={:.2} {prefix}_p90_ms={:.2} {prefix}_p99_ms={:.2} {prefix}_max_ms={:.2}",
            self.sent,
            self.answered_ms.len(),
            self.answered_pct(),
            self.pct(50.0),
            self.pct(90.0),
            self.pct(99.0),
            self.max()
        )
    }
}

/// One fresh authenticated `GET /health`; its time, or None when not answered 200.
fn fresh_request(addr: SocketAddr, token: &str) -> Option<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, ANSWER_BOUND).ok()?;
    s.set_read_timeout(Some(ANSWER_BOUND)).ok()?;
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::with_capacity(1024);
    s.read_to_end(&mut raw).ok()?;
    let took = t0.elapsed();
    let ok = raw.starts_with(b"HTTP/1.1 200 ") && took <= ANSWER_BOUND;
    ok.then_some(took)
}

/// Fresh requests from the client namespace, one every `every`, for `secs`.
fn fresh_loop(topo: &Topology, token: &str, secs: u64, every: Duration) -> Loop {
    let (ns, token) = (topo.client.name().to_owned(), token.to_owned());
    let addr = sa(NODE_IP, API_PORT);
    std::thread::spawn(move || {
        enter_netns(&ns).unwrap();
        let start = Instant::now();
        let mut out = Loop {
            sent: 0,
            answered_ms: Vec::new(),
        };
        while start.elapsed() < Duration::from_secs(secs) {
            let due = start + every * out.sent as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            out.sent += 1;
            if let Some(took) = fresh_request(addr, &token) {
                out.answered_ms.push(took.as_secs_f64() * 1000.0);
            }
        }
        out
    })
    .join()
    .unwrap()
}

#[derive(Default)]
struct HostileCounts {
    connects: AtomicU64,
    connect_errors: AtomicU64,
    closed_by_agent: AtomicU64,
    /// Connections open at this moment.
    open: AtomicU64,
}

#[derive(Clone, Copy)]
enum Kind {
    Idle,
    Slowloris,
    SlowBody,
}

/// The strangers' connections, held from their own thread until `stop`.
struct Hostile {
    stop: Arc<AtomicBool>,
    counts: Arc<HostileCounts>,
    thread: std::thread::JoinHandle<()>,
}

impl Hostile {
    fn start(topo: &Topology) -> Hostile {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(HostileCounts::default());
        let ns = topo.client.name().to_owned();
        let (stop2, counts2) = (stop.clone(), counts.clone());
        let thread = std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(hold_all(stop2, counts2));
        });
        Hostile {
            stop,
            counts,
            thread,
        }
    }

    fn stop(self) -> Arc<HostileCounts> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.counts
    }
}

async fn hold_all(stop: Arc<AtomicBool>, counts: Arc<HostileCounts>) {
    let kinds = std::iter::repeat_n(Kind::Idle, IDLE)
        .chain(std::iter::repeat_n(Kind::Slowloris, SLOWLORIS))
        .chain(std::iter::repeat_n(Kind::SlowBody, SLOW_BODY));
    let tasks: Vec<_> = kinds
        .map(|k| tokio::spawn(hold(k, stop.clone(), counts.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// Keeps one connection of kind `k` open, re-opening it whenever the agent closes it.
async fn hold(k: Kind, stop: Arc<AtomicBool>, counts: Arc<HostileCounts>) {
    let addr = sa(NODE_IP, API_PORT);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            counts.connect_errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        counts.connects.fetch_add(1, Ordering::Relaxed);
        counts.open.fetch_add(1, Ordering::Relaxed);
        let opening: &[u8] = match k {
            Kind::Idle => b"",
            Kind::Slowloris => b"GET /health HTTP/1.1\r\nHost: node\r\n",
            Kind::SlowBody => {
                b"POST /ports HTTP/1.1\r\nHost: node\r\nContent-Length: 1000\r\n\r\n{"
            }
        };
        let mut alive = s.write_all(opening).await.is_ok();
        let mut buf = [0u8; 1024];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while alive && !stop.load(Ordering::Relaxed) {
            tokio::select! {
                r = s.read(&mut buf) => alive = matches!(r, Ok(n) if n > 0),
                _ = tick.tick() => {
                    if matches!(k, Kind::Slowloris) {
                        alive = s.write_all(b"X-Slow: a\r\n").await.is_ok();
                    }
                }
            }
        }
        counts.open.fetch_sub(1, Ordering::Relaxed);
        if !alive {
            counts.closed_by_agent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
#[ignore]
fn bench_fresh_requests_under_hostile_connections() {
    raise_own_fd_limit();
    let secs = env_or("BENCH_CONN_SECS", 60);
    let every = Duration::from_millis(env_or("BENCH_CONN_EVERY_MS", 20));
    let topo = Topology::new();
    // Ports for the attacker's reconnects (the agent closes first, so the TIME-WAITs
    // are on its side).
    topo.client
        .exec_ok(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"]);
    let agent = Agent::start_via(&topo, &["prlimit", "--nofile=1024:1024"], &[]);
    let pid = agent.pid().unwrap();
    let cap = agent
        .log()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cap=").map(str::to_owned))
        .unwrap_or_default();

    eprintln!("baseline: {secs} s of fresh requests, one every {every:?}");
    let base = fresh_loop(&topo, &agent.token, secs, every);
    eprintln!("baseline: {}", base.fields("base"));

    let hostile = Hostile::start(&topo);
    // The attacker's first round of connections is in place before measuring.
    let ramp = Instant::now();
    while hostile.counts.connects.load(Ordering::Relaxed) < (IDLE + SLOWLORIS + SLOW_BODY) as u64
        && ramp.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ramp_ms = ramp.elapsed().as_millis();
    eprintln!("hostile load up after {ramp_ms} ms; {secs} s of fresh requests");
    let before = hostile.counts.connects.load(Ordering::Relaxed);
    let load = fresh_loop(&topo, &agent.token, secs, every);
    let during = hostile.counts.connects.load(Ordering::Relaxed) - before;
    let (rss, fds, threads) = (
        status_field(pid, "VmRSS:"),
        open_fds(pid),
        status_field(pid, "Threads:"),
    );
    let counts = hostile.stop();
    eprintln!("under load: {}", load.fields("load"));
    println!(
        "BENCH conn secs={secs} every_ms={} cap={cap} {} {} hostile={} ramp_ms={ramp_ms} \
         hostile_connects={} hostile_connects_during={during} hostile_closed_by_agent={} \
         hostile_connect_errors={} agent_rss_kib={rss} agent_fds={fds} agent_threads={threads}",
        every.as_millis(),
        base.fields("base"),
        load.fields("load"),
        IDLE + SLOWLORIS + SLOW_BODY,
        counts.connects.load(Ordering::Relaxed),
        counts.closed_by_agent.load(Ordering::Relaxed),
        counts.connect_errors.load(Ordering::Relaxed),
    );
    let _ = std::io::stdout().flush();
}
