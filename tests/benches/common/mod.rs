//! What the benchmarks that boot guests share: the realistic root file system (debootstrap,
//! else the host's own files when no mirror is reachable; kept between runs), OCI layouts of
//! it, and a measured `run`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gantry_api::{ApiClient, LazyStats};
use gantry_e2e::{TestAgent, output_within, workspace_root};
use gantry_oci::Digest;
use gantry_oci::layout::LayoutWriter;
use gantry_oci::manifest::{Descriptor, OCI_CONFIG, OCI_MANIFEST};
use gantry_testkit::{ShapingProxy, noise};
use serde_json::json;

pub const SUITE: &str = "bookworm";
pub const PACKAGES: &str = "python3-minimal";
/// The VM name the benchmarks' agents give their guest.
pub const VM: &str = "bench";
pub const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long converting one variant of the root file system may take.
pub const CONVERT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// A benchmark's `main`: runs `bench`, or nothing when `cargo test --benches` asks for a list
/// (`cargo bench` passes `--bench`).
pub fn run_bench(name: &str, bench: fn() -> Result<()>) -> std::process::ExitCode {
    if std::env::args().any(|a| a == "--list") {
        return std::process::ExitCode::SUCCESS;
    }
    match bench() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Where inputs are kept between runs.
pub fn bench_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GANTRY_BENCH_DATA") {
        return dir.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("bench-data")
}

/// The mirror apt on this machine uses for [`SUITE`] (debootstrap's third argument).
pub fn apt_mirror() -> Result<String> {
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
pub fn deb822_mirror(content: &str) -> Option<String> {
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
pub fn one_line_mirror(content: &str) -> Option<String> {
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

pub use gantry_testkit::bench_root::RootChoice;
use gantry_testkit::bench_root::{host_root, last_line};

/// How a debootstrapped root is described ([`RootfsLayer::root`]).
pub fn debootstrap_origin(mirror: &str) -> String {
    format!("debootstrap {SUITE} minbase+{PACKAGES} from {mirror}")
}

/// The root file system as one tar+gzip layer, and what the image's config says of it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RootfsLayer {
    /// The tar+gzip file.
    #[serde(skip)]
    pub path: PathBuf,
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// The uncompressed tar's digest.
    pub diff_id: Digest,
    /// The uncompressed tar's size.
    pub tar_size: u64,
    /// Files and directories in it.
    pub entries: u64,
    /// Where the root file system came from: [`debootstrap_origin`], or what
    /// `qemu/host-root.sh` said of the host files it copied ("host files: N packages (…), N MB").
    /// Facts cached before this field existed are all debootstrap's (filled in on load).
    #[serde(default)]
    pub root: String,
    /// The mirror debootstrap used; empty for a root made from the host's files.
    pub mirror: String,
    /// Why this run did not use debootstrap's root, when it did not.
    #[serde(skip)]
    pub fallback: Option<String>,
}

impl RootfsLayer {
    /// The `root:` line the benchmarks print beside their figures.
    pub fn root_line(&self) -> String {
        match &self.fallback {
            Some(why) => format!("root: {} (not debootstrap: {why})", self.root),
            None => format!("root: {}", self.root),
        }
    }
}

/// The cached layer named `stem` in `data`, when it and its facts are complete.
fn cached_layer(data: &Path, stem: &str) -> Option<RootfsLayer> {
    let path = data.join(format!("{stem}.tar.gz"));
    let bytes = std::fs::read(data.join(format!("{stem}.json"))).ok()?;
    let mut layer = serde_json::from_slice::<RootfsLayer>(&bytes).ok()?;
    if !path.exists() {
        return None;
    }
    if layer.root.is_empty() {
        layer.root = debootstrap_origin(&layer.mirror);
    }
    Some(RootfsLayer { path, ..layer })
}

/// The cached root file system layer: debootstrap's, made when missing, or (see [`RootChoice`])
/// one of the host's files when debootstrap cannot make it.
pub fn rootfs_layer(data: &Path) -> Result<RootfsLayer> {
    let choice = RootChoice::from_env().map_err(anyhow::Error::msg)?;
    let debootstrap_stem = format!("{SUITE}-minbase-{PACKAGES}");
    // The host root has a name of its own so it is never taken for debootstrap's.
    let host_stem = format!("host-{PACKAGES}");
    let why = match choice {
        RootChoice::Host => "GANTRY_BENCH_ROOT=host".to_owned(),
        RootChoice::Debootstrap | RootChoice::DebootstrapFirst => {
            if let Some(layer) = cached_layer(data, &debootstrap_stem) {
                return Ok(layer);
            }
            match debootstrap_layer(data, &debootstrap_stem) {
                Ok(layer) => return Ok(layer),
                Err(error) if choice == RootChoice::DebootstrapFirst => {
                    eprintln!("{error:#}\nfalling back to a root of the host's files");
                    format!("no mirror reachable: {}", last_line(&format!("{error:#}")))
                }
                Err(error) => return Err(error),
            }
        }
    };
    let layer = match cached_layer(data, &host_stem) {
        Some(layer) => layer,
        None => host_layer(data, &host_stem)?,
    };
    Ok(RootfsLayer {
        fallback: Some(why),
        ..layer
    })
}

/// Makes debootstrap's root and packs it as the layer `stem`.
fn debootstrap_layer(data: &Path, stem: &str) -> Result<RootfsLayer> {
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
        let _ = std::fs::remove_dir_all(&root);
        bail!(
            "debootstrap failed ({}). Its last lines:\n{}",
            output.status,
            lines[lines.len().saturating_sub(25)..].join("\n")
        );
    }
    eprintln!("debootstrap took {:.0} s", started.elapsed().as_secs_f64());
    pack_layer(data, stem, &root, debootstrap_origin(&mirror), mirror)
}

/// Copies the host's files for the same packages with `qemu/host-root.sh` and packs them as the
/// layer `stem`.
fn host_layer(data: &Path, stem: &str) -> Result<RootfsLayer> {
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let root = data.join(format!("{stem}.root"));
    let origin = host_root(&root, &[PACKAGES]).map_err(anyhow::Error::msg)?;
    pack_layer(data, stem, &root, origin, String::new())
}

/// Packs the tree `root` as the layer `stem` (tar+gzip and its facts) and removes the tree.
fn pack_layer(
    data: &Path,
    stem: &str,
    root: &Path,
    origin: String,
    mirror: String,
) -> Result<RootfsLayer> {
    let path = data.join(format!("{stem}.tar.gz"));
    let facts = data.join(format!("{stem}.json"));
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
        .arg(root)
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
        root: origin,
        mirror,
        fallback: None,
    };
    std::fs::rename(&partial, &path)?;
    std::fs::write(&facts, serde_json::to_vec_pretty(&layer)?)?;
    std::fs::remove_file(&tar)?;
    std::fs::remove_dir_all(root)?;
    Ok(layer)
}

