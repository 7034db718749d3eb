//! Settings of the VM layer: the libvirt connection, the storage pool, what new VMs get
//! by default and how large one may be (decisions §9, §15, §16).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::parse_name;
use crate::vm::VmConfig;
use crate::vm::spec::Limits;

/// How often `/ip` asks libvirt for the lease while waiting.
const LEASE_POLL: Duration = Duration::from_millis(200);

/// libvirt, the pool and the new VMs' defaults and bounds.
#[derive(Args, Clone, Debug)]
pub struct VmSettings {
    /// libvirt connection URI: one long-lived connection, reopened after libvirtd restarts.
    /// A remote one (qemu+ssh://host/system) works the same; set VMS_HOST_DIR to the
    /// pool's directory on that host. The driver is qemu (or test, libvirt's in-process
    /// test driver); anything else is refused at startup. Connected only once the node
    /// has VMs or image transfers, or a VM call arrives.
    #[arg(
        long,
        env = "LIBVIRT_URI",
        value_name = "LIBVIRT_URI",
        default_value = "qemu:///system"
    )]
    pub libvirt_uri: String,

    /// Directory of the storage pool (when VMS_HOST_DIR is unset), an absolute path;
    /// `GET /stats` reports its filesystem.
    #[arg(
        long,
        env = "VMS_WORK_DIR",
        value_name = "VMS_WORK_DIR",
        default_value = "/srv/vms"
    )]
    pub vms_work_dir: PathBuf,

    /// The pool's directory as the libvirt host sees it (an agent in a container), an
    /// absolute path; the agent itself never opens it.
    #[arg(long, env = "VMS_HOST_DIR", value_name = "VMS_HOST_DIR")]
    pub vms_host_dir: Option<PathBuf>,

    /// libvirt network of new VMs (started and set to autostart if inactive).
    #[arg(
        long,
        env = "VMS_NETWORK",
        value_name = "VMS_NETWORK",
        default_value = "default",
        value_parser = parse_name
    )]
    pub vms_network: String,

    /// Architecture of new VMs (x86_64, aarch64).
    #[arg(
        long,
        env = "VMS_ARCH",
        value_name = "VMS_ARCH",
        default_value = "x86_64",
        value_parser = ["x86_64", "aarch64"]
    )]
    pub vms_arch: String,

    /// libvirt storage pool holding base images, VM disks, seeds and console logs. Created
    /// (type dir, at VMS_HOST_DIR or else VMS_WORK_DIR) when missing.
    #[arg(long, env = "VMS_POOL", value_name = "VMS_POOL", default_value = "node-vm-agent", value_parser = parse_name)]
    pub vms_pool: String,

    /// libvirt domain type of new VMs: `kvm`, or `qemu` (TCG) on hosts without usable KVM.
    #[arg(long, env = "VMS_DOMAIN_TYPE", value_name = "VMS_DOMAIN_TYPE", default_value = "kvm", value_parser = ["kvm", "qemu"])]
    pub vms_domain_type: String,

    /// Image used when `POST /vms` names none (and boots no kernel of its own).
    #[arg(long, env = "VMS_DEFAULT_IMAGE", value_name = "VMS_DEFAULT_IMAGE", default_value = "ubuntu-22.04", value_parser = parse_name)]
    pub vms_default_image: String,

    /// Where VMS_DEFAULT_IMAGE is downloaded from on first use, when it is not there yet
    /// (empty: never download it; it must be uploaded or added with `POST /images`).
    #[arg(
        long,
        env = "VMS_DEFAULT_IMAGE_URL",
        value_name = "VMS_DEFAULT_IMAGE_URL",
        default_value = "https://cloud-images.ubuntu.com/jammy/current/jammy-server-cloudimg-amd64.img"
    )]
    pub vms_default_image_url: String,

    /// SSH public keys (one per line) given to every new VM that brings none of its own.
    /// Default: none; the agent has no built-in key or password.
    #[arg(
        long,
        env = "SSH_AUTHORIZED_KEYS",
        value_name = "SSH_AUTHORIZED_KEYS",
        default_value = ""
    )]
    pub ssh_authorized_keys: String,

    /// Largest memory of one VM, MiB (also bounded by the host's memory).
    #[arg(long, env = "VM_MAX_MEMORY_MIB", value_name = "VM_MAX_MEMORY_MIB", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(64..=16_777_216))]
    pub vm_max_memory_mib: u64,

    /// Most vCPUs of one VM (also bounded by libvirt's maximum for the domain type).
    #[arg(long, env = "VM_MAX_VCPUS", value_name = "VM_MAX_VCPUS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub vm_max_vcpus: u32,

    /// Largest disk of one VM, GB.
    #[arg(long, env = "VM_MAX_DISK_GB", value_name = "VM_MAX_DISK_GB", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub vm_max_disk_gb: u64,

    /// Seconds a graceful `stop` waits for the guest to power off before forcing it.
    #[arg(long, env = "VM_STOP_TIMEOUT", value_name = "VM_STOP_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub vm_stop_timeout: u64,

    /// Seconds one libvirt call may take before the request gets a 503 (libvirtd hung or
    /// unreachable); the connection's keepalive drops a dead daemon in about 15 s.
    #[arg(long, env = "LIBVIRT_TIMEOUT", value_name = "LIBVIRT_TIMEOUT", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub libvirt_timeout: u64,
}

impl VmSettings {
    /// The keys of SSH_AUTHORIZED_KEYS, one per non-empty line.
    pub fn default_ssh_keys(&self) -> Vec<String> {
        self.ssh_authorized_keys
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The pool's directory as the libvirt host sees it.
    pub fn pool_dir(&self) -> &Path {
        self.vms_host_dir.as_deref().unwrap_or(&self.vms_work_dir)
    }

    pub fn libvirt_timeout(&self) -> Duration {
        Duration::from_secs(self.libvirt_timeout)
    }
}

/// The VM layer's configuration: built here once, so the agent and nothing else
/// spells out which setting feeds which field.
impl From<&VmSettings> for VmConfig {
    fn from(s: &VmSettings) -> Self {
        VmConfig {
            pool: s.vms_pool.clone(),
            pool_dir: s.pool_dir().to_string_lossy().into_owned(),
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
            local: crate::vm::conn::is_local_uri(&s.libvirt_uri),
        }
    }
}
