//! The lazy data path against a real cache directory and chunked blobs written by
//! `gantry_oci::chunked`: what is fetched, when, how often, and what a reader sees when an
//! origin lies, hangs or goes away.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use gantry_oci::Digest;
use gantry_oci::chunked::{ChunkedLayerOptions, IndexLocation, write_chunked_layer};
use gantry_oci::layer_index::LayerIndex;
use gantry_oci::manifest::Descriptor;
use tokio::sync::Notify;
use vm_memory::VolatileSlice;

use super::layer::LazyLayer;
use super::origin::{BlobOrigin, OriginError, StreamReceiver};
use super::{LazyConfig, LazyLayers};
use crate::blk::BlockSource;
use crate::cache::{Cache, CacheConfig, LayerRecord, PinGuard};
use crate::sync::lock;

const CHUNK: u32 = 64 * 1024;

/// Bytes that do not compress much, so chunks have distinct sizes in the blob.
fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Every fourth byte repeats: compressible a little.
            if i % 4 == 0 { 0 } else { state as u8 }
        })
        .collect()
}

/// How a [`TestOrigin`] misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The first response has one byte flipped.
    CorruptOnce,
    /// Every response has one byte flipped.
    CorruptAlways,
    /// Every response has one byte flipped and comes after 300 ms.
    CorruptSlowly,
    /// Never answers.
    Hang,
    /// Answers ranges right, then says it ignores `Range` (a registry answering `200`), and
    /// streams whole blobs.
    IgnoreRanges,
    /// Answers right after 50 ms (so fetches overlap).
    Slow,
}

/// Requests in flight now, and the most seen at once, across the origins sharing it.
#[derive(Debug, Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

#[derive(Debug)]
struct TestOrigin {
    blob: Vec<u8>,
    fault: Mutex<Fault>,
    requests: Mutex<Vec<Range<u64>>>,
    /// When each request came, in order.
    arrivals: Mutex<Vec<Instant>>,
    corrupted: AtomicBool,
    ignoring: AtomicBool,
    streams: AtomicUsize,
    /// The registry it stands for, with the gauge its requests are counted on.
    registry: Option<(String, Arc<Gauge>)>,
}

impl TestOrigin {
    fn new(blob: Vec<u8>, fault: Fault) -> Arc<TestOrigin> {
        Arc::new(TestOrigin {
            blob,
            fault: Mutex::new(fault),
            requests: Mutex::new(Vec::new()),
            arrivals: Mutex::new(Vec::new()),
            corrupted: AtomicBool::new(false),
            ignoring: AtomicBool::new(false),
            streams: AtomicUsize::new(0),
            registry: None,
        })
    }

    /// A slow origin standing for `registry`, counting its requests in flight on `gauge`.
    fn registry(blob: Vec<u8>, registry: &str, gauge: &Arc<Gauge>) -> Arc<TestOrigin> {
        let mut origin = Arc::into_inner(TestOrigin::new(blob, Fault::Slow)).unwrap();
        origin.registry = Some((registry.to_string(), Arc::clone(gauge)));
        Arc::new(origin)
    }

    fn requests(&self) -> Vec<Range<u64>> {
        lock(&self.requests).clone()
    }

    fn set_fault(&self, fault: Fault) {
        *lock(&self.fault) = fault;
    }
}

impl BlobOrigin for TestOrigin {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, OriginError>> {
        lock(&self.requests).push(range.clone());
        lock(&self.arrivals).push(Instant::now());
        let fault = *lock(&self.fault);
        Box::pin(async move {
            if fault == Fault::Hang {
                std::future::pending::<()>().await;
            }
            if fault == Fault::CorruptSlowly {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if fault == Fault::IgnoreRanges {
                self.ignoring.store(true, Ordering::SeqCst);
            }
            if fault == Fault::Slow {
                let gauge = self.registry.as_ref().map(|(_, gauge)| gauge);
                if let Some(gauge) = gauge {
                    let now = gauge.now.fetch_add(1, Ordering::SeqCst) + 1;
                    gauge.max.fetch_max(now, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(gauge) = gauge {
                    gauge.now.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let mut bytes = self.blob[range.start as usize..range.end as usize].to_vec();
            let flip = match fault {
                Fault::CorruptAlways | Fault::CorruptSlowly => true,
                Fault::CorruptOnce => !self.corrupted.swap(true, Ordering::SeqCst),
                _ => false,
            };
            if flip {
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x40;
            }
            Ok(Bytes::from(bytes))
        })
    }

    fn describe(&self) -> String {
        "test-origin".into()
    }

    fn ignores_ranges(&self) -> bool {
        self.ignoring.load(Ordering::SeqCst)
    }

    fn registry(&self) -> Option<&str> {
        self.registry
            .as_ref()
            .map(|(registry, _)| registry.as_str())
    }

    fn stream_blob<'a>(
        &'a self,
        receiver: &'a mut dyn StreamReceiver,
    ) -> BoxFuture<'a, Result<(), OriginError>> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            for piece in self.blob.chunks(7000) {
                if receiver.receive(piece).is_err() {
                    break;
                }
            }
            Ok(())
        })
    }
}

