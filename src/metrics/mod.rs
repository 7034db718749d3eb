//! One home for the agent's metrics (`GET /metrics`, and METRICS_LISTEN): the
//! instruments the agent updates as it works ([`Metrics`], one per process, like the
//! logger) and the node's state sampled at each scrape ([`sample::NodeSample`]), both
//! written in the Prometheus text format by `prometheus-client`.
//!
//! Names follow Prometheus' conventions: a `node_vm_agent_` prefix, base units in the
//! name (`_seconds`, `_bytes`), `_total` on counters. Labels take a bounded set of
//! values only: a route's template (never its path), a status code, a VM's name, a map's
//! port and protocol (per map only up to [`sample::MAX_MAP_SERIES`] maps).

pub mod sample;

use std::sync::LazyLock;
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The agent's version (Cargo.toml's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit it was built from (`build.rs`).
pub const COMMIT: &str = env!("NVA_COMMIT");
/// What `--version` prints after the program's name.
pub const VERSION_LINE: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("NVA_COMMIT"), ")");

/// Every series' prefix.
pub const PREFIX: &str = "node_vm_agent";

/// The `Content-Type` of a scrape: Prometheus' text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route's template (`/vms/{name}/start`), `unmatched` for no route.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

/// What a reconcile looked after: `portmaps` or `vms`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// The instruments the agent updates as it works.
pub struct Metrics {
    registry: Registry,
    started: SystemTime,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram>,
    pub reconcile_passes: Family<KindLabels, Counter>,
    pub reconcile_repairs: Family<KindLabels, Counter>,
    pub kernel_apply_duration: Histogram,
    pub audit_rows: Counter,
    pub refused_requests: Counter,
    pub events_published: Counter,
    pub consoles_open: Gauge,
    pub console_input_bytes: Counter,
    pub console_output_bytes: Counter,
}

/// The process's instruments.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status",
            http_requests.clone(),
        );
        // 0.5 ms to about 16 s.
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 4.0, 9))
        });
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's head to its answer's head, by method and route template",
            Unit::Seconds,
            http_duration.clone(),
        );
        let reconcile_passes = Family::<KindLabels, Counter>::default();
        registry.register(
            "reconcile_passes",
            "Reconcile passes run, by what they reconcile (portmaps, vms)",
            reconcile_passes.clone(),
        );
        let reconcile_repairs = Family::<KindLabels, Counter>::default();
        registry.register(
            "reconcile_repairs",
            "Repairs the reconciles made (a rewritten table, a VM defined again, ...), by kind",
            reconcile_repairs.clone(),
        );
        // 0.25 ms to about 4 s.
        let kernel_apply_duration = Histogram::new(exponential_buckets(0.00025, 4.0, 8));
        registry.register_with_unit(
            "kernel_apply_duration",
            "Time of each nftables batch that applies the port maps (one change, or the whole table)",
            Unit::Seconds,
            kernel_apply_duration.clone(),
        );
        let audit_rows = Counter::default();
        registry.register(
            "audit_rows",
            "Rows inserted into the audit log (one whose transaction rolled back counts too)",
            audit_rows.clone(),
        );
        let refused_requests = Counter::default();
        registry.register(
            "refused_requests",
            "Requests refused for want of authentication (the rows of refused_requests aggregate them)",
            refused_requests.clone(),
        );
        let events_published = Counter::default();
        registry.register(
            "events_published",
            "Events published to GET /events",
            events_published.clone(),
        );
        let (consoles_open, console_input_bytes, console_output_bytes) =
            register_consoles(&mut registry);
        Self {
            registry,
            started: SystemTime::now(),
            http_requests,
            http_duration,
            reconcile_passes,
            reconcile_repairs,
            kernel_apply_duration,
            audit_rows,
            refused_requests,
            events_published,
            consoles_open,
            console_input_bytes,
            console_output_bytes,
        }
    }

    /// When the process started (its first use of the metrics, at startup).
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// A reconcile pass of `kind` that made `repairs` repairs.
    pub fn reconciled(&self, kind: &'static str, repairs: usize) {
        let labels = KindLabels { kind };
        self.reconcile_passes.get_or_create(&labels).inc();
        if repairs > 0 {
            self.reconcile_repairs
                .get_or_create(&labels)
                .inc_by(repairs as u64);
        }
    }

    /// The whole scrape: these instruments, then the node's state in `node`.
    pub fn render(&self, node: sample::NodeSample) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut dynamic = Registry::with_prefix(PREFIX);
        dynamic.register_collector(Box::new(node));
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &dynamic);
        to_text_format(&out)
    }
}

/// The consoles' instruments: sessions open, bytes in, bytes out.
fn register_consoles(registry: &mut Registry) -> (Gauge, Counter, Counter) {
    let consoles_open = Gauge::default();
    registry.register(
        "consoles_open",
        "Interactive console sessions open now",
        consoles_open.clone(),
    );
    let console_input_bytes = Counter::default();
    registry.register_with_unit(
        "console_input",
        "Bytes clients sent into VM consoles",
        Unit::Bytes,
        console_input_bytes.clone(),
    );
    let console_output_bytes = Counter::default();
    registry.register_with_unit(
        "console_output",
        "Bytes VM consoles sent to clients",
        Unit::Bytes,
        console_output_bytes.clone(),
    );
    (consoles_open, console_input_bytes, console_output_bytes)
}

/// `prometheus-client` writes OpenMetrics, where a counter family is named without its
/// `_total` and has a `# UNIT` line. Prometheus' text format (what `promtool check
/// metrics` and older scrapers read) names the family as its samples: this renames the
/// counters' `# HELP` and `# TYPE` lines and drops `# UNIT`. Everything else is the same
/// in both formats.
fn to_text_format(open_metrics: &str) -> String {
    let mut out = String::with_capacity(open_metrics.len() + 1024);
    let mut help: Option<&str> = None;
    for line in open_metrics.lines() {
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|t| t.strip_suffix(" counter"))
        {
            if let Some(h) = help.take() {
                let text = h.strip_prefix("# HELP ").and_then(|h| h.strip_prefix(name));
                out.push_str(&format!("# HELP {name}_total{}\n", text.unwrap_or("")));
            }
            out.push_str(&format!("# TYPE {name}_total counter\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_named_as_their_samples_and_units_dropped() {
        let om = "# HELP x_bytes Bytes.\n# TYPE x_bytes counter\n# UNIT x_bytes bytes\nx_bytes_total 3\n\
                  # HELP g A gauge.\n# TYPE g gauge\ng 1.0\n# EOF\n";
        assert_eq!(
            super::to_text_format(om),
            "# HELP x_bytes_total Bytes.\n# TYPE x_bytes_total counter\nx_bytes_total 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1.0\n"
        );
    }
}
