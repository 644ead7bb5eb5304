//! Lazy loading end to end: images converted to the chunked EROFS format
//! (`gantry-agent image convert`), pushed to a real `docker-registry`, reached through a
//! fault-injecting proxy, and run in real TCG guests before their layers are downloaded.
//!
//! One agent with two VMs, booted once; tests take turns (they share the proxy's fault
//! switches). The crash test has its own agent without VMs. Each step is bounded in time and
//! prints what it measured (`cargo test -p gantry-e2e --test lazy_loading -- --nocapture`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use gantry_agent::images::default_image;
use gantry_e2e::{TestAgent, TestVm, agent_binary, image_layers};
use gantry_oci::Digest;
use gantry_oci::builder::{self, ImageConfigSpec, LayerBuilder};
use gantry_oci::chunked::IndexLocation;
use gantry_oci::manifest::Descriptor;
use gantry_testkit::proxy::FlipByte;
use gantry_testkit::{FaultProxy, Registry, noise};

const VM_A: &str = "lazy-a";
const VM_B: &str = "lazy-b";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Size of the file each test image carries and most runs never read.
const BIG: usize = 24 << 20;
/// How long a guest's read of a chunk no origin delivers may wait (the agent's setting here).
const PARK_TIMEOUT_SECS: u64 = 5;
/// How long the shared agent records a cold start's reads as the image's startup trace (each
/// test runs its own images, so no test replays another's trace).
const TRACE_SECONDS: u64 = 4;

struct Fixture {
    agent: TestAgent,
    registry: Registry,
    proxy: FaultProxy,
    runtime: tokio::runtime::Runtime,
    work: tempfile::TempDir,
}

fn settings() -> String {
    format!(
        "[lazy]\nmode = \"lazy\"\npark_timeout_secs = {PARK_TIMEOUT_SECS}\nfailure_hold_ms = 300\n\
         retries = 1\ntrace_seconds = {TRACE_SECONDS}\n"
    )
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let registry = Registry::start();
        let proxy = runtime.block_on(FaultProxy::start(&format!("http://{}", registry.host())));
        let agent = TestAgent::start_with(
            &[
                TestVm::new(VM_A, 40).memory(512),
                TestVm::new(VM_B, 41).memory(512),
            ],
            &settings(),
        )
        .expect("agent starts");
        agent
            .wait_guest_info(VM_A, BOOT_TIMEOUT)
            .expect("vm a boots");
        agent
            .wait_guest_info(VM_B, BOOT_TIMEOUT)
            .expect("vm b boots");
        Fixture {
            agent,
            registry,
            proxy,
            runtime,
            work: tempfile::tempdir().expect("work dir"),
        }
    })
}

/// One test at a time: they share the proxy's fault switches.
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn cli_on(agent: &TestAgent, args: &[&str], timeout: Duration) -> Output {
    agent.cli_within(args, timeout)
}

fn cli(args: &[&str]) -> Output {
    cli_on(&fixture().agent, args, Duration::from_secs(180))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn succeed(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}\n--- agent log ---\n{}",
        output.status,
        text(&output.stderr),
        tail(&fixture().agent.log())
    );
    text(&output.stdout)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Digest::of(bytes).hex().to_string()
}

/// A test image: busybox and a data layer with a small file, two big files, and a tree.
struct TestImage {
    /// `host/repo:tag` of the original (tar+gzip layers).
    original: String,
    /// The same converted to the lazy format, as reached through `host`.
    converted: String,
    big_sha: String,
    big2_sha: String,
    /// The converted data layer's descriptor.
    data_layer: Descriptor,
}