/// A descriptor of `size` bytes with digest `digest`.
pub fn descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
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
pub fn write_layout(dir: &Path, layer: &RootfsLayer, tag: &str) -> Result<()> {
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

/// What one run of a container measured.
#[derive(Debug, Default)]
pub struct RunFigures {
    /// The CLI's "run → first output".
    pub first_output: Option<Duration>,
    /// The CLI's "run → exit".
    pub exit: Duration,
    /// Bytes the proxy delivered from the registry between the command's start and the first
    /// output the bench saw.
    pub proxy_bytes: u64,
    /// The agent's lazy layers' fetched blob bytes at first output (the CLI's `--timing`).
    pub lazy_fetched: Option<u64>,
    /// The agent's lazy counters after the run.
    pub stats: Option<LazyStats>,
    pub stdout: String,
}

/// A number in milliseconds after `prefix` in `line`.
pub fn ms_after(line: &str, prefix: &str) -> Option<Duration> {
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
pub fn measured_run(
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

pub fn succeeded(output: Output, what: &str) -> Result<Output> {
    ensure!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        text(&output.stderr)
    );
    Ok(output)
}

/// The root file system with `./etc/gantry-variant` (and `./srv/app/data.bin`) appended, as
/// one tar+gzip layer in `work`.
pub fn variant_layer(
    base: &RootfsLayer,
    work: &Path,
    tag: &str,
    app_bytes: usize,
) -> Result<RootfsLayer> {
    let extra = work.join(format!("{}-extra", tag));
    std::fs::create_dir_all(extra.join("etc"))?;
    std::fs::write(extra.join("etc/gantry-variant"), format!("{}\n", tag))?;
    let mut added = vec!["./etc/gantry-variant"];
    if app_bytes > 0 {
        std::fs::create_dir_all(extra.join("srv/app"))?;
        let seed = tag.bytes().map(u64::from).sum();
        std::fs::write(extra.join("srv/app/data.bin"), noise(app_bytes, seed))?;
        added.push("./srv/app");
    }
    let tar = work.join(format!("{}.tar", tag));
    let gzipped = work.join(format!("{}.tar.gz", tag));
    let script = format!(
        "gzip -dc '{base}' > '{tar}' && tar --append --numeric-owner --owner=0 --group=0 \
         -f '{tar}' -C '{extra}' {added} && gzip -n -6 -c '{tar}' > '{gzipped}'",
        base = base.path.display(),
        tar = tar.display(),
        extra = extra.display(),
        added = added.join(" "),
        gzipped = gzipped.display(),
    );
    let status = Command::new("sh").arg("-c").arg(&script).status()?;
    ensure!(status.success(), "making the {} layer failed", tag);
    let tar_bytes = std::fs::read(&tar)?;
    let gzip_bytes = std::fs::read(&gzipped)?;
    std::fs::remove_file(&tar)?;
    std::fs::remove_dir_all(&extra)?;
    Ok(RootfsLayer {
        path: gzipped,
        digest: Digest::of(&gzip_bytes),
        size: gzip_bytes.len() as u64,
        diff_id: Digest::of(&tar_bytes),
        tar_size: tar_bytes.len() as u64,
        entries: base.entries + added.len() as u64,
        root: base.root.clone(),
        mirror: base.mirror.clone(),
        fallback: base.fallback.clone(),
    })
}

/// Pushes `base` with `tag`'s marker (and `app_bytes` of app data) as `REPOSITORY:TAG-tgz` to
/// `registry`, and converts it with `gantry-agent image convert` to `REPOSITORY:TAG`.
pub fn push_converted_variant(
    registry: &gantry_testkit::Registry,
    repository: &str,
    base: &RootfsLayer,
    work: &Path,
    tag: &str,
    app_bytes: usize,
) -> Result<()> {
    let layer = variant_layer(base, work, tag, app_bytes)?;
    let layout = work.join(tag);
    let original = format!("{tag}-tgz");
    write_layout(&layout, &layer, &original)?;
    registry.push(&layout, &original, &format!("{repository}:{original}"));
    let at_registry = |tag: &str| format!("{}/{repository}:{tag}", registry.host());
    succeeded(
        output_within(
            Command::new(gantry_e2e::agent_binary()).args([
                "image",
                "convert",
                &at_registry(&original),
                &at_registry(tag),
            ]),
            CONVERT_TIMEOUT,
            || {},
        )?,
        "gantry-agent image convert",
    )?;
    std::fs::remove_dir_all(&layout)?;
    std::fs::remove_file(&layer.path)?;
    Ok(())
}
