//! `gantry-agent`: the daemon (`serve`) and the operator's CLI over its API socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gantry_agent::api::client::ApiClient;
use gantry_agent::api::{GuestInfoReport, PingReport, VmStatus};
use gantry_agent::config::AgentConfig;

const DEFAULT_API_SOCKET: &str = "/run/gantry/agent.sock";

#[derive(Debug, Parser)]
#[command(name = "gantry-agent", version, about = "Gantry's agent on the offload card")]
struct Cli {
    /// The agent's operator API socket [default: the config file's for `serve`, else
    /// /run/gantry/agent.sock].
    #[arg(long, global = true, env = "GANTRY_API_SOCKET")]
    api_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: attach the configured VMs and serve the operator API.
    Serve {
        /// The agent's configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show what the shim in a VM reports about its guest.
    GuestInfo {
        /// The VM's name.
        vm: String,
        /// Wait this many seconds for the shim to connect (e.g. while the guest boots).
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Measure the round trip to a VM's shim.
    Ping {
        /// The VM's name.
        vm: String,
        /// How many pings.
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// Payload bytes per ping.
        #[arg(long, default_value_t = 0)]
        size: usize,
    },
    /// Manage VMs.
    #[command(subcommand)]
    Vm(VmCommand),
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// List the VMs this agent serves.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Kill a VM's QEMU and boot it again (VMs the agent launched).
    Restart {
        /// The VM's name.
        vm: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = ApiClient::new(cli.api_socket.as_deref().unwrap_or(DEFAULT_API_SOCKET.as_ref()));
    match cli.command {
        Command::Serve { config } => {
            let mut config = AgentConfig::load(&config)?;
            if let Some(socket) = cli.api_socket {
                config.api_socket = socket;
            }
            gantry_agent::daemon::run(config).await?;
        }
        Command::GuestInfo { vm, wait, json } => {
            let wait_ms = Duration::try_from_secs_f64(wait)
                .context("--wait takes a number of seconds")?
                .as_millis();
            let report: GuestInfoReport = client
                .get(&format!("/v1/vms/{vm}/guest-info?wait_ms={wait_ms}"))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let guest = &report.guest;
                println!("vm:             {}", report.vm);
                println!("kernel:         {}", guest.kernel_release);
                println!("cpus:           {}", guest.cpus);
                println!("memory:         {} MiB", guest.memory_total_bytes >> 20);
                println!("shim:           {}", guest.shim_version);
                println!("uptime:         {:.3} s", guest.uptime_ms as f64 / 1000.0);
                println!("shim ready at:  {:.3} s after kernel start", guest.shim_ready_uptime_ms as f64 / 1000.0);
                println!("round trip:     {} µs", report.round_trip_us);
            }
        }
        Command::Ping { vm, count, size } => {
            let report: PingReport = client
                .post(&format!("/v1/vms/{vm}/ping?count={count}&size={size}"))
                .await?;
            let mut sorted = report.round_trips_us.clone();
            sorted.sort_unstable();
            anyhow::ensure!(!sorted.is_empty(), "the agent returned no round trips");
            let percentile = |p: usize| sorted[(sorted.len() - 1) * p / 100];
            println!(
                "{} pings of {} bytes to {}: min {} µs, p50 {} µs, p95 {} µs, max {} µs",
                sorted.len(),
                size,
                report.vm,
                sorted[0],
                percentile(50),
                percentile(95),
                sorted[sorted.len() - 1]
            );
        }
        Command::Vm(VmCommand::Ls { json }) => {
            let vms: Vec<VmStatus> = client.get("/v1/vms").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                println!("{:<16} {:>6} {:<10} {:>9} {:>14}  SHIM", "NAME", "CID", "STATE", "SESSIONS", "BOOT→READY");
                for vm in vms {
                    println!(
                        "{:<16} {:>6} {:<10} {:>9} {:>14}  {}",
                        vm.name,
                        vm.guest_cid,
                        if vm.connected { "connected" } else { "waiting" },
                        vm.sessions,
                        vm.boot_to_ready_ms.map(|ms| format!("{ms} ms")).unwrap_or_else(|| "-".into()),
                        vm.shim_version.unwrap_or_else(|| "-".into()),
                    );
                }
            }
        }
        Command::Vm(VmCommand::Restart { vm }) => {
            let _: serde_json::Value = client.post(&format!("/v1/vms/{vm}/restart")).await?;
            println!("{vm}: restarting");
        }
    }
    Ok(ExitCode::SUCCESS)
}
