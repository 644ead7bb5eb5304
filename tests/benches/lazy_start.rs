//! Lazy loading (issue 12): cold start of `python3 -c 'print(1)'` from a realistic image in a
//! booted TCG guest, the registry reached through a shaping proxy (100 Mbit/s, 20 ms added round
//! trip), four ways: eager (the tar+gzip image: download and convert, then start), lazy (the same
//! image converted with `gantry-agent image convert`, chunks fetched as the guest reads them),
//! lazy with a startup trace recorded on another agent, and `skopeo copy` of the tar+gzip image
//! as the yardstick. Prints time to first output, bytes fetched before it and their share of the
//! image, and the full-read time (`tar c /` in the container) after a background fill against the
//! eager image's; PASS/MISS per goal of the issue. A benchmark reports: it asserts nothing about
//! the figures, only that every step worked.
//!
//! Run: `qemu/build-guest.sh && cargo build --release -p gantry-agent && cargo bench -p gantry-e2e
//! --bench lazy_start` (benches run in the release profile and use the agent built beside them).
//! It boots three guests, one after the other; on a shared machine build first
//! (`cargo bench -p gantry-e2e --bench lazy_start --no-run`) and run it under the guests' lock:
//! `flock /tmp/gantry-guests.lock cargo bench -p gantry-e2e --bench lazy_start`.
//!
//! The image: `debootstrap --variant=minbase --include=python3-minimal bookworm` from the apt
//! mirror this machine is configured with (`/etc/apt/sources.list{,.d}`, or
//! `$GANTRY_BENCH_MIRROR`), packed as one tar+gzip layer (no device nodes, no downloaded
//! packages: as a published base image) and kept in `$GANTRY_BENCH_DATA` (default
//! `target/bench-data/`), so reruns skip debootstrap. Needs root, debootstrap, docker-registry,
//! skopeo and GNU tar. Without a root file system it stops with an error: it makes none up.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gantry_api::{ApiClient, LazyStats};
use gantry_e2e::{TestAgent, TestVm, agent_binary, image_layers, output_within, workspace_root};
use gantry_oci::Digest;
use gantry_oci::layout::LayoutWriter;
use gantry_oci::manifest::{Descriptor, OCI_CONFIG, OCI_MANIFEST};
use gantry_testkit::{Registry, Shaping, ShapingProxy};
use serde_json::json;

const SUITE: &str = "bookworm";
const PACKAGES: &str = "python3-minimal";
const COMMAND: [&str; 3] = ["python3", "-c", "print(1)"];
/// Reads every file of the container's root (GNU tar: the image is Debian).
const FULL_READ: [&str; 3] = ["sh", "-c", "tar cf - --one-file-system / | wc -c"];
const VM: &str = "bench";
const GUEST_MIB: u32 = 1024;
const REPOSITORY: &str = "bench/python";
const ORIGINAL_TAG: &str = "tar-gzip";
const CONVERTED_TAG: &str = "erofs-zstd";
/// Lazy runs bring in only what is read; the first one records the startup trace.
const SETTINGS: &str = "[lazy]\nmode = \"lazy\"\ntrace_seconds = 5\n";
const TRACE_SECONDS: u64 = 5;

const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const CONVERT_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
const TRACE_TIMEOUT: Duration = Duration::from_secs(60);
const FILL_TIMEOUT: Duration = Duration::from_secs(600);

