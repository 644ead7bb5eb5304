//! Peers over real HTTP on loopback, with real caches: what an endpoint serves and refuses,
//! and how the fetcher treats a peer that lies, breaks off or hangs.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::future::BoxFuture;
use gantry_oci::chunked::{ChunkedLayerOptions, IndexLocation, write_chunked_layer};
use gantry_oci::manifest::Descriptor;
use gantry_oci::registry::{RegistryClient, RegistryConfig};

use super::client::PeerClient;
use super::routes::PeerSet;
use super::server::{self, PeerEndpoint};
use super::{PEER_REPOSITORY, PeerToken};
use crate::cache::{Cache, CacheConfig, LayerRecord, PinGuard};
use crate::images::ImageService;
use crate::lazy::LazyConfig;
use crate::lazy::layer::LazyLayer;
use crate::lazy::origin::{BlobOrigin, OriginError};
use crate::sync::lock;

const CHUNK: u32 = 64 * 1024;
const TOKEN: &str = "peer-token-0123456789";

/// A chunked layer blob of `chunks` chunks of poorly compressible bytes.
struct Blob {
    image: Vec<u8>,
    bytes: Vec<u8>,
    descriptor: Descriptor,
    uncompressed: gantry_oci::Digest,
}

fn blob(chunks: usize) -> Blob {
    let image = gantry_testkit::noise(chunks * CHUNK as usize - 1000, 11);
    let mut bytes = Vec::new();
    let options = ChunkedLayerOptions {
        chunk_size: CHUNK,
        ..ChunkedLayerOptions::default()
    };
    let layer = write_chunked_layer(image.as_slice(), &mut bytes, &options).unwrap();
    Blob {
        image,
        bytes,
        descriptor: layer.descriptor(),
        uncompressed: layer.uncompressed_digest.clone(),
    }
}

/// One card: a cache holding the blob's layer (no chunk yet), its image service and, if it
/// serves, its endpoint.
struct Node {
    _dir: tempfile::TempDir,
    images: Arc<ImageService>,
    record: LayerRecord,
    _pin: PinGuard,
    url: String,
    peers: Arc<PeerSet>,
    metrics: crate::metrics::Metrics,
    _server: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(server) = &self._server {
            server.abort();
        }
    }
}

fn lazy_config() -> LazyConfig {
    LazyConfig {
        read_ahead_chunks: 0,
        park_timeout_secs: 10.0,
        retries: 1,
        ..LazyConfig::default()
    }
}

/// A node with its endpoint listening on a free loopback port, asking `peers` (URLs).
async fn node(blob: &Blob, peers: &[String], serve: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("cache"), CacheConfig::default()).unwrap();
    let location = IndexLocation::from_descriptor(&blob.descriptor).unwrap();
    let section = &blob.bytes[location.range.start as usize..location.range.end as usize];
    let index = location.parse(section).unwrap();
    let (record, pin) = cache
        .publish_lazy_layer(
            &blob.descriptor,
            &index,
            location.digest.as_ref().unwrap(),
            blob.uncompressed.clone(),
            section,
        )
        .await
        .unwrap();
    let registry = RegistryClient::new(RegistryConfig::default()).unwrap();
    let metrics = crate::metrics::Metrics::new();
    let images = Arc::new(ImageService::new(
        cache,
        registry,
        lazy_config(),
        dir.path(),
        &dir.path().join("no-busybox"),
        metrics.clone(),
    ));
    let token = PeerToken::parse(TOKEN).unwrap();
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
    let peers = Arc::new(PeerSet::new(
        Some(url.clone()),
        peers.to_vec(),
        PeerClient::new(Some(token.clone())).unwrap(),
    ));
    images.lazy.fetcher().set_peers(peers.clone());
    let server = serve.then(|| {
        let endpoint = Arc::new(PeerEndpoint::new(images.clone(), peers.clone(), token));
        tokio::spawn(server::serve(listener, endpoint))
    });
    Node {
        _dir: dir,
        images,
        record,
        _pin: pin,
        url,
        peers,
        metrics,
        _server: server,
    }
}

impl Node {
    fn layer(&self) -> Arc<LazyLayer> {
        self.images
            .lazy
            .open(&self.images.cache, &self.record)
            .unwrap()
    }
}

/// The registry, in process: serves any range of the blob, counting bytes and requests.
#[derive(Debug)]
struct Registry {
    blob: Vec<u8>,
    bytes: Arc<AtomicU64>,
    requests: Mutex<Vec<Range<u64>>>,
}

