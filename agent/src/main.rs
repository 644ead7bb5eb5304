//! `gantry-agent`: the daemon (`serve`) and the operator's CLI over its API socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gantry_agent::api::client::ApiClient;
use gantry_agent::api::{GuestInfoReport, PingReport, VmStatus};
use gantry_agent::cli::containers;
use gantry_agent::config::AgentConfig;

const DEFAULT_API_SOCKET: &str = "/run/gantry/agent.sock";

#[derive(Debug, Parser)]
#[command(
    name = "gantry-agent",
    version,
    about = "Gantry's agent on the offload card"
)]
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
    /// Run a container: pull and convert the image, map its layers, create, start, stream the
    /// output, and exit with the container's code.
    Run(containers::RunArgs),
    /// List containers.
    Ps(containers::PsArgs),
    /// Print a container's output.
    Logs(containers::LogsArgs),
    /// Run a command in a running container.
    Exec(containers::ExecArgs),
    /// Send a signal to a container.
    Kill(containers::KillArgs),
    /// Remove containers.
    Rm(containers::RmArgs),
    /// Show a container's resource usage.
    Stats(containers::StatsArgs),
    /// List the images in the agent's cache.
    Images {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Work with image files (no agent needed).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Pull an image into the card's cache (works with or without a running agent).
    Pull(gantry_agent::cache::cli::PullArgs),
    /// Remove an image from the cache (layers other images or running containers use stay).
    Rmi(gantry_agent::cache::cli::RmiArgs),
    /// Maintain the cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Remove leftovers of interrupted work and enforce the size budget.
    Gc(gantry_agent::cache::cli::GcArgs),
    /// List the images in a cache directory (without asking an agent).
    Images(gantry_agent::cache::cli::ImagesArgs),
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Convert an OCI layer (tar, tar+gzip, tar+zstd) into an EROFS image.
    ConvertLayer(gantry_agent::image::cli::ConvertLayerArgs),
    /// Write the embedded default image (busybox) as an OCI layout.
    BuildDefault {
        /// The layout directory to create.
        #[arg(long)]
        output: PathBuf,
        /// The busybox binary to put in it.
        #[arg(long, default_value = gantry_agent::image::builder::DEFAULT_BUSYBOX)]
        busybox: PathBuf,
    },
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
    /// What the guest holds for containers: layer mounts, loop devices, overlays, cgroups.
    Resources {
        /// The VM's name.
        vm: String,
    },
    /// Check that the shim survives a garbage frame on a second connection.
    Probe {
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
    let client = ApiClient::new(
        cli.api_socket
            .as_deref()
            .unwrap_or(DEFAULT_API_SOCKET.as_ref()),
    );
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
                println!(
                    "shim ready at:  {:.3} s after kernel start",
                    guest.shim_ready_uptime_ms as f64 / 1000.0
                );
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
                println!(
                    "{:<16} {:>6} {:<10} {:>9} {:>14}  SHIM",
                    "NAME", "CID", "STATE", "SESSIONS", "BOOT→READY"
                );
                for vm in vms {
                    println!(
                        "{:<16} {:>6} {:<10} {:>9} {:>14}  {}",
                        vm.name,
                        vm.guest_cid,
                        if vm.connected { "connected" } else { "waiting" },
                        vm.sessions,
                        vm.boot_to_ready_ms
                            .map(|ms| format!("{ms} ms"))
                            .unwrap_or_else(|| "-".into()),
                        vm.shim_version.unwrap_or_else(|| "-".into()),
                    );
                }
            }
        }
        Command::Vm(VmCommand::Restart { vm }) => {
            let _: serde_json::Value = client.post(&format!("/v1/vms/{vm}/restart")).await?;
            println!("{vm}: restarting");
        }
        Command::Vm(VmCommand::Resources { vm }) => {
            let resources: serde_json::Value =
                client.get(&format!("/v1/vms/{vm}/resources")).await?;
            println!("{}", serde_json::to_string_pretty(&resources)?);
        }
        Command::Vm(VmCommand::Probe { vm }) => {
            let answer: serde_json::Value = client.post(&format!("/v1/vms/{vm}/probe")).await?;
            println!(
                "the shim closed the probe connection: {}",
                answer["goodbye"]
            );
        }
        Command::Run(args) => return containers::run(&client, args).await,
        Command::Ps(args) => return containers::ps(&client, args).await,
        Command::Logs(args) => return containers::logs(&client, args).await,
        Command::Exec(args) => return containers::exec(&client, args).await,
        Command::Kill(args) => return containers::kill(&client, args).await,
        Command::Rm(args) => return containers::rm(&client, args).await,
        Command::Stats(args) => return containers::stats(&client, args).await,
        Command::Images { json } => return containers::images(&client, json).await,
        Command::Pull(args) => gantry_agent::cache::cli::run_pull(&args).await?,
        Command::Rmi(args) => gantry_agent::cache::cli::run_rmi(&args).await?,
        Command::Cache(CacheCommand::Gc(args)) => gantry_agent::cache::cli::run_gc(&args).await?,
        Command::Cache(CacheCommand::Images(args)) => {
            gantry_agent::cache::cli::run_images(&args).await?
        }
        Command::Image(ImageCommand::ConvertLayer(args)) => {
            gantry_agent::image::cli::run_convert_layer(&args)?;
        }
        Command::Image(ImageCommand::BuildDefault { output, busybox }) => {
            let digest = gantry_agent::image::builder::write_image(
                &output,
                gantry_agent::image::builder::DEFAULT_IMAGE_NAME,
                &[gantry_agent::image::builder::busybox_layer(&busybox)?],
                &gantry_agent::image::builder::default_image_config(),
            )?;
            println!("{} {digest}", output.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
