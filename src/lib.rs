//! node-vm-agent: the module map.

pub mod net;
pub mod portmap;
