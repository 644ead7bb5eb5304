//! gantry-shim: the thin in-guest half of Gantry.
//!
//! As the initramfs' `/init` (PID 1) it mounts the basic file systems, loads the kernel modules
//! listed in the initramfs, reaps orphans and never exits: when the server dies it powers the VM
//! off. Under another init it only serves. Either way it listens on vsock for the agent.

mod container;
mod guest_info;
mod init;
mod modules;
mod reaper;
mod server;
mod storage;
mod switch_root;

use std::path::Path;
use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// Environment variable holding the log filter (`tracing` syntax). As PID 1 it can be set on
/// the kernel command line (`GANTRY_SHIM_LOG=debug`): the kernel passes unknown `key=value`
/// words to init's environment.
const LOG_ENV: &str = "GANTRY_SHIM_LOG";

fn main() {
    // The container helper is this same binary, re-executed: it must not start logging, threads
    // or anything else before it forks (see container::nsinit).
    match std::env::args_os().nth(1) {
        Some(arg) if arg == container::nsinit::INIT_ARG => container::nsinit::run_init(),
        Some(arg) if arg == container::nsinit::EXEC_ARG => container::nsinit::run_exec(),
        _ => {}
    }
    let pid1 = init::is_pid1();
    // Containers need pivot_root, which the initramfs cannot give: move onto a tmpfs first.
    if pid1 && switch_root::needed() {
        let error = switch_root::switch_to_tmpfs();
        // Logging is not up yet; the kernel console is stderr (or nothing at all).
        eprintln!("gantry-shim: staying on the initramfs, switching root failed: {error}");
    }
    // As PID 1 the mounts come first: /dev/console may only exist once devtmpfs is mounted, and
    // logging needs the console. Errors are logged as soon as logging works.
    let mount_result = pid1.then(init::mount_early_filesystems);
    if pid1 {
        init::ensure_console();
    }
    init_logging();
    // Panics go to the log (the console), like everything else. A panic in one connection's task
    // only ends that task; a panic on the main path is caught below.
    std::panic::set_hook(Box::new(|info| tracing::error!(%info, "panic")));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), pid1, "starting");

    if let Some(Err(error)) = mount_result {
        tracing::error!(%error, "early mounts failed; continuing with what is mounted");
    }
    if pid1 {
        load_modules();
    }

    match std::panic::catch_unwind(|| run_server(pid1)) {
        Ok(Ok(never)) => match never {},
        Ok(Err(error)) => tracing::error!(%error, "gantry-shim server stopped"),
        Err(_) => tracing::error!("gantry-shim server panicked"),
    }
    if pid1 {
        // PID 1 must not exit (the kernel would panic): power off so that QEMU exits.
        tracing::error!("powering off");
        init::power_off();
    }
    std::process::exit(1);
}

fn init_logging() {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_timer(BootClock)
        .init();
}

/// Log timestamps in the kernel's format and clock (time since boot), so that shim lines and
/// kernel lines on the console read as one timeline.
struct BootClock;

impl FormatTime for BootClock {
    fn format_time(&self, writer: &mut Writer<'_>) -> std::fmt::Result {
        let since_boot = clock_gettime(ClockId::CLOCK_BOOTTIME)
            .map(Duration::from)
            .unwrap_or_default();
        write!(
            writer,
            "[{:5}.{:06}] gantry-shim",
            since_boot.as_secs(),
            since_boot.subsec_micros()
        )
    }
}

fn load_modules() {
    let started = Instant::now();
    let modules_dir = modules::running_kernel_modules_dir();
    match modules::load_listed_modules(Path::new(modules::MODULE_LIST_PATH), &modules_dir) {
        Ok(report) => {
            let failed = report.failed();
            if failed.is_empty() {
                tracing::info!(
                    count = report.outcomes.len(),
                    elapsed_ms = started.elapsed().as_millis(),
                    "kernel modules loaded"
                );
            } else {
                tracing::error!(?failed, "some kernel modules failed to load");
            }
        }
        Err(error) => tracing::error!(%error, "kernel modules not loaded"),
    }
}

/// Where containers' cgroups go, prepared. A failure is logged and the shim serves anyway: the
/// agent then sees each container creation fail with the reason, and can still ask the guest
/// what is wrong.
fn container_cgroups(pid1: bool) -> container::cgroup::CgroupTree {
    use container::cgroup::CgroupTree;
    let tree = CgroupTree::for_this_process(pid1).unwrap_or_else(|error| {
        tracing::error!(%error, "cannot tell this process's cgroup; using the whole hierarchy");
        CgroupTree::whole_hierarchy()
    });
    match tree.prepare() {
        Ok(()) => tracing::info!(parent = %tree.parent().display(), "container cgroups"),
        Err(error) => tracing::error!(%error, "container cgroups not prepared"),
    }
    tree
}

/// Runs the vsock server on a Tokio runtime; returns only if it fails.
fn run_server(pid1: bool) -> Result<std::convert::Infallible, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gantry-shim")
        .build()?;
    runtime.block_on(async {
        let reaper = reaper::Reaper::start(pid1)?;
        let runtime = container::Runtime::new(reaper, container_cgroups(pid1));
        let never = server::run(server::ServerConfig::default(), runtime).await?;
        Ok(never)
    })
}
