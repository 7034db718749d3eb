//! The node's state as one scrape sees it: plain numbers gathered by the API from the
//! services (`api/metrics.rs`), written here as series. Nothing in this file reads the
//! kernel, libvirt or the database.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use crate::model::{MapCounters, Proto};

/// Above this many port maps, a scrape has totals only, no series per map: a node with
/// 10,000 maps would otherwise send 40,000 series every scrape.
pub const MAX_MAP_SERIES: usize = 1000;

/// Everything a scrape reports beyond the agent's own instruments.
#[derive(Debug, Default)]
pub struct NodeSample {
    pub version: &'static str,
    pub commit: &'static str,
    pub start_time_seconds: f64,
    pub mesh: MeshSample,
    pub maps: MapsSample,
    /// `None` when libvirt has not been sampled (a node without VMs never loads it).
    pub vms: Option<VmsSample>,
    pub images: usize,
    pub image_bytes: u64,
    pub database_bytes: u64,
}

#[derive(Debug, Default)]
pub struct MeshSample {
    /// `standalone`, `joining`, `joined` or `cached`.
    pub state: &'static str,
    pub last_handshake_age_seconds: Option<f64>,
    pub stale: bool,
    /// Bytes through the tunnel from and to the controller, as of the mesh task's last
    /// look (about once a second while the tunnel is up).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Default)]
pub struct MapsSample {
    pub tcp: usize,
    pub udp: usize,
    pub totals: MapCounters,
    /// Per map, when there are at most [`MAX_MAP_SERIES`] maps.
    pub per_map: Option<Vec<(Proto, u16, MapCounters)>>,
}

#[derive(Debug, Default)]
pub struct VmsSample {
    /// How old libvirt's statistics are: a scrape never waits behind a slow libvirt,
    /// it reports the last sample and its age.
    pub age_seconds: f64,
    pub domains: Vec<DomainSample>,
}

/// One domain's statistics from `virConnectGetAllDomainStats`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DomainSample {
    pub name: String,
    /// libvirt's `virDomainState` (1 running, 3 paused, 5 shut off, 6 crashed, ...).
    pub state: u32,
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// A label value as the text format needs it: `prometheus-client` writes values as they
/// are, and a domain made outside the agent may have `"`, `\` or a line break in its name.
fn escaped(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

type Out<'a, 'b> = &'a mut DescriptorEncoder<'b>;
type Fmt = Result<(), std::fmt::Error>;

/// One gauge family: `name` with each of `rows`' label sets and values.
fn gauges<L: prometheus_client::encoding::EncodeLabelSet>(
    out: Out,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> Fmt {
    let mut family = out.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter family (`_total` is added to the series' name).
fn counters<L: prometheus_client::encoding::EncodeLabelSet>(
    out: Out,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> Fmt {
    let mut family = out.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge without labels (`None`: the family without a sample).
fn gauge(out: Out, name: &str, help: &str, unit: Option<&Unit>, v: Option<f64>) -> Fmt {
    let family = out.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    match v {
        Some(v) => ConstGauge::new(v).encode(family),
        None => Ok(()),
    }
}

/// One counter without labels.
fn counter(out: Out, name: &str, help: &str, unit: Option<&Unit>, v: u64) -> Fmt {
    let family = out.encode_descriptor(name, help, unit, MetricType::Counter)?;
    ConstCounter::new(v).encode(family)
}

impl Collector for NodeSample {
    fn encode(&self, mut out: DescriptorEncoder) -> Fmt {
        let out = &mut out;
        gauges(
            out,
            "build_info",
            "The agent's version and the commit it was built from; always 1",
            None,
            [([("version", self.version), ("commit", self.commit)], 1.0)],
        )?;
        gauge(
            out,
            "start_time",
            "When the agent started, in seconds since the Unix epoch",
            Some(&Unit::Seconds),
            Some(self.start_time_seconds),
        )?;
        self.encode_mesh(out)?;
        self.encode_maps(out)?;
        if let Some(vms) = &self.vms {
            encode_vms(out, vms)?;
        }
        gauge(
            out,
            "images",
            "Base images ready in the pool",
            None,
            Some(self.images as f64),
        )?;
        gauge(
            out,
            "images",
            "Bytes of the ready base images",
            Some(&Unit::Bytes),
            Some(self.image_bytes as f64),
        )?;
        gauge(
            out,
            "database",
            "Size of the SQLite database file (agent.db)",
            Some(&Unit::Bytes),
            Some(self.database_bytes as f64),
        )
    }
}

impl NodeSample {
    fn encode_mesh(&self, out: Out) -> Fmt {
        let m = &self.mesh;
        gauges(
            out,
            "mesh_join_state",
            "1 for the node's join state (standalone, joining, joined, cached), 0 for the others",
            None,
            ["standalone", "joining", "joined", "cached"]
                .map(|s| ([("state", s)], f64::from(u8::from(s == m.state)))),
        )?;
        gauge(
            out,
            "mesh_tunnel_stale",
            "1 while the tunnel has had no handshake for WG_STALE_AFTER (the agent re-joins)",
            None,
            Some(f64::from(u8::from(m.stale))),
        )?;
        gauge(
            out,
            "mesh_last_handshake_age",
            "Seconds since the controller's last WireGuard handshake (absent before the first)",
            Some(&Unit::Seconds),
            m.last_handshake_age_seconds,
        )?;
        counter(
            out,
            "mesh_tunnel_receive",
            "Bytes received through the tunnel from the controller",
            Some(&Unit::Bytes),
            m.rx_bytes,
        )?;
        counter(
            out,
            "mesh_tunnel_transmit",
            "Bytes sent through the tunnel to the controller",
            Some(&Unit::Bytes),
            m.tx_bytes,
        )
    }

    fn encode_maps(&self, out: Out) -> Fmt {
        let m = &self.maps;
        gauges(
            out,
            "port_maps",
            "Port maps in force, by protocol",
            None,
            [
                ([("proto", "tcp")], m.tcp as f64),
                ([("proto", "udp")], m.udp as f64),
            ],
        )?;
        // (name after `port_maps`/`port_map`, help, unit): `port_maps_bytes_total`
        // has its unit for a name.
        type Field = fn(&MapCounters) -> u64;
        let fields: [(&str, &str, Option<&Unit>, Field); 4] = [
            (
                "_packets",
                "Packets of the maps' connections, both directions",
                None,
                |c| c.packets,
            ),
            (
                "",
                "Bytes of the maps' connections, both directions",
                Some(&Unit::Bytes),
                |c| c.bytes,
            ),
            (
                "_connections",
                "New connections DNAT'd (a connection's first packet)",
                None,
                |c| c.connections,
            ),
            (
                "_dropped_packets",
                "First packets dropped because their source is outside allow_from",
                None,
                |c| c.drops,
            ),
        ];
        for (what, help, unit, field) in fields {
            counter(
                out,
                &format!("port_maps{what}"),
                &format!("{help}, all maps"),
                unit,
                field(&m.totals),
            )?;
            let Some(per_map) = &m.per_map else { continue };
            counters(
                out,
                &format!("port_map{what}"),
                &format!("{help}, per map (absent above {MAX_MAP_SERIES} maps)"),
                unit,
                per_map.iter().map(|(proto, port, c)| {
                    (
                        [
                            ("listen_port", port.to_string()),
                            ("proto", proto.to_string()),
                        ],
                        field(c),
                    )
                }),
            )?;
        }
        Ok(())
    }
}

fn encode_vms(out: Out, vms: &VmsSample) -> Fmt {
    gauge(
        out,
        "vm_stats_age",
        "Age of libvirt's statistics in this scrape (a slow libvirt is never waited for)",
        Some(&Unit::Seconds),
        Some(vms.age_seconds),
    )?;
    gauge(
        out,
        "vms",
        "Domains libvirt knows",
        None,
        Some(vms.domains.len() as f64),
    )?;
    let by_vm = |f: fn(&DomainSample) -> f64| {
        vms.domains
            .iter()
            .map(move |d| ([("vm", escaped(&d.name))], f(d)))
    };
    let by_vm_count = |f: fn(&DomainSample) -> u64| {
        vms.domains
            .iter()
            .map(move |d| ([("vm", escaped(&d.name))], f(d)))
    };
    gauges(
        out,
        "vm_state",
        "libvirt's state of the domain: 1 running, 2 blocked, 3 paused, 4 shutting down, 5 shut off, 6 crashed, 7 suspended by power management",
        None,
        by_vm(|d| f64::from(d.state)),
    )?;
    let mut family = out.encode_descriptor(
        "vm_cpu",
        "CPU time the domain used",
        Some(&Unit::Seconds),
        MetricType::Counter,
    )?;
    for d in &vms.domains {
        let labels = [("vm", escaped(&d.name))];
        ConstCounter::new(d.cpu_seconds).encode(family.encode_family(&labels)?)?;
    }
    gauges(
        out,
        "vm_memory",
        "Memory the domain has (the balloon's current size)",
        Some(&Unit::Bytes),
        by_vm(|d| d.memory_bytes as f64),
    )?;
    type Field = fn(&DomainSample) -> u64;
    let io: [(&str, &str, Field); 4] = [
        ("vm_block_read", "Bytes read from the domain's disks", |d| {
            d.block_read_bytes
        }),
        (
            "vm_block_write",
            "Bytes written to the domain's disks",
            |d| d.block_write_bytes,
        ),
        (
            "vm_network_receive",
            "Bytes the domain's interfaces received",
            |d| d.net_rx_bytes,
        ),
        (
            "vm_network_transmit",
            "Bytes the domain's interfaces sent",
            |d| d.net_tx_bytes,
        ),
    ];
    for (name, help, f) in io {
        counters(out, name, help, Some(&Unit::Bytes), by_vm_count(f))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
