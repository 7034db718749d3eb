//! Every setting of the agent: environment variable, flag and default, in one place
//! (their validation is in `check`). Names and defaults of the original agent's variables
//! are kept as they were.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use ipnetwork::Ipv4Network;

mod check;

pub use check::{SettingError, check_libvirt_uri};
// The value parsers of names: each rule is the domain type's (`model`), written once.
use crate::model::iface::check_ifname as parse_ifname;
use crate::model::name::check_name as parse_name;
use check::{names_with_verb, parse_port};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How the WireGuard link is implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WgMode {
    /// The kernel module where it exists, else the embedded userspace implementation.
    Auto,
    /// The kernel module only (fails without it).
    Kernel,
    /// The embedded userspace implementation (boringtun over /dev/net/tun) only.
    Userspace,
}

/// Settings of `node-vm-agent serve` (and of the commands that read the same state).
#[derive(Args, Clone, Debug)]
pub struct Settings {
    /// Directory for the SQLite database, keys, the generated API token and imports.
    #[arg(
        long,
        env = "DATA_DIR",
        value_name = "DATA_DIR",
        default_value = "/data"
    )]
    pub data_dir: PathBuf,

    /// TCP port of the REST API.
    #[arg(
        long,
        env = "NODE_API_PORT",
        value_name = "NODE_API_PORT",
        default_value_t = 8000,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub node_api_port: u16,

    /// Address the REST API listens on.
    #[arg(
        long,
        env = "API_LISTEN",
        value_name = "API_LISTEN",
        default_value = "0.0.0.0"
    )]
    pub api_listen: IpAddr,

    /// Bearer token required on every API call but /health. When neither this nor
    /// PORTMAP_TOKEN is set, a token is generated into $DATA_DIR/api.token (mode 0600).
    #[arg(
        long,
        env = "API_TOKEN",
        value_name = "API_TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,

    /// The original agent's name for API_TOKEN, accepted as an alias.
    #[arg(
        long,
        env = "PORTMAP_TOKEN",
        value_name = "PORTMAP_TOKEN",
        hide_env_values = true
    )]
    pub portmap_token: Option<String>,

    /// Controller API base URL (used by the mesh join).
    #[arg(long, env = "CONTROLLER_URL", value_name = "CONTROLLER_URL")]
    pub controller_url: Option<String>,

    /// Join token sent as X-Join-Token (used by the mesh join).
    #[arg(
        long,
        env = "JOIN_TOKEN",
        value_name = "JOIN_TOKEN",
        hide_env_values = true
    )]
    pub join_token: Option<String>,

    /// Unique node identifier (used by the mesh join).
    #[arg(long, env = "NODE_ID", value_name = "NODE_ID")]
    pub node_id: Option<String>,

    /// WireGuard interface name; traffic leaving through it is masqueraded.
    #[arg(long, env = "WG_IFACE", value_name = "WG_IFACE", default_value = "wg0", value_parser = parse_ifname)]
    pub wg_iface: String,

    /// WireGuard listen port, refused as a port-map listen port when set.
    #[arg(long, env = "WG_LISTEN_PORT", value_name = "WG_LISTEN_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub wg_listen_port: Option<u16>,

    /// WireGuard implementation: auto (kernel module where it exists, else userspace),
    /// kernel, or userspace. A userspace link goes down with the agent process.
    #[arg(
        long,
        env = "WG_MODE",
        value_name = "WG_MODE",
        value_enum,
        default_value = "auto"
    )]
    pub wg_mode: WgMode,

    /// MTU of the WireGuard link.
    #[arg(long, env = "WG_MTU", value_name = "WG_MTU", default_value_t = 1420, value_parser = clap::value_parser!(u32).range(576..=9000))]
    pub wg_mtu: u32,

    /// Persistent keepalive towards the controller, in seconds (0: off).
    #[arg(
        long,
        env = "WG_KEEPALIVE",
        value_name = "WG_KEEPALIVE",
        default_value_t = 25
    )]
    pub wg_keepalive: u16,

    /// First delay between two join attempts, in milliseconds; doubled after every
    /// failure (with jitter) up to JOIN_RETRY_MAX.
    #[arg(long, env = "JOIN_RETRY_INITIAL_MS", value_name = "JOIN_RETRY_INITIAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub join_retry_initial_ms: u64,

    /// Longest delay between two join attempts, in seconds.
    #[arg(long, env = "JOIN_RETRY_MAX", value_name = "JOIN_RETRY_MAX", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub join_retry_max: u64,

    /// Seconds between two re-joins once joined: a changed node_ip, endpoint or
    /// controller key is applied then, without a restart.
    #[arg(long, env = "JOIN_REFRESH_INTERVAL", value_name = "JOIN_REFRESH_INTERVAL", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub join_refresh_interval: u64,

    /// Timeout of one join request, in seconds.
    #[arg(long, env = "JOIN_TIMEOUT", value_name = "JOIN_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub join_timeout: u64,

    /// Authorise, without a token, requests that arrive through WG_IFACE from the
    /// controller's tunnel address (allowed_ips of the join response), as the original
    /// controller's proxy sends no authentication header.
    #[arg(long, env = "TRUST_CONTROLLER_TUNNEL", value_name = "TRUST_CONTROLLER_TUNNEL", default_value_t = true, action = clap::ArgAction::Set)]
    pub trust_controller_tunnel: bool,

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

    /// Seconds a client has to send a request's headers, counted from the connection's
    /// accept for its first request and from the first byte for later ones on a
    /// kept-alive connection; then the connection is closed (slowloris).
    #[arg(long, env = "HEADER_READ_TIMEOUT", value_name = "HEADER_READ_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub header_read_timeout: u64,

    /// Seconds a request body may take to arrive whole, counted from the end of its
    /// headers (image uploads follow UPLOAD_MIN_BYTES/UPLOAD_WINDOW instead); then the
    /// request fails with 408 and the connection is closed.
    #[arg(long, env = "BODY_READ_TIMEOUT", value_name = "BODY_READ_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_read_timeout: u64,

    /// Seconds a kept-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "KEEPALIVE_TIMEOUT", value_name = "KEEPALIVE_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive_timeout: u64,

    /// Most API connections open at once (lowered at startup when the descriptor limit
    /// would not leave room for the agent's own). At the cap a new connection makes the
    /// agent close the one idle longest; only when every connection has a request in
    /// progress is it refused (503).
    #[arg(long, env = "MAX_CONNECTIONS", value_name = "MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub max_connections: u64,

    /// Bytes an image upload (`POST /images/{name}`, a stream of any size, with no
    /// deadline) must deliver in every UPLOAD_WINDOW; a slower one fails (408) and leaves no
    /// partial image.
    #[arg(long, env = "UPLOAD_MIN_BYTES", value_name = "UPLOAD_MIN_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=1_073_741_824))]
    pub upload_min_bytes: u64,

    /// Seconds of the window UPLOAD_MIN_BYTES is counted over (time the agent itself
    /// spends storing the upload does not count).
    #[arg(long, env = "UPLOAD_WINDOW", value_name = "UPLOAD_WINDOW", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub upload_window: u64,

    /// Bridge the VMs sit on: DNAT'd connections leaving through it are masqueraded.
    #[arg(long, env = "VMS_BRIDGE", value_name = "VMS_BRIDGE", default_value = "virbr0", value_parser = parse_ifname)]
    pub vms_bridge: String,

    /// The VMs' subnet, as a network address (10.0.0.0/8, not 10.0.0.5/8): port-map targets
    /// must lie in it; its internet egress is masqueraded.
    #[arg(
        long,
        env = "VM_SUBNET",
        value_name = "VM_SUBNET",
        default_value = "192.168.122.0/24"
    )]
    pub vm_subnet: Ipv4Network,

    /// Interface for VM internet egress NAT; it must exist when the agent starts. Default:
    /// the interface of the IPv4 default route; without one, any interface but VMS_BRIDGE.
    #[arg(long, env = "EXTERNAL_IFACE", value_name = "EXTERNAL_IFACE", value_parser = parse_ifname)]
    pub external_iface: Option<String>,

    /// Extra networks (comma-separated CIDRs) that port maps may target besides VM_SUBNET.
    #[arg(
        long,
        env = "ALLOWED_TARGETS",
        value_name = "ALLOWED_TARGETS",
        value_delimiter = ','
    )]
    pub allowed_targets: Vec<Ipv4Network>,

    /// Listen ports (comma-separated) refused for port maps, in addition to 22,
    /// NODE_API_PORT and WG_LISTEN_PORT.
    #[arg(
        long,
        env = "RESERVED_PORTS",
        value_name = "RESERVED_PORTS",
        value_delimiter = ',',
        value_parser = parse_port
    )]
    pub reserved_ports: Vec<u16>,

    /// Seconds between two comparisons of the kernel with the database (drift repair).
    #[arg(
        long,
        env = "RECONCILE_INTERVAL",
        value_name = "RECONCILE_INTERVAL",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub reconcile_interval: u64,

    /// On shutdown, delete the agent's nftables table and its accept rule in libvirt's
    /// chains (default: keep them, so mapped traffic survives an agent restart).
    #[arg(long, env = "CLEANUP_ON_EXIT", value_name = "CLEANUP_ON_EXIT", default_value_t = false, action = clap::ArgAction::Set)]
    pub cleanup_on_exit: bool,

    /// Days the audit trail (audit_log, refused_requests) is kept; older rows are deleted
    /// in small batches every minute.
    #[arg(long, env = "AUDIT_RETENTION_DAYS", value_name = "AUDIT_RETENTION_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub audit_retention_days: u32,

    /// Most rows kept in each audit table; the oldest past it are deleted (about 200-500
    /// bytes a row).
    #[arg(long, env = "AUDIT_MAX_ROWS", value_name = "AUDIT_MAX_ROWS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000_000))]
    pub audit_max_rows: u64,

    /// Log format.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

