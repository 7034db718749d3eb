//! Host figures for `GET /stats`, in the original agent's shape.
//! Interface stub: the implementation lands with branch `xml`.

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cpu {
    pub cores: u32,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ram {
    pub total_mb: u64,
    pub free_mb: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Disk {
    pub total_gb: f64,
    pub free_gb: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostStats {
    pub cpu: Cpu,
    pub ram: Ram,
    pub disk: Disk,
}

/// Reads /proc and statvfs(`disk_path`). Blocking (small file reads).
pub fn collect(_disk_path: &Path) -> std::io::Result<HostStats> {
    Err(std::io::Error::other("not implemented yet"))
}
