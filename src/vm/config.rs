//! What the VM service is configured with: one value, made from the VM settings once
//! (`VmConfig::from(&VmSettings)` in `config/vms.rs`). The libvirt driver gets its own
//! (`driver::libvirt::Place`).

use std::time::Duration;

use super::spec::Limits;

/// The settings the VM service needs, taken from the settings once.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The agent's storage pool (VMS_POOL), as messages name it.
    pub pool: String,
    pub domain_type: String,
    pub default_network: String,
    pub default_arch: String,
    pub default_image: String,
    /// Where the default image comes from on first use ("" = never downloaded).
    pub default_image_url: String,
    pub default_keys: Vec<String>,
    pub limits: Limits,
    pub stop_timeout: Duration,
    /// How often `/ip` asks libvirt for the lease while waiting.
    pub lease_poll: Duration,
    /// LIBVIRT_URI reaches a libvirtd on this host (`driver::libvirt::is_local_uri`), so a
    /// request's kernel and initrd are files this host can check.
    pub local: bool,
}
