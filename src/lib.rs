//! node-vm-agent: the module map.

pub mod agent;
pub mod api;
pub mod config;
pub mod memory;
pub mod net;
pub mod portmap;
pub mod store;
