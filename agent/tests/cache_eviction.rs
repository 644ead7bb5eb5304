//! Cache maintenance: LRU eviction under a budget, pinning, `rmi` and `gc`.
//! Images come from OCI layout directories (the same pipeline as registry pulls).

mod registry_common;

use std::path::Path;
use std::time::Duration;

use gantry_agent::cache::{Cache, CacheConfig, ImageRecord, trace};
use gantry_agent::images::pull::{self, no_progress};
use gantry_agent::metrics::Metrics;
use gantry_oci::layout::{OciLayout, OciLayoutSource};
use registry_common::*;

/// A layout with images `img0..img{n}`, each one unique 256 KiB layer, plus `pair` sharing
/// img0's layer.
fn layout(dir: &Path, n: u64) -> OciLayout {
    let mut builder = LayoutBuilder::new(dir);
    for i in 0..n {
        let layer = layer(&[Entry::File("data", noise(256 << 10, i))]);
        builder.simple_image(&format!("img{i}"), &[layer]);
    }
    let shared = layer(&[Entry::File("data", noise(256 << 10, 0))]);
    let extra = layer(&[Entry::File("extra", b"x".to_vec())]);
    builder.simple_image("pair", &[shared, extra]);
    OciLayout::open(dir).unwrap()
}

async fn pull(cache: &Cache, layout: &OciLayout, name: &str) -> ImageRecord {
    let record = pull::pull(cache, &OciLayoutSource::new(layout, name), &no_progress)
        .await
        .unwrap();
    // Distinct LRU timestamps.
    tokio::time::sleep(Duration::from_millis(20)).await;
    record
}

