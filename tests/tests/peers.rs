//! The peer cache end to end: three agents on loopback, each with its own TCG guest, cache and
//! peer endpoint, sharing one real `docker-registry` behind a counting proxy. They run the same
//! lazy image one after another; the registry should carry each byte about once.
//!
//! A fourth "peer" lies: it is a proxy before the registry that flips a byte in every body.
//! The third agent lists it. It is caught while that agent runs the shared image if it ranks
//! first for some chunk (the fetch goes on from an honest peer); if not, a second image, which
//! no honest peer holds, makes every fetch ask it. Either way the guest reads correct bytes and
//! the liar is counted and put on backoff.
//!
//! One test: the steps build on each other (who holds what). Each is bounded and prints what
//! it measured (`cargo test -p gantry-e2e --test peers -- --nocapture`).

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gantry_agent::images::default_image;
use gantry_e2e::{TestAgent, TestVm, agent_binary, image_layers};
use gantry_oci::builder::{self, ImageConfigSpec, LayerBuilder};
use gantry_oci::manifest::Descriptor;
use gantry_testkit::{FaultProxy, Registry, free_port, noise};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a card may take to hold every chunk after its container ran (its fill, which
/// waits a few passes for the owners of the chunks it does not own).
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
/// The big file each image carries (read whole by the container).
const BIG: usize = 12 << 20;
const TOKEN: &str = "peer-token-for-the-e2e-cluster-0123";
/// What peer requests name (any valid name works: peers serve by digest).
const PEER_REPOSITORY: &str = "gantry/cache";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn succeed(agent: &TestAgent, output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}\n--- agent log ---\n{}",
        output.status,
        text(&output.stderr),
        tail(&agent.log())
    );
    text(&output.stdout)
}

/// One card: an agent with one VM and a peer endpoint.
struct Card {
    name: &'static str,
    agent: TestAgent,
    url: String,
}

/// A test image: busybox and a data layer with one big file.
struct TestImage {
    /// As the cards pull it (through the counting proxy).
    reference: String,
    big_sha: String,
    layers: Vec<Descriptor>,
    /// The layers' and config's sizes: what one full download costs.
    compressed_size: u64,
}

/// Builds image `name`, pushes it, converts it with `image convert` (to its own repository and
/// to the one the liar serves from), and names it as reached through `host`.
fn image(registry: &Registry, work: &Path, name: &str, seed: u64, host: &str) -> TestImage {
    let busybox = default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX))
        .expect("busybox layer");
    let big = noise(BIG, seed);
    let mut data = LayerBuilder::new();
    data.file("data/hello.txt", 0o644, format!("hello from {name}\n"))
        .unwrap();
    data.file("data/big.bin", 0o644, big.clone()).unwrap();
    let config = ImageConfigSpec {
        cmd: vec!["cat".into(), "/data/hello.txt".into()],
        env: vec!["PATH=/bin:/usr/bin".into()],
        ..Default::default()
    };
    let layout = work.join(name);
    builder::write_image(&layout, "v1", &[busybox, data], &config).expect("write image");
    let repo = format!("peers/{name}");
    registry.push(&layout, "v1", &format!("{repo}:v1"));
    let original = format!("{}/{repo}:v1", registry.host());
    // The same input gives the same digests: the liar's repository holds the same blobs.
    for destination in [
        format!("{}/{repo}:v1-erofs", registry.host()),
        format!("{}/{PEER_REPOSITORY}:{name}", registry.host()),
    ] {
        let convert = Command::new(agent_binary())
            .args(["image", "convert", "--chunk-size", "256k", &original])
            .arg(&destination)
            .output()
            .expect("image convert runs");
        assert!(
            convert.status.success(),
            "image convert: {}",
            text(&convert.stderr)
        );
    }
    let converted = format!("{}/{repo}:v1-erofs", registry.host());
    let layers = image_layers(&converted).expect("the converted image's layers");
    let manifest = gantry_e2e::raw_manifest(&converted).expect("the converted manifest");
    let config_size = manifest["config"]["size"].as_u64().expect("config size");
    let compressed_size = layers.iter().map(|layer| layer.size).sum::<u64>() + config_size;
    let digest = sha256_hex(&big);
    TestImage {
        reference: format!("{host}/{repo}:v1-erofs"),
        big_sha: digest,
        layers,
        compressed_size,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    gantry_oci::Digest::of(bytes).hex().to_string()
}