/// Goals of issue 12.
const GOAL_SPEEDUP: f64 = 10.0;
const GOAL_LAZY_SHARE: f64 = 0.10;
const GOAL_TRACE_SHARE: f64 = 0.05;
const GOAL_FULL_READ: f64 = 1.2;

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --benches` asks for a list: nothing to list.
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lazy_start: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Where inputs are kept between runs.
fn bench_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GANTRY_BENCH_DATA") {
        return dir.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("bench-data")
}

/// The mirror apt on this machine uses for [`SUITE`] (debootstrap's third argument).
fn apt_mirror() -> Result<String> {
    if let Ok(mirror) = std::env::var("GANTRY_BENCH_MIRROR") {
        return Ok(mirror);
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in &files {
        let Ok(content) = std::fs::read_to_string(file) else {
            continue;
        };
        let found = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => deb822_mirror(&content),
            Some("list") | None => one_line_mirror(&content),
            Some(_) => None,
        };
        if let Some(mirror) = found {
            return Ok(mirror);
        }
    }
    bail!(
        "no enabled apt source for {SUITE} in /etc/apt/sources.list or /etc/apt/sources.list.d \
         (set GANTRY_BENCH_MIRROR to the Debian mirror to use)"
    )
}

/// The first URI of a deb822 stanza (`*.sources`) of type `deb` listing [`SUITE`].
fn deb822_mirror(content: &str) -> Option<String> {
    content.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza
                .lines()
                .filter(|line| !line.trim_start().starts_with('#'))
                .find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| value.trim().to_owned())
                })
        };
        let has = |name: &str, word: &str| {
            field(name).is_some_and(|value| value.split_whitespace().any(|w| w == word))
        };
        let enabled = field("Enabled").is_none_or(|value| value != "no");
        (enabled && has("Types", "deb") && has("Suites", SUITE))
            .then(|| field("URIs")?.split_whitespace().next().map(str::to_owned))
            .flatten()
    })
}

/// The URI of the first `deb URI SUITE …` line (`sources.list`, `*.list`).
fn one_line_mirror(content: &str) -> Option<String> {
    content.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options: `[arch=amd64 signed-by=…]`.
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        (words.next()? == SUITE).then(|| uri.to_owned())
    })
}

/// The root file system as one tar+gzip layer, and what the image's config says of it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RootfsLayer {
    /// The tar+gzip file.
    #[serde(skip)]
    path: PathBuf,
    /// Its digest.
    digest: Digest,
    /// Its size.
    size: u64,
    /// The uncompressed tar's digest.
    diff_id: Digest,
    /// The uncompressed tar's size.
    tar_size: u64,
    /// Files and directories in it.
    entries: u64,
    /// The mirror debootstrap used.
    mirror: String,
}

/// The cached root file system layer, made with debootstrap when missing.
fn rootfs_layer(data: &Path) -> Result<RootfsLayer> {
    let stem = format!("{SUITE}-minbase-{PACKAGES}");
    let path = data.join(format!("{stem}.tar.gz"));
    let facts = data.join(format!("{stem}.json"));
    if path.exists()
        && let Ok(bytes) = std::fs::read(&facts)
        && let Ok(layer) = serde_json::from_slice::<RootfsLayer>(&bytes)
    {
        return Ok(RootfsLayer { path, ..layer });
    }
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let mirror = apt_mirror()?;
    let root = data.join(format!("{stem}.root"));
    let _ = std::fs::remove_dir_all(&root);
    eprintln!(
        "debootstrap --variant=minbase --include={PACKAGES} {SUITE} {} {mirror} (first run only) …",
        root.display()
    );
    let started = Instant::now();
    let output = output_within(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={PACKAGES}"))
            .arg(SUITE)
            .arg(&root)
            .arg(&mirror),
        DEBOOTSTRAP_TIMEOUT,
        || {},
    )
    .context("debootstrap did not complete")?;
    if !output.status.success() {
        let log = text(&output.stdout) + &text(&output.stderr);
        let lines: Vec<&str> = log.lines().collect();
        bail!(
            "debootstrap failed ({}); the benchmark needs this Debian root file system and \
             makes none up. Its last lines:\n{}",
            output.status,
            lines[lines.len().saturating_sub(25)..].join("\n")
        );
    }
    eprintln!("debootstrap took {:.0} s", started.elapsed().as_secs_f64());
    let tar = data.join(format!("{stem}.tar"));
    let partial = data.join(format!("{stem}.tar.gz.partial"));
    // What a published base image leaves out: device nodes (the runtime makes /dev), mounts'
    // contents, downloaded packages and package lists.
    let pack = Command::new("tar")
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            "--exclude=./dev/*",
            "--exclude=./proc/*",
            "--exclude=./sys/*",
            "--exclude=./run/*",
            "--exclude=./var/cache/apt/archives/*.deb",
            "--exclude=./var/lib/apt/lists/*",
            "-C",
        ])
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .context("running tar")?;
    ensure!(pack.success(), "tar of {} failed", root.display());
    let tar_bytes = std::fs::read(&tar)?;
    let entries = Command::new("tar").arg("-tf").arg(&tar).output()?;
    ensure!(entries.status.success(), "tar -tf {} failed", tar.display());
    let gzip = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -n -6 -c '{}' > '{}'",
            tar.display(),
            partial.display()
        ))
        .status()?;
    ensure!(gzip.success(), "gzip failed");
    let gzipped = std::fs::read(&partial)?;
    let layer = RootfsLayer {
        path: path.clone(),
        digest: Digest::of(&gzipped),
        size: gzipped.len() as u64,
        diff_id: Digest::of(&tar_bytes),
        tar_size: tar_bytes.len() as u64,
        entries: entries.stdout.iter().filter(|&&b| b == b'\n').count() as u64,
        mirror,
    };
    std::fs::rename(&partial, &path)?;
    std::fs::write(&facts, serde_json::to_vec_pretty(&layer)?)?;
    std::fs::remove_file(&tar)?;
    std::fs::remove_dir_all(&root)?;
    Ok(layer)
}

/// A descriptor of `size` bytes with digest `digest`.
fn descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size,
        platform: None,
        annotations: Default::default(),
        urls: Vec::new(),
        artifact_type: None,
    }
}

/// Writes an OCI layout at `dir` holding one image, `tag`: the layer, `Cmd` python3.
fn write_layout(dir: &Path, layer: &RootfsLayer, tag: &str) -> Result<()> {
    let writer = LayoutWriter::create(dir)?;
    let layer_descriptor = descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        layer.digest.clone(),
        layer.size,
    );
    writer.copy_blob(&layer_descriptor, &layer.path)?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Cmd": ["python3"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id.to_string()]},
    }))?;
    let config_descriptor =
        descriptor(OCI_CONFIG, writer.write_blob(&config)?, config.len() as u64);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_descriptor,
        "layers": [layer_descriptor],
    }))?;
    let manifest_descriptor = descriptor(
        OCI_MANIFEST,
        writer.write_blob(&manifest)?,
        manifest.len() as u64,
    );
    writer.name_image(&manifest_descriptor, tag)?;
    Ok(())
}

/// The images the variants run.
struct Images {
    /// `proxy/repo:tag` of the tar+gzip image and its layers.
    original: String,
    original_layers: Vec<Descriptor>,
    /// The same converted, and its layers.
    converted: String,
    converted_layers: Vec<Descriptor>,
}

impl Images {
    fn original_size(&self) -> u64 {
        self.original_layers.iter().map(|l| l.size).sum()
    }

    fn converted_size(&self) -> u64 {
        self.converted_layers.iter().map(|l| l.size).sum()
    }
}

/// What one run of a container measured.
#[derive(Debug, Default)]
struct RunFigures {
    /// The CLI's "run → first output".
    first_output: Option<Duration>,
    /// The CLI's "run → exit".
    exit: Duration,
    /// Bytes the proxy delivered from the registry between the command's start and the first
    /// output the bench saw.
    proxy_bytes: u64,
    /// The agent's lazy layers' fetched blob bytes at first output (the CLI's `--timing`).
    lazy_fetched: Option<u64>,
    /// The agent's lazy counters after the run.
    stats: Option<LazyStats>,
    stdout: String,
}

/// A number in milliseconds after `prefix` in `line`.
fn ms_after(line: &str, prefix: &str) -> Option<Duration> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let number: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    number.parse().ok().map(Duration::from_millis)
}

/// Runs `run --rm --timing ARGS… IMAGE COMMAND…` on `agent`, counting what the proxy delivered
/// until the first output.
fn measured_run(
    agent: &TestAgent,
    proxy: &ShapingProxy,
    runtime: &tokio::runtime::Runtime,
    options: &[&str],
    image: &str,
    command: &[&str],
) -> Result<RunFigures> {
    let mut args = vec!["run", "--vm", VM, "--rm", "--timing"];
    args.extend_from_slice(options);
    args.push(image);
    args.extend_from_slice(command);
    let before = proxy.bytes_down();
    let bytes_down = proxy.bytes_down_reader();
    let at_first_output = Arc::new(Mutex::new(None));
    let output = agent.cli_observed(&args, RUN_TIMEOUT, {
        let at_first_output = Arc::clone(&at_first_output);
        move || *at_first_output.lock().unwrap() = Some(bytes_down())
    });
    let stderr = text(&output.stderr);
    ensure!(
        output.status.success(),
        "`gantry-agent {}` failed ({}): {stderr}",
        args.join(" "),
        output.status
    );
    let mut figures = RunFigures {
        stdout: text(&output.stdout),
        proxy_bytes: at_first_output
            .lock()
            .unwrap()
            .unwrap_or_else(|| proxy.bytes_down())
            - before,
        ..RunFigures::default()
    };
    for line in stderr.lines().filter(|l| l.starts_with("timing:")) {
        if let Some(first) = ms_after(line, "first output") {
            figures.first_output = Some(first);
        }
        if let Some(exit) = ms_after(line, "run → exit") {
            figures.exit = exit;
        }
        if let Some(rest) = line.strip_prefix("timing: lazy layers at first output:") {
            figures.lazy_fetched = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    ensure!(
        stderr.contains("run → exit"),
        "no timing in the run's output: {stderr}"
    );
    figures.stats = runtime
        .block_on(ApiClient::new(agent.api_socket()).get::<LazyStats>("/v1/lazy"))
        .ok();
    Ok(figures)
}

/// A fresh agent (empty state) with one booted guest.
fn booted_agent(cid: u64) -> Result<TestAgent> {
    let agent = TestAgent::start_with(&[TestVm::new(VM, cid).memory(GUEST_MIB)], SETTINGS)?;
    let started = Instant::now();
    agent.wait_guest_info(VM, BOOT_TIMEOUT)?;
    eprintln!(
        "agent {}: guest booted in {:.1} s",
        agent.dir().display(),
        started.elapsed().as_secs_f64()
    );
    Ok(agent)
}

/// The startup trace files in `agent`'s cache.
fn traces(agent: &TestAgent) -> Vec<PathBuf> {
    std::fs::read_dir(agent.state_dir().join("cache/traces"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Waits until every layer of `layers` is present in `agent`'s cache; returns how long it took.
fn wait_filled(agent: &TestAgent, layers: &[Descriptor]) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let mut complete = true;
        for layer in layers {
            let (present, chunks) = agent.layer_presence(&layer.digest)?;
            complete &= present == chunks;
        }
        if complete {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < FILL_TIMEOUT,
            "the fill did not complete within {FILL_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The full read's duration (the CLI's run → exit) and the bytes `tar` wrote.
fn full_read(
    agent: &TestAgent,
    proxy: &ShapingProxy,
    runtime: &tokio::runtime::Runtime,
    image: &str,
) -> Result<(Duration, u64)> {
    let figures = measured_run(agent, proxy, runtime, &["-q"], image, &FULL_READ)?;
    let bytes = figures
        .stdout
        .trim()
        .parse()
        .with_context(|| format!("wc -c printed {:?}", figures.stdout))?;
    Ok((figures.exit, bytes))
}

fn succeeded(output: Output, what: &str) -> Result<Output> {
    ensure!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        text(&output.stderr)
    );
    Ok(output)
}

/// One line of the results table.
struct Row {
    variant: &'static str,
    first_output: Duration,
    proxy_bytes: u64,
    lazy_fetched: Option<u64>,
    image_size: u64,
    which_size: &'static str,
}

fn bench() -> Result<()> {
    let data = bench_data_dir();
    let layer = rootfs_layer(&data)?;
    let work = tempfile::Builder::new()
        .prefix("lazy-start-")
        .tempdir_in(&data)?;

    // The registry, the original image and its conversion (directly, not through the proxy).
    let layout = work.path().join("layout");
    write_layout(&layout, &layer, ORIGINAL_TAG)?;
    let registry = Registry::start();
    registry.push(
        &layout,
        ORIGINAL_TAG,
        &format!("{REPOSITORY}:{ORIGINAL_TAG}"),
    );
    let at_registry = |tag: &str| format!("{}/{REPOSITORY}:{tag}", registry.host());
    let started = Instant::now();
    succeeded(
        output_within(
            Command::new(agent_binary()).args([
                "image",
                "convert",
                &at_registry(ORIGINAL_TAG),
                &at_registry(CONVERTED_TAG),
            ]),
            CONVERT_TIMEOUT,
            || {},
        )?,
        "gantry-agent image convert",
    )?;
    let convert_time = started.elapsed();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let shaping = Shaping::link(100, Duration::from_millis(20));
    let proxy = runtime.block_on(ShapingProxy::start(
        format!("127.0.0.1:{}", registry.port).parse()?,
        shaping,
    ))?;
    let through_proxy = |tag: &str| format!("{}/{REPOSITORY}:{tag}", proxy.host());
    let images = Images {
        original: through_proxy(ORIGINAL_TAG),
        original_layers: image_layers(&at_registry(ORIGINAL_TAG))?,
        converted: through_proxy(CONVERTED_TAG),
        converted_layers: image_layers(&at_registry(CONVERTED_TAG))?,
    };
    // 1. Eager: the tar+gzip image, downloaded and converted before the container starts; then
    //    the full read on the same guest.
    let eager_agent = booted_agent(70)?;
    let eager = measured_run(
        &eager_agent,
        &proxy,
        &runtime,
        &[],
        &images.original,
        &COMMAND,
    )?;
    let (eager_read, eager_read_bytes) =
        full_read(&eager_agent, &proxy, &runtime, &images.original)?;
    drop(eager_agent);

    // 2. Lazy: the converted image, nothing but what the guest reads (and read-ahead). This
    //    first cold start records the image's startup trace.
    let lazy_start = |agent: &TestAgent| {
        measured_run(
            agent,
            &proxy,
            &runtime,
            &["--pull-mode", "lazy"],
            &images.converted,
            &COMMAND,
        )
    };
    let lazy_agent = booted_agent(71)?;
    let lazy = lazy_start(&lazy_agent)?;
    let started = Instant::now();
    let trace = loop {
        if let Some(trace) = traces(&lazy_agent).pop() {
            break trace;
        }
        ensure!(
            started.elapsed() < TRACE_TIMEOUT,
            "no startup trace in {} after {TRACE_TIMEOUT:?}",
            lazy_agent.state_dir().join("cache/traces").display()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let trace_json: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace)?)?;
    let traced_chunks: usize = trace_json["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["chunks"].as_array().map_or(0, Vec::len))
        .sum();
    let trace_copy = work.path().join("trace.json");
    std::fs::copy(&trace, &trace_copy)?;
    drop(lazy_agent);

    // 3. Lazy with the trace: another card that has it (copied into its empty cache, where its
    //    agent looks for it); then the fill, and the full read once it is complete.
    let trace_agent = booted_agent(72)?;
    let traces_dir = trace_agent.state_dir().join("cache/traces");
    std::fs::create_dir_all(&traces_dir)?;
    std::fs::copy(
        &trace_copy,
        traces_dir.join(trace.file_name().context("a trace file name")?),
    )?;
    let traced = lazy_start(&trace_agent)?;
    succeeded(
        trace_agent.cli_within(
            &["prefetch", "--pull-mode", "fill", &images.converted],
            RUN_TIMEOUT,
        ),
        "prefetch --pull-mode fill",
    )?;
    let fill_time = wait_filled(&trace_agent, &images.converted_layers)?;
    // The floor under every cold start: the same command once nothing is left to fetch.
    let warm = lazy_start(&trace_agent)?;
    let (lazy_read, lazy_read_bytes) =
        full_read(&trace_agent, &proxy, &runtime, &images.converted)?;
    drop(trace_agent);

    // 4. The yardstick: skopeo copies the tar+gzip image through the same proxy.
    let before = proxy.bytes_down();
    let started = Instant::now();
    succeeded(
        output_within(
            Command::new("skopeo")
                .args(["--insecure-policy", "copy", "-q", "--src-tls-verify=false"])
                .arg(format!("docker://{}", images.original))
                .arg(format!("oci:{}:py", work.path().join("skopeo").display())),
            RUN_TIMEOUT,
            || {},
        )?,
        "skopeo copy",
    )?;
    let skopeo_time = started.elapsed();
    let skopeo_bytes = proxy.bytes_down() - before;

    for (name, run) in [
        ("eager", &eager),
        ("lazy", &lazy),
        ("lazy + trace", &traced),
        ("warm", &warm),
    ] {
        ensure!(
            run.stdout == "1\n",
            "{name}: the container printed {:?}",
            run.stdout
        );
    }
    let first = |run: &RunFigures| run.first_output.unwrap_or(run.exit);
    let rows = [
        Row {
            variant: "eager (tar+gzip, today's path)",
            first_output: first(&eager),
            proxy_bytes: eager.proxy_bytes,
            lazy_fetched: None,
            image_size: images.original_size(),
            which_size: "tar+gzip",
        },
        Row {
            variant: "lazy (erofs+zstd, no fill)",
            first_output: first(&lazy),
            proxy_bytes: lazy.proxy_bytes,
            lazy_fetched: lazy.lazy_fetched,
            image_size: images.converted_size(),
            which_size: "erofs+zstd",
        },
        Row {
            variant: "lazy + trace from another card",
            first_output: first(&traced),
            proxy_bytes: traced.proxy_bytes,
            lazy_fetched: traced.lazy_fetched,
            image_size: images.converted_size(),
            which_size: "erofs+zstd",
        },
        Row {
            variant: "skopeo copy (yardstick: done)",
            first_output: skopeo_time,
            proxy_bytes: skopeo_bytes,
            lazy_fetched: None,
            image_size: images.original_size(),
            which_size: "tar+gzip",
        },
    ];

    println!(
        "lazy start (issue 12): cold start of `{}` in a booted TCG guest ({GUEST_MIB} MiB), \
         empty cache, fresh agent per variant",
        shell_words(&COMMAND)
    );
    println!(
        "input: debootstrap --variant=minbase --include={PACKAGES} {SUITE} from {} \
         ({} entries, tar {:.1} MB; kept in {})",
        layer.mirror,
        layer.entries,
        mb(layer.tar_size),
        layer.path.display()
    );
    println!(
        "original image: {} layer(s), tar+gzip, {:.1} MB ({})",
        images.original_layers.len(),
        mb(images.original_size()),
        images.original
    );
    let chunks: u64 = lazy
        .stats
        .iter()
        .flat_map(|stats| &stats.layers)
        .map(|layer| layer.chunks)
        .sum();
    println!(
        "converted image: {} layer(s), erofs+zstd, {:.1} MB in {chunks} chunks ({}; `gantry-agent \
         image convert` took {:.1} s, not through the proxy)",
        images.converted_layers.len(),
        mb(images.converted_size()),
        images.converted,
        convert_time.as_secs_f64()
    );
    println!("registry: docker-registry on loopback, through the shaping proxy: {shaping}");
    println!(
        "trace: recorded by the lazy run's agent (lazy.trace_seconds = {TRACE_SECONDS}, {traced_chunks} \
         chunks), copied into the third agent's empty cache before its first run"
    );
    println!();
    println!(
        "{:<32} {:>14} {:>22} {:>8} {:>16} {:>8}  image size (which)",
        "variant",
        "first out ms",
        "proxy bytes (→ 1st out)",
        "÷ image",
        "agent lazy bytes",
        "÷ image"
    );
    for row in &rows {
        let share = |bytes: u64| bytes as f64 * 100.0 / row.image_size.max(1) as f64;
        let (agent_bytes, agent_share) = row.lazy_fetched.map_or_else(
            || ("-".to_owned(), "-".to_owned()),
            |bytes| (bytes.to_string(), format!("{:.1}%", share(bytes))),
        );
        println!(
            "{:<32} {:>14.0} {:>22} {:>7.1}% {:>16} {:>8}  {:.1} MB ({})",
            row.variant,
            ms(row.first_output),
            row.proxy_bytes,
            share(row.proxy_bytes),
            agent_bytes,
            agent_share,
            mb(row.image_size),
            row.which_size
        );
    }
    println!(
        "(first out: the CLI's `--timing` \"run → first output\"; for skopeo, the whole copy. \
         Proxy bytes: everything the registry sent through the proxy, HTTP and manifests \
         included, until the bench saw the first output.)"
    );
    for (name, run) in [("lazy", &lazy), ("lazy + trace", &traced)] {
        if let Some(stats) = &run.stats {
            let parks: Vec<String> = stats
                .park_time_ms_buckets
                .iter()
                .filter(|(_, count)| *count > 0)
                .map(|(bound, count)| match bound {
                    Some(bound) => format!("≤{bound} ms: {count}"),
                    None => format!("more: {count}"),
                })
                .collect();
            println!(
                "agent counters after the {name} run: {} range requests, {} foreground + {} \
                 background chunks, {} blob bytes; guest reads parked: {}",
                stats.requests,
                stats.foreground_chunks,
                stats.background_chunks,
                stats.bytes,
                if parks.is_empty() {
                    "none".to_owned()
                } else {
                    parks.join(", ")
                }
            );
        }
    }
    println!(
        "floor: the same run once the layers are present (after the fill, same guest): first \
         output {:.0} ms, {} bytes through the proxy",
        ms(first(&warm)),
        warm.proxy_bytes
    );
    println!(
        "full read after the fill ({:.1} s to complete the layers): `{}`: lazy-filled {:.0} ms \
         ({} bytes), eager {:.0} ms ({} bytes)",
        fill_time.as_secs_f64(),
        shell_words(&FULL_READ),
        ms(lazy_read),
        lazy_read_bytes,
        ms(eager_read),
        eager_read_bytes
    );
    println!();

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    let share = |row: &Row| row.proxy_bytes as f64 / row.image_size.max(1) as f64;
    let speedup = ratio(rows[0].first_output, rows[1].first_output);
    let trace_speedup = ratio(rows[0].first_output, rows[2].first_output);
    let read_ratio = ratio(lazy_read, eager_read);
    // (goal, measured, met): a benchmark reports, it does not assert.
    let goals = [
        (
            format!("lazy first output ≥ {GOAL_SPEEDUP}× sooner than eager (eager ÷ lazy)"),
            format!("{speedup:.1}×"),
            Some(speedup >= GOAL_SPEEDUP),
        ),
        (
            format!("lazy + trace first output ≥ {GOAL_SPEEDUP}× sooner than eager"),
            format!("{trace_speedup:.1}×"),
            Some(trace_speedup >= GOAL_SPEEDUP),
        ),
        (
            format!(
                "lazy: bytes before first output ≤ {:.0}% of the image",
                GOAL_LAZY_SHARE * 100.0
            ),
            format!("{:.1}%", share(&rows[1]) * 100.0),
            Some(share(&rows[1]) <= GOAL_LAZY_SHARE),
        ),
        (
            format!(
                "lazy + trace: bytes before first output ≤ {:.0}%",
                GOAL_TRACE_SHARE * 100.0
            ),
            format!("{:.1}%", share(&rows[2]) * 100.0),
            Some(share(&rows[2]) <= GOAL_TRACE_SHARE),
        ),
        (
            format!("full read after fill ≤ {GOAL_FULL_READ}× eager's (lazy ÷ eager)"),
            format!("{read_ratio:.2}×"),
            Some(read_ratio <= GOAL_FULL_READ),
        ),
        (
            "for scale: skopeo copy ÷ lazy first output".to_owned(),
            format!("{:.1}×", ratio(skopeo_time, rows[1].first_output)),
            None,
        ),
    ];
    println!("{:<58} {:>10}", "goal", "measured");
    for (goal, measured, met) in goals {
        let verdict = match met {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "",
        };
        println!("{goal:<58} {measured:>10} {verdict:>6}");
    }
    Ok(())
}

/// `words` as one would type them in a shell.
fn shell_words(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| {
            if w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=".contains(c))
            {
                (*w).to_owned()
            } else {
                format!("'{w}'")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