impl Settings {
    /// The three join settings, when all are set; `None` when none is (standalone). One
    /// or two of them is an error: the operator meant to join and forgot something.
    pub fn join_settings(&self) -> Result<Option<JoinSettings<'_>>, SettingError> {
        match (&self.controller_url, &self.join_token, &self.node_id) {
            (Some(url), Some(token), Some(node_id)) => Ok(Some(JoinSettings {
                url,
                token,
                node_id,
            })),
            (None, None, None) => Ok(None),
            (url, token, node_id) => {
                let all = [
                    ("CONTROLLER_URL", url.is_some()),
                    ("JOIN_TOKEN", token.is_some()),
                    ("NODE_ID", node_id.is_some()),
                ];
                let names = |present: bool| -> Vec<&str> {
                    all.iter()
                        .filter(|(_, p)| *p == present)
                        .map(|(v, _)| *v)
                        .collect()
                };
                Err(SettingError::IncompleteJoin {
                    set: names_with_verb(&names(true)),
                    missing: names_with_verb(&names(false)),
                    set_names: names(true).join(" and "),
                })
            }
        }
    }
    /// The configured API token, from API_TOKEN or its alias.
    pub fn configured_token(&self) -> Option<&str> {
        self.api_token.as_deref().or(self.portmap_token.as_deref())
    }

    pub fn audit_retention(&self) -> crate::store::retention::Retention {
        crate::store::retention::Retention {
            max_age_days: self.audit_retention_days,
            max_rows: self.audit_max_rows,
        }
    }

    pub fn reconcile_every(&self) -> Duration {
        Duration::from_secs(self.reconcile_interval)
    }

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
    pub fn pool_dir(&self) -> &std::path::Path {
        self.vms_host_dir.as_deref().unwrap_or(&self.vms_work_dir)
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("agent.db")
    }
}