/// Runs `sha256sum /data/big.bin` from `image` on `card`'s VM; returns the time to its output.
fn run_big(card: &Card, image: &TestImage) -> Duration {
    let started = Instant::now();
    let output = card.agent.cli_within(
        &[
            "run",
            "--vm",
            card.name,
            "--rm",
            "-q",
            &image.reference,
            "sha256sum",
            "/data/big.bin",
        ],
        RUN_TIMEOUT,
    );
    let elapsed = started.elapsed();
    let out = succeed(&card.agent, output, &format!("run on {}", card.name));
    assert!(
        out.starts_with(&image.big_sha),
        "{} read big.bin as {out:?}, not {}",
        card.name,
        image.big_sha
    );
    elapsed
}

/// Waits until `card` holds every chunk of `image`.
fn wait_complete(card: &Card, image: &TestImage) -> Duration {
    let started = Instant::now();
    loop {
        let missing: Vec<String> = image
            .layers
            .iter()
            .filter_map(|layer| {
                let (present, chunks) = card
                    .agent
                    .layer_presence(&layer.digest)
                    .expect("images --json");
                (present < chunks).then(|| format!("{}: {present}/{chunks}", layer.digest))
            })
            .collect();
        if missing.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < COMPLETE_TIMEOUT,
            "{} still misses chunks after {COMPLETE_TIMEOUT:?}: {missing:?}\n--- agent log ---\n{}",
            card.name,
            tail(&card.agent.log())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn lazy_stats(runtime: &tokio::runtime::Runtime, card: &Card) -> gantry_api::LazyStats {
    runtime
        .block_on(gantry_api::ApiClient::new(card.agent.api_socket()).get("/v1/lazy"))
        .expect("/v1/lazy answers")
}

/// Bytes the counting proxy sent from blobs.
fn registry_bytes(proxy: &FaultProxy) -> u64 {
    proxy.log.lock().unwrap().blob_bytes_sent
}

/// `GET url` at a peer endpoint, with the token or without; returns the status and the time.
fn peer_get(runtime: &tokio::runtime::Runtime, url: &str, token: Option<&str>) -> (u16, Duration) {
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let mut request = client.get(url).header("range", "bytes=0-1023");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let started = Instant::now();
        let response = request.send().await.expect("the peer endpoint answers");
        let elapsed = started.elapsed();
        (response.status().as_u16(), elapsed)
    })
}