impl Registry {
    fn new(blob: &[u8], bytes: &Arc<AtomicU64>) -> Arc<Registry> {
        Arc::new(Registry {
            blob: blob.to_vec(),
            bytes: Arc::clone(bytes),
            requests: Mutex::new(Vec::new()),
        })
    }
}

impl BlobOrigin for Registry {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, OriginError>> {
        lock(&self.requests).push(range.clone());
        Box::pin(async move {
            // A registry some way off: fetches overlap.
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.bytes
                .fetch_add(range.end - range.start, Ordering::SeqCst);
            Ok(Bytes::copy_from_slice(
                &self.blob[range.start as usize..range.end as usize],
            ))
        })
    }

    fn describe(&self) -> String {
        "registry".into()
    }

    fn registry(&self) -> Option<&str> {
        Some("registry.test")
    }
}

/// Reads `len` bytes at `offset` as the device does (the lazy tests' reader, 20 s at most).
async fn read(layer: &LazyLayer, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    crate::lazy::tests::read(layer, offset, len, Duration::from_secs(20)).await
}

/// Stores chunks `chunks` of `blob` in `layer` (as if fetched).
fn store(layer: &LazyLayer, chunks: Range<usize>, blob: &Blob) {
    let span = layer.blob_span(chunks.clone());
    layer
        .store_chunks(chunks, &blob.bytes[span.start as usize..span.end as usize])
        .unwrap();
}

/// `GET url` of the blob bytes `chunk`, with the token.
async fn get_chunk(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
    chunk: &Range<u64>,
) -> reqwest::Response {
    http.get(url)
        .header(header::AUTHORIZATION, bearer)
        .header(
            header::RANGE,
            format!("bytes={}-{}", chunk.start, chunk.end - 1),
        )
        .send()
        .await
        .unwrap()
}

fn blob_url(base: &str, blob: &Blob) -> String {
    format!(
        "{base}/v2/{PEER_REPOSITORY}/blobs/{}",
        blob.descriptor.digest
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_serves_what_it_holds_to_holders_of_the_token_only() {
    let blob = blob(8);
    let node = node(&blob, &[], true).await;
    let layer = node.layer();
    store(&layer, 0..4, &blob);
    let http = reqwest::Client::new();
    let url = blob_url(&node.url, &blob);
    let bearer = format!("Bearer {TOKEN}");

    // No token, a wrong one: 401, for the ping as for a blob.
    for (target, auth) in [
        (format!("{}/v2/", node.url), None),
        (url.clone(), None),
        (
            url.clone(),
            Some("Bearer peer-token-0123456780".to_string()),
        ),
    ] {
        let mut request = http.get(&target);
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{target}");
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    }
    let ping = http
        .get(format!("{}/v2/", node.url))
        .header(header::AUTHORIZATION, &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), StatusCode::OK);

    // A present chunk: 206 with its bytes, as in the blob.
    let chunk = layer.index().blob_range(1);
    let response = get_chunk(&http, &url, &bearer, &chunk).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        response.headers()[header::CONTENT_RANGE],
        format!(
            "bytes {}-{}/{}",
            chunk.start,
            chunk.end - 1,
            blob.bytes.len()
        )
        .as_str()
    );
    let body = response.bytes().await.unwrap();
    assert_eq!(
        &body[..],
        &blob.bytes[chunk.start as usize..chunk.end as usize]
    );

    // A range reaching into a missing chunk, the whole incomplete blob: 404, at once.
    let straddling = layer.blob_span(3..5);
    for range in [
        Some(format!("bytes={}-{}", straddling.start, straddling.end - 1)),
        None,
    ] {
        let started = Instant::now();
        let mut request = http.get(&url).header(header::AUTHORIZATION, &bearer);
        if let Some(range) = &range {
            request = request.header(header::RANGE, range);
        }
        let response = request.send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{range:?}");
        println!("404 for {range:?} in {took:?}");
        assert!(took < Duration::from_millis(50), "{took:?}");
    }
    // Manifests by tag, bad digests, ranges past the end, unknown blobs.
    let cases = [
        (
            format!("{}/v2/app/manifests/latest", node.url),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            format!("{}/v2/app/blobs/sha256:xyz", node.url),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{}/v2/App/blobs/{}", node.url, blob.descriptor.digest),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            format!(
                "{}/v2/app/blobs/{}",
                node.url,
                gantry_oci::Digest::of(b"other")
            ),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            url.clone(),
            Some(format!("bytes={}-", blob.bytes.len())),
            StatusCode::RANGE_NOT_SATISFIABLE,
        ),
    ];
    for (target, range, status) in cases {
        let mut request = http.get(&target).header(header::AUTHORIZATION, &bearer);
        if let Some(range) = range {
            request = request.header(header::RANGE, range);
        }
        assert_eq!(request.send().await.unwrap().status(), status, "{target}");
    }
    let head = http
        .head(&url)
        .header(header::AUTHORIZATION, &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);

    // Complete: the whole blob, as the registry has it (and HEAD says so).
    store(&layer, 4..8, &blob);
    let whole = http
        .get(&url)
        .header(header::AUTHORIZATION, &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(&whole.bytes().await.unwrap()[..], &blob.bytes[..]);
    let head = http
        .head(&url)
        .header(header::AUTHORIZATION, &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()[header::CONTENT_LENGTH],
        blob.bytes.len().to_string().as_str()
    );
    // The layer closed (no VM maps it): its bitmap on disk says the same.
    drop(layer);
    let response = get_chunk(&http, &url, &bearer, &chunk).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    let stats = node.peers.stats();
    assert_eq!(stats.unauthorized, 3);
    assert!(stats.not_held >= 4, "{stats:?}");
}

