//! The peer cache (issue 14): N = 1, 3 and 6 cards (agents on loopback, each with a booted TCG
//! guest and its own cache) start the same image cold at the same moment, the registry behind
//! the lazy benchmark's shaping proxy (100 Mbit/s, 20 ms added round trip), once without peers
//! and once with the N cards as each other's peers. Figures: the registry's egress until every
//! card holds the whole image (the fill completes it), ÷ the image's size; and p50/p95 of the
//! time to first output (nearest rank over the N cards). Without peers is the reference,
//! measured in the same run. A benchmark reports: it asserts nothing about the figures, only
//! that every step worked.
//!
//! Run: `qemu/build-guest.sh && cargo build --release -p gantry-agent && cargo bench -p gantry-e2e
//! --bench peer_cache` (on a shared machine under the guests' lock:
//! `flock /tmp/gantry-guests.lock cargo bench -p gantry-e2e --bench peer_cache`). No network:
//! the root file system is the lazy-start benchmark's, kept in `target/bench-data/` (made with
//! debootstrap from the configured apt mirror on the first run of either, or from the host's
//! files when no mirror is reachable; the `root:` line says which).
//!
//! The image: `debootstrap --variant=minbase --include=python3-minimal bookworm` as one
//! tar+gzip layer with a marker file appended per round (so every round is cold on every card),
//! converted with `gantry-agent image convert`. Each card runs `python3 -c 'print(1)'` with the
//! default pull mode (`fill`: lazy, then completed in the background). Peers reach each other
//! on loopback, unshaped: the cards of one rack, the registry across a WAN.

mod common;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use gantry_e2e::{TestAgent, TestVm, image_layers};
use gantry_oci::manifest::Descriptor;
use gantry_testkit::{Registry, Shaping, ShapingProxy, free_port};

use common::*;

/// The cluster sizes measured.
const SIZES: [usize; 3] = [1, 3, 6];
const GUEST_MIB: u32 = 768;
const COMMAND: [&str; 3] = ["python3", "-c", "print(1)"];
const REPOSITORY: &str = "bench/peers";
const LINK_MBIT: u64 = 100;
const LINK_ROUND_TRIP: Duration = Duration::from_millis(20);
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const TOKEN: &str = "peer-cache-benchmark-token-0123456789";

fn main() -> ExitCode {
    run_bench("peer_cache", bench)
}

/// One card: an agent with a guest and a peer endpoint.
struct Card {
    agent: TestAgent,
    url: String,
}

/// One round's figures.
struct Round {
    cards: usize,
    peers: bool,
    first_outputs: Vec<Duration>,
    egress: u64,
    image_bytes: u64,
    complete_after: Duration,
}

/// The nearest-rank percentile `p` (0–100) of `values` (sorted here).
fn percentile(values: &[Duration], p: usize) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Puts a manifest naming `peers` (and no images) in force on `card`.
fn set_peers(card: &Card, peers: &[&str], work: &Path) -> Result<()> {
    let path = work.join(format!("peers-{}.toml", free_port()));
    let mut manifest = String::from("version = 1\n");
    for peer in peers {
        manifest += &format!("\n[[peer]]\nurl = \"{peer}\"\n");
    }
    std::fs::write(&path, manifest)?;
    let path = path.to_str().context("a UTF-8 path")?;
    succeeded(
        card.agent
            .cli_within(&["manifest", "apply", path], RUN_TIMEOUT),
        "manifest apply",
    )?;
    Ok(())
}

/// Whether `card` holds every chunk of `layers`.
fn holds(card: &Card, layers: &[Descriptor]) -> Result<bool> {
    for layer in layers {
        let (present, chunks) = card.agent.layer_presence(&layer.digest)?;
        if present < chunks {
            return Ok(false);
        }
    }
    Ok(true)
}