#[test]
fn three_cards_fetch_an_image_from_the_registry_about_once() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let registry = Registry::start();
    let upstream = format!("http://{}", registry.host());
    let proxy = runtime.block_on(FaultProxy::start(&upstream));
    let liar = runtime.block_on(FaultProxy::start(&upstream));
    liar.faults.corrupt_blobs.store(true, Ordering::SeqCst);
    let liar_url = format!("http://{}", liar.host());
    let work = tempfile::tempdir().expect("work dir");
    let token_file = work.path().join("peer-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");

    let names = ["peer-a", "peer-b", "peer-c"];
    let urls: Vec<String> = names
        .iter()
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let cards: Vec<Card> = names
        .iter()
        .enumerate()
        .map(|(i, &name)| {
            let mut settings = format!(
                "peer_listen = {:?}\npeer_token_file = {:?}\n",
                urls[i].trim_start_matches("http://"),
                token_file
            );
            let mut peers: Vec<&str> = urls
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, url)| url.as_str())
                .collect();
            if name == "peer-c" {
                peers.push(&liar_url);
            }
            for peer in peers {
                settings.push_str(&format!("[[peer]]\nurl = {peer:?}\n"));
            }
            let agent =
                TestAgent::start_with(&[TestVm::new(name, 60 + i as u64).memory(384)], &settings)
                    .expect("agent starts");
            Card {
                name,
                agent,
                url: urls[i].clone(),
            }
        })
        .collect();
    let started = Instant::now();
    for card in &cards {
        card.agent
            .wait_guest_info(card.name, BOOT_TIMEOUT)
            .expect("guest boots");
    }
    println!("three guests booted in {:?}", started.elapsed());

    // The endpoint: 401 without the token, 404 at once for what it does not hold.
    let absent = format!(
        "{}/v2/{PEER_REPOSITORY}/blobs/sha256:{}",
        cards[0].url,
        "0".repeat(64)
    );
    let (status, _) = peer_get(&runtime, &absent, None);
    assert_eq!(status, 401, "no token");
    let (status, _) = peer_get(&runtime, &absent, Some("not-the-cluster-token-at-all"));
    assert_eq!(status, 401, "a wrong token");
    let (status, elapsed) = peer_get(&runtime, &absent, Some(TOKEN));
    println!("a blob the peer does not hold: {status} in {elapsed:?}");
    assert_eq!(status, 404);
    assert!(elapsed < Duration::from_millis(50), "404 took {elapsed:?}");

    // One image, three cards, one after another: the first from the registry, the others from it.
    let shared = image(&registry, work.path(), "shared", 11, &proxy.host());
    println!(
        "image {}: {} bytes compressed ({} layers)",
        shared.reference,
        shared.compressed_size,
        shared.layers.len()
    );
    let mut before = 0;
    for card in &cards {
        let first_output = run_big(card, &shared);
        let complete = wait_complete(card, &shared);
        let total = registry_bytes(&proxy);
        println!(
            "{}: big.bin read in {first_output:?}, every chunk held {complete:?} later; \
             registry sent {} bytes for it ({} in all)",
            card.name,
            total - before,
            total
        );
        before = total;
    }
    let egress = registry_bytes(&proxy);
    let ratio = egress as f64 / shared.compressed_size as f64;
    println!(
        "registry egress for three cards: {egress} bytes = {ratio:.3} × the image ({} bytes)",
        shared.compressed_size
    );
    assert!(
        ratio <= 1.1,
        "the registry sent {ratio:.3}× the image for three cards"
    );
    let (a, b) = (
        lazy_stats(&runtime, &cards[0]),
        lazy_stats(&runtime, &cards[1]),
    );
    println!(
        "peer-a served {} requests, {} bytes; peer-b's sources: {:?}",
        a.peers.served_requests, a.peers.served_bytes, b.origins
    );
    assert!(a.peers.served_bytes > 0, "peer-a served nothing");
    let from_a = b
        .origins
        .iter()
        .filter(|origin| origin.origin.contains(&cards[0].url))
        .map(|origin| origin.bytes)
        .sum::<u64>();
    assert!(
        from_a > 0,
        "peer-b got nothing from peer-a: {:?}",
        b.origins
    );

    let liar_health = |stats: &gantry_api::LazyStats| {
        stats
            .peers
            .peers
            .iter()
            .find(|peer| peer.url == liar_url)
            .cloned()
            .expect("peer-c lists the liar")
    };
    println!(
        "the liar, as peer-c saw it while running the shared image: {:?} ({} bytes sent)",
        liar_health(&lazy_stats(&runtime, &cards[2])),
        registry_bytes(&liar)
    );

    // A second image only the liar "holds": a live liar is asked on every fetch, its bytes
    // fail, the guest reads the registry's.
    let fresh = image(&registry, work.path(), "fresh", 21, &proxy.host());
    let first_output = run_big(&cards[2], &fresh);
    let c = lazy_stats(&runtime, &cards[2]);
    let liar_health = liar_health(&c);
    println!("peer-c read a fresh image in {first_output:?}; the liar: {liar_health:?}");
    assert!(liar_health.bad_bytes >= 1, "the lie went unseen");
    assert!(!liar_health.live, "the liar is still asked");
    let honest_bad: u64 = c
        .peers
        .peers
        .iter()
        .filter(|peer| peer.url != liar_url)
        .map(|peer| peer.bad_bytes)
        .sum();
    assert_eq!(honest_bad, 0, "an honest peer was blamed: {:?}", c.peers);
    assert!(
        c.verification_failures >= 1,
        "the fetcher counted no failed verification"
    );
}
