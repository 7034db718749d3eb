//! What the VM layer is configured with: one value, made from the VM settings once
//! (`VmConfig::from(&VmSettings)` in `config/vms.rs`), read by the service and the
//! blocking libvirt steps alike, so neither imports the other for it.

use std::time::Duration;

use super::spec::Limits;

/// The settings the VM layer needs, taken from the settings once.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub pool: String,
    /// The pool's directory as the libvirt host sees it.
    pub pool_dir: String,
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
    /// LIBVIRT_URI reaches a libvirtd on this host ([`super::conn::is_local_uri`]), so
    /// the domains' taps may be bridge ports here (hairpin mode is set on them), and a
    /// request's kernel and initrd are files this host can check.
    pub local: bool,
}
