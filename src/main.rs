//! `node-vm-agent`: the command line.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use node_vm_agent::agent;
use node_vm_agent::config::{ConsoleArgs, DiffSettings, Settings};
use node_vm_agent::net::nft::NatSettings;
use node_vm_agent::portmap::{NftFirewall, Policy, PortMaps};

/// Edge-node agent: joins the WireGuard mesh, runs libvirt VMs, maps node ports to them
/// with one nftables table, and keeps its state in SQLite behind an authenticated REST API.
#[derive(Parser)]
#[command(version = node_vm_agent::metrics::VERSION_LINE, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the API, the mesh join, the VMs and the port maps).
    ///
    /// It first rebuilds the kernel state from SQLite ($DATA_DIR/agent.db), then serves
    /// the API and repairs drift every RECONCILE_INTERVAL seconds, until SIGTERM or
    /// SIGINT. It refuses to start (exit status 2, nothing changed) while another agent
    /// serves this network namespace or DATA_DIR. Under systemd (NOTIFY_SOCKET) it sends
    /// READY=1 once the port maps are in the kernel and the API listens, and pings the
    /// watchdog (WATCHDOG_USEC). Every setting is an environment variable and a flag;
    /// docs/configuration.md has the same list.
    Serve(Settings),
    /// Print what differs between the database and the kernel's table, changing nothing.
    ///
    /// It may run beside a serving agent, and reads the same environment as `serve`;
    /// the settings below are those it uses. Exit status 0: in sync; 1: drift found;
    /// 2: error.
    Diff(DiffSettings),
    /// Attach this terminal to a VM's serial console, through this node's API.
    ///
    /// Raw bytes both ways; `Ctrl-]` detaches, and the terminal is restored on every
    /// way out. The API is reached at API_LISTEN (loopback when it listens on all
    /// addresses) and NODE_API_PORT, with API_TOKEN, else $DATA_DIR/api.token. One
    /// session per VM: `--force` takes the console over from the one that holds it.
    /// Exit status 0 once attached and ended; 1 when refused (the agent's message on
    /// stderr); 2 on another error.
    Console(ConsoleArgs),
}

fn main() -> ExitCode {
    node_vm_agent::memory::unmap_large_allocations();
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve(s) | Command::Diff(DiffSettings(s)) => s.log_format,
        // Only errors, on stderr: the terminal is the console's.
        Command::Console(_) => node_vm_agent::config::LogFormat::Text,
    };
    node_vm_agent::logging::init(log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fatal(&format!("cannot start the async runtime: {e}")),
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(s) => agent::run(s).await.map(|()| ExitCode::SUCCESS),
            Command::Diff(DiffSettings(s)) => diff(s).await,
            Command::Console(args) => Ok(console(args).await),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => fatal(&e.to_string()),
    }
}

/// A fatal error, said once: in the log (text or JSON), or on stderr when the log
/// filter hides errors.
fn fatal(message: &str) -> ExitCode {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!(error = %message, "node-vm-agent stopped");
    } else {
        eprintln!("node-vm-agent: {message}");
    }
    ExitCode::from(2)
}

async fn console(args: ConsoleArgs) -> ExitCode {
    use node_vm_agent::agent::console_cli::{self, ConsoleCliError};
    match console_cli::run(args).await {
        Ok(code) => code,
        Err(e @ ConsoleCliError::Refused { .. }) => {
            eprintln!("node-vm-agent console: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("node-vm-agent console: {e}");
            ExitCode::from(2)
        }
    }
}

async fn diff(s: Settings) -> Result<ExitCode, agent::AgentError> {
    node_vm_agent::preflight::diff(&s)?;
    let store = agent::open_state(&s)?;
    let nat = NatSettings::from_settings(&s.portmaps, &s.mesh);
    let fw = NftFirewall::from_settings_readonly(nat).await?;
    let pm = PortMaps::new(store, Arc::new(fw), Policy::from_settings(&s));
    let lines = pm.drift().await.map_err(agent::AgentError::PortMaps)?;
    if lines.is_empty() {
        println!("in sync");
        Ok(ExitCode::SUCCESS)
    } else {
        for l in &lines {
            println!("{l}");
        }
        Ok(ExitCode::from(1))
    }
}
