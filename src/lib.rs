//! node-vm-agent: the module map.

pub mod agent;
pub mod api;
pub mod cloudinit;
pub mod config;
pub mod events;
pub mod fdlimit;
pub mod hoststats;
pub mod join;
pub mod keys;
pub mod locks;
pub mod logging;
pub mod memory;
pub mod mesh;
pub mod metrics;
pub mod model;
pub mod net;
pub mod notify;
pub mod periodic;
pub mod portmap;
pub mod preflight;
pub mod store;
pub mod vm;
