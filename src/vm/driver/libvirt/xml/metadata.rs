//! The agent's element in a domain's `<metadata>`: its namespace and names.

/// Namespace of the agent's element in a domain's `<metadata>`.
pub const METADATA_NS: &str = "https://github.com/node-vm-agent/xmlns/vm/1";

/// Prefix we write for `METADATA_NS`. Readers match the namespace URI, never this prefix:
/// libvirt keeps it, but another writer of the same namespace may choose its own.
pub(crate) const METADATA_PREFIX: &str = "nva";
/// Local names inside the agent's metadata element.
pub(crate) const METADATA_ROOT: &str = "vm";
pub(crate) const METADATA_INSTANCE_ID: &str = "instance-id";
