//! The cluster manifest (issue 13): N = 4 simulated cards (agents on loopback that share
//! nothing but the registry) are given one manifest of 3 realistic images, and the figures are
//! the time from the manifest to every card holding every image, the registry bytes that took
//! (against 4 × the images' size), and the cold start of a prefetched image against one that
//! was not, on the card with a booted TCG guest. On that card, cold starts of images not in
//! the manifest are measured against the same cold start on the idle agent: while only this
//! card prefetches another image (its own fetcher's doing; the goal: at most 1.5 ×), and while
//! the four cards prefetch (they share the registry's link, which no card schedules). A
//! benchmark reports: it asserts nothing about the figures, only that every step worked.
//!
//! Run: `qemu/build-guest.sh && cargo build --release -p gantry-agent && cargo bench -p gantry-e2e
//! --bench cluster_prefetch` (under the guests' lock on a shared machine:
//! `flock /tmp/gantry-guests.lock cargo bench -p gantry-e2e --bench cluster_prefetch`).
//!
//! The images: the lazy-start benchmark's root file system (`debootstrap --variant=minbase
//! --include=python3-minimal bookworm`, or the host's files when no mirror is reachable; kept
//! in `target/bench-data/`, made on the first run; the `root:` line says which),
//! each with a file of its own appended (so no two share a layer) and, for `web` and `worker`,
//! application data; one tar+gzip layer each, converted with `gantry-agent image convert`. The
//! registry is `docker-registry` on loopback behind one shaping proxy, the registry's uplink
//! shared by the cards: 400 Mbit/s, 20 ms round trip.

mod common;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gantry_e2e::{TestAgent, TestVm, image_layers};
use gantry_testkit::{Registry, Shaping, ShapingProxy};

use common::*;

const CARDS: usize = 4;
const GUEST_MIB: u32 = 1024;
/// No startup traces: every cold start here is a first one.
const SETTINGS: &str = "[lazy]\nmode = \"lazy\"\ntrace_seconds = 0\n";
const COMMAND: [&str; 3] = ["python3", "-c", "print(1)"];
const REPOSITORY: &str = "bench/cluster";
const LINK_MBIT: u64 = 400;
const LINK_ROUND_TRIP: Duration = Duration::from_millis(20);
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const PREFETCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Goal: a cold start while the prefetch runs, against the same on an idle agent.
const GOAL_BUSY: f64 = 1.5;

/// An image of the benchmark: the root file system, a marker file, and this much app data.
struct Variant {
    tag: &'static str,
    app_bytes: usize,
    /// In the manifest, with this priority; `None`: a probe, run cold, never prefetched.
    priority: Option<i64>,
}

/// The image of the second manifest, given to the guest's card alone.
const LOCAL_BATCH: &str = "batch";

const VARIANTS: [Variant; 7] = [
    Variant {
        tag: "python",
        app_bytes: 0,
        priority: Some(100),
    },
    Variant {
        tag: "web",
        app_bytes: 24 << 20,
        priority: Some(50),
    },
    Variant {
        tag: "worker",
        app_bytes: 12 << 20,
        priority: Some(10),
    },
    Variant {
        tag: "probe-idle",
        app_bytes: 0,
        priority: None,
    },
    Variant {
        tag: "probe-busy",
        app_bytes: 0,
        priority: None,
    },
    Variant {
        tag: "probe-local",
        app_bytes: 0,
        priority: None,
    },
    Variant {
        tag: LOCAL_BATCH,
        app_bytes: 48 << 20,
        priority: None,
    },
];

fn main() -> ExitCode {
    run_bench("cluster_prefetch", bench)
}

/// Seconds since `since`, as text.
fn seconds(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64())
}

/// Writes a manifest of `images` (reference, priority), each to be prefetched whole.
fn write_manifest(path: &Path, images: &[(String, i64)]) -> Result<()> {
    let mut text = String::from("version = 1\n");
    for (reference, priority) in images {
        text += &format!(
            "\n[[image]]\nref = \"{reference}\"\npriority = {priority}\nprefetch = \"all\"\n"
        );
    }
    Ok(std::fs::write(path, text)?)
}

