//! The node's own answers on the wire: `GET /health` and `GET /stats`, written with
//! their keys sorted (`sorted.rs`).

use std::time::SystemTime;

use serde::Serialize;
use utoipa::ToSchema;

use crate::hoststats;
use crate::mesh;

/// Answer of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub ok: bool,
    pub version: String,
    /// `standalone`, `joining`, `joined` or `cached`.
    pub join: String,
    pub node_ip: Option<String>,
    /// `kernel` or `userspace`.
    pub tunnel: Option<String>,
    pub last_handshake_s: Option<u64>,
    /// No handshake with the controller for WG_STALE_AFTER: the node is re-joining.
    pub tunnel_stale: bool,
    pub join_error: Option<String>,
}

impl Health {
    /// Where the node stands with the mesh now. Never a secret.
    pub fn of(s: mesh::Status) -> Self {
        let since = s
            .last_handshake
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| d.as_secs());
        Self {
            ok: true,
            version: env!("CARGO_PKG_VERSION").to_string(),
            join: s.state.as_str().to_string(),
            node_ip: s.node_ip.map(|ip| ip.to_string()),
            tunnel: s.tunnel.map(|t| t.as_str().to_string()),
            last_handshake_s: since,
            tunnel_stale: s.stale,
            join_error: s.error,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Cpu {
    pub cores: u32,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Ram {
    pub total_mb: u64,
    pub free_mb: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Disk {
    pub total_gb: f64,
    pub free_gb: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostStats {
    pub cpu: Cpu,
    pub ram: Ram,
    pub disk: Disk,
}

impl From<hoststats::HostStats> for HostStats {
    fn from(h: hoststats::HostStats) -> Self {
        let hoststats::HostStats { cpu, ram, disk } = h;
        Self {
            cpu: Cpu {
                cores: cpu.cores,
                load1: cpu.load1,
                load5: cpu.load5,
                load15: cpu.load15,
            },
            ram: Ram {
                total_mb: ram.total_mb,
                free_mb: ram.free_mb,
            },
            disk: Disk {
                total_gb: disk.total_gb,
                free_gb: disk.free_gb,
            },
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmCounts {
    pub total: usize,
    pub running: usize,
}

/// Answer of `GET /stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stats {
    pub ok: bool,
    #[serde(flatten)]
    pub host: HostStats,
    pub vms: VmCounts,
}