/// Wakes a [`Notify`] (the queue thread's event in the real device).
struct NotifyWake(Arc<Notify>);

impl Wake for NotifyWake {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
}

/// Reads `len` bytes at `offset` the way the device does: poll, park on `Pending`, poll again
/// when woken. Fails the test if a read stays parked for `limit`. (The peer tests use it too.)
pub(crate) async fn read(
    layer: &LazyLayer,
    offset: u64,
    len: usize,
    limit: Duration,
) -> io::Result<Vec<u8>> {
    let notify = Arc::new(Notify::new());
    let waker = Waker::from(Arc::new(NotifyWake(Arc::clone(&notify))));
    let mut buf = vec![0u8; len];
    let deadline = Instant::now() + limit;
    loop {
        // The slice (not `Send`) must not live across the await below.
        let poll = {
            let slice = VolatileSlice::from(buf.as_mut_slice());
            layer.read_at(offset, &[slice], &waker)
        };
        match poll {
            Poll::Ready(result) => return result.map(|()| buf),
            Poll::Pending => {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(
                    tokio::time::timeout(left, notify.notified()).await.is_ok(),
                    "a read stayed parked for {limit:?}"
                );
            }
        }
    }
}

/// Waits (up to 5 s) for `condition`: the fetch task updates counters after it woke readers.
async fn eventually(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "the condition never held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    cache: Cache,
    image: Vec<u8>,
    blob: Vec<u8>,
    record: LayerRecord,
    _pin: PinGuard,
}

async fn fixture(chunks: usize) -> Fixture {
    fixture_named(chunks, "cache").await
}

/// A fixture whose cache lives in directory `name` of its own temporary directory.
async fn fixture_named(chunks: usize, name: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join(name), CacheConfig::default()).unwrap();
    // The last chunk is short.
    let seed = name
        .bytes()
        .fold(7u64, |seed, byte| seed * 31 + u64::from(byte));
    let image = image_bytes(chunks * CHUNK as usize - 1000, seed);
    let mut blob = Vec::new();
    let options = ChunkedLayerOptions {
        chunk_size: CHUNK,
        ..ChunkedLayerOptions::default()
    };
    let layer = write_chunked_layer(image.as_slice(), &mut blob, &options).unwrap();
    let descriptor: Descriptor = layer.descriptor();
    let location = IndexLocation::from_descriptor(&descriptor).unwrap();
    let section = &blob[location.range.start as usize..location.range.end as usize];
    let index = location.parse(section).unwrap();
    assert_eq!(index.len(), chunks);
    let (record, pin) = cache
        .publish_lazy_layer(
            &descriptor,
            &index,
            location.digest.as_ref().unwrap(),
            layer.uncompressed_digest.clone(),
            section,
        )
        .await
        .unwrap();
    assert!(record.lazy);
    Fixture {
        _dir: dir,
        cache,
        image,
        blob,
        record,
        _pin: pin,
    }
}

fn config() -> LazyConfig {
    LazyConfig {
        read_ahead_chunks: 0,
        ..LazyConfig::default()
    }
}

