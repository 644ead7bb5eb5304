//! The operator CLI: the command tree and every command but `serve`'s daemon, each a thin layer
//! over the API client or, for the cache, over the cache directory itself. `main.rs` only parses
//! and calls [`run`].
//!
//! - [`containers`]: `run`, `ps`, `logs`, `exec`, `kill`, `rm`, `stats`, `images` over the API.
//! - [`vms`]: `guest-info`, `ping`, `vm …` over the API.
//! - [`cache`]: `pull`, `images`, `rmi`, `cache gc` on a cache directory (no agent needed).
//! - [`image`]: `image convert`, `image convert-layer`, `image build-default` (no agent needed).
//! - [`manifest`]: `manifest apply`, `manifest status` over the API.
//! - [`progress`]: how `run` and `image convert` show their progress (live on a terminal, plain
//!   lines otherwise).

pub mod cache;
pub mod containers;
pub mod image;
pub mod interactive;
pub mod manifest;
pub mod progress;
pub mod vms;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gantry_api::{API_SOCKET_ENV, ApiClient, DEFAULT_API_SOCKET};

use crate::config::AgentConfig;
use crate::images::default_image::DEFAULT_BUSYBOX;
pub use crate::units::{SizeError, parse_limit, parse_size};

/// `gantry-agent`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "gantry-agent",
    version,
    about = "Gantry's agent on the offload card"
)]
pub struct Cli {
    /// The agent's operator API socket [default: the config file's for `serve`, else
    /// /run/gantry/agent.sock].
    #[arg(long, global = true, env = API_SOCKET_ENV)]
    pub api_socket: Option<PathBuf>,
    /// How the log on standard error is written: text for a person, json (one object per
    /// line, with the spans it happened in) for a log collector.
    #[arg(
        long,
        global = true,
        env = "GANTRY_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How the log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for a person.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach the configured VMs and serve the operator API.
    Serve {
        /// The agent's configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// A cluster manifest to put in force at start (TOML; refused whole if malformed).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Check the config (and manifest) as a start would, say what it found, and exit:
        /// nothing is bound, created or started.
        #[arg(long)]
        check: bool,
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
    /// A VM's keeper (started by the agent, one per VM): its vsock device and its QEMU's
    /// parent, outliving agent restarts.
    #[command(hide = true)]
    VmKeeper {
        /// The keeper's `keeper.json`.
        #[arg(long)]
        config: PathBuf,
    },
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
    Pull(cache::PullArgs),
    /// Have the agent bring an image into its cache without running it (lazy-format layers
    /// as `--pull-mode` says).
    Prefetch(containers::PrefetchArgs),
    /// Remove an image from the cache (layers other images or running containers use stay).
    Rmi(cache::RmiArgs),
    /// Maintain the cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// The cluster manifest: what the agent prefetches for the cluster.
    #[command(subcommand)]
    Manifest(ManifestCommand),
}

/// `manifest …`.
#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Put a cluster manifest (TOML) in force; a malformed one is refused whole with its line
    /// and reason, and the one in force stays.
    Apply {
        /// The manifest file.
        file: PathBuf,
    },
    /// Show the manifest in force: per image its resolution, state and present chunks.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Follow the prefetch until every image is settled (live bars on a terminal, a line
        /// per change otherwise).
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
}

/// `cache …`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Remove leftovers of interrupted work and enforce the size budget.
    Gc(cache::GcArgs),
    /// List the images in a cache directory (without asking an agent).
    Images(cache::ImagesArgs),
    /// Write cached images into a bundle (an OCI image layout, lazy-format layers, startup
    /// traces as artifacts) for another card's `cache import`.
    Export(cache::ExportArgs),
    /// Load a bundle into the cache before any VM asks, every blob and chunk checked.
    Import(cache::ImportArgs),
}

/// `image …`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Convert an image (every layer: tar, tar+gzip, tar+zstd) into the lazy EROFS format
    /// (erofs-image-spec v1) and push it to a registry or write it into an OCI layout.
    Convert(image::ConvertArgs),
    /// Convert an OCI layer (tar, tar+gzip, tar+zstd) into an EROFS image.
    ConvertLayer(image::ConvertLayerArgs),
    /// Show the startup trace the cache holds for an image (the chunks its first lazy start
    /// read, replayed as the first prefetch of later cold starts).
    Trace(cache::TraceArgs),
    /// Write the embedded default image (busybox) as an OCI layout.
    BuildDefault {
        /// The layout directory to create.
        #[arg(long)]
        output: PathBuf,
        /// The busybox binary to put in it.
        #[arg(long, default_value = DEFAULT_BUSYBOX)]
        busybox: PathBuf,
    },
}

