//! Faults between the agent and a real `docker-registry`: corrupted and truncated blobs, 500s,
//! stalls, mirrors that are down, a full disk, and the agent killed mid-pull.

mod registry_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gantry_agent::cache::Cache;
use gantry_agent::images::pull::{self, PullEvent, no_progress};
use gantry_oci::reference::Reference;
use gantry_oci::registry::{RegistryClient, RegistryConfig, RegistrySource};
use registry_common::*;

/// A registry with the usual two-layer image pushed as `fault/app:v1`.
fn registry_with_image(work: &Path) -> (Registry, BuiltImage) {
    let registry = Registry::start();
    let mut layout = LayoutBuilder::new(&work.join("layout"));
    let built = layout.simple_image("v1", &small_layers(42));
    registry.push(&layout.root, "v1", "fault/app:v1");
    (registry, built)
}

async fn pull(
    cache: &Cache,
    config: RegistryConfig,
    image: &str,
) -> Result<gantry_agent::cache::ImageRecord, String> {
    let client = RegistryClient::new(config).unwrap();
    let reference: Reference = image.parse().unwrap();
    pull::pull(
        cache,
        &RegistrySource {
            client: &client,
            reference: &reference,
        },
        &no_progress,
    )
    .await
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blob_is_rejected_naming_the_source_and_never_cached() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (registry, built) = registry_with_image(work.path());
    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    proxy.faults.corrupt_blobs.store(true, Ordering::SeqCst);
    let cache_dir = work.path().join("cache");
    let cache = open_cache(&cache_dir);
    let error = pull(
        &cache,
        fast_config(),
        &format!("{}/fault/app:v1", proxy.host()),
    )
    .await
    .unwrap_err();
    let corrupted = &built.layer_digests[1];
    assert!(
        error.contains("digest mismatch")
            && error.contains(&format!("{}/v2/fault/app/blobs/{corrupted}", proxy.url())),
        "{error}"
    );
    assert!(cache.layer(corrupted).unwrap().is_none());
    assert!(cache.images().unwrap().is_empty());
    assert_consistent(&cache_dir);

    // A corrupting mirror is skipped for the next endpoint (here the registry itself).
    let mut config = fast_config();
    config.mirrors.insert(registry.host(), vec![proxy.url()]);
    let record = pull(&cache, config, &format!("{}/fault/app:v1", registry.host()))
        .await
        .unwrap();
    assert_eq!(record.layers[1].blob_digest, *corrupted);
    assert!(proxy.blob_requests(corrupted) >= 2);
    assert_consistent(&cache_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_blob_resumes_with_a_range_request() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (registry, built) = registry_with_image(work.path());
    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    proxy.faults.truncate_blobs.store(1, Ordering::SeqCst);
    let cache_dir = work.path().join("cache");
    let cache = open_cache(&cache_dir);
    let mut config = fast_config();
    // One layer at a time, so the truncation hits a known request.
    config.retries = 2;
    let record = pull(&cache, config, &format!("{}/fault/app:v1", proxy.host()))
        .await
        .unwrap();
    assert_eq!(record.layers.len(), 2);
    assert!(
        proxy.range_requests() >= 1,
        "no Range request after truncation"
    );
    let resumed = proxy
        .log
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter_map(|(path, range)| range.as_ref().map(|r| (path.clone(), r.clone())))
        .collect::<Vec<_>>();
    assert!(
        resumed
            .iter()
            .all(|(_, r)| r.starts_with("bytes=") && r != "bytes=0-"),
        "{resumed:?}"
    );
    let _ = built;
    assert_consistent(&cache_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_backoff_then_reported() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (registry, _) = registry_with_image(work.path());
    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    let cache_dir = work.path().join("cache");
    let cache = open_cache(&cache_dir);

    proxy.faults.fail_requests.store(2, Ordering::SeqCst);
    pull(
        &cache,
        fast_config(),
        &format!("{}/fault/app:v1", proxy.host()),
    )
    .await
    .unwrap();

    proxy.faults.always_fail.store(true, Ordering::SeqCst);
    let before = proxy.request_count();
    let started = Instant::now();
    let error = pull(
        &cache,
        fast_config(),
        &format!("{}/fault/app:v2", proxy.host()),
    )
    .await
    .unwrap_err();
    assert!(error.contains("HTTP 500"), "{error}");
    // One try and three retries, with backoff between them (20 + 40 + 80 ms).
    assert_eq!(proxy.request_count() - before, 4);
    assert!(started.elapsed() >= Duration::from_millis(140));
    assert_consistent(&cache_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_responses_time_out_and_are_retried() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (registry, _) = registry_with_image(work.path());
    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    let cache_dir = work.path().join("cache");
    let cache = open_cache(&cache_dir);

    // One stall: the stall timeout (1 s) fires, the retry resumes and completes.
    proxy.faults.stall_blobs.store(1, Ordering::SeqCst);
    let record = pull(
        &cache,
        fast_config(),
        &format!("{}/fault/app:v1", proxy.host()),
    )
    .await
    .unwrap();
    assert_eq!(record.layers.len(), 2);

    // Stalling forever: a clean error after the retries, nothing cached for the image.
    let other = open_cache(&work.path().join("cache2"));
    proxy
        .faults
        .stall_large_blobs_over
        .store(100_000, Ordering::SeqCst);
    let mut config = fast_config();
    config.retries = 1;
    config.stall_timeout_ms = 300;
    let error = pull(&other, config, &format!("{}/fault/app:v1", proxy.host()))
        .await
        .unwrap_err();
    assert!(error.contains("no data for"), "{error}");
    assert!(other.images().unwrap().is_empty());
    assert_consistent(&work.path().join("cache2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_tried_in_order_with_fallback() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (registry, _) = registry_with_image(work.path());
    let upstream = format!("http://{}", registry.host());
    let origin = FaultProxy::start(&upstream).await;
    let failing = FaultProxy::start(&upstream).await;
    failing.faults.always_fail.store(true, Ordering::SeqCst);
    let good = FaultProxy::start(&upstream).await;
    let down = format!("http://127.0.0.1:{}", free_port());

    let mut config = fast_config();
    config.retries = 1;
    config
        .mirrors
        .insert(origin.host(), vec![down, failing.url(), good.url()]);
    let cache = open_cache(&work.path().join("cache"));
    let record = pull(&cache, config, &format!("{}/fault/app:v1", origin.host()))
        .await
        .unwrap();
    assert_eq!(record.layers.len(), 2);
    assert!(
        failing.request_count() > 0,
        "the failing mirror was skipped"
    );
    assert!(good.blob_requests(&record.layers[1].blob_digest) == 1);
    assert_eq!(
        origin.request_count(),
        0,
        "the registry was asked before the mirrors"
    );
}

/// Unmounts on drop.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_during_conversion_leaves_a_consistent_cache() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    let big = layer(&[
        Entry::Dir("big"),
        Entry::File("big/blob", noise(6 << 20, 1)),
    ]);
    layout.simple_image("big", &[small_layers(50).remove(0), big]);
    layout.simple_image("small", &small_layers(51));
    registry.push(&layout.root, "big", "full/app:big");
    registry.push(&layout.root, "small", "full/app:small");

    let cache_dir = work.path().join("cache");
    std::fs::create_dir(&cache_dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&cache_dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIP: mounting a tmpfs needs root");
        return;
    }
    let _unmount = Tmpfs(cache_dir.clone());
    let cache = open_cache(&cache_dir);
    let error = pull(
        &cache,
        fast_config(),
        &format!("{}/full/app:big", registry.host()),
    )
    .await
    .unwrap_err();
    assert!(error.contains("No space left on device"), "{error}");
    assert!(cache.images().unwrap().is_empty());
    assert_consistent(&cache_dir);

    // The cache still works: a small image fits.
    let record = pull(
        &cache,
        fast_config(),
        &format!("{}/full/app:small", registry.host()),
    )
    .await
    .unwrap();
    assert_eq!(record.layers.len(), 2);
    assert_consistent(&cache_dir);
}

/// Runs in a child process for `killed_mid_pull_restart_completes`: pulls and hangs on the
/// stalled layer until killed.
#[test]
#[ignore = "run by killed_mid_pull_restart_completes in a child process"]
fn child_pull_until_killed() {
    let (Ok(cache_dir), Ok(image)) = (
        std::env::var("GANTRY_TEST_CACHE"),
        std::env::var("GANTRY_TEST_IMAGE"),
    ) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let cache = open_cache(Path::new(&cache_dir));
        let mut config = fast_config();
        config.stall_timeout_ms = 600_000;
        let _ = pull(&cache, config, &image).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_pull_restart_completes() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    let mut layers = small_layers(60);
    layers.push(layer(&[Entry::File("big.bin", noise(2 << 20, 2))]));
    let built = layout.simple_image("v1", &layers);
    registry.push(&layout.root, "v1", "kill/app:v1");
    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    proxy
        .faults
        .stall_large_blobs_over
        .store(1 << 20, Ordering::SeqCst);
    let cache_dir = work.path().join("cache");
    let image = format!("{}/kill/app:v1", proxy.host());

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_pull_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("GANTRY_TEST_CACHE", &cache_dir)
        .env("GANTRY_TEST_IMAGE", &image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the small layers are published and the big one is being fetched.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let published = list(&cache_dir.join("layers")).len();
        if published == 2 && proxy.blob_requests(&built.layer_digests[2]) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the child never got mid-pull");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited early"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !list(&cache_dir.join("tmp")).is_empty(),
        "the killed pull left no partial work (was it really mid-pull?)"
    );

    // Restart: opening cleans the partial work; the pull completes, reusing what was done.
    proxy
        .faults
        .stall_large_blobs_over
        .store(0, Ordering::SeqCst);
    let cache = open_cache(&cache_dir);
    assert_consistent(&cache_dir);
    assert!(cache.images().unwrap().is_empty());
    let client = RegistryClient::new(fast_config()).unwrap();
    let reference: Reference = image.parse().unwrap();
    let events = Mutex::new(Vec::new());
    let record = pull::pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &reference,
        },
        &|e: &PullEvent| events.lock().unwrap().push(e.clone()),
    )
    .await
    .unwrap();
    assert_eq!(record.layers.len(), 3);
    let events = events.lock().unwrap();
    let cached = events
        .iter()
        .filter(|e| matches!(e, PullEvent::LayerCached { .. }))
        .count();
    let fetched = events
        .iter()
        .filter(|e| matches!(e, PullEvent::LayerDone { .. }))
        .count();
    assert_eq!((cached, fetched), (2, 1));
    assert_consistent(&cache_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_reads_return_exactly_the_range_asked_for() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (registry, built) = registry_with_image(work.path());
    let blob = std::fs::read(
        work.path()
            .join("layout/blobs/sha256")
            .join(built.layer_digests[1].hex()),
    )
    .unwrap();
    let descriptor = gantry_oci::manifest::Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: built.layer_digests[1].clone(),
        size: built.layer_sizes[1],
        platform: None,
        annotations: Default::default(),
        urls: Vec::new(),
        artifact_type: None,
    };
    assert!(blob.len() > 3000, "the layer is large enough to cut");
    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    let client = RegistryClient::new(fast_config()).unwrap();
    let reference: Reference = format!("{}/fault/app:v1", proxy.host()).parse().unwrap();

    let read = client
        .fetch_blob_range(&reference, &descriptor, 1000..3000)
        .await
        .unwrap();
    assert_eq!(&read.bytes[..], &blob[1000..3000]);
    assert!(!read.ranges_ignored);
    assert_eq!(proxy.range_requests(), 1);
    let last = client
        .fetch_blob_range(
            &reference,
            &descriptor,
            blob.len() as u64 - 1..blob.len() as u64,
        )
        .await
        .unwrap();
    assert_eq!(&last.bytes[..], &blob[blob.len() - 1..]);

    // A server that ignores Range still yields exactly the range, and says so.
    proxy.faults.ignore_ranges.store(true, Ordering::SeqCst);
    let read = client
        .fetch_blob_range(&reference, &descriptor, 1000..3000)
        .await
        .unwrap();
    assert_eq!(&read.bytes[..], &blob[1000..3000]);
    assert!(read.ranges_ignored);

    // Ranges outside the blob are refused before any request.
    let requests = proxy.request_count();
    let (high, low) = (3000, 1000);
    for bad in [5..5, high..low, 0..blob.len() as u64 + 1] {
        let error = client
            .fetch_blob_range(&reference, &descriptor, bad.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("cannot read bytes"), "{bad:?}: {error}");
    }
    assert_eq!(proxy.request_count(), requests);

    // An error body that never ends is cut short: the error comes quickly and stays small.
    proxy
        .faults
        .endless_error_bodies
        .store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let error = client
        .fetch_blob_range(&reference, &descriptor, 0..10)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("500"), "{error}");
    assert!(error.len() < 4096, "{} bytes of error", error.len());
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    proxy
        .faults
        .endless_error_bodies
        .store(false, Ordering::SeqCst);

    // A failing mirror falls through to the registry itself.
    proxy.faults.always_fail.store(true, Ordering::SeqCst);
    let mut config = fast_config();
    config.mirrors.insert(registry.host(), vec![proxy.url()]);
    let client = RegistryClient::new(config).unwrap();
    let reference: Reference = format!("{}/fault/app:v1", registry.host()).parse().unwrap();
    let read = client
        .fetch_blob_range(&reference, &descriptor, 0..10)
        .await
        .unwrap();
    assert_eq!(&read.bytes[..], &blob[..10]);
    assert!(read.url.contains(&registry.host()), "{}", read.url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_errors_name_their_cause() {
    let mut config = fast_config();
    config.retries = 0;
    let client = RegistryClient::new(config).unwrap();
    let fetch = |image: &'static str| {
        let client = &client;
        async move {
            let reference: Reference = image.parse().unwrap();
            client
                .fetch_manifest(&reference, "v1")
                .await
                .unwrap_err()
                .to_string()
        }
    };
    // Nothing listens on port 1 of the loopback.
    let refused = fetch("127.0.0.1:1/app:v1").await;
    assert!(refused.contains("cannot connect"), "{refused}");
    assert!(
        refused.to_lowercase().contains("connection refused"),
        "{refused}"
    );
    let unresolvable = fetch("no-such-host.invalid:5000/app:v1").await;
    assert!(unresolvable.contains("cannot connect"), "{unresolvable}");
    assert!(
        unresolvable.contains("dns") || unresolvable.contains("lookup"),
        "{unresolvable}"
    );
}
