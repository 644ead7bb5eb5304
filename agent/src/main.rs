//! `gantry-agent`: the daemon (`serve`) and the operator's CLI over its API socket. The command
//! tree and the commands are in `gantry_agent::cli`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use gantry_agent::cli::{self, Cli, Command, LogFormat};
use tracing_subscriber::fmt::format::FmtSpan;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // A command whose output goes to `head` should end quietly when the pipe closes, as
        // Unix tools do, not panic in `println!`. The daemon keeps ignoring SIGPIPE: a client
        // that hangs up must never kill it.
        // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log on standard error, filtered by `RUST_LOG` (default `info`). Each span's end is logged
/// with its duration, so a `run`'s phases (pull, map, create, start, first output) show how long
/// each took.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::CLOSE);
    match format {
        // Colour only for a person at a terminal, never into log files.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}
