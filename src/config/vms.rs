//! Settings of the VM layer: the libvirt connection, the storage pool, what new VMs get
//! by default and how large one may be (decisions §9, §15, §16).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::parse_name;

/// Seconds between keepalive probes on a libvirt connection, unless LIBVIRT_KEEPALIVE
/// says otherwise.
pub const DEFAULT_LIBVIRT_KEEPALIVE_S: u32 = 5;

/// libvirt, the pool and the new VMs' defaults and bounds.
#[derive(Args, Clone, Debug)]
pub struct VmSettings {
    /// libvirt connection URI.
    ///
    /// The driver must be qemu (or test, libvirt's in-process test driver) with a known
    /// transport; anything else is refused at startup. A remote URI
    /// (qemu+ssh://host/system, qemu+tls://, qemu+tcp://) works the same; set
    /// VMS_HOST_DIR to the pool's directory on that host. With a remote host the agent
    /// leaves local network devices alone (no hairpin mode).
    ///
    /// Connections are long-lived (keepalive 5 s x 3), one call at a time each, at most
    /// 8, reopened after libvirtd restarts, plus one only for libvirt's domain events.
    /// They are opened only once the node has VMs or image transfers, or a VM call
    /// arrives: a node that only maps ports never connects.
    #[arg(
        long,
        env = "LIBVIRT_URI",
        value_name = "LIBVIRT_URI",
        default_value = "qemu:///system"
    )]
    pub libvirt_uri: String,

    /// Directory of the storage pool (when VMS_HOST_DIR is unset).
    ///
    /// An absolute path; `GET /stats` reports its filesystem.
    #[arg(
        long,
        env = "VMS_WORK_DIR",
        value_name = "VMS_WORK_DIR",
        default_value = "/srv/vms"
    )]
    pub vms_work_dir: PathBuf,

    /// The pool's directory as the libvirt host sees it.
    ///
    /// An absolute path, for an agent in a container with another mount, or a remote
    /// LIBVIRT_URI; the agent itself never opens it.
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

    /// Architecture of new VMs.
    #[arg(
        long,
        env = "VMS_ARCH",
        value_name = "VMS_ARCH",
        default_value = "x86_64",
        value_parser = ["x86_64", "aarch64"]
    )]
    pub vms_arch: String,

    /// libvirt storage pool of base images, VM disks, seeds and console logs.
    ///
    /// When missing, a `dir` pool at VMS_HOST_DIR (or else VMS_WORK_DIR) is defined,
    /// built, started and set to autostart.
    #[arg(long, env = "VMS_POOL", value_name = "VMS_POOL", default_value = "node-vm-agent", value_parser = parse_name)]
    pub vms_pool: String,

    /// libvirt domain type of new VMs.
    ///
    /// `qemu` is TCG, for hosts where KVM is not usable.
    #[arg(long, env = "VMS_DOMAIN_TYPE", value_name = "VMS_DOMAIN_TYPE", default_value = "kvm", value_parser = ["kvm", "qemu"])]
    pub vms_domain_type: String,

    /// Image used when `POST /vms` names none (and boots no kernel of its own).
    #[arg(long, env = "VMS_DEFAULT_IMAGE", value_name = "VMS_DEFAULT_IMAGE", default_value = "ubuntu-22.04", value_parser = parse_name)]
    pub vms_default_image: String,

    /// Where VMS_DEFAULT_IMAGE is downloaded from on first use.
    ///
    /// The default is the Ubuntu 22.04 (jammy) cloud image. While it downloads, a create
    /// that needs it answers 503. Empty: never downloaded; the image must be uploaded or
    /// added with `POST /images`.
    #[arg(
        long,
        env = "VMS_DEFAULT_IMAGE_URL",
        value_name = "VMS_DEFAULT_IMAGE_URL",
        default_value = "https://cloud-images.ubuntu.com/jammy/current/jammy-server-cloudimg-amd64.img"
    )]
    pub vms_default_image_url: String,

    /// SSH public keys (one per line) for every new VM that brings none of its own.
    ///
    /// Default: none; the agent has no built-in key or password.
    #[arg(
        long,
        env = "SSH_AUTHORIZED_KEYS",
        value_name = "SSH_AUTHORIZED_KEYS",
        default_value = ""
    )]
    pub ssh_authorized_keys: String,

    /// Largest memory of one VM, in MiB.
    ///
    /// 64..16777216; also bounded by the host's memory.
    #[arg(long, env = "VM_MAX_MEMORY_MIB", value_name = "VM_MAX_MEMORY_MIB", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(64..=16_777_216))]
    pub vm_max_memory_mib: u64,

    /// Most vCPUs of one VM.
    ///
    /// 1..4096; also bounded by libvirt's maximum for the domain type.
    #[arg(long, env = "VM_MAX_VCPUS", value_name = "VM_MAX_VCPUS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub vm_max_vcpus: u32,

    /// Largest disk of one VM, in GiB.
    ///
    /// 1..1048576; also the largest image accepted, downloaded or uploaded.
    #[arg(long, env = "VM_MAX_DISK_GB", value_name = "VM_MAX_DISK_GB", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub vm_max_disk_gb: u64,

    /// Seconds a graceful stop waits for the guest to power off.
    ///
    /// 0..3600; then the VM is forced off.
    #[arg(long, env = "VM_STOP_TIMEOUT", value_name = "VM_STOP_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub vm_stop_timeout: u64,

    /// Seconds a request waits for libvirt.
    ///
    /// 1..3600. A create, start, stop, reboot or delete that outlives it answers 504
    /// while its work goes on: the VM stays claimed, and the row (or the cleanup) and an
    /// audit row record how it ended. Any other libvirt call answers 503 then (libvirtd
    /// hung or unreachable). The connection's keepalive drops a dead daemon sooner
    /// (LIBVIRT_KEEPALIVE). Reads of VMs never wait for libvirt (docs/api.md).
    #[arg(long, env = "LIBVIRT_TIMEOUT", value_name = "LIBVIRT_TIMEOUT", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub libvirt_timeout: u64,

    /// Seconds between keepalive probes on each libvirt connection.
    ///
    /// 1..300. After 3 unanswered probes (a frozen or unreachable libvirtd) libvirt
    /// gives the connection up, 4 x this after the daemon's last packet (20 s by
    /// default), and the next call opens another. Lower it for a quicker verdict on a
    /// remote libvirtd, raise it for a link that drops packets.
    #[arg(long, env = "LIBVIRT_KEEPALIVE", value_name = "LIBVIRT_KEEPALIVE", default_value_t = DEFAULT_LIBVIRT_KEEPALIVE_S, value_parser = clap::value_parser!(u32).range(1..=300))]
    pub libvirt_keepalive: u32,

    /// Interactive console sessions open at once on the node.
    ///
    /// 1..1024. Outside the API's connection budget (MAX_CONNECTIONS) and exempt from
    /// its header and body timeouts; one session per VM (docs/api.md, consoles).
    #[arg(long, env = "CONSOLE_MAX_SESSIONS", value_name = "CONSOLE_MAX_SESSIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub console_max_sessions: u32,

    /// Seconds a console session may pass without a byte either way.
    ///
    /// 10..86400; then it is closed (code 4002). The agent's pings every 15 s do not
    /// count, so a forgotten session does not hold its VM's console for ever.
    #[arg(long, env = "CONSOLE_IDLE_TIMEOUT", value_name = "CONSOLE_IDLE_TIMEOUT", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(10..=86400))]
    pub console_idle_timeout: u64,

    /// Bytes per second a console client may type (a burst of one second's worth).
    ///
    /// 64..1048576. Faster input waits: a paste goes through at this rate.
    #[arg(long, env = "CONSOLE_INPUT_RATE", value_name = "CONSOLE_INPUT_RATE", default_value_t = 32768, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub console_input_rate: u32,
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
