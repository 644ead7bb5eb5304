//! Helpers for the registry and cache tests: a real `docker-registry` on 127.0.0.1, an OCI
//! layout builder, `skopeo` pushes, and a fault-injecting proxy.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use gantry_agent::cache::{Cache, CacheConfig};
use gantry_oci::reference::Digest;
use gantry_oci::registry::RegistryConfig;
use serde_json::json;

/// Whether the registry tools are installed; tests skip loudly when not.
pub fn tools_available() -> bool {
    let ok = ["docker-registry", "skopeo"].iter().all(|tool| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        eprintln!(
            "SKIP: docker-registry and skopeo are needed (apt-get install docker-registry skopeo)"
        );
    }
    ok
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry` process with its own storage, stopped on drop.
pub struct Registry {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    pub credentials: Option<(String, String)>,
}

/// How to start a [`Registry`].
#[derive(Default)]
pub struct RegistryOptions<'a> {
    /// htpasswd-protected with this user and password.
    pub credentials: Option<(&'a str, &'a str)>,
    /// HTTPS with this certificate and key.
    pub tls: Option<(&'a Path, &'a Path)>,
    /// Upload `Location`s relative to the host (`http.relativeurls`).
    pub relative_urls: bool,
    /// Log every request (read with [`Registry::access_log`]).
    pub access_log: bool,
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// Starts a registry; with `credentials`, an htpasswd-protected one.
    pub fn start_with(credentials: Option<(&str, &str)>) -> Registry {
        Registry::start_options(&RegistryOptions {
            credentials,
            ..RegistryOptions::default()
        })
    }

    /// Starts an HTTPS registry with a certificate for 127.0.0.1 signed by a fresh test CA;
    /// returns it and the CA's PEM path (the CA to trust).
    pub fn start_tls(ca_dir: &Path) -> (Registry, PathBuf) {
        let ca = ca_dir.join("ca.pem");
        let cert = ca_dir.join("cert.pem");
        let key = ca_dir.join("key.pem");
        let script = format!(
            "set -e; cd '{dir}'
            openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=gantry-test-ca \
                -keyout ca-key.pem -out ca.pem
            openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out req.pem
            printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf
            openssl x509 -req -in req.pem -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
                -days 1 -extfile ext.cnf -out cert.pem",
            dir = ca_dir.display()
        );
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl is needed for the TLS test");
        assert!(status.success(), "making the test certificates failed");
        let options = RegistryOptions {
            tls: Some((&cert, &key)),
            ..RegistryOptions::default()
        };
        (Registry::start_options(&options), ca)
    }

    /// Starts a registry as `options` say.
    pub fn start_options(options: &RegistryOptions<'_>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: {}\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: gantry-test-secret\n  relativeurls: {}\n",
            !options.access_log,
            storage.display(),
            options.relative_urls,
        );
        let credentials = options.credentials;
        if let Some((cert, key)) = options.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some((user, password)) = credentials {
            let htpasswd = dir.path().join("htpasswd");
            let output = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils) is needed for the auth test");
            assert!(output.status.success());
            std::fs::write(&htpasswd, output.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: gantry-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let registry = Registry {
            port,
            child,
            dir,
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The requests logged so far (with `access_log`), as `METHOD PATH STATUS`, oldest first.
    pub fn access_log(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        // Combined log format: `… "METHOD PATH HTTP/1.1" STATUS SIZE …`.
        log.lines()
            .filter_map(|line| {
                let (_, request) = line.split_once('"')?;
                let (request, rest) = request.split_once('"')?;
                let mut words = request.split_whitespace();
                let (method, path) = (words.next()?, words.next()?);
                let status = rest.split_whitespace().next()?;
                Some(format!("{method} {path} {status}"))
            })
            .collect()
    }

    /// Pushes image `tag` of `layout` as `repo:tag` (all platforms of an index).
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) {
        let mut command = Command::new("skopeo");
        command.args([
            "--insecure-policy",
            "copy",
            "--all",
            "--dest-tls-verify=false",
        ]);
        if let Some((user, password)) = &self.credentials {
            command.arg(format!("--dest-creds={user}:{password}"));
        }
        command
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host()));
        let output = command.output().expect("running skopeo");
        assert!(
            output.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One file of a test layer.
#[derive(Clone, Debug)]
pub enum Entry {
    File(&'static str, Vec<u8>),
    Dir(&'static str),
    Symlink(&'static str, &'static str),
}

/// A tar.gz layer of `entries`.
pub fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        match entry {
            Entry::File(path, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o755);
                header.set_size(data.len() as u64);
                builder
                    .append_data(&mut header, path, data.as_slice())
                    .unwrap();
            }
            Entry::Dir(path) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder
                    .append_data(&mut header, path, std::io::empty())
                    .unwrap();
            }
            Entry::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Writes OCI layouts.
pub struct LayoutBuilder {
    pub root: PathBuf,
    index: Vec<serde_json::Value>,
}

/// What was written for one image.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub layer_digests: Vec<Digest>,
    pub layer_sizes: Vec<u64>,
}

impl LayoutBuilder {
    pub fn new(root: &Path) -> LayoutBuilder {
        std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
        std::fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        LayoutBuilder {
            root: root.to_path_buf(),
            index: Vec::new(),
        }
    }

    /// Stores a blob; returns its descriptor.
    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        let digest = Digest::of(bytes);
        std::fs::write(self.root.join("blobs/sha256").join(digest.hex()), bytes).unwrap();
        json!({"mediaType": media_type, "digest": digest.to_string(), "size": bytes.len()})
    }

    /// Writes an image manifest for `layers` (tar.gz bytes); returns its descriptor and facts.
    pub fn image(
        &self,
        layers: &[Vec<u8>],
        arch: &str,
        process: serde_json::Value,
    ) -> (serde_json::Value, BuiltImage) {
        let layer_descriptors: Vec<serde_json::Value> = layers
            .iter()
            .map(|l| self.blob("application/vnd.oci.image.layer.v1.tar+gzip", l))
            .collect();
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": process,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| {
                let mut decoder = flate2::read::GzDecoder::new(l.as_slice());
                let mut raw = Vec::new();
                std::io::Read::read_to_end(&mut decoder, &mut raw).unwrap();
                Digest::of(&raw).to_string()
            }).collect::<Vec<_>>()},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_descriptor =
            self.blob("application/vnd.oci.image.config.v1+json", &config_bytes);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_descriptor,
            "layers": layer_descriptors,
        });
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
        let mut descriptor = self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            &manifest_bytes,
        );
        descriptor["platform"] = json!({"architecture": arch, "os": "linux"});
        let built = BuiltImage {
            manifest_digest: Digest::of(&manifest_bytes),
            config_digest: Digest::of(&config_bytes),
            layer_digests: layers.iter().map(|l| Digest::of(l)).collect(),
            layer_sizes: layers.iter().map(|l| l.len() as u64).collect(),
        };
        (descriptor, built)
    }

    /// Writes an index of `manifests`; returns its descriptor.
    pub fn index(&self, manifests: Vec<serde_json::Value>) -> serde_json::Value {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        self.blob(
            "application/vnd.oci.image.index.v1+json",
            &serde_json::to_vec(&index).unwrap(),
        )
    }

    /// Names `descriptor` `tag` in `index.json` (written at once).
    pub fn tag(&mut self, mut descriptor: serde_json::Value, tag: &str) {
        if let Some(object) = descriptor.as_object_mut() {
            object.remove("platform");
        }
        descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        self.index.push(descriptor);
        let index = json!({"schemaVersion": 2, "manifests": self.index});
        std::fs::write(
            self.root.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    /// A one-platform image tagged `tag`.
    pub fn simple_image(&mut self, tag: &str, layers: &[Vec<u8>]) -> BuiltImage {
        let (descriptor, built) = self.image(
            layers,
            "amd64",
            json!({"Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "Env": ["PATH=/bin", "MODE=test"], "WorkingDir": "/srv", "User": "1000:1000"}),
        );
        self.tag(descriptor, tag);
        built
    }
}

/// Two small distinct layers (a base and an app) for the usual test image.
pub fn small_layers(seed: u64) -> Vec<Vec<u8>> {
    vec![
        layer(&[
            Entry::Dir("bin"),
            Entry::File(
                "bin/app",
                format!("#!/bin/sh\necho app {seed}\n").into_bytes(),
            ),
            Entry::Dir("etc"),
            Entry::File("etc/os-release", b"ID=gantry-test\n".to_vec()),
        ]),
        layer(&[
            Entry::Dir("srv"),
            Entry::File("srv/data.bin", noise(300_000, seed)),
            Entry::Symlink("srv/link", "data.bin"),
        ]),
    ]
}

/// A registry config for tests: fast retries, short stall timeout.
pub fn fast_config() -> RegistryConfig {
    RegistryConfig {
        retries: 3,
        backoff_initial_ms: 20,
        backoff_max_ms: 100,
        stall_timeout_ms: 1_000,
        connect_timeout_ms: 1_000,
        ..RegistryConfig::default()
    }
}

/// Opens a cache in `dir` with no budget.
pub fn open_cache(dir: &Path) -> Cache {
    Cache::open(dir, CacheConfig::default()).unwrap()
}

/// Lists a directory's entries (names), sorted; empty if missing.
pub fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Asserts the cache holds no partial state: nothing in tmp/, every layer directory complete.
pub fn assert_consistent(cache_dir: &Path) {
    let tmp = list(&cache_dir.join("tmp"));
    let owned: Vec<&String> = tmp.iter().collect();
    assert!(owned.is_empty(), "leftovers in tmp/: {owned:?}");
    for layer in list(&cache_dir.join("layers")) {
        let dir = cache_dir.join("layers").join(&layer);
        assert_eq!(
            list(&dir),
            ["chunks.bitmap", "image.erofs", "layer.json"],
            "layer {layer} is incomplete"
        );
    }
}

/// Extracts an EROFS image with `fsck.erofs --extract` and returns the directory.
pub fn extract_erofs(image: &Path, into: &Path) -> PathBuf {
    let out = into.join(format!(
        "x-{}",
        image
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
    ));
    let status = Command::new("fsck.erofs")
        .arg(format!("--extract={}", out.display()))
        .arg(image)
        .stdout(Stdio::null())
        .status()
        .expect("fsck.erofs (erofs-utils)");
    assert!(status.success(), "fsck.erofs failed on {}", image.display());
    out
}

/// Faults the proxy injects.
#[derive(Default)]
pub struct Faults {
    /// Flip a byte in every blob body larger than 1 KiB (layers, not configs).
    pub corrupt_blobs: AtomicBool,
    /// Cut this many blob bodies over 1 KiB in half (then behave).
    pub truncate_blobs: AtomicU32,
    /// Answer this many requests with 500 (then behave).
    pub fail_requests: AtomicU32,
    /// Answer every request with 500.
    pub always_fail: AtomicBool,
    /// Stall this many blob bodies after their first bytes (then behave).
    pub stall_blobs: AtomicU32,
    /// Stall blobs larger than this forever after their first 64 KiB (0 = off).
    pub stall_large_blobs_over: AtomicU64,
    /// Require bearer tokens from /token; a token works for this many requests (0 = off).
    pub bearer_token_uses: AtomicU32,
    /// Drop `Range` headers: the registry then answers `200` with whole blobs.
    pub ignore_ranges: AtomicBool,
    /// Name this host (`host:port`) as the token realm's instead of the proxy's own.
    pub realm_host: Mutex<Option<String>>,
    /// Answer every request with a 500 whose body never ends.
    pub endless_error_bodies: AtomicBool,
}

/// What the proxy saw.
#[derive(Default)]
pub struct ProxyLog {
    pub requests: Vec<(String, Option<String>)>,
    pub token_requests: u32,
    /// Token requests that carried credentials (an `Authorization` header).
    pub token_requests_with_credentials: u32,
    pub blob_bytes_sent: u64,
}

struct ProxyState {
    upstream: String,
    faults: Arc<Faults>,
    log: Arc<Mutex<ProxyLog>>,
    client: reqwest::Client,
    tokens: Mutex<BTreeMap<String, u32>>,
    token_counter: AtomicU32,
    port: u16,
}

/// A fault-injecting HTTP proxy in front of a registry.
pub struct FaultProxy {
    pub port: u16,
    pub faults: Arc<Faults>,
    pub log: Arc<Mutex<ProxyLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let log = Arc::new(Mutex::new(ProxyLog::default()));
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            faults: faults.clone(),
            log: log.clone(),
            client: reqwest::Client::new(),
            tokens: Mutex::new(BTreeMap::new()),
            token_counter: AtomicU32::new(0),
            port,
        });
        let app = axum::Router::new()
            .fallback(proxy_handler)
            .with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy {
            port,
            faults,
            log,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Blob GETs seen, by digest.
    pub fn blob_requests(&self, digest: &Digest) -> usize {
        let needle = format!("/blobs/{digest}");
        self.log
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(path, _)| path.ends_with(&needle))
            .count()
    }

    /// Requests carrying a Range header.
    pub fn range_requests(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(_, range)| range.is_some())
            .count()
    }

    pub fn request_count(&self) -> usize {
        self.log.lock().unwrap().requests.len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

async fn proxy_handler(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = request.headers().clone();
    let faults = &state.faults;

    if path.starts_with("/token") {
        let mut log = state.log.lock().unwrap();
        log.token_requests += 1;
        if headers.contains_key("authorization") {
            log.token_requests_with_credentials += 1;
        }
        drop(log);
        let n = state.token_counter.fetch_add(1, Ordering::SeqCst);
        let token = format!("tok-{n}");
        state.tokens.lock().unwrap().insert(
            token.clone(),
            faults.bearer_token_uses.load(Ordering::SeqCst),
        );
        return json_response(StatusCode::OK, json!({"token": token, "expires_in": 300}));
    }
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state
        .log
        .lock()
        .unwrap()
        .requests
        .push((path.clone(), range.clone()));

    if faults.bearer_token_uses.load(Ordering::SeqCst) > 0 {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let valid = presented.is_some_and(|token| {
            let mut tokens = state.tokens.lock().unwrap();
            match tokens.get_mut(&token) {
                Some(uses) if *uses > 0 => {
                    *uses -= 1;
                    true
                }
                _ => false,
            }
        });
        if !valid {
            let mut response = json_response(StatusCode::UNAUTHORIZED, json!({"errors": []}));
            response.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_str(&format!(
                    "Bearer realm=\"http://{}/token\",service=\"test\"",
                    faults
                        .realm_host
                        .lock()
                        .unwrap()
                        .clone()
                        .unwrap_or_else(|| format!("127.0.0.1:{}", state.port))
                ))
                .unwrap(),
            );
            return response;
        }
    }
    if faults.endless_error_bodies.load(Ordering::SeqCst) {
        let chunks = futures::stream::repeat_with(|| {
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 64 << 10]))
        });
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from_stream(chunks))
            .unwrap();
    }
    if faults.always_fail.load(Ordering::SeqCst) || take_one(&faults.fail_requests) {
        return json_response(StatusCode::INTERNAL_SERVER_ERROR, json!({"errors": []}));
    }

    let method = request.method().clone();
    let is_head = method == axum::http::Method::HEAD;
    // Pushes send bodies (uploads, manifests).
    let Ok(body) = axum::body::to_bytes(request.into_body(), usize::MAX).await else {
        return json_response(StatusCode::BAD_REQUEST, json!({"error": "unreadable body"}));
    };
    let mut upstream = state
        .client
        .request(method, format!("{}{path}", state.upstream))
        .body(body);
    for name in ["accept", "range", "content-type"] {
        if name == "range" && faults.ignore_ranges.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(value) = headers.get(name) {
            upstream = upstream.header(name, value.clone());
        }
    }
    let response = match upstream.send().await {
        Ok(response) => response,
        Err(error) => {
            return json_response(StatusCode::BAD_GATEWAY, json!({"error": error.to_string()}));
        }
    };
    let status = response.status();
    let mut out_headers = HeaderMap::new();
    for name in [
        "content-type",
        "docker-content-digest",
        "content-range",
        "accept-ranges",
        "location",
        "docker-upload-uuid",
    ] {
        if let Some(value) = response.headers().get(name) {
            out_headers.insert(name, value.clone());
        }
    }
    // A HEAD answer has no body but states the blob's length.
    let head_length = (is_head && status.is_success())
        .then(|| response.headers().get("content-length").cloned())
        .flatten();
    let mut body = response.bytes().await.unwrap_or_default().to_vec();
    let is_blob = path.contains("/blobs/") && status.is_success();
    let mut builder = Response::builder().status(status.as_u16());
    for (name, value) in &out_headers {
        builder = builder.header(name, value);
    }
    builder = match head_length {
        Some(length) => builder.header("content-length", length),
        None => builder.header("content-length", body.len()),
    };
    if !is_blob {
        return builder.body(Body::from(body)).unwrap();
    }
    state.log.lock().unwrap().blob_bytes_sent += body.len() as u64;
    let middle = body.len() / 2;
    if faults.corrupt_blobs.load(Ordering::SeqCst)
        && body.len() > 1024
        && let Some(byte) = body.get_mut(middle)
    {
        *byte ^= 0x55;
    }
    let stall_over = faults.stall_large_blobs_over.load(Ordering::SeqCst);
    if stall_over > 0 && body.len() as u64 > stall_over {
        let head = Bytes::copy_from_slice(&body[..65536.min(body.len())]);
        let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(head)]).chain(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Bytes::new())
            }),
        );
        return builder.body(Body::from_stream(stream)).unwrap();
    }
    if take_one(&faults.stall_blobs) {
        let head = Bytes::copy_from_slice(&body[..(body.len() / 2)]);
        let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(head)]).chain(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Bytes::new())
            }),
        );
        return builder.body(Body::from_stream(stream)).unwrap();
    }
    if body.len() > 1024 && take_one(&faults.truncate_blobs) {
        let head = Bytes::copy_from_slice(&body[..(body.len() / 2)]);
        // The pause lets the first half reach the client before the connection breaks.
        let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(head)]).chain(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(std::io::Error::other("truncated by the fault proxy"))
            }),
        );
        return builder.body(Body::from_stream(stream)).unwrap();
    }
    builder.body(Body::from(body)).unwrap()
}

use futures::StreamExt as _;

fn json_response(status: StatusCode, value: serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&value).unwrap()))
        .unwrap()
}

/// Writes a docker config.json with one credential.
pub fn docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let path = dir.join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut file = std::fs::File::create(&path).unwrap();
    write!(file, "{}", json!({"auths": {host: {"auth": auth}}})).unwrap();
    path
}