/// A fake peer: answers every blob request with `respond(range asked)`.
async fn fake_peer(
    respond: impl Fn(Range<u64>) -> Response + Send + Sync + Clone + 'static,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let respond = respond.clone();
        async move {
            let range = request
                .headers()
                .get(header::RANGE)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("bytes="))
                .and_then(|value| value.split_once('-'))
                .map(|(start, end)| start.parse::<u64>().unwrap()..end.parse::<u64>().unwrap() + 1)
                .unwrap_or(0..0);
            respond(range)
        }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

fn partial(bytes: Vec<u8>, range: &Range<u64>, total: usize, length: u64) -> Response {
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{total}", range.start, range.end - 1),
        )
        .header(header::CONTENT_LENGTH, length)
        .body(Body::from(bytes))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_caught_counted_and_put_on_backoff_and_the_reader_gets_true_bytes() {
    let blob = blob(4);
    let served = blob.bytes.clone();
    let total = served.len();
    let (liar, _task) = fake_peer(move |range| {
        let mut bytes = served[range.start as usize..range.end as usize].to_vec();
        bytes[0] ^= 0x40;
        let len = bytes.len() as u64;
        partial(bytes, &range, total, len)
    })
    .await;
    let node = node(&blob, std::slice::from_ref(&liar), false).await;
    let registry_bytes = Arc::new(AtomicU64::new(0));
    let layer = node.layer();
    layer.add_origin(Registry::new(&blob.bytes, &registry_bytes));

    let data = read(&layer, 0, CHUNK as usize).await.unwrap();
    assert_eq!(data, blob.image[..CHUNK as usize]);
    let stats = node.peers.stats();
    println!("{stats:?}");
    assert_eq!(stats.peers[0].bad_bytes, 1);
    assert!(!stats.peers[0].live, "a liar goes on backoff");
    let lazy = node.images.lazy.stats();
    let origin = lazy
        .origins
        .iter()
        .find(|origin| origin.origin == format!("peer {liar}"))
        .expect("the peer is in the origin counters");
    assert_eq!(origin.verification_failures, 1);
    assert_eq!(origin.chunks, 0);
    // On backoff it is not asked again: the next chunk comes from the registry alone.
    let requests = stats.peers[0].requests;
    read(&layer, u64::from(CHUNK), 16).await.unwrap();
    assert_eq!(node.peers.stats().peers[0].requests, requests);

    // The metrics say the same, per source.
    use crate::metrics::tests::sample;
    let peer = [("kind", "peer"), ("source", liar.as_str())];
    let registry = [("kind", "registry"), ("source", "registry.test")];
    let value = |name, labels: &[(&str, &str)]| sample(&node.metrics, name, labels);
    assert_eq!(
        value("gantry_registry_requests_total", &peer),
        Some(requests as f64)
    );
    assert!(
        value("gantry_registry_errors_total", &peer) >= Some(1.0),
        "the lie counts as the peer's error"
    );
    assert_eq!(
        value("gantry_registry_bytes_total", &registry),
        Some(registry_bytes.load(Ordering::SeqCst) as f64)
    );
    assert_eq!(value("gantry_registry_errors_total", &registry), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_short_resumes_from_the_next_source_at_the_byte_it_reached() {
    let blob = blob(4);
    let served = blob.bytes.clone();
    let total = served.len();
    // Promises the whole range, sends the first half, and dies (the connection closes).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let breaker = format!("http://{}", listener.local_addr().unwrap());
    let _task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&request).to_lowercase();
            let range = text
                .lines()
                .find_map(|line| line.strip_prefix("range: bytes="))
                .and_then(|value| value.trim().split_once('-'))
                .map(|(a, b)| a.parse::<u64>().unwrap()..b.parse::<u64>().unwrap() + 1)
                .unwrap();
            let len = range.end - range.start;
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\ncontent-length: {len}\r\ncontent-range: bytes {}-{}/{total}\r\n\r\n",
                range.start,
                range.end - 1
            );
            let half = &served[range.start as usize..(range.start + len / 2) as usize];
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(half).await;
            let _ = stream.flush().await;
            drop(stream);
        }
    });
    let node = node(&blob, std::slice::from_ref(&breaker), false).await;
    let registry_bytes = Arc::new(AtomicU64::new(0));
    let registry = Registry::new(&blob.bytes, &registry_bytes);
    let layer = node.layer();
    layer.add_origin(registry.clone());

    let data = read(&layer, 0, CHUNK as usize).await.unwrap();
    assert_eq!(data, blob.image[..CHUNK as usize]);
    let chunk = layer.index().blob_range(0);
    let half = (chunk.end - chunk.start) / 2;
    let asked = lock(&registry.requests).clone();
    println!("chunk 0 is blob bytes {chunk:?}; the registry was asked for {asked:?}");
    assert_eq!(asked, vec![(chunk.start + half)..chunk.end]);
    assert_eq!(
        registry_bytes.load(Ordering::SeqCst),
        chunk.end - chunk.start - half
    );
    assert_eq!(node.peers.stats().peers[0].failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_peer_is_passed_over_within_the_timeouts() {
    let blob = blob(4);
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung = format!("http://{}", listener.local_addr().unwrap());
    let _task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let node = node(&blob, std::slice::from_ref(&hung), false).await;
    let registry_bytes = Arc::new(AtomicU64::new(0));
    let layer = node.layer();
    layer.add_origin(Registry::new(&blob.bytes, &registry_bytes));

    let started = Instant::now();
    let data = read(&layer, 0, 4096).await.unwrap();
    let took = started.elapsed();
    println!("read past a hung peer in {took:?}");
    assert_eq!(data, blob.image[..4096]);
    assert!(took >= super::client::FIRST_BYTE_TIMEOUT, "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(!node.peers.stats().peers[0].live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_cards_filling_one_layer_fetch_each_chunk_from_the_registry_about_once() {
    let blob = blob(48);
    // Endpoints first (their URLs name the nodes), then each asks the other two.
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(node(&blob, &[], true).await);
    }
    let urls: Vec<String> = nodes.iter().map(|node| node.url.clone()).collect();
    for node in &nodes {
        node.peers.set_manifest_peers(&urls);
    }
    let registry_bytes = Arc::new(AtomicU64::new(0));
    let layers: Vec<Arc<LazyLayer>> = nodes.iter().map(Node::layer).collect();
    let started = Instant::now();
    for (node, layer) in nodes.iter().zip(&layers) {
        layer.add_origin(Registry::new(&blob.bytes, &registry_bytes));
        node.images.lazy.fill(Arc::clone(layer));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !layers.iter().all(|layer| layer.is_complete()) {
        assert!(Instant::now() < deadline, "the fills did not complete");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = registry_bytes.load(Ordering::SeqCst);
    let ratio = sent as f64 / blob.bytes.len() as f64;
    println!(
        "3 cards filled {} chunks in {:?}: the registry sent {sent} bytes, {ratio:.2}x the blob",
        layers[0].index().len(),
        started.elapsed()
    );
    assert!(ratio <= 1.1, "{ratio}");
    for (node, layer) in nodes.iter().zip(&layers) {
        let data = read(layer, 0, blob.image.len()).await.unwrap();
        assert!(data == blob.image, "{} holds the image", node.url);
        // Each got chunks from both others.
        let stats = node.images.lazy.stats();
        let from_peers = stats
            .origins
            .iter()
            .filter(|origin| origin.origin.starts_with("peer ") && origin.chunks > 0)
            .count();
        assert_eq!(from_peers, 2, "{:?}", stats.origins);
    }
}