fn apply(card: &TestAgent, manifest: &Path) -> Result<()> {
    let path = manifest.to_str().context("a UTF-8 path")?;
    succeeded(
        card.cli_within(&["manifest", "apply", path], RUN_TIMEOUT),
        "manifest apply",
    )?;
    Ok(())
}

/// Waits until every image of `card`'s manifest is complete; the time since `since`.
fn wait_complete(card: &TestAgent, since: Instant) -> Result<Duration> {
    loop {
        if all_complete(card)? {
            return Ok(since.elapsed());
        }
        ensure!(
            since.elapsed() < PREFETCH_TIMEOUT,
            "the prefetch did not complete within {PREFETCH_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether every image of `card`'s manifest is complete (an image that failed is an error).
fn all_complete(card: &TestAgent) -> Result<bool> {
    let status = card.cli_json(&["manifest", "status", "--json"])?;
    let images = status["images"]
        .as_array()
        .context("manifest status lists images")?;
    ensure!(!images.is_empty(), "no manifest in force: {status}");
    for image in images {
        if image["state"] == "failed" {
            bail!("{} failed: {}", image["reference"], image["error"]);
        }
    }
    Ok(images.iter().all(|image| image["state"] == "complete"))
}

fn bench() -> Result<()> {
    let data = bench_data_dir();
    let base = rootfs_layer(&data)?;
    let work = tempfile::Builder::new()
        .prefix("cluster-prefetch-")
        .tempdir_in(&data)?;
    let registry = Registry::start();
    let at_registry = |tag: &str| format!("{}/{REPOSITORY}:{tag}", registry.host());
    let started = Instant::now();
    for variant in &VARIANTS {
        push_converted_variant(
            &registry,
            REPOSITORY,
            &base,
            work.path(),
            variant.tag,
            variant.app_bytes,
        )?;
    }
    let prepare_time = started.elapsed();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let shaping = Shaping::link(LINK_MBIT, LINK_ROUND_TRIP);
    let proxy = runtime.block_on(ShapingProxy::start(
        format!("127.0.0.1:{}", registry.port).parse()?,
        shaping,
    ))?;
    let through_proxy = |tag: &str| format!("{}/{REPOSITORY}:{tag}", proxy.host());
    let mut image_bytes = 0;
    for variant in VARIANTS.iter().filter(|v| v.priority.is_some()) {
        image_bytes += image_layers(&at_registry(variant.tag))?
            .iter()
            .map(|layer| layer.size)
            .sum::<u64>();
    }

    // The cards: the first with a guest, the others without (a guest changes nothing in how a
    // card prefetches).
    let guest_card = TestAgent::start_with(&[TestVm::new(VM, 80).memory(GUEST_MIB)], SETTINGS)?;
    guest_card.wait_guest_info(VM, BOOT_TIMEOUT)?;
    let mut cards = vec![guest_card];
    for _ in 1..CARDS {
        cards.push(TestAgent::start_with(&[], SETTINGS)?);
    }
    let cold_run = |tag: &str| {
        measured_run(
            &cards[0],
            &proxy,
            &runtime,
            &["--pull-mode", "lazy"],
            &through_proxy(tag),
            &COMMAND,
        )
    };

    // 1. The yardstick: a cold start on the idle card.
    let idle = cold_run("probe-idle")?;

    // 2. The guest's card alone prefetches an image; meanwhile a cold start of another.
    let local_manifest = work.path().join("local.toml");
    write_manifest(&local_manifest, &[(through_proxy(LOCAL_BATCH), 1)])?;
    let local_applied = Instant::now();
    apply(&cards[0], &local_manifest)?;
    let local = cold_run("probe-local")?;
    let local_still_prefetching = !all_complete(&cards[0])?;
    let local_done = wait_complete(&cards[0], local_applied)?;

    // 3. The cluster's manifest, given to every card at once.
    let manifest = work.path().join("cluster.toml");
    let images: Vec<(String, i64)> = VARIANTS
        .iter()
        .filter_map(|v| Some((through_proxy(v.tag), v.priority?)))
        .collect();
    write_manifest(&manifest, &images)?;
    let bytes_before = proxy.bytes_down();
    let applied = Instant::now();
    for card in &cards {
        apply(card, &manifest)?;
    }
    let apply_time = applied.elapsed();

    // 4. A cold start of an image the manifest does not name, while the cards prefetch.
    let busy = cold_run("probe-busy")?;
    let busy_still_prefetching = !all_complete(&cards[0])?;

    // 5. Until every card holds every image.
    let mut complete_after = [None; CARDS];
    while complete_after.iter().any(Option::is_none) {
        ensure!(
            applied.elapsed() < PREFETCH_TIMEOUT,
            "the prefetch did not complete within {PREFETCH_TIMEOUT:?}"
        );
        for (card, done) in cards.iter().zip(complete_after.iter_mut()) {
            if done.is_none() && all_complete(card)? {
                *done = Some(applied.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // The link's bytes while the cards prefetched, the busy probe's own cold start included.
    let prefetch_bytes = proxy.bytes_down() - bytes_before;
    let all_done = complete_after
        .iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or_default();

    // 6. A cold start of a prefetched image.
    let prefetched = cold_run("python")?;

    let runs = [
        ("not prefetched, idle card", &idle),
        ("not prefetched, this card prefetching `batch`", &local),
        ("not prefetched, all 4 cards prefetching", &busy),
        ("prefetched by the manifest", &prefetched),
    ];
    for (name, run) in runs {
        ensure!(
            run.stdout == "1\n",
            "{name}: the container printed {:?}",
            run.stdout
        );
    }
    let first = |run: &RunFigures| ms(run.first_output.unwrap_or(run.exit));
    let idle_ms = first(&idle);

    println!(
        "cluster manifest (issue 13): {CARDS} cards (agents on loopback sharing only the \
         registry), one manifest of 3 images, prefetch = \"all\""
    );
    println!("{}", base.root_line());
    println!(
        "input: that root (tar {:.1} MB, kept in {}); per image a marker file appended, `web` +24 MiB, `worker` +12 MiB and \
         `{LOCAL_BATCH}` +48 MiB of app data; converted with `gantry-agent image convert` ({} s \
         for all {}, not timed below)",
        mb(base.tar_size),
        base.path.display(),
        seconds(prepare_time),
        VARIANTS.len()
    );
    println!("registry: docker-registry on loopback behind one shaping proxy: {shaping}");
    println!();
    println!(
        "manifest → every card holds every image: {} s (per card: {}; applying took {} s)",
        seconds(all_done),
        complete_after
            .iter()
            .flatten()
            .map(|d| seconds(*d))
            .collect::<Vec<_>>()
            .join(", "),
        seconds(apply_time)
    );
    println!(
        "registry bytes meanwhile: {:.1} MB = {:.2} × ({CARDS} cards × {:.1} MB of images; the \
         busy cold start's own bytes included)",
        mb(prefetch_bytes),
        prefetch_bytes as f64 / (CARDS as u64 * image_bytes).max(1) as f64,
        mb(image_bytes)
    );
    println!();
    println!(
        "{:<52} {:>13} {:>24}",
        "cold start of `python3 -c 'print(1)'`", "first out ms", "link bytes → 1st out"
    );
    for (what, run) in runs {
        println!("{what:<52} {:>13.0} {:>24}", first(run), run.proxy_bytes);
    }
    println!(
        "(`{LOCAL_BATCH}` alone was in after {} s; link bytes are every card's while they prefetch)",
        seconds(local_done)
    );
    println!();
    let ratio = |run: &RunFigures| first(run) / idle_ms.max(1.0);
    let ended = |prefetching: bool| {
        if prefetching {
            ""
        } else {
            " (the prefetch had ended by the first output: the figure says little)"
        }
    };
    let local_ratio = ratio(&local);
    println!(
        "while this card prefetches: {local_ratio:.2} × idle (goal ≤ {GOAL_BUSY} ×): {}{}",
        if local_ratio <= GOAL_BUSY {
            "PASS"
        } else {
            "MISS"
        },
        ended(local_still_prefetching)
    );
    println!(
        "while all 4 cards prefetch: {:.2} × idle (the shared link: no card's fetcher decides \
         it){}",
        ratio(&busy),
        ended(busy_still_prefetching)
    );
    println!(
        "prefetched: {:.2} × the cold start of an image not prefetched ({:.1} × faster)",
        ratio(&prefetched),
        idle_ms / first(&prefetched).max(1.0)
    );
    Ok(())
}
