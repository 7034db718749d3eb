//! Every setting of the agent: environment variable, flag and default, one group per
//! concern (`state`, `api`, `mesh`, `vms`, `portmaps`), flattened into [`Settings`];
//! their validation is in `check`. The settings are plain data and import nothing of
//! the agent but `model`: each subsystem turns its group into its own configuration
//! (`VmConfig::from(&VmSettings)`, `Policy::from_settings`, `NatSettings::from_settings`,
//! `api::server::Limits::from_settings`, `Retention::from_settings`). Names and defaults
//! of the original agent's variables are kept as they were.

use std::time::Duration;

use clap::{Args, ValueEnum};

mod api;
mod check;
mod error;
mod mesh;
mod portmaps;
#[cfg(test)]
mod reference;
mod state;
#[cfg(test)]
mod tests;
mod values;
mod vms;

pub use api::ApiSettings;
pub use error::SettingError;
pub use mesh::{JoinSettings, MeshSettings, WgMode};
pub use portmaps::PortMapSettings;
pub use state::StateSettings;
pub use values::check_libvirt_uri;
pub use vms::{DEFAULT_LIBVIRT_KEEPALIVE_S, VmSettings};
// The value parsers of names: each rule is the domain type's (`model`), written once.
use crate::model::iface::check_ifname as parse_ifname;
use crate::model::name::check_name as parse_name;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of `node-vm-agent serve` (and of the commands that read the same state).
#[derive(Args, Clone, Debug)]
pub struct Settings {
    #[command(flatten, next_help_heading = "State and audit")]
    pub state: StateSettings,

    #[command(flatten, next_help_heading = "REST API")]
    pub api: ApiSettings,

    #[command(flatten, next_help_heading = "Mesh (WireGuard)")]
    pub mesh: MeshSettings,

    #[command(flatten, next_help_heading = "VMs (libvirt)")]
    pub vms: VmSettings,

    #[command(flatten, next_help_heading = "Port maps and NAT")]
    pub portmaps: PortMapSettings,

    /// Seconds between two drift checks of the kernel and libvirt against the database.
    ///
    /// 1..86400. Each pass compares the nftables table, the accept in libvirt's chain
    /// and the VMs with SQLite and repairs what differs (someone flushed the table,
    /// libvirt re-created its reject rules, a domain was undefined by hand).
    #[arg(
        help_heading = "Agent",
        long,
        env = "RECONCILE_INTERVAL",
        value_name = "RECONCILE_INTERVAL",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub reconcile_interval: u64,

    /// Format of the log on stderr.
    ///
    /// Text is coloured only on a terminal, and not when NO_COLOR is set. The level is
    /// set with RUST_LOG (default `info`).
    #[arg(
        help_heading = "Agent",
        long,
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

impl Settings {
    /// How often the port maps (and the VMs) are compared with the world and repaired.
    pub fn reconcile_every(&self) -> Duration {
        Duration::from_secs(self.reconcile_interval)
    }
}

/// Settings of `node-vm-agent console`: the VM, and where this node's API and its token
/// are (the same environment as `serve`).
#[derive(Args, Clone, Debug)]
pub struct ConsoleArgs {
    /// The VM whose serial console to attach to.
    pub name: String,
    /// Take the console over from the session (or `virsh console`) that holds it.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub api: ApiSettings,
    #[command(flatten)]
    pub state: StateSettings,
}

/// The settings `node-vm-agent diff` uses: those that decide the port maps' table and
/// where the database is. `diff` parses the same environment as `serve` (one
/// `/etc/default` file serves both) but lists only these in its `--help`.
const DIFF_READS: &[&str] = &[
    "data_dir",
    "node_api_port",
    "wg_iface",
    "wg_listen_port",
    "vms_bridge",
    "vm_subnet",
    "external_iface",
    "allowed_targets",
    "reserved_ports",
    "log_format",
];

/// Settings of `node-vm-agent diff`: [`Settings`], with the help limited to
/// [`DIFF_READS`].
#[derive(Clone, Debug)]
pub struct DiffSettings(pub Settings);

impl DiffSettings {
    fn limit_help(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            let shown = DIFF_READS.contains(&a.get_id().as_str());
            a.hide(!shown)
        })
    }
}

impl clap::FromArgMatches for DiffSettings {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        <Settings as clap::FromArgMatches>::from_arg_matches(m).map(Self)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }
}

impl Args for DiffSettings {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        Self::limit_help(Settings::augment_args(cmd))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::limit_help(Settings::augment_args_for_update(cmd))
    }
}