/// `vm …`.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List the VMs this agent serves.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Attach a VM at run time: the agent becomes its devices (and, with --launch, starts its
    /// QEMU from agent.toml's [vm_template]) until `vm detach`, across its own restarts.
    Attach {
        /// The VM's name.
        vm: String,
        /// The guest's vsock context id (3 or more, unique on the card).
        #[arg(long)]
        cid: u64,
        /// Start QEMU from the config's [vm_template].
        #[arg(long)]
        launch: bool,
        /// Where the vsock device listens (default: in the VM's state directory).
        #[arg(long)]
        vsock_socket: Option<String>,
        /// Where the layer store listens (default: in the VM's state directory).
        #[arg(long)]
        layer_socket: Option<String>,
        /// Guest memory in MiB instead of the template's (with --launch).
        #[arg(long)]
        memory_mib: Option<u32>,
        /// Guest CPUs instead of the template's (with --launch).
        #[arg(long)]
        cpus: Option<u32>,
    },
    /// Detach a VM attached at run time: stop its QEMU (if launched), unmap and unpin its
    /// layers, and remove its state (container records and logs included).
    Detach {
        /// The VM's name.
        vm: String,
    },
    /// Kill a VM's QEMU and boot it again (VMs the agent launched).
    Restart {
        /// The VM's name.
        vm: String,
    },
    /// Stop a VM the agent launched (VMs keep running when the agent exits or restarts).
    Stop {
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

/// Runs one command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = ApiClient::new(
        cli.api_socket
            .as_deref()
            .unwrap_or(DEFAULT_API_SOCKET.as_ref()),
    );
    match cli.command {
        Command::Serve {
            config: path,
            manifest,
            check,
        } => {
            let mut config = AgentConfig::load(&path)?;
            if let Some(socket) = cli.api_socket {
                config.api_socket = socket;
            }
            let manifest = manifest.map(|path| manifest::load(&path)).transpose()?;
            if check {
                let report = crate::daemon::check(&config, manifest.as_ref())?;
                println!("{}: the agent would start with it", path.display());
                for line in report.lines {
                    println!("  {line}");
                }
                for warning in report.warnings {
                    println!("  warning: {warning}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            crate::daemon::run(config, manifest).await?;
        }
        Command::Manifest(ManifestCommand::Apply { file }) => {
            manifest::apply(&client, &file).await?
        }
        Command::Manifest(ManifestCommand::Status { json, watch }) => {
            if watch {
                manifest::watch(&client).await?;
            } else {
                manifest::status(&client, json).await?;
            }
        }
        Command::GuestInfo { vm, wait, json } => vms::guest_info(&client, &vm, wait, json).await?,
        Command::Ping { vm, count, size } => vms::ping(&client, &vm, count, size).await?,
        Command::Vm(command) => vms::run(&client, command).await?,
        Command::VmKeeper { config } => crate::keeper::serve::run(&config).await?,
        Command::Run(args) => return containers::run(&client, args).await,
        Command::Ps(args) => return containers::ps(&client, args).await,
        Command::Logs(args) => return containers::logs(&client, args).await,
        Command::Exec(args) => return containers::exec(&client, args).await,
        Command::Kill(args) => return containers::kill(&client, args).await,
        Command::Rm(args) => return containers::rm(&client, args).await,
        Command::Stats(args) => return containers::stats(&client, args).await,
        Command::Images { json } => return containers::images(&client, json).await,
        Command::Prefetch(args) => containers::prefetch(&client, args).await?,
        Command::Pull(args) => cache::run_pull(&args).await?,
        Command::Rmi(args) => cache::run_rmi(&args).await?,
        Command::Cache(CacheCommand::Gc(args)) => cache::run_gc(&args).await?,
        Command::Cache(CacheCommand::Images(args)) => cache::run_images(&args).await?,
        Command::Cache(CacheCommand::Export(args)) => cache::run_export(&args).await?,
        Command::Cache(CacheCommand::Import(args)) => cache::run_import(&args).await?,
        Command::Image(ImageCommand::Convert(args)) => image::run_convert(&args).await?,
        Command::Image(ImageCommand::ConvertLayer(args)) => {
            image::run_convert_layer(&args)?;
        }
        Command::Image(ImageCommand::Trace(args)) => cache::run_trace(&args).await?,
        Command::Image(ImageCommand::BuildDefault { output, busybox }) => {
            image::run_build_default(&output, &busybox)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("512kb"), Ok(512 << 10));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "m", "G", "-1m", "1X", "99999999999T", "99999999999g"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_refuse_zero() {
        assert_eq!(parse_limit("1G"), Ok(1 << 30));
        let err = parse_limit("0").unwrap_err();
        assert!(err.to_string().contains("more than zero"), "{err}");
    }
}
