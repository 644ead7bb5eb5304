//! Cold pull + convert of a realistic image from a local `docker-registry`, against `skopeo copy`
//! of the same image to a local directory.
//!
//! `cargo bench -p gantry-agent --bench pull_bench`
//!
//! The image is a Debian bookworm minbase root file system with python3 (made with
//! `debootstrap --variant=minbase --include=python3`, kept in `$GANTRY_BENCH_DIR`, default
//! `/var/tmp/gantry-bench`, and reused), packed as one tar+gzip layer into an OCI layout and
//! pushed with `skopeo`. Needs root, debootstrap, docker-registry and skopeo.

#[path = "../tests/registry_common/mod.rs"]
#[allow(unused_imports)]
mod registry_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use gantry_agent::cache::{Cache, CacheConfig};
use gantry_agent::images::pull::{no_progress, pull};
use gantry_oci::reference::Reference;
use gantry_oci::registry::{RegistryClient, RegistryConfig, RegistrySource};
use registry_common::{LayoutBuilder, Registry};
use serde_json::json;

fn run(command: &mut Command) {
    let status = command.status().expect("running a command");
    assert!(status.success(), "{command:?} failed");
}

/// The debootstrapped root file system, made on first use.
fn rootfs(work: &Path) -> PathBuf {
    let rootfs = work.join("rootfs");
    if !rootfs.join("usr/bin/python3").exists() {
        eprintln!(
            "debootstrap (minbase + python3) into {} …",
            rootfs.display()
        );
        let partial = work.join("rootfs.partial");
        let _ = std::fs::remove_dir_all(&partial);
        run(Command::new("debootstrap").args([
            "--variant=minbase",
            "--include=python3",
            "bookworm",
            partial.to_str().unwrap_or_default(),
            "http://deb.debian.org/debian",
        ]));
        std::fs::rename(&partial, &rootfs).expect("renaming the root file system");
    }
    rootfs
}

/// One tar+gzip layer of the root file system (made once).
fn layer(work: &Path, rootfs: &Path) -> Vec<u8> {
    let path = work.join("layer.tar.gz");
    if !path.exists() {
        let partial = work.join("layer.tar.gz.partial");
        let script = format!(
            "tar --numeric-owner --xattrs -C '{}' -cf - . | gzip -6 > '{}'",
            rootfs.display(),
            partial.display()
        );
        run(Command::new("sh").arg("-c").arg(script));
        std::fs::rename(&partial, &path).expect("renaming the layer");
    }
    std::fs::read(&path).expect("reading the layer")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo test --benches` asks for a list; there is nothing to list.
        return;
    }
    let work = PathBuf::from(
        std::env::var("GANTRY_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/gantry-bench".into()),
    );
    std::fs::create_dir_all(&work).expect("creating the bench directory");
    let rootfs = rootfs(&work);
    let layer = layer(&work, &rootfs);
    let scratch = tempfile::tempdir_in(&work).expect("scratch directory");
    let mut layout = LayoutBuilder::new(&scratch.path().join("layout"));
    let (descriptor, _) = layout.image(
        std::slice::from_ref(&layer),
        "amd64",
        json!({"Cmd": ["/usr/bin/python3"], "Env": ["PATH=/usr/bin:/bin"]}),
    );
    layout.tag(descriptor, "py");
    let registry = Registry::start();
    registry.push(&layout.root, "py", "bench/debian:py");
    let image = format!("{}/bench/debian:py", registry.host());
    let size_mb = layer.len() as f64 / 1e6;

    // Gantry: cold pull, verify, convert to EROFS, publish (fsync) into an empty cache.
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let cache_dir = scratch.path().join("cache");
    let started = Instant::now();
    let record = runtime.block_on(async {
        let cache = Cache::open(&cache_dir, CacheConfig::default()).expect("cache");
        let client = RegistryClient::new(RegistryConfig::default()).expect("client");
        let reference: Reference = image.parse().expect("reference");
        pull(
            &cache,
            &RegistrySource {
                client: &client,
                reference: &reference,
            },
            &no_progress,
        )
        .await
        .expect("pull")
    });
    let gantry = started.elapsed().as_secs_f64();

    // skopeo: copy the same image to a local directory (no conversion).
    let dir = scratch.path().join("skopeo-dir");
    let started = Instant::now();
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false", "-q"])
        .arg(format!("docker://{image}"))
        .arg(format!("dir:{}", dir.display())));
    let skopeo = started.elapsed().as_secs_f64();

    let erofs_mb = record.erofs_size() as f64 / 1e6;
    println!("image: debian bookworm minbase + python3, one tar+gzip layer of {size_mb:.1} MB");
    println!(
        "gantry pull + convert: {gantry:.2} s, {:.1} MB/s compressed in, {erofs_mb:.1} MB EROFS out",
        size_mb / gantry
    );
    println!(
        "skopeo copy to dir:    {skopeo:.2} s, {:.1} MB/s",
        size_mb / skopeo
    );
    println!("ratio gantry / skopeo: {:.2}", gantry / skopeo);
}
