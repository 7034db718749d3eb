//! What the VM service is configured with: one value, made from the VM settings once
//! (`VmConfig::from(&VmSettings)` in `config/vms.rs`). The libvirt driver gets its own
//! (`driver::libvirt::Place`).

use std::time::Duration;

use super::spec::Limits;
use crate::config::VmSettings;

/// How often `/ip` asks libvirt for the lease while waiting.
const LEASE_POLL: Duration = Duration::from_millis(200);

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

/// The VM layer's configuration: built here once, so the agent and nothing else
/// spells out which setting feeds which field.
impl From<&VmSettings> for VmConfig {
    fn from(s: &VmSettings) -> Self {
        VmConfig {
            pool: s.vms_pool.clone(),
            domain_type: s.vms_domain_type.clone(),
            default_network: s.vms_network.clone(),
            default_arch: s.vms_arch.clone(),
            default_image: s.vms_default_image.clone(),
            default_image_url: s.vms_default_image_url.clone(),
            default_keys: s.default_ssh_keys(),
            limits: Limits {
                max_memory_mib: s.vm_max_memory_mib,
                max_vcpus: s.vm_max_vcpus,
                max_disk_gb: s.vm_max_disk_gb,
            },
            stop_timeout: Duration::from_secs(s.vm_stop_timeout),
            lease_poll: LEASE_POLL,
            local: crate::vm::driver::libvirt::is_local_uri(&s.libvirt_uri),
        }
    }
}
