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
//! `target/bench-data/`), so reruns skip debootstrap. When debootstrap fails (no mirror
//! reachable), or with `GANTRY_BENCH_ROOT=host`, the root is instead the same packages copied
//! from the host's own installed files (`qemu/host-root.sh`); `GANTRY_BENCH_ROOT=debootstrap`
//! refuses that fallback. The output's `root:` line says which root was used. Needs root,
//! debootstrap (or a Debian host), docker-registry, skopeo and GNU tar.

mod common;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use gantry_e2e::{TestAgent, TestVm, agent_binary, image_layers, output_within};
use gantry_oci::manifest::Descriptor;
use gantry_testkit::{Registry, Shaping, ShapingProxy};

use common::*;

const COMMAND: [&str; 3] = ["python3", "-c", "print(1)"];
/// Reads every file of the container's root (GNU tar: the image is Debian).
const FULL_READ: [&str; 3] = ["sh", "-c", "tar cf - --one-file-system / | wc -c"];
const GUEST_MIB: u32 = 1024;
const REPOSITORY: &str = "bench/python";
const ORIGINAL_TAG: &str = "tar-gzip";
const CONVERTED_TAG: &str = "erofs-zstd";
/// Lazy runs bring in only what is read; the first one records the startup trace.
const SETTINGS: &str = "[lazy]\nmode = \"lazy\"\ntrace_seconds = 5\n";
const TRACE_SECONDS: u64 = 5;

const CONVERT_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const TRACE_TIMEOUT: Duration = Duration::from_secs(60);
const FILL_TIMEOUT: Duration = Duration::from_secs(600);

/// Goals of issue 12.
const GOAL_SPEEDUP: f64 = 10.0;
const GOAL_LAZY_SHARE: f64 = 0.10;
const GOAL_TRACE_SHARE: f64 = 0.05;
const GOAL_FULL_READ: f64 = 1.2;

fn main() -> ExitCode {
    run_bench("lazy_start", bench)
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
    println!("{}", layer.root_line());
    println!(
        "input: that root, one tar+gzip layer ({} entries, tar {:.1} MB; kept in {})",
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
