//! Where the libvirt driver keeps a node's volumes.

/// Where the agent keeps its volumes, and whether libvirtd runs on this host.
pub struct Place {
    /// The agent's storage pool (VMS_POOL).
    pub pool: String,
    /// The pool's directory as the libvirt host sees it.
    pub pool_dir: String,
    /// LIBVIRT_URI reaches a libvirtd on this host ([`super::is_local_uri`]): the domains' taps
    /// are bridge ports here, which get hairpin mode.
    pub local: bool,
}
