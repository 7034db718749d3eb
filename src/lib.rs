//! node-vm-agent: the module map.