fn present(cache: &Cache, record: &ImageRecord) -> bool {
    record
        .layers
        .iter()
        .all(|l| cache.layer(&l.blob_digest).unwrap().is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_under_budget_spares_pinned_layers() {
    let work = tempfile::tempdir().unwrap();
    let layout = layout(&work.path().join("layout"), 4);

    // Measure one image's footprint.
    let probe = Cache::open(&work.path().join("probe"), CacheConfig::default()).unwrap();
    pull(&probe, &layout, "img0").await;
    let one = probe.layers_bytes().unwrap();
    assert!(one > 256 << 10);

    let cache_dir = work.path().join("cache");
    let config = CacheConfig {
        budget_bytes: one * 2 + one / 2,
        ..CacheConfig::default()
    };
    let metrics = Metrics::new();
    let cache = Cache::open(&cache_dir, config)
        .unwrap()
        .with_metrics(metrics.cache());
    let a = pull(&cache, &layout, "img0").await;
    let pins = cache.pin_image(&a).unwrap();
    let b = pull(&cache, &layout, "img1").await;
    let c = pull(&cache, &layout, "img2").await;
    // Over budget after c: a is the least recently used but pinned, so b goes.
    assert!(present(&cache, &a), "a pinned layer was evicted");
    assert!(!present(&cache, &b));
    assert!(present(&cache, &c));
    assert!(cache.layers_bytes().unwrap() <= one * 2 + one / 2);
    let images = cache.images().unwrap();
    let b_status = images.iter().find(|i| i.record.name == b.name).unwrap();
    assert_eq!(
        b_status.missing_layers,
        vec![b.layers[0].blob_digest.clone()]
    );

    // Unpinned, a is the least recently used and goes next.
    drop(pins);
    let d = pull(&cache, &layout, "img3").await;
    assert!(!present(&cache, &a));
    assert!(present(&cache, &c) && present(&cache, &d));

    // Pulling b again fetches its evicted layer.
    let b_again = pull(&cache, &layout, "img1").await;
    assert!(present(&cache, &b_again));
    assert_consistent(&cache_dir);

    // The metrics count it all: b, a, and c (for b's return) evicted, every pull a miss, then
    // img3 again a hit.
    pull(&cache, &layout, "img3").await;
    let counter = |name: &str| {
        let text = metrics.encode().unwrap();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        match scrape.samples.iter().find(|sample| sample.metric == name) {
            Some(sample) => match sample.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            },
            None => panic!("no {name} in {text}"),
        }
    };
    assert_eq!(counter("gantry_cache_evictions_total"), 3.0);
    assert!(counter("gantry_cache_evicted_bytes_total") >= 3.0 * (256 << 10) as f64);
    assert_eq!(counter("gantry_cache_misses_total"), 5.0);
    assert_eq!(counter("gantry_cache_hits_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmi_removes_only_layers_no_other_image_uses() {
    let work = tempfile::tempdir().unwrap();
    let layout = layout(&work.path().join("layout"), 2);
    let cache_dir = work.path().join("cache");
    let cache = Cache::open(&cache_dir, CacheConfig::default()).unwrap();
    let img0 = pull(&cache, &layout, "img0").await;
    let pair = pull(&cache, &layout, "pair").await;
    let img1 = pull(&cache, &layout, "img1").await;
    assert_eq!(pair.layers[0], img0.layers[0]);
    assert_eq!(list(&cache_dir.join("layers")).len(), 3);
    // Startup traces of two of the images.
    for image in [&img0, &pair] {
        let recorded = trace::StartupTrace {
            version: trace::TRACE_VERSION,
            manifest_digest: image.manifest_digest.clone(),
            window_ms: 1000,
            recorded_unix: 0,
            layers: Vec::new(),
        };
        trace::write_trace(&cache_dir, &recorded).unwrap();
    }

    // pair's own layer goes, and its trace; the layer img0 shares stays, and img0's trace.
    let report = cache.remove_image(&pair.name).await.unwrap();
    assert_eq!(report.traces_removed, 1);
    assert!(
        trace::read_trace(&cache_dir, &pair.manifest_digest)
            .unwrap()
            .is_none()
    );
    assert!(
        trace::read_trace(&cache_dir, &img0.manifest_digest)
            .unwrap()
            .is_some()
    );
    assert_eq!(report.layers_removed.len(), 1);
    assert_eq!(report.layers_removed[0].0, pair.layers[1].blob_digest);
    assert!(present(&cache, &img0));
    assert!(cache.image(&pair.name).unwrap().is_none());

    // A pinned layer survives its image's removal, and gc takes it once unpinned.
    let pin = cache.pin(&img1.layers[0]).unwrap();
    let report = cache.remove_image(&img1.name).await.unwrap();
    assert!(report.layers_removed.is_empty());
    assert_eq!(report.pinned_kept, vec![img1.layers[0].blob_digest.clone()]);
    assert!(cache.layer(&img1.layers[0].blob_digest).unwrap().is_some());
    drop(pin);
    let report = cache.gc().await.unwrap();
    assert_eq!(report.layers_removed.len(), 1);
    assert!(cache.layer(&img1.layers[0].blob_digest).unwrap().is_none());
    assert!(cache.pin(&img1.layers[0]).is_err());

    assert!(cache.remove_image("no/such:image").await.is_err());
    assert_consistent(&cache_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_unowned_temporary_work_only() {
    let work = tempfile::tempdir().unwrap();
    let cache_dir = work.path().join("cache");
    let cache = Cache::open(&cache_dir, CacheConfig::default()).unwrap();
    // Stale work from a dead process, and work of a live one (this process holds its lock).
    let stale = cache_dir.join("tmp/999999-0");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("owner.lock"), b"").unwrap();
    std::fs::write(stale.join("image.erofs"), vec![0; 4096]).unwrap();
    let live = cache.begin_build().unwrap();
    std::fs::write(live.image_path(), b"partial").unwrap();

    let report = cache.gc().await.unwrap();
    assert_eq!(report.temp_removed, 1);
    assert!(!stale.exists());
    assert!(live.image_path().exists());
    drop(live);
    assert!(list(&cache_dir.join("tmp")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_pull_keeps_its_layers_until_the_caller_lets_go() {
    let work = tempfile::tempdir().unwrap();
    let layout = layout(&work.path().join("layout"), 2);
    // A budget smaller than one image: every unpinned layer is evicted at once.
    let config = CacheConfig {
        budget_bytes: 1,
        ..CacheConfig::default()
    };
    let cache = Cache::open(&work.path().join("cache"), config).unwrap();
    let (record, pins) =
        pull::pull_pinned(&cache, &OciLayoutSource::new(&layout, "img0"), &no_progress)
            .await
            .unwrap();
    assert_eq!(pins.len(), record.layers.len());
    // Between the pull and its use, other work enforces the budget: the layers stay.
    let _other = pull(&cache, &layout, "img1").await;
    cache.enforce_budget().await.unwrap();
    assert!(
        present(&cache, &record),
        "a pulled image's layers went before they were used"
    );
    drop(pins);
    cache.enforce_budget().await.unwrap();
    assert!(!present(&cache, &record));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_image_record_does_not_stop_removal_or_gc() {
    let work = tempfile::tempdir().unwrap();
    let layout = layout(&work.path().join("layout"), 2);
    let cache_dir = work.path().join("cache");
    let cache = Cache::open(&cache_dir, CacheConfig::default()).unwrap();
    let img0 = pull(&cache, &layout, "img0").await;
    let img1 = pull(&cache, &layout, "img1").await;
    std::fs::write(cache_dir.join("images/garbage.json"), b"{ not json").unwrap();
    let report = cache.remove_image(&img1.name).await.unwrap();
    assert_eq!(report.layers_removed.len(), 1);
    cache.gc().await.unwrap();
    assert!(
        present(&cache, &img0),
        "a layer a readable record names stays"
    );
    assert_eq!(cache.images().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulling_a_cached_image_again_leaves_its_record_alone() {
    use std::os::unix::fs::MetadataExt;
    let work = tempfile::tempdir().unwrap();
    let layout = layout(&work.path().join("layout"), 2);
    let cache_dir = work.path().join("cache");
    let cache = Cache::open(&cache_dir, CacheConfig::default()).unwrap();
    let record_file = |cache_dir: &Path| {
        let mut files: Vec<_> = std::fs::read_dir(cache_dir.join("images"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files.pop().unwrap()
    };
    let first = pull(&cache, &layout, "img0").await;
    let path = record_file(&cache_dir);
    let inode = std::fs::metadata(&path).unwrap().ino();
    // Across a second boundary, so the pull time would differ if it were written.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = pull(&cache, &layout, "img0").await;
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "the record file was replaced"
    );
    let stored = cache.image(&first.name).unwrap().unwrap();
    assert_eq!(stored.pulled_at_unix, first.pulled_at_unix);
    assert_eq!(stored.manifest_digest, again.manifest_digest);

    // A stored record that differs (here: unreadable) is replaced.
    std::fs::write(&path, b"{ not a record").unwrap();
    pull(&cache, &layout, "img0").await;
    let rewritten = cache.image(&first.name).unwrap().unwrap();
    assert!(
        rewritten.pulled_at_unix > first.pulled_at_unix,
        "{rewritten:?}"
    );
}