fn chunk_range(chunk: usize) -> Range<usize> {
    chunk * CHUNK as usize..(chunk + 1) * CHUNK as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_fetches_only_the_chunks_it_touches() {
    let fixture = fixture(8).await;
    let lazy = LazyLayers::new(config());
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::None);
    layer.add_origin(origin.clone());

    // Bytes straddling chunks 2 and 3.
    let offset = 3 * u64::from(CHUNK) - 100;
    let got = read(&layer, offset, 300, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got, &fixture.image[offset as usize..offset as usize + 300]);
    let present: Vec<usize> = (0..8).filter(|&c| layer.is_present(c)).collect();
    assert_eq!(present, vec![2, 3], "only the touched chunks are fetched");
    // Both wanted chunks went in one coalesced range request.
    let requests = origin.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0], layer.blob_span(2..4));
    // A second read of present data asks nobody.
    let again = read(&layer, offset, 300, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(again, got);
    assert_eq!(origin.requests().len(), 1);

    // The cache file holds the verified chunks, and the bitmap says so after a reopen.
    let image = std::fs::read(&fixture.record.erofs_path).unwrap();
    for chunk in [2, 3] {
        assert_eq!(image[chunk_range(chunk)], fixture.image[chunk_range(chunk)]);
    }
    eventually(|| lazy.counters().foreground_chunks.load(Ordering::Relaxed) == 2).await;
    drop(layer);
    let reopened = LazyLayers::new(config())
        .open(&fixture.cache, &fixture.record)
        .unwrap();
    assert_eq!(reopened.present_chunks(), 2);
    assert!(reopened.is_present(2) && reopened.is_present(3) && !reopened.is_present(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_one_chunk_fetch_it_once() {
    let fixture = fixture(4).await;
    let lazy = LazyLayers::new(config());
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::None);
    layer.add_origin(origin.clone());
    // Two "VMs": the table hands out the same layer, so they share its fetches.
    let same = lazy.open(&fixture.cache, &fixture.record).unwrap();
    assert!(Arc::ptr_eq(&layer, &same));

    let readers: Vec<_> = (0..16u64)
        .map(|i| {
            let layer = Arc::clone(if i % 2 == 0 { &layer } else { &same });
            tokio::spawn(async move {
                read(
                    &layer,
                    u64::from(CHUNK) + i * 512,
                    512,
                    Duration::from_secs(10),
                )
                .await
            })
        })
        .collect();
    for reader in readers {
        reader.await.unwrap().unwrap();
    }
    let requests = origin.requests();
    assert_eq!(
        requests,
        vec![layer.blob_span(1..2)],
        "one fetch for 16 readers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_fail_verification_never_reach_a_reader() {
    let fixture = fixture(4).await;
    let lazy = LazyLayers::new(LazyConfig {
        retries: 1,
        failure_hold_ms: 200,
        ..config()
    });
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::CorruptOnce);
    layer.add_origin(origin.clone());

    // The first answer is corrupt: discarded, and the retry gives the right bytes.
    let got = read(&layer, 0, 4096, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got, &fixture.image[..4096]);
    assert_eq!(origin.requests().len(), 2);
    assert_eq!(
        lazy.counters()
            .verification_failures
            .load(Ordering::Relaxed),
        1
    );

    // An origin that always lies: the read fails, naming the layer and the chunk, and nothing
    // is marked present.
    origin.set_fault(Fault::CorruptAlways);
    let error = read(&layer, 2 * u64::from(CHUNK), 4096, Duration::from_secs(10))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&fixture.record.blob_digest.to_string()) && message.contains("chunk 2"),
        "{message}"
    );
    assert!(!layer.is_present(2));
    let image = std::fs::read(&fixture.record.erofs_path).unwrap();
    assert!(
        image[chunk_range(2)].iter().all(|&b| b == 0),
        "nothing unverified was written"
    );

    // After the hold, a read tries again; now the origin is honest.
    origin.set_fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let got = read(&layer, 2 * u64::from(CHUNK), 4096, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got, &fixture.image[chunk_range(2)][..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_origin_fails_reads_after_the_park_timeout() {
    let fixture = fixture(4).await;
    let lazy = LazyLayers::new(LazyConfig {
        park_timeout_secs: 0.3,
        failure_hold_ms: 100,
        ..config()
    });
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::Hang);
    layer.add_origin(origin.clone());

    let started = Instant::now();
    let error = read(&layer, 0, 4096, Duration::from_secs(10))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    println!("a read of a hung origin failed after {waited:?}: {error}");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert!(error.to_string().contains("within"), "{error}");
    assert_eq!(lazy.counters().failed_fetches.load(Ordering::Relaxed), 1);

    // Within the hold, reads fail at once without asking again.
    let asked = origin.requests().len();
    assert!(read(&layer, 0, 4096, Duration::from_secs(1)).await.is_err());
    assert_eq!(origin.requests().len(), asked);
    // The origin comes back: after the hold, reads work.
    origin.set_fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let got = read(&layer, 0, 4096, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got, &fixture.image[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_completes_the_layer_and_every_present_chunk_matches() {
    let fixture = fixture(12).await;
    let lazy = LazyLayers::new(LazyConfig {
        coalesce_bytes: 2 * u64::from(CHUNK),
        ..config()
    });
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::None);
    layer.add_origin(origin.clone());
    lazy.fill(Arc::clone(&layer));
    tokio::time::timeout(Duration::from_secs(20), layer.wait_complete())
        .await
        .expect("the fill completes");
    assert!(layer.is_complete());
    let image = std::fs::read(&fixture.record.erofs_path).unwrap();
    assert_eq!(image, fixture.image);
    // Coalesced: fewer requests than chunks, none larger than the limit, no chunk twice.
    let requests = origin.requests();
    assert!(requests.len() < 12, "{requests:?}");
    let fetched: u64 = requests.iter().map(|r| r.end - r.start).sum();
    assert_eq!(
        fetched,
        layer.blob_span(0..12).end - layer.blob_span(0..12).start
    );
    eventually(|| lazy.counters().background_chunks.load(Ordering::Relaxed) == 12).await;
    let digest = Digest::of(&image);
    assert_eq!(digest, gantry_oci::Digest::of(&fixture.image));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_ignores_ranges_is_streamed_once() {
    let fixture = fixture(10).await;
    let lazy = LazyLayers::new(config());
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::IgnoreRanges);
    layer.add_origin(origin.clone());
    // The first read learns that the origin sends whole blobs.
    read(&layer, u64::from(CHUNK), 100, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(layer.ignores_ranges());
    // The next miss streams the blob once and stores every free chunk from there on.
    let offset = 4 * u64::from(CHUNK) + 10;
    let got = read(&layer, offset, 5000, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got, &fixture.image[offset as usize..offset as usize + 5000]);
    eventually(|| (4..10).all(|chunk| layer.is_present(chunk))).await;
    assert_eq!(origin.streams.load(Ordering::SeqCst), 1);
    assert_eq!(origin.requests().len(), 1, "no more ranged requests");
    assert!(
        !layer.is_present(0) && !layer.is_present(2),
        "chunks before the miss are left"
    );
    let image = std::fs::read(&fixture.record.erofs_path).unwrap();
    assert_eq!(
        image[chunk_range(4).start..],
        fixture.image[chunk_range(4).start..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_trace_records_first_touches_and_replays_in_order() {
    let fixture = fixture(8).await;
    let lazy = LazyLayers::new(LazyConfig {
        // One fetch at a time, so the order of the requests is the order of the trace.
        connections: 2,
        foreground_reserved: 1,
        ..config()
    });
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::None);
    layer.add_origin(origin.clone());
    // Reads before the recording starts are not in the trace.
    read(&layer, 0, 10, Duration::from_secs(10)).await.unwrap();
    layer.record_trace(Duration::from_secs(60));
    for chunk in [5u64, 2, 5, 6, 2] {
        read(
            &layer,
            chunk * u64::from(CHUNK),
            10,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        layer.trace(),
        vec![5, 2, 6],
        "first touch first, each chunk once"
    );

    // Replayed on a cold layer elsewhere: fetched in the trace's order, before anyone reads.
    let other = fixture_named(8, "other").await;
    let cold = lazy.open(&other.cache, &other.record).unwrap();
    let other_origin = TestOrigin::new(other.blob.clone(), Fault::None);
    cold.add_origin(other_origin.clone());
    lazy.prefetch(Arc::clone(&cold), vec![5, 2, 6]);
    eventually(|| [5, 2, 6].iter().all(|&chunk| cold.is_present(chunk))).await;
    let requests = other_origin.requests();
    // 5 first; 6, which the trace also names, coalesced with it; then 2.
    assert_eq!(requests, vec![cold.blob_span(5..7), cold.blob_span(2..3)]);
    assert_eq!(cold.present_chunks(), 3, "nothing but the trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waiting_on_a_failed_background_fetch_is_asked_for_again() {
    let fixture = fixture(6).await;
    let lazy = LazyLayers::new(LazyConfig {
        retries: 0,
        coalesce_bytes: 8 * u64::from(CHUNK),
        ..config()
    });
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::CorruptSlowly);
    layer.add_origin(origin.clone());
    // The fill takes every chunk into one background fetch; the guest's read of chunk 3 comes
    // while it is in flight, waits on it, and must not be forgotten when it fails.
    lazy.fill(Arc::clone(&layer));
    eventually(|| !origin.requests().is_empty()).await;
    let error = read(&layer, 3 * u64::from(CHUNK), 100, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("chunk 3"), "{error}");
    let requests = origin.requests();
    assert!(
        requests.len() >= 2,
        "the read was fetched on its own: {requests:?}"
    );
    assert_eq!(
        requests[1].start,
        layer.blob_span(3..4).start,
        "{requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_fetch_the_next_chunks_ahead_and_no_more() {
    let fixture = fixture(10).await;
    let lazy = LazyLayers::new(LazyConfig {
        read_ahead_chunks: 2,
        coalesce_bytes: 64 << 20,
        ..config()
    });
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::None);
    layer.add_origin(origin.clone());
    // A read with nothing before it present is not sequential: no read-ahead.
    read(&layer, u64::from(CHUNK), 100, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let present = |layer: &LazyLayer| -> Vec<usize> {
        (0..10).filter(|&chunk| layer.is_present(chunk)).collect()
    };
    assert_eq!(present(&layer), vec![1]);
    // The next chunk continues it: the two after it come too, however large the coalescing
    // limit.
    read(&layer, 2 * u64::from(CHUNK), 100, Duration::from_secs(10))
        .await
        .unwrap();
    eventually(|| layer.is_present(3) && layer.is_present(4)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(present(&layer), vec![1, 2, 3, 4]);
    // The read-ahead is queued when the read's fetch starts, so the two may go out in either
    // order.
    let mut requests = origin.requests();
    requests.sort_by_key(|range| range.start);
    assert_eq!(
        requests,
        vec![
            layer.blob_span(1..2),
            layer.blob_span(2..3),
            layer.blob_span(3..5)
        ]
    );
}

/// Fills two layers from one registry; the most fill fetches that were in flight at once.
async fn fill_two_layers(limit: Option<usize>) -> usize {
    let (first, second) = (
        fixture_named(8, "first").await,
        fixture_named(8, "second").await,
    );
    let lazy = LazyLayers::new(LazyConfig {
        coalesce_bytes: 1,
        connections: 8,
        foreground_reserved: 2,
        ..config()
    });
    if let Some(limit) = limit {
        lazy.fetcher()
            .set_registry_limits([("r.example".to_string(), limit)].into());
    }
    let gauge = Arc::new(Gauge::default());
    let mut layers = Vec::new();
    for fixture in [&first, &second] {
        let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
        layer.add_origin(TestOrigin::registry(
            fixture.blob.clone(),
            "r.example",
            &gauge,
        ));
        lazy.fill(Arc::clone(&layer));
        layers.push(layer);
    }
    for layer in &layers {
        tokio::time::timeout(Duration::from_secs(20), layer.wait_complete())
            .await
            .expect("the fill completes");
    }
    gauge.max.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_limit_bounds_the_fill_fetches_in_flight_to_it() {
    let unlimited = fill_two_layers(None).await;
    let limited = fill_two_layers(Some(2)).await;
    println!("fill fetches in flight at once: {unlimited} without a limit, {limited} with 2");
    assert!(
        unlimited > 2,
        "without a limit the fill uses its slots: {unlimited}"
    );
    assert!((1..=2).contains(&limited), "{limited}");
}

/// A guest's read of the last chunk, then a fill: how long after the read returned the fill's
/// first fetch came.
async fn fill_after_a_read(fill_yield_ms: u64) -> Duration {
    let fixture = fixture(8).await;
    let lazy = LazyLayers::new(LazyConfig {
        coalesce_bytes: 1,
        fill_yield_ms,
        ..config()
    });
    let layer = lazy.open(&fixture.cache, &fixture.record).unwrap();
    let origin = TestOrigin::new(fixture.blob.clone(), Fault::Slow);
    layer.add_origin(origin.clone());
    let last = chunk_range(7);
    read(&layer, last.start as u64, 100, Duration::from_secs(10))
        .await
        .unwrap();
    let read_done = Instant::now();
    lazy.fill(Arc::clone(&layer));
    tokio::time::timeout(Duration::from_secs(20), layer.wait_complete())
        .await
        .expect("the fill completes");
    let arrivals = lock(&origin.arrivals).clone();
    assert!(arrivals.len() >= 2, "{arrivals:?}");
    arrivals[1].saturating_duration_since(read_done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_keeps_quiet_while_a_guest_reads() {
    let yielding = fill_after_a_read(400).await;
    let eager = fill_after_a_read(0).await;
    println!(
        "the fill's first fetch came {yielding:?} after a read (yield 400 ms), {eager:?} without"
    );
    assert!(yielding >= Duration::from_millis(350), "{yielding:?}");
    assert!(eager < Duration::from_millis(300), "{eager:?}");
}

/// A gzip layer read as it is, published in a cache: a synthesized EROFS image (metadata
/// written, data holes) whose data chunks come from gzip spans that neighbours may share.
struct GzipFixture {
    _dir: tempfile::TempDir,
    cache: Cache,
    record: LayerRecord,
    _pin: PinGuard,
    blob: Vec<u8>,
    /// The image every chunk filled from the blob directly (what the lazy reads must show).
    filled: Vec<u8>,
    map: Arc<gantry_oci::ztoc::synth::LayerMap>,
}

async fn gzip_fixture() -> GzipFixture {
    use std::io::Write as _;

    let mut tar = tar::Builder::new(Vec::new());
    for (name, len) in [
        ("small", 3000),
        ("big", 700_000),
        ("odd", 200_001),
        ("tiny", 5),
    ] {
        let data = image_bytes(len, len as u64);
        let mut header = tar::Header::new_gnu();
        header.set_size(len as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&tar).unwrap();
    let blob = gzip.finish().unwrap();
    let descriptor = Descriptor::new(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest::of(&blob),
        blob.len() as u64,
    );

    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("cache"), CacheConfig::default()).unwrap();
    let ztoc = gantry_oci::ztoc::toc::build(blob.as_slice(), 64 << 10).unwrap();
    let (record, pin) = cache
        .publish_gzip_layer(&descriptor, ztoc, &gantry_oci::ConvertOptions::default())
        .await
        .unwrap();
    assert!(record.lazy);
    let map = match cache.lazy_index(&record.blob_digest).unwrap() {
        LayerIndex::Gzip(map) => map,
        other => panic!("a gzip layer read back as {other:?}"),
    };
    let mut filled = std::fs::read(&record.erofs_path).unwrap();
    for chunk in (0..map.len()).filter(|&chunk| !map.is_metadata(chunk)) {
        let image = map.image_range(chunk);
        let stored = map.blob_range(chunk);
        let out = &mut filled[image.start as usize..image.end as usize];
        map.decode_chunk_into(
            chunk,
            &blob[stored.start as usize..stored.end as usize],
            out,
        )
        .unwrap();
    }
    // Neighbours sharing a span is what this fixture is for.
    assert!(
        (1..map.len()).any(|c| map.blob_range(c).start < map.blob_range(c - 1).end),
        "no two chunks share a span"
    );
    GzipFixture {
        _dir: dir,
        cache,
        record,
        _pin: pin,
        blob,
        filled,
        map,
    }
}

impl GzipFixture {
    fn open(&self, lazy: &LazyLayers) -> Arc<LazyLayer> {
        lazy.open(&self.cache, &self.record).unwrap()
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.record.erofs_path).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_layer_serves_metadata_at_once_and_data_from_its_spans() {
    let gzip = gzip_fixture().await;
    let lazy = LazyLayers::new(config());
    let layer = gzip.open(&lazy);
    let origin = TestOrigin::new(gzip.blob.clone(), Fault::None);
    layer.add_origin(origin.clone());
    // Block 0 and the metadata need no fetch.
    let size = gzip.filled.len();
    let superblock = read(&layer, 0, 4096, Duration::from_secs(5)).await.unwrap();
    assert_eq!(superblock, gzip.filled[..4096]);
    let last = gzip.map.image_range(gzip.map.len() - 1);
    let metadata = read(
        &layer,
        last.start,
        (last.end - last.start) as usize,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(metadata, gzip.filled[last.start as usize..]);
    assert!(origin.requests().is_empty(), "metadata was fetched");
    // A read across a chunk boundary fetches the spans of those two chunks only.
    let boundary = gzip.map.image_range(3).start;
    let got = read(&layer, boundary - 100, 200, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        got,
        gzip.filled[boundary as usize - 100..boundary as usize + 100]
    );
    assert!(layer.is_present(2) && layer.is_present(3));
    assert!(!layer.is_present(1) && !layer.is_present(4));
    let fetched: Vec<_> = origin.requests();
    let wanted = gzip.map.blob_range(2).start..gzip.map.blob_range(3).end;
    assert!(
        fetched
            .iter()
            .all(|r| wanted.start <= r.start && r.end <= wanted.end),
        "{fetched:?} outside {wanted:?}"
    );
    // The fill completes the image, equal to the directly filled one.
    lazy.fill(Arc::clone(&layer));
    tokio::time::timeout(Duration::from_secs(20), layer.wait_complete())
        .await
        .expect("the fill completes");
    let image = gzip.image();
    assert_eq!(image.len(), size);
    assert!(image == gzip.filled, "the filled image differs");
    // Opened again (an agent restart): the map reads back from the cache, every chunk present.
    drop(layer);
    let again = LazyLayers::new(config());
    let layer = gzip.open(&again);
    assert!(layer.is_complete());
    let tail = read(&layer, (size - 8192) as u64, 8192, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(tail, gzip.filled[size - 8192..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_layer_from_an_origin_that_ignores_ranges_is_streamed_once() {
    let gzip = gzip_fixture().await;
    let lazy = LazyLayers::new(config());
    let layer = gzip.open(&lazy);
    let origin = TestOrigin::new(gzip.blob.clone(), Fault::IgnoreRanges);
    layer.add_origin(origin.clone());
    let first = gzip.map.image_range(1).start;
    read(&layer, first, 100, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(layer.ignores_ranges());
    // The next miss streams the blob once; chunks sharing spans are all cut from it.
    let data = 1..gzip.map.len() - 1;
    let offset = gzip.map.image_range(2).start + 10;
    let got = read(&layer, offset, 5000, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got, gzip.filled[offset as usize..offset as usize + 5000]);
    eventually(|| data.clone().skip(1).all(|chunk| layer.is_present(chunk))).await;
    assert_eq!(origin.streams.load(Ordering::SeqCst), 1);
    let image = gzip.image();
    let from = gzip.map.image_range(2).start as usize;
    assert!(
        image[from..] == gzip.filled[from..],
        "the streamed chunks differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_span_with_wrong_bytes_never_reaches_a_reader() {
    let gzip = gzip_fixture().await;
    let lazy = LazyLayers::new(config());
    let layer = gzip.open(&lazy);
    layer.add_origin(TestOrigin::new(gzip.blob.clone(), Fault::CorruptAlways));
    let offset = gzip.map.image_range(2).start;
    let result = read(&layer, offset, 4096, Duration::from_secs(10)).await;
    assert!(result.is_err(), "a read of corrupt spans succeeded");
    assert!(!layer.is_present(2));
    assert!(
        lazy.counters()
            .verification_failures
            .load(Ordering::Relaxed)
            > 0,
        "no verification failure counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_gzip_blob_is_checked_and_a_wrong_one_quarantines_the_layer() {
    // The right blob: complete, checked, reads go on.
    let gzip = gzip_fixture().await;
    let lazy = LazyLayers::new(config());
    let layer = gzip.open(&lazy);
    layer.add_origin(TestOrigin::new(gzip.blob.clone(), Fault::None));
    lazy.fill(Arc::clone(&layer));
    tokio::time::timeout(Duration::from_secs(20), layer.wait_complete())
        .await
        .expect("the fill completes");
    layer.check_blob().unwrap();
    assert!(!layer.is_poisoned());

    // A blob whose gzip header (in no span) differs: every span verifies, the data inflates
    // the same, but the whole blob is not the layer's.
    let gzip = gzip_fixture().await;
    let lazy = LazyLayers::new(config());
    let layer = gzip.open(&lazy);
    let mut forged = gzip.blob.clone();
    forged[4] ^= 0x01; // the header's MTIME
    layer.add_origin(TestOrigin::new(forged, Fault::None));
    let offset = gzip.map.image_range(1).start;
    read(&layer, offset, 4096, Duration::from_secs(5))
        .await
        .expect("a span-verified read is served before the layer is complete");
    lazy.fill(Arc::clone(&layer));
    tokio::time::timeout(Duration::from_secs(20), layer.wait_complete())
        .await
        .expect("the fill completes");
    // The watcher started at open checks it in the background.
    eventually(|| layer.is_poisoned()).await;
    let error = read(&layer, offset, 4096, Duration::from_secs(5))
        .await
        .expect_err("a quarantined layer served a read");
    assert!(error.to_string().contains("quarantined"), "{error}");
}
