//! Helpers for the registry and cache tests: an OCI layout builder, layers, cache checks; the
//! registry, `skopeo` pushes and the fault-injecting proxy come from `gantry-testkit` (shared
//! with the end-to-end tests).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flate2::Compression;
use flate2::write::GzEncoder;
use gantry_agent::cache::{Cache, CacheConfig};
use gantry_oci::reference::Digest;
use gantry_oci::registry::RegistryConfig;
use serde_json::json;

// Each test file that includes this module uses a different part of it.
#[allow(unused_imports)]
pub use gantry_testkit::*;

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

/// Serves a stub HTTP server (a registry or storage host that misbehaves on purpose) on a free
/// loopback port: the port and the task (abort it, or let the runtime end it).
pub async fn serve_stub(app: axum::Router) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, task)
}