/// Builds image `name` (its data seeded by `seed`), pushes it, converts it with
/// `gantry-agent image convert`, and names the converted one as seen through `host`.
fn image(fixture: &Fixture, name: &str, seed: u64, host: &str) -> TestImage {
    let busybox = default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX))
        .expect("busybox layer");
    let (big, big2) = (noise(BIG, seed), noise(BIG / 2, seed + 1));
    let mut data = LayerBuilder::new();
    data.file("data/hello.txt", 0o644, format!("hello from {name}\n"))
        .unwrap();
    data.file("data/big.bin", 0o644, big.clone()).unwrap();
    data.file("data/big2.bin", 0o644, big2.clone()).unwrap();
    for i in 0..50 {
        data.file(&format!("data/tree/f{i}"), 0o644, format!("{name} {i}\n"))
            .unwrap();
    }
    let config = ImageConfigSpec {
        cmd: vec!["cat".into(), "/data/hello.txt".into()],
        env: vec!["PATH=/bin:/usr/bin".into()],
        ..Default::default()
    };
    let layout = fixture.work.path().join(name);
    builder::write_image(&layout, "v1", &[busybox, data], &config).expect("write image");
    let repo = format!("lazy/{name}");
    fixture.registry.push(&layout, "v1", &format!("{repo}:v1"));
    let original = format!("{}/{repo}:v1", fixture.registry.host());
    let converted_at_registry = format!("{}/{repo}:v1-erofs", fixture.registry.host());
    let started = Instant::now();
    let convert = Command::new(agent_binary())
        .args(["image", "convert", &original, &converted_at_registry])
        .output()
        .expect("image convert runs");
    assert!(
        convert.status.success(),
        "image convert: {}",
        text(&convert.stderr)
    );
    println!("{name}: converted and pushed in {:?}", started.elapsed());
    let data_layer = image_layers(&converted_at_registry)
        .expect("the converted image's layers")
        .pop()
        .expect("a data layer");
    TestImage {
        original: format!("{host}/{repo}:v1"),
        converted: format!("{host}/{repo}:v1-erofs"),
        big_sha: sha256_hex(&big),
        big2_sha: sha256_hex(&big2),
        data_layer,
    }
}

/// `images --json`'s presence of the layer blob `digest`: (present chunks, chunks).
fn presence(agent: &TestAgent, digest: &Digest) -> (u64, u64) {
    agent.layer_presence(digest).expect("images --json")
}

fn lazy_stats(agent: &TestAgent) -> gantry_api::LazyStats {
    fixture()
        .runtime
        .block_on(gantry_api::ApiClient::new(agent.api_socket()).get("/v1/lazy"))
        .expect("/v1/lazy answers")
}

/// Bytes `range` (`start-end`, inclusive; `None`: all) of blob `digest` in `repository` of the
/// registry, fetched directly.
fn registry_blob(repository: &str, digest: &Digest, range: Option<(u64, u64)>) -> Vec<u8> {
    let fixture = fixture();
    let url = format!(
        "http://{}/v2/{repository}/blobs/{digest}",
        fixture.registry.host()
    );
    fixture.runtime.block_on(async {
        let mut request = reqwest::Client::new().get(url);
        if let Some((start, end)) = range {
            request = request.header("range", format!("bytes={start}-{end}"));
        }
        let response = request.send().await.expect("blob request");
        assert!(response.status().is_success(), "{}", response.status());
        response.bytes().await.expect("blob body").to_vec()
    })
}

/// `lazy/NAME` of an image reference.
fn repository(reference: &str) -> &str {
    let (name, _) = reference.rsplit_once(':').unwrap();
    name.split_once('/').unwrap().1
}

#[test]
fn a_converted_image_starts_before_its_layers_are_present() {
    let fixture = fixture();
    let _turn = turn();
    let image = image(fixture, "first", 1, &fixture.proxy.host());
    let started = Instant::now();
    let output = cli(&[
        "run",
        "--vm",
        VM_A,
        "--rm",
        "--timing",
        "--pull-mode",
        "lazy",
        &image.converted,
    ]);
    let elapsed = started.elapsed();
    let stdout = succeed(output.clone(), "lazy run");
    assert_eq!(stdout, "hello from first\n");
    let stderr = text(&output.stderr);
    let timing: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("timing:"))
        .collect();
    println!("lazy run of {} in {elapsed:?}: {timing:?}", image.converted);
    assert!(
        timing
            .iter()
            .any(|line| line.contains("lazy layers at first output")),
        "--timing reports what was fetched: {timing:?}"
    );
    // The data layer was not complete when the output came, and still is not (lazy mode).
    let (present, chunks) = presence(&fixture.agent, &image.data_layer.digest);
    println!("data layer after the run: {present} of {chunks} chunks present");
    assert!(chunks >= 36, "the data layer has {chunks} chunks");
    assert!(
        present < chunks / 4,
        "only what the container read was fetched: {present} of {chunks}"
    );
    // Fetched through ranged requests, never the whole blob.
    let ranges = fixture.proxy.blob_ranges(&image.data_layer.digest);
    assert!(
        !ranges.is_empty() && ranges.iter().all(Option::is_some),
        "{ranges:?}"
    );
}

