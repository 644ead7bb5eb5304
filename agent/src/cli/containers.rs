//! `run`, `ps`, `logs`, `exec`, `kill`, `rm`, `stats`, `images`: docker-shaped commands over the
//! agent's API.

use std::io::Write;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use gantry_api::ContainerState;
use gantry_api::records::{ExitRecord, LogItem};
use gantry_api::stream::BodyStream;
use gantry_api::{ApiClient, ContainerView, ExecRequest, RunOptions, RunUpdate, VmStatus};
use gantry_proto::{ExitStatus, OutputStream};
use hyper::Method;

use super::progress::RunDisplay;
use super::{interactive, parse_limit};

/// Which VM (optional when the agent serves exactly one).
#[derive(Debug, Clone, Args)]
pub struct VmArg {
    /// The VM; may be left out when the agent serves only one.
    #[arg(long)]
    pub vm: Option<String>,
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArg,
    /// Name the container (default: generated).
    #[arg(long)]
    name: Option<String>,
    /// Remove the container when it exits.
    #[arg(long, conflicts_with = "detach")]
    rm: bool,
    /// Start the container and print its name instead of following its output.
    #[arg(short, long)]
    detach: bool,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Memory limit, e.g. 256m.
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit as a fraction of one CPU, e.g. 0.5.
    #[arg(long)]
    cpus: Option<f64>,
    /// Limit on the number of processes.
    #[arg(long)]
    pids_limit: Option<u64>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// User (name, uid, name:group or uid:gid).
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Replace the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Host name inside the container.
    #[arg(long)]
    hostname: Option<String>,
    /// Size of the writable layer, e.g. 64m (default 256m).
    #[arg(long)]
    writable_layer: Option<String>,
    /// How lazy-format layers come in: `lazy` (only what the container reads), `fill` (and
    /// the rest in the background), `eager` (everything before the start). Default: the
    /// agent's `lazy.mode`.
    #[arg(long, value_name = "lazy|fill|eager")]
    pull_mode: Option<gantry_api::PullMode>,
    /// Print no progress.
    #[arg(short, long)]
    quiet: bool,
    /// Print the time from `run` to the first output and to the exit on stderr.
    #[arg(long)]
    timing: bool,
    #[command(flatten)]
    interactive: InteractiveArgs,
    /// The image: `default`, `oci:DIR[:NAME]`, or a registry reference.
    image: String,
    /// The command (replaces the image's Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// The VM to use: the one named, or the only one.
pub async fn resolve_vm(client: &ApiClient, vm: &VmArg) -> anyhow::Result<String> {
    if let Some(vm) = &vm.vm {
        return Ok(vm.clone());
    }
    let vms: Vec<VmStatus> = client.get("/v1/vms").await?;
    match vms.as_slice() {
        [only] => Ok(only.name.clone()),
        [] => bail!("the agent serves no VM"),
        many => bail!(
            "the agent serves several VMs ({}): choose one with --vm",
            many.iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The exit code a shell would give for a container's exit (code, or 128 + signal).
fn exit_code(record: &ExitRecord) -> ExitCode {
    ExitCode::from((record.shell_code() & 0xff) as u8)
}

/// When the first output arrived, and what the lazy fetcher had fetched by then.
#[derive(Debug, Default)]
struct FirstOutput {
    /// Time from the start of the command to the first output.
    at: Option<Duration>,
    /// Ask the agent for its lazy counters at the first output.
    want_lazy: bool,
    lazy: Option<gantry_api::LazyStats>,
}

/// Streams a process's output to this terminal until it exits; returns how it ended.
async fn follow(
    client: &ApiClient,
    vm: &str,
    id: &str,
    exec: Option<&str>,
    first_output: &mut FirstOutput,
    started: Instant,
) -> anyhow::Result<ExitRecord> {
    let exec_query = exec.map(|e| format!("&exec={e}")).unwrap_or_default();
    let body = client
        .open(
            Method::GET,
            &format!("/v1/vms/{vm}/containers/{id}/logs?follow=true{exec_query}"),
            Vec::new(),
        )
        .await?;
    let mut records = BodyStream::new(body);
    while let Some(item) = records.record().await? {
        match item {
            LogItem::Output(stream, data) => {
                if first_output.at.is_none() {
                    first_output.at = Some(started.elapsed());
                    if first_output.want_lazy {
                        first_output.lazy = client.get("/v1/lazy").await.ok();
                    }
                }
                match stream {
                    OutputStream::Stdout => write_all(&mut std::io::stdout().lock(), &data)?,
                    OutputStream::Stderr => write_all(&mut std::io::stderr().lock(), &data)?,
                }
            }
            LogItem::Exit(record) => return Ok(record),
        }
    }
    bail!("the agent's output stream ended before {id} exited")
}

fn write_all(out: &mut impl Write, data: &[u8]) -> anyhow::Result<()> {
    out.write_all(data)?;
    out.flush()?;
    Ok(())
}

/// `run`: create, start, stream the output, exit with the container's code.
pub async fn run(client: &ApiClient, args: RunArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let vm = resolve_vm(client, &args.vm).await?;
    let options = RunOptions {
        image: args.image,
        name: args.name,
        command: args.command,
        entrypoint: args.entrypoint.map(|e| vec![e]),
        env: args.env,
        workdir: args.workdir,
        user: args.user,
        hostname: args.hostname,
        memory_bytes: args.memory.as_deref().map(parse_limit).transpose()?,
        cpus: args.cpus,
        pids_limit: args.pids_limit,
        writable_layer_bytes: args
            .writable_layer
            .as_deref()
            .map(parse_limit)
            .transpose()?,
        stdin: args.interactive.stdin,
        tty: args.interactive.tty,
        tty_size: None,
        pull_mode: args.pull_mode,
        create_only: false,
    };
    let window_changes = args.interactive.window_changes()?;
    let options = RunOptions {
        tty_size: args.interactive.initial_size(),
        ..options
    };
    let body = client
        .open(
            Method::POST,
            &format!("/v1/vms/{vm}/containers"),
            serde_json::to_vec(&options)?,
        )
        .await?;
    let mut updates = BodyStream::new(body);
    let mut display = RunDisplay::new(args.quiet);
    let id = loop {
        let line = updates
            .line()
            .await?
            .ok_or_else(|| anyhow!("the agent closed the run stream without a result"))?;
        match serde_json::from_slice::<RunUpdate>(&line).context("reading the run stream")? {
            RunUpdate::Started(id) => break id,
            RunUpdate::Failed(error) => {
                display.finish();
                bail!("{error}")
            }
            other => display.show(&other),
        }
    };
    display.finish();
    if args.detach {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut first_output = FirstOutput {
        want_lazy: args.timing,
        ..FirstOutput::default()
    };
    let output = follow(client, &vm, &id, None, &mut first_output, started);
    let record = match args
        .interactive
        .attach(client, &vm, &id, None, window_changes)
    {
        Some(attach) => interactive::attach(attach, output).await?,
        None => output.await?,
    };
    if args.rm {
        let _: serde_json::Value = client
            .delete(&format!("/v1/vms/{vm}/containers/{id}"))
            .await?;
    }
    if args.timing {
        let first = first_output.at.map_or_else(
            || "no output".to_owned(),
            |d| format!("{} ms", d.as_millis()),
        );
        eprintln!(
            "timing: run → first output {first}; run → exit {} ms",
            started.elapsed().as_millis()
        );
        if let Some(lazy) = first_output.lazy.filter(|lazy| !lazy.layers.is_empty()) {
            let fetched: u64 = lazy.layers.iter().map(|l| l.fetched_bytes).sum();
            let total: u64 = lazy.layers.iter().map(|l| l.blob_bytes).sum();
            eprintln!(
                "timing: lazy layers at first output: {fetched} of {total} blob bytes fetched \
                 ({:.1}%), {} foreground chunks",
                fetched as f64 * 100.0 / total.max(1) as f64,
                lazy.foreground_chunks
            );
        }
    }
    if record.oom_killed {
        eprintln!("{id}: killed by the kernel's OOM killer (memory limit reached)");
    }
    Ok(exit_code(&record))
}

/// `ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    #[command(flatten)]
    vm: VmArg,
    /// Show stopped containers too.
    #[arg(short, long)]
    all: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `ps`: the containers of a VM.
pub async fn ps(client: &ApiClient, args: PsArgs) -> anyhow::Result<ExitCode> {
    let vm = resolve_vm(client, &args.vm).await?;
    let mut containers: Vec<ContainerView> =
        client.get(&format!("/v1/vms/{vm}/containers")).await?;
    if !args.all {
        containers.retain(|c| matches!(c.state, ContainerState::Created | ContainerState::Running));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&containers)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<28} {:<8} {:>7} {:<12} LAYERS",
        "NAME", "IMAGE", "STATE", "PID", "EXIT"
    );
    for c in containers {
        let exit = match c.exit {
            Some(ExitStatus::Code(code)) => format!("code {code}"),
            Some(ExitStatus::Signal(signal)) => format!("signal {signal}"),
            None => "-".into(),
        };
        println!(
            "{:<24} {:<28} {:<8} {:>7} {:<12} {}",
            fit(&c.id, 24),
            fit(c.image.as_deref().unwrap_or("?"), 28),
            format!("{:?}", c.state).to_lowercase(),
            c.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            if c.oom_killed {
                format!("{exit} (OOM)")
            } else {
                exit
            },
            c.layers.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` in at most `width` characters: a longer one keeps its start and end around `…`, so
/// columns stay aligned and a registry name and its tag both stay visible.
fn fit(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count <= width {
        return text.to_owned();
    }
    let tail = (width - 1) / 2;
    let head = width - 1 - tail;
    let start: String = text.chars().take(head).collect();
    let end: String = text.chars().skip(count - tail).collect();
    format!("{start}…{end}")
}

/// `logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    vm: VmArg,
    /// Keep following until the process exits.
    #[arg(short, long)]
    follow: bool,
    /// An exec's output instead of the main process's.
    #[arg(long)]
    exec: Option<String>,
    /// The container.
    name: String,
}

/// `logs`: what a container wrote.
pub async fn logs(client: &ApiClient, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let vm = resolve_vm(client, &args.vm).await?;
    let exec_query = args.exec.map(|e| format!("&exec={e}")).unwrap_or_default();
    let path = format!(
        "/v1/vms/{vm}/containers/{}/logs?follow={}{exec_query}",
        args.name, args.follow
    );
    let mut records = BodyStream::new(client.open(Method::GET, &path, Vec::new()).await?);
    while let Some(item) = records.record().await? {
        match item {
            LogItem::Output(OutputStream::Stdout, data) => {
                write_all(&mut std::io::stdout().lock(), &data)?
            }
            LogItem::Output(OutputStream::Stderr, data) => {
                write_all(&mut std::io::stderr().lock(), &data)?
            }
            LogItem::Exit(_) => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    vm: VmArg,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory.
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// User.
    #[arg(short = 'u', long)]
    user: Option<String>,
    #[command(flatten)]
    interactive: InteractiveArgs,
    /// The container.
    name: String,
    /// The command.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

/// `exec`: run a command in a running container; exit with its code.
pub async fn exec(client: &ApiClient, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let vm = resolve_vm(client, &args.vm).await?;
    let request = ExecRequest {
        exec_id: None,
        command: args.command,
        env: args.env,
        workdir: args.workdir,
        user: args.user,
        stdin: args.interactive.stdin,
        tty: args.interactive.tty,
        tty_size: None,
    };
    let window_changes = args.interactive.window_changes()?;
    let request = ExecRequest {
        tty_size: args.interactive.initial_size(),
        ..request
    };
    let answer: serde_json::Value = client
        .post_json(
            &format!("/v1/vms/{vm}/containers/{}/exec", args.name),
            &request,
        )
        .await?;
    let exec_id = answer["exec_id"]
        .as_str()
        .context("the agent named no exec")?
        .to_owned();
    let mut first_output = FirstOutput::default();
    let output = follow(
        client,
        &vm,
        &args.name,
        Some(&exec_id),
        &mut first_output,
        started,
    );
    let attach = args
        .interactive
        .attach(client, &vm, &args.name, Some(&exec_id), window_changes);
    let record = match attach {
        Some(attach) => interactive::attach(attach, output).await?,
        None => output.await?,
    };
    Ok(exit_code(&record))
}

/// `-i` and `-t` of `run` and `exec`.
#[derive(Debug, Clone, Args)]
pub struct InteractiveArgs {
    /// Keep standard input open and forward it to the process.
    #[arg(short = 'i', long = "interactive")]
    stdin: bool,
    /// Run the process on a pseudo-terminal; with -i this terminal goes raw meanwhile.
    #[arg(short = 't', long)]
    tty: bool,
}

impl InteractiveArgs {
    /// With `-t`: `SIGWINCH`, listened to before the size is first read.
    fn window_changes(&self) -> anyhow::Result<Option<tokio::signal::unix::Signal>> {
        self.tty.then(interactive::window_changes).transpose()
    }

    /// With `-t`: the local terminal's size, if there is a local terminal.
    fn initial_size(&self) -> Option<gantry_proto::TtySize> {
        self.tty.then(interactive::local_size).flatten()
    }

    /// What to attach, when `-i` or `-t` asks for more than following the output.
    fn attach(
        &self,
        client: &ApiClient,
        vm: &str,
        id: &str,
        exec: Option<&str>,
        window_changes: Option<tokio::signal::unix::Signal>,
    ) -> Option<interactive::Attach> {
        (self.stdin || self.tty).then(|| interactive::Attach {
            client: client.clone(),
            vm: vm.to_owned(),
            id: id.to_owned(),
            exec: exec.map(str::to_owned),
            stdin: self.stdin,
            tty: self.tty,
            window_changes,
        })
    }
}

/// `kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    #[command(flatten)]
    vm: VmArg,
    /// The signal: a number or a name (TERM, SIGTERM).
    #[arg(short, long, default_value = "KILL")]
    signal: String,
    /// The container.
    name: String,
}

/// Parses `9`, `KILL` or `SIGKILL`.
pub fn parse_signal(text: &str) -> anyhow::Result<i32> {
    if let Ok(number) = text.parse::<i32>() {
        return Ok(number);
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&name)
        .map(|s| s as i32)
        .map_err(|_| anyhow!("unknown signal {text:?}"))
}

/// `kill`: send a signal to a container's main process.
pub async fn kill(client: &ApiClient, args: KillArgs) -> anyhow::Result<ExitCode> {
    let vm = resolve_vm(client, &args.vm).await?;
    let signal = parse_signal(&args.signal)?;
    let _: serde_json::Value = client
        .post(&format!(
            "/v1/vms/{vm}/containers/{}/kill?signal={signal}",
            args.name
        ))
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// `rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    #[command(flatten)]
    vm: VmArg,
    /// Kill the container first if it runs.
    #[arg(short, long)]
    force: bool,
    /// The containers.
    #[arg(required = true)]
    names: Vec<String>,
}

/// `rm`: delete containers (their writable layer, mounts and cgroup).
pub async fn rm(client: &ApiClient, args: RmArgs) -> anyhow::Result<ExitCode> {
    let vm = resolve_vm(client, &args.vm).await?;
    let mut failed = false;
    for name in &args.names {
        let path = format!("/v1/vms/{vm}/containers/{name}?force={}", args.force);
        match client.delete::<serde_json::Value>(&path).await {
            Ok(_) => println!("{name}"),
            Err(err) => {
                eprintln!("error: {name}: {err}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    vm: VmArg,
    /// The container.
    name: String,
}

/// `stats`: a container's cgroup figures.
pub async fn stats(client: &ApiClient, args: StatsArgs) -> anyhow::Result<ExitCode> {
    let vm = resolve_vm(client, &args.vm).await?;
    let stats: serde_json::Value = client
        .get(&format!("/v1/vms/{vm}/containers/{}/stats", args.name))
        .await?;
    println!("{}", serde_json::to_string_pretty(&stats)?);
    Ok(ExitCode::SUCCESS)
}

/// `images`: the images in the agent's cache.
/// `prefetch`.
#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// How lazy-format layers come in: `lazy` (chunk indexes only), `fill` (and the rest in
    /// the background), `eager` (return once every chunk is present). Default: the agent's
    /// `lazy.mode`.
    #[arg(long, value_name = "lazy|fill|eager")]
    pull_mode: Option<gantry_api::PullMode>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The image: `default`, `oci:DIR[:NAME]`, or a registry reference.
    image: String,
}

/// `prefetch`.
pub async fn prefetch(client: &ApiClient, args: PrefetchArgs) -> anyhow::Result<()> {
    let request = gantry_api::PrefetchRequest {
        image: args.image,
        pull_mode: args.pull_mode,
    };
    let report: gantry_api::PrefetchReport =
        client.post_json("/v1/images/prefetch", &request).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} {} ({} layers, {} lazy)",
            report.image, report.manifest_digest, report.layers, report.lazy_layers
        );
    }
    Ok(())
}

pub async fn images(client: &ApiClient, json: bool) -> anyhow::Result<ExitCode> {
    let images: Vec<serde_json::Value> = client.get("/v1/images").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<48} {:<20} {:>6} {:>8}",
        "IMAGE", "MANIFEST", "LAYERS", "PRESENT"
    );
    for image in images {
        let digest = image["manifest_digest"].as_str().unwrap_or("?");
        let count = |field: &str| {
            image["layer_presence"].as_array().map_or(0, |layers| {
                layers
                    .iter()
                    .map(|layer| layer[field].as_u64().unwrap_or(0))
                    .sum::<u64>()
            })
        };
        let (chunks, present) = (count("chunks"), count("present_chunks"));
        let present = if chunks == 0 {
            "-".to_string()
        } else {
            format!("{:.0}%", present as f64 * 100.0 / chunks as f64)
        };
        println!(
            "{:<48} {:<20} {:>6} {:>8}",
            image["name"].as_str().unwrap_or("?"),
            digest.get(..19).unwrap_or(digest),
            image["layers"].as_array().map_or(0, Vec::len),
            present
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_fit_their_column() {
        assert_eq!(fit("short", 10), "short");
        let long = "registry.example:5000/team/a-very-long-image-name:v1.2.3";
        let fitted = fit(long, 28);
        assert_eq!(fitted.chars().count(), 28);
        assert!(
            fitted.starts_with("registry.exa") && fitted.ends_with(":v1.2.3"),
            "{fitted}"
        );
    }

    #[test]
    fn signals_parse_by_number_and_name() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("TERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("sigusr1").unwrap(), libc::SIGUSR1);
        assert!(parse_signal("NOPE").is_err());
    }
}