/// The settings of the mesh join, all three present.
#[derive(Clone, Copy, Debug)]
pub struct JoinSettings<'a> {
    pub url: &'a str,
    pub token: &'a str,
    pub node_id: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        s: Settings,
    }

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .map(|c| c.s)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_original_agent() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/data"));
        assert_eq!(s.node_api_port, 8000);
        assert_eq!(s.wg_iface, "wg0");
        assert_eq!(s.vms_bridge, "virbr0");
        assert_eq!(s.vm_subnet.to_string(), "192.168.122.0/24");
        assert_eq!(s.libvirt_uri, "qemu:///system");
        assert_eq!(s.vms_work_dir, PathBuf::from("/srv/vms"));
        assert_eq!(s.vms_network, "default");
        assert_eq!(s.vms_arch, "x86_64");
        assert_eq!(s.reconcile_interval, 30);
        assert!(!s.cleanup_on_exit);
        assert_eq!(s.wg_mode, WgMode::Auto);
        assert_eq!(s.wg_mtu, 1420);
        assert_eq!(s.wg_keepalive, 25);
        assert!(s.trust_controller_tunnel);
        assert_eq!(
            (
                s.header_read_timeout,
                s.body_read_timeout,
                s.keepalive_timeout
            ),
            (10, 30, 60)
        );
        assert_eq!(s.max_connections, 1024);
        assert_eq!((s.upload_min_bytes, s.upload_window), (65_536, 30));
        s.validate().unwrap();
        assert!(s.join_settings().unwrap().is_none());
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        let e = parse(&["--node-api-port", "70000"]).unwrap_err();
        assert!(e.contains("NODE_API_PORT") && e.contains("70000"), "{e}");
        let e = parse(&["--vm-subnet", "10.0.0.0/33"]).unwrap_err();
        assert!(e.contains("VM_SUBNET") && e.contains("10.0.0.0/33"), "{e}");
        let e = parse(&["--vms-bridge", "br/../x"]).unwrap_err();
        assert!(e.contains("VMS_BRIDGE"), "{e}");
        let e = parse(&["--reserved-ports", "80,0"]).unwrap_err();
        assert!(e.contains("RESERVED_PORTS"), "{e}");
        let e = parse(&["--reconcile-interval", "0"]).unwrap_err();
        assert!(e.contains("RECONCILE_INTERVAL"), "{e}");
    }

    #[test]
    fn connection_settings_are_bounded_and_named_when_wrong() {
        for (flag, bad) in [
            ("--header-read-timeout", "0"),
            ("--header-read-timeout", "301"),
            ("--body-read-timeout", "0"),
            ("--keepalive-timeout", "x"),
            ("--max-connections", "15"),
            ("--upload-min-bytes", "0"),
            ("--upload-window", "3601"),
        ] {
            let e = parse(&[flag, bad]).unwrap_err();
            let variable = flag
                .trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase();
            assert!(
                e.contains(&variable) && e.contains(bad),
                "{flag} {bad}: {e}"
            );
        }
        let s = parse(&["--max-connections", "4096", "--keepalive-timeout", "5"]).unwrap();
        assert_eq!((s.max_connections, s.keepalive_timeout), (4096, 5));
    }

    #[test]
    fn join_settings_are_all_or_nothing() {
        let s = parse(&["--controller-url", "http://c:5000", "--node-id", "n1"]).unwrap();
        let e = s.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "CONTROLLER_URL and NODE_ID are set but JOIN_TOKEN is not: joining the mesh needs \
             CONTROLLER_URL, JOIN_TOKEN and NODE_ID together; unset CONTROLLER_URL and NODE_ID \
             to run standalone"
        );
        let s = parse(&["--controller-url", "http://c:5000"]).unwrap();
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("CONTROLLER_URL is set but JOIN_TOKEN and NODE_ID are not:"),
            "{e}"
        );
        let s = parse(&[
            "--controller-url",
            "http://c:5000",
            "--node-id",
            "n1",
            "--join-token",
            "t",
        ])
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.join_settings().unwrap().unwrap().node_id, "n1");
        let s = parse(&[
            "--controller-url",
            "ftp://c",
            "--node-id",
            "n1",
            "--join-token",
            "t",
        ])
        .unwrap();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("CONTROLLER_URL")
        );
    }

    #[test]
    fn cross_checks_refuse_open_relays_and_weak_tokens() {
        let s = parse(&["--allowed-targets", "10.0.0.0/8,0.0.0.0/0"]).unwrap();
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("ALLOWED_TARGETS") && e.contains("0.0.0.0/0"),
            "{e}"
        );
        let s = parse(&["--api-token", "short"]).unwrap();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("API_TOKEN") && !e.contains("short"), "{e}");
        let s = parse(&["--vm-subnet", "0.0.0.0/0"]).unwrap();
        assert!(s.validate().is_err());
    }

    #[test]
    fn values_that_parse_but_cannot_work_are_refused_by_name() {
        let refused = |args: &[&str], variable: &str, says: &str| {
            let e = parse(args).unwrap().validate().unwrap_err().to_string();
            assert!(e.contains(variable) && e.contains(says), "{args:?}: {e}");
        };
        refused(
            &["--vm-subnet", "10.0.0.5/8"],
            "VM_SUBNET=\"10.0.0.5/8\"",
            "host bits are set; the network is 10.0.0.0/8",
        );
        refused(
            &["--allowed-targets", "10.1.2.3/16"],
            "ALLOWED_TARGETS",
            "the network is 10.1.0.0/16",
        );
        refused(
            &["--vms-work-dir", "relative/dir"],
            "VMS_WORK_DIR=\"relative/dir\"",
            "absolute path",
        );
        refused(&["--vms-host-dir", "pool"], "VMS_HOST_DIR", "absolute path");
        refused(
            &["--libvirt-uri", "banana"],
            "LIBVIRT_URI=\"banana\"",
            "not a libvirt URI",
        );
        refused(
            &["--libvirt-uri", "xen:///system"],
            "LIBVIRT_URI",
            "driver \"xen\"",
        );
        refused(
            &["--libvirt-uri", "qemu+carrier://h/system"],
            "LIBVIRT_URI",
            "transport \"carrier\"",
        );
        refused(
            &["--libvirt-uri", "qemu:///sytem"],
            "LIBVIRT_URI",
            "/system",
        );
        refused(&["--libvirt-uri", "qemu://"], "LIBVIRT_URI", "no path");
        for ok in [
            "qemu:///system",
            "qemu:///session",
            "qemu+ssh://root@node-7:2222/system?keyfile=/k",
            "qemu+tcp://10.77.3.2/system",
            "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
            "test:///default",
        ] {
            parse(&["--libvirt-uri", ok]).unwrap().validate().unwrap();
        }
        parse(&["--vm-subnet", "10.0.0.0/8"])
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn a_bad_port_in_a_list_says_which_value() {
        let e = parse(&["--reserved-ports", "80,abc"]).unwrap_err();
        assert!(
            e.contains("RESERVED_PORTS") && e.contains("\"abc\" is not a port number (1..65535)"),
            "{e}"
        );
        assert!(!e.contains("invalid digit"), "{e}");
        assert_eq!(
            parse(&["--reserved-ports", "80, 443"])
                .unwrap()
                .reserved_ports,
            [80, 443]
        );
    }
}
