//! node-vm-agent: the module map.

pub mod portmap;