fn bench() -> Result<()> {
    let data = bench_data_dir();
    let base = rootfs_layer(&data)?;
    let work = tempfile::Builder::new()
        .prefix("peer-cache-")
        .tempdir_in(&data)?;
    let registry = Registry::start();
    let at_registry = |tag: &str| format!("{}/{REPOSITORY}:{tag}", registry.host());

    // One image per round, each with its own marker: every round starts cold everywhere.
    let rounds: Vec<(usize, bool)> = SIZES
        .iter()
        .flat_map(|&cards| [(cards, false), (cards, true)])
        .collect();
    let tag =
        |cards: usize, peers: bool| format!("n{cards}-{}", if peers { "peers" } else { "alone" });
    let started = Instant::now();
    for &(cards, peers) in &rounds {
        push_converted_variant(
            &registry,
            REPOSITORY,
            &base,
            work.path(),
            &tag(cards, peers),
            0,
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

    let token_file = work.path().join("peer-token");
    std::fs::write(&token_file, TOKEN)?;
    let largest = SIZES.iter().copied().max().unwrap_or(1);
    let mut cards = Vec::new();
    for i in 0..largest {
        let listen = format!("127.0.0.1:{}", free_port());
        let settings = format!(
            "peer_listen = {listen:?}\npeer_token_file = {token_file:?}\n\
             [lazy]\ntrace_seconds = 0\n"
        );
        let agent = TestAgent::start_with(
            &[TestVm::new(VM, 90 + i as u64).memory(GUEST_MIB)],
            &settings,
        )?;
        cards.push(Card {
            agent,
            url: format!("http://{listen}"),
        });
    }
    let booted = Instant::now();
    for card in &cards {
        card.agent.wait_guest_info(VM, BOOT_TIMEOUT)?;
    }
    println!(
        "{largest} guests booted in {:.1} s",
        booted.elapsed().as_secs_f64()
    );

    let mut figures = Vec::new();
    for &(count, peers) in &rounds {
        let tag = tag(count, peers);
        let image = through_proxy(&tag);
        let layers = image_layers(&at_registry(&tag))?;
        let manifest = gantry_e2e::raw_manifest(&at_registry(&tag))?;
        let image_bytes = layers.iter().map(|layer| layer.size).sum::<u64>()
            + manifest["config"]["size"].as_u64().unwrap_or(0);
        let members = &cards[..count];
        let urls: Vec<&str> = members.iter().map(|card| card.url.as_str()).collect();
        for card in &cards {
            set_peers(card, if peers { &urls } else { &[] }, work.path())?;
        }
        let before = proxy.bytes_down();
        let at_once = Instant::now();
        let runs: Vec<Result<RunFigures>> = std::thread::scope(|scope| {
            let handles: Vec<_> = members
                .iter()
                .map(|card| {
                    let (proxy, runtime, image) = (&proxy, &runtime, &image);
                    scope.spawn(move || {
                        measured_run(&card.agent, proxy, runtime, &[], image, &COMMAND)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("a run thread"))
                .collect()
        });
        let mut first_outputs = Vec::new();
        for run in runs {
            let run = run?;
            ensure!(
                run.stdout == "1\n",
                "{tag}: the container printed {:?}",
                run.stdout
            );
            first_outputs.push(run.first_output.unwrap_or(run.exit));
        }
        loop {
            let mut all = true;
            for card in members {
                all &= holds(card, &layers)?;
            }
            if all {
                break;
            }
            ensure!(
                at_once.elapsed() < COMPLETE_TIMEOUT,
                "{tag}: the cards did not complete the image within {COMPLETE_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        let round = Round {
            cards: count,
            peers,
            first_outputs,
            egress: proxy.bytes_down() - before,
            image_bytes,
            complete_after: at_once.elapsed(),
        };
        println!(
            "{tag}: first outputs {:?} ms, registry egress {:.1} MB, complete after {:.1} s",
            round
                .first_outputs
                .iter()
                .map(|d| d.as_millis())
                .collect::<Vec<_>>(),
            mb(round.egress),
            round.complete_after.as_secs_f64()
        );
        figures.push(round);
    }

    println!();
    println!(
        "peer cache (issue 14): N cards start one image cold at once, default pull mode (fill); \
         with peers, the N cards are each other's peers (manifest [[peer]])"
    );
    println!("{}", base.root_line());
    println!(
        "input: that root (tar {:.1} MB, kept in {}), a marker file appended per round, converted with `gantry-agent image \
         convert` ({:.1} s for {} rounds, not timed below); command `{}`",
        mb(base.tar_size),
        base.path.display(),
        prepare_time.as_secs_f64(),
        rounds.len(),
        COMMAND.join(" ")
    );
    println!(
        "registry: docker-registry on loopback behind a shaping proxy ({shaping}); peers on \
         loopback, unshaped; guests: TCG, {GUEST_MIB} MiB, 2 host cores shared by all"
    );
    println!();
    println!(
        "{:>2} {:>6} {:>12} {:>17} {:>10} {:>10} {:>13}",
        "N", "peers", "image MB", "egress ÷ image", "p50 ms", "p95 ms", "complete s"
    );
    for round in &figures {
        println!(
            "{:>2} {:>6} {:>12.1} {:>17.2} {:>10} {:>10} {:>13.1}",
            round.cards,
            if round.peers { "yes" } else { "no" },
            mb(round.image_bytes),
            round.egress as f64 / round.image_bytes.max(1) as f64,
            percentile(&round.first_outputs, 50).as_millis(),
            percentile(&round.first_outputs, 95).as_millis(),
            round.complete_after.as_secs_f64()
        );
    }
    println!();
    for &count in &SIZES {
        let find = |peers: bool| {
            figures
                .iter()
                .find(|round| round.cards == count && round.peers == peers)
        };
        if let (Some(alone), Some(with)) = (find(false), find(true)) {
            println!(
                "N = {count}: egress with peers {:.2} × without; p50 first output {:.2} × without",
                with.egress as f64 / alone.egress.max(1) as f64,
                ms(percentile(&with.first_outputs, 50))
                    / ms(percentile(&alone.first_outputs, 50)).max(1.0)
            );
        }
    }
    println!(
        "(egress: the link's bytes, HTTP included, from the moment the N runs start until every \
         one of the N cards holds every chunk)"
    );
    Ok(())
}