#[test]
fn original_and_converted_images_have_the_same_files() {
    let fixture = fixture();
    let _turn = turn();
    let image = image(fixture, "same", 2, &fixture.proxy.host());
    let listing = [
        "sh",
        "-c",
        "cd / && find bin data -type f | sort | xargs sha256sum",
    ];
    let mut original = vec!["run", "--vm", VM_A, "--rm", "-q", &image.original];
    original.extend_from_slice(&listing);
    let mut converted = vec![
        "run",
        "--vm",
        VM_B,
        "--rm",
        "-q",
        "--pull-mode",
        "fill",
        &image.converted,
    ];
    converted.extend_from_slice(&listing);
    let started = Instant::now();
    let original = succeed(cli(&original), "run of the original");
    let original_took = started.elapsed();
    let started = Instant::now();
    let converted = succeed(cli(&converted), "run of the converted image");
    println!(
        "checksum listing: original (eager) {original_took:?}, converted (lazy + fill) {:?}",
        started.elapsed()
    );
    assert_eq!(original, converted);
    assert!(original.contains(&image.big_sha) && original.contains(&image.big2_sha));
    assert!(original.lines().count() > 50, "{original}");
    // The fill completes the layer in the background.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (present, chunks) = presence(&fixture.agent, &image.data_layer.digest);
        if present == chunks {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fill stuck at {present}/{chunks}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The blob offset of a byte inside chunk `chunk` of a converted layer (the middle of its
/// stored frame).
fn offset_in_chunk(image: &TestImage, chunk: usize) -> (u64, usize) {
    let location = IndexLocation::from_descriptor(&image.data_layer).unwrap();
    let section = registry_blob(
        repository(&image.converted),
        &image.data_layer.digest,
        Some((location.range.start, location.range.end - 1)),
    );
    let index = location.parse(&section).expect("the chunk index parses");
    let range = index.blob_range(chunk);
    (range.start + (range.end - range.start) / 2, index.len())
}

#[test]
fn bytes_that_fail_verification_never_reach_the_guest() {
    let fixture = fixture();
    let _turn = turn();
    let image = image(fixture, "flip", 3, &fixture.proxy.host());
    // The middle of the layer is inside big.bin.
    let (_, chunks) = offset_in_chunk(&image, 0);
    let (offset, _) = offset_in_chunk(&image, chunks / 3);
    let failures_before = lazy_stats(&fixture.agent).verification_failures;
    *fixture.proxy.faults.flip_blob_byte.lock().unwrap() = Some(FlipByte {
        digest: image.data_layer.digest.clone(),
        offset,
        times: 1,
    });
    let output = succeed(
        cli(&[
            "run",
            "--vm",
            VM_A,
            "--rm",
            "-q",
            &image.converted,
            "sha256sum",
            "/data/big.bin",
        ]),
        "sha256sum through a proxy that lies once",
    );
    assert!(output.starts_with(&image.big_sha), "{output}");
    let failures = lazy_stats(&fixture.agent).verification_failures;
    assert!(
        failures > failures_before,
        "the lie was caught and refetched"
    );

    // A proxy that always lies about one chunk of big2.bin: the read fails with EIO, and the
    // agent names the layer and the chunk.
    let (_, chunks) = offset_in_chunk(&image, 0);
    let target = chunks - 3;
    let (offset, _) = offset_in_chunk(&image, target);
    *fixture.proxy.faults.flip_blob_byte.lock().unwrap() = Some(FlipByte {
        digest: image.data_layer.digest.clone(),
        offset,
        times: u32::MAX,
    });
    let output = cli(&[
        "run",
        "--vm",
        VM_A,
        "--rm",
        "-q",
        &image.converted,
        "cat",
        "/data/big2.bin",
    ]);
    *fixture.proxy.faults.flip_blob_byte.lock().unwrap() = None;
    assert!(
        !output.status.success(),
        "a read over a lying chunk must fail"
    );
    assert!(
        text(&output.stderr).contains("Input/output error"),
        "stderr: {}",
        text(&output.stderr)
    );
    let log = fixture.agent.log();
    let named = format!("layer {} chunk {target}", image.data_layer.digest);
    assert!(
        log.contains(&named),
        "the agent log names {named:?}:\n{}",
        tail(&log)
    );
}

#[test]
fn two_vms_starting_the_same_image_fetch_each_chunk_once() {
    let fixture = fixture();
    let _turn = turn();
    let image = image(fixture, "twins", 4, &fixture.proxy.host());
    let run = |vm: &'static str, converted: String| {
        let api = fixture.agent.api_socket().to_path_buf();
        std::thread::spawn(move || {
            Command::new(agent_binary())
                .arg("--api-socket")
                .arg(api)
                .args([
                    "run",
                    "--vm",
                    vm,
                    "--rm",
                    "-q",
                    &converted,
                    "sha256sum",
                    "/data/big.bin",
                ])
                .output()
                .expect("run")
        })
    };
    let started = Instant::now();
    let (a, b) = (
        run(VM_A, image.converted.clone()),
        run(VM_B, image.converted.clone()),
    );
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    println!("two VMs read big.bin at once in {:?}", started.elapsed());
    assert!(succeed(a, "vm a").starts_with(&image.big_sha));
    assert!(succeed(b, "vm b").starts_with(&image.big_sha));
    // One copy on the card: both VMs map the one cache file, which `images` counts once.
    let data_erofs = erofs_digest(&image.data_layer);
    for vm in [VM_A, VM_B] {
        assert!(
            mapped_layers(vm).contains(&data_erofs),
            "{vm} maps the data layer"
        );
    }
    let images = fixture
        .agent
        .cli_json(&["images", "--json"])
        .expect("images");
    let listed = images
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|entry| entry["layers"].as_array().cloned().unwrap_or_default())
        .filter(|layer| layer["blob_digest"] == image.data_layer.digest.to_string().as_str())
        .count();
    assert_eq!(listed, 1, "the data layer is one cache entry");
    assert!(
        layer_dir(&fixture.agent, &image.data_layer.digest)
            .join("image.erofs")
            .is_file()
    );
    // No byte of the layer was asked for twice.
    let mut seen = BTreeSet::new();
    for range in fixture.proxy.blob_ranges(&image.data_layer.digest) {
        let range = range.expect("ranged");
        let (start, end) = range
            .strip_prefix("bytes=")
            .and_then(|r| r.split_once('-'))
            .expect("a byte range");
        let (start, end): (u64, u64) = (start.parse().unwrap(), end.parse().unwrap());
        for (other_start, other_end) in &seen {
            assert!(
                end < *other_start || start > *other_end,
                "bytes {start}-{end} fetched again (overlaps {other_start}-{other_end})"
            );
        }
        seen.insert((start, end));
    }
}

/// The EROFS image digest of a converted layer (what a VM's layer store maps it by).
fn erofs_digest(layer: &Descriptor) -> String {
    IndexLocation::from_descriptor(layer)
        .expect("a lazy-format layer")
        .uncompressed_digest
        .expect("an uncompressed digest")
        .to_string()
}

/// The layers mapped into `vm`'s layer store.
fn mapped_layers(vm: &str) -> Vec<String> {
    let fixture = fixture();
    let status: gantry_api::VmStatus = fixture
        .runtime
        .block_on(
            gantry_api::ApiClient::new(fixture.agent.api_socket()).get(&format!("/v1/vms/{vm}")),
        )
        .expect("/v1/vms/VM answers");
    status.mapped_layers
}

/// A proxy of the test's own before the registry: stopping it is the registry going away for
/// that test only, leaving the other tests' proxy alone.
fn own_proxy(fixture: &Fixture) -> FaultProxy {
    fixture.runtime.block_on(FaultProxy::start(&format!(
        "http://{}",
        fixture.registry.host()
    )))
}

#[test]
fn a_registry_that_disappears_fails_missing_reads_only() {
    let fixture = fixture();
    let _turn = turn();
    let proxy = own_proxy(fixture);
    let image = image(fixture, "vanish", 5, &proxy.host());
    let name = "vanish";
    succeed(
        cli(&[
            "run",
            "--vm",
            VM_B,
            "-d",
            "--name",
            name,
            &image.converted,
            "sh",
            "-c",
            "cat /data/hello.txt; sleep 600",
        ]),
        "detached run",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !text(&cli(&["logs", "--vm", VM_B, name]).stdout).contains("hello from vanish") {
        assert!(Instant::now() < deadline, "no output from the container");
        std::thread::sleep(Duration::from_millis(100));
    }
    proxy.stop();
    // Present chunks go on being served.
    let hello = succeed(
        cli(&["exec", "--vm", VM_B, name, "cat", "/data/hello.txt"]),
        "exec of a present file",
    );
    assert_eq!(hello, "hello from vanish\n");
    // A missing one fails after the park timeout, not never.
    let started = Instant::now();
    let output = cli(&["exec", "--vm", VM_B, name, "sha256sum", "/data/big.bin"]);
    let waited = started.elapsed();
    println!("a read with the registry gone failed after {waited:?}");
    assert!(!output.status.success(), "{}", text(&output.stdout));
    assert!(
        text(&output.stderr).contains("Input/output error"),
        "{}",
        text(&output.stderr)
    );
    assert!(
        waited >= Duration::from_secs(PARK_TIMEOUT_SECS - 1),
        "{waited:?}"
    );
    assert!(
        waited < Duration::from_secs(PARK_TIMEOUT_SECS * 6),
        "{waited:?}"
    );
    // The container can be killed and removed cleanly.
    succeed(cli(&["rm", "--vm", VM_B, "-f", name]), "rm -f");
    let ps = succeed(cli(&["ps", "--vm", VM_B, "-a", "--json"]), "ps");
    assert!(!ps.contains(name), "{ps}");
}

/// `gantry-agent cache ARGS --cache-dir DIR` (no agent API involved; agents may be running).
fn cache_cli(cache_dir: &Path, args: &[&str]) -> Output {
    Command::new(agent_binary())
        .arg("cache")
        .args(args)
        .arg("--cache-dir")
        .arg(cache_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("gantry-agent cache runs")
}

#[test]
fn a_bundle_from_one_card_starts_containers_on_another_with_the_registry_down() {
    let fixture = fixture();
    let _turn = turn();
    let proxy = own_proxy(fixture);
    let image = image(fixture, "bundled", 11, &proxy.host());
    // Card A (no VMs) prefetches both forms whole: the lazy one, and the tar one it converts.
    let card_a = TestAgent::start_with(&[], "[lazy]\nmode = \"lazy\"\ntrace_seconds = 0\n")
        .expect("card a starts");
    for reference in [&image.converted, &image.original] {
        succeed(
            cli_on(
                &card_a,
                &["prefetch", "--pull-mode", "eager", reference],
                Duration::from_secs(120),
            ),
            "prefetch on card a",
        );
    }
    let bundle = fixture.work.path().join("bundle");
    let started = Instant::now();
    let exported = succeed(
        cache_cli(
            &card_a.state_dir().join("cache"),
            &[
                "export",
                &image.converted,
                &image.original,
                bundle.to_str().unwrap(),
            ],
        ),
        "cache export beside a running agent",
    );
    println!("{exported}exported in {:?}", started.elapsed());
    assert!(exported.contains("as cached"), "{exported}");
    assert!(exported.contains("re-chunked"), "{exported}");
    drop(card_a);

    proxy.stop();
    // Card B has never seen the image; the bundle goes into its cache while it runs.
    let cache_b = fixture.agent.state_dir().join("cache");
    let started = Instant::now();
    let imported = succeed(
        cache_cli(&cache_b, &["import", bundle.to_str().unwrap()]),
        "cache import",
    );
    println!("{imported}imported in {:?}", started.elapsed());
    for reference in [&image.converted, &image.original] {
        let started = Instant::now();
        let output = succeed(
            cli(&[
                "run",
                "--vm",
                VM_A,
                "--rm",
                reference,
                "sh",
                "-c",
                "cat /data/hello.txt; sha256sum /data/big.bin /data/big2.bin",
            ]),
            "run with the registry down",
        );
        println!(
            "{reference}: ran from the bundle in {:?}",
            started.elapsed()
        );
        assert!(output.starts_with("hello from bundled\n"), "{output}");
        assert!(output.contains(&image.big_sha), "{output}");
        assert!(output.contains(&image.big2_sha), "{output}");
    }
    let log = fixture.agent.log();
    assert!(
        log.contains("the registry is out of reach: using the cached image"),
        "{}",
        tail(&log)
    );
    // Tenants stay apart: the VM that never asked for the image has none of its layers.
    let data_erofs = erofs_digest(&image.data_layer);
    assert!(mapped_layers(VM_A).contains(&data_erofs));
    assert!(
        !mapped_layers(VM_B).contains(&data_erofs),
        "{VM_B} never ran the image"
    );
}

/// Every present chunk of a lazy layer in the cache equals the blob's chunk, decoded.
fn check_bitmap_against_file(layer_dir: &Path, blob: &[u8], descriptor: &Descriptor) -> (u64, u64) {
    let location = IndexLocation::from_descriptor(descriptor).unwrap();
    let index = location
        .parse(&blob[location.range.start as usize..location.range.end as usize])
        .unwrap();
    let image = std::fs::read(layer_dir.join("image.erofs")).unwrap();
    let bitmap = std::fs::read(layer_dir.join("chunks.bitmap")).unwrap();
    let mut present = 0;
    for chunk in 0..index.len() {
        let bit = bitmap[32 + chunk / 8] & (1 << (chunk % 8)) != 0;
        if !bit {
            continue;
        }
        present += 1;
        let stored = index.blob_range(chunk);
        let target = index.uncompressed_range(chunk);
        let mut decoded = vec![0u8; (target.end - target.start) as usize];
        index
            .decode_chunk_into(
                chunk,
                &blob[stored.start as usize..stored.end as usize],
                &mut decoded,
            )
            .unwrap();
        assert_eq!(
            &image[target.start as usize..target.end as usize],
            decoded.as_slice(),
            "chunk {chunk}: its bit is set over bytes that are not the chunk's"
        );
    }
    (present, index.len() as u64)
}

fn layer_dir(agent: &TestAgent, digest: &Digest) -> PathBuf {
    agent
        .state_dir()
        .join("cache")
        .join("layers")
        .join(format!("sha256-{}", digest.hex()))
}

/// `gantry-agent image trace …` on a cache directory (no agent involved).
fn image_trace(cache_dir: &Path, args: &[&str]) -> Output {
    Command::new(agent_binary())
        .args(["image", "trace", "--cache-dir"])
        .arg(cache_dir)
        .args(args)
        .output()
        .expect("image trace runs")
}

/// The startup trace `image trace --json` shows, once it exists (within `timeout`).
fn wait_for_trace(cache_dir: &Path, image: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let output = image_trace(cache_dir, &["--json", image]);
        if output.status.success() {
            return serde_json::from_slice(&output.stdout).expect("trace JSON");
        }
        assert!(
            Instant::now() < deadline,
            "no startup trace of {image} in {} after {timeout:?}: {}",
            cache_dir.display(),
            text(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_startup_trace_pushed_by_one_card_is_replayed_by_another() {
    let fixture = fixture();
    let _turn = turn();
    let image = image(fixture, "traced", 7, &fixture.proxy.host());
    // Card A: the first start of the image records what the container reads.
    let output = succeed(
        cli(&[
            "run",
            "--vm",
            VM_A,
            "--rm",
            "--pull-mode",
            "lazy",
            &image.converted,
            "sh",
            "-c",
            "cat /data/hello.txt /data/tree/f7 /data/tree/f42",
        ]),
        "the recorded run",
    );
    assert_eq!(output, "hello from traced\ntraced 7\ntraced 42\n");
    let cache_a = fixture.agent.state_dir().join("cache");
    let recorded = wait_for_trace(
        &cache_a,
        &image.converted,
        Duration::from_secs(TRACE_SECONDS + 20),
    );
    let data_digest = image.data_layer.digest.to_string();
    let traced_data_chunks: BTreeSet<u64> = recorded["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter(|layer| layer["blob_digest"] == data_digest.as_str())
        .flat_map(|layer| layer["chunks"].as_array().cloned().unwrap_or_default())
        .filter_map(|chunk| chunk.as_u64())
        .collect();
    println!("card A recorded {recorded}");
    assert!(
        !traced_data_chunks.is_empty(),
        "the data layer's chunks are in the trace"
    );

    // Pushed beside the image: docker-registry 2.8 has no referrers API, so it is listed
    // under the referrers tag.
    let pushed = image_trace(&cache_a, &["--push", &image.converted]);
    let pushed_text = succeed(pushed, "image trace --push");
    let manifest = recorded["manifest_digest"]
        .as_str()
        .expect("manifest digest");
    let tag = format!("sha256-{}", manifest.trim_start_matches("sha256:"));
    assert!(pushed_text.contains(&tag), "{pushed_text}");
    let listing = fixture.runtime.block_on(async {
        reqwest::Client::new()
            .get(format!(
                "http://{}/v2/{}/manifests/{tag}",
                fixture.registry.host(),
                repository(&image.converted)
            ))
            .header("accept", "application/vnd.oci.image.index.v1+json")
            .send()
            .await
            .expect("listing request")
            .bytes()
            .await
            .expect("listing body")
    });
    let listing: serde_json::Value = serde_json::from_slice(&listing).expect("listing JSON");
    assert_eq!(
        listing["manifests"][0]["artifactType"], "application/vnd.gantry.startup-trace.v1+json",
        "{listing}"
    );

    // Card B has never run the image: its first pull finds the trace in the registry, keeps
    // it, and prefetches exactly the traced chunks (lazy mode: nothing else).
    let card_b = TestAgent::start_with(&[], "[lazy]\nmode = \"lazy\"\ntrace_seconds = 0\n")
        .expect("card b starts");
    succeed(
        cli_on(
            &card_b,
            &["prefetch", "--pull-mode", "lazy", &image.converted],
            Duration::from_secs(60),
        ),
        "prefetch on card b",
    );
    let cache_b = card_b.state_dir().join("cache");
    let imported = wait_for_trace(&cache_b, &image.converted, Duration::from_secs(20));
    assert_eq!(imported, recorded, "card B replays card A's trace");
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = traced_data_chunks.len() as u64;
    loop {
        let (present, chunks) = presence(&card_b, &image.data_layer.digest);
        if present >= wanted {
            println!("card B prefetched {present} of {chunks} chunks of the data layer");
            assert_eq!(present, wanted, "only the traced chunks are fetched");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "card B has {present} of the {wanted} traced chunks"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_agent_killed_mid_fill_resumes_with_a_bitmap_that_matches_its_file() {
    let fixture = fixture();
    let _turn = turn();
    let image = image(fixture, "crash", 6, &fixture.registry.host());
    // The blob itself, to check the cache against.
    let blob = registry_blob(repository(&image.converted), &image.data_layer.digest, None);
    assert_eq!(Digest::of(&blob), image.data_layer.digest);

    // A slow fill (2 MiB/s), so that the crash lands in its middle.
    let mut agent = TestAgent::start_with(
        &[],
        "[lazy]\nmode = \"fill\"\nbackground_bytes_per_sec = 2097152\ntrace_seconds = 0\n",
    )
    .expect("agent starts");
    let prefetch = |agent: &TestAgent| {
        succeed(
            cli_on(
                agent,
                &["prefetch", "--pull-mode", "fill", &image.converted],
                Duration::from_secs(60),
            ),
            "prefetch",
        )
    };
    prefetch(&agent);
    let dir = layer_dir(&agent, &image.data_layer.digest);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (present, chunks) = presence(&agent, &image.data_layer.digest);
        if present >= 4 {
            assert!(present < chunks, "the fill was too fast to interrupt");
            break;
        }
        assert!(Instant::now() < deadline, "the fill does not progress");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.crash_and_restart().expect("restart");
    let (present, chunks) = check_bitmap_against_file(&dir, &blob, &image.data_layer);
    println!("after the crash: {present} of {chunks} chunks present, each verified");
    assert!(present > 0 && present < chunks);
    // The fill resumes where it was and completes.
    prefetch(&agent);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (now, _) = presence(&agent, &image.data_layer.digest);
        if now == chunks {
            break;
        }
        assert!(now >= present, "chunks were lost: {now} < {present}");
        assert!(
            Instant::now() < deadline,
            "the fill did not complete: {now}/{chunks}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (present, _) = check_bitmap_against_file(&dir, &blob, &image.data_layer);
    assert_eq!(present, chunks);
}
