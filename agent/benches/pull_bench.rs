//! Cold pull + convert of a realistic image from a local `docker-registry`, against `skopeo copy`
//! of the same image to a local directory.
//!
//! `cargo bench -p gantry-agent --bench pull_bench`
//!
//! The image is a Debian bookworm minbase root file system with python3 (made with
//! `debootstrap --variant=minbase --include=python3`, kept in `$GANTRY_BENCH_DIR`, default
//! `/var/tmp/gantry-bench`, and reused), packed as one tar+gzip layer into an OCI layout and
//! pushed with `skopeo`. When debootstrap fails (no mirror reachable), or with
//! `GANTRY_BENCH_ROOT=host`, the root is instead the same packages copied from the host's
//! installed files (`qemu/host-root.sh`, kept as `host-rootfs`); `GANTRY_BENCH_ROOT=debootstrap`
//! refuses that fallback. The `root:` line of the output says which root was measured. Needs
//! root, debootstrap (or a Debian host with python3), docker-registry and skopeo.

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
use gantry_testkit::bench_root::{RootChoice, debootstrap_minbase, host_root};
use registry_common::{LayoutBuilder, Registry};
use serde_json::json;

fn run(command: &mut Command) {
    let status = command.status().expect("running a command");
    assert!(status.success(), "{command:?} failed");
}

/// Debootstrap's mirror (a fixed one: this benchmark measures the pull, not the mirror).
const MIRROR: &str = "http://deb.debian.org/debian";

/// The packages the root holds besides minbase's (debootstrap's `--include`).
const PACKAGES: &str = "python3";

/// The debootstrapped root file system, made on first use; why not, when debootstrap fails.
fn debootstrap_rootfs(work: &Path) -> Result<PathBuf, String> {
    let rootfs = work.join("rootfs");
    if rootfs.join("usr/bin/python3").exists() {
        return Ok(rootfs);
    }
    eprintln!(
        "debootstrap (minbase + {PACKAGES}) into {} …",
        rootfs.display()
    );
    let partial = work.join("rootfs.partial");
    debootstrap_minbase(&partial, &[PACKAGES], MIRROR)?;
    std::fs::rename(&partial, &rootfs).map_err(|e| format!("renaming the root: {e}"))?;
    Ok(rootfs)
}

/// The root file system and the `root:` line saying which it is: debootstrap's, else (no
/// mirror reachable, or `GANTRY_BENCH_ROOT=host`) the same packages from the host's files.
fn rootfs(work: &Path) -> (PathBuf, String) {
    let choice = RootChoice::from_env().unwrap_or_else(|why| panic!("{why}"));
    let why = match choice {
        RootChoice::Host => "GANTRY_BENCH_ROOT=host".to_owned(),
        RootChoice::Debootstrap | RootChoice::DebootstrapFirst => match debootstrap_rootfs(work) {
            Ok(rootfs) => return (rootfs, debootstrap_line()),
            Err(why) if choice == RootChoice::DebootstrapFirst => {
                format!("no mirror reachable: {why}")
            }
            Err(why) => panic!("{why} (and GANTRY_BENCH_ROOT=debootstrap)"),
        },
    };
    // Kept beside debootstrap's under its own name, so it is never taken for it.
    let rootfs = work.join("host-rootfs");
    let description = host_root(&rootfs, &[PACKAGES]).unwrap_or_else(|why| panic!("{why}"));
    (
        rootfs,
        format!("root: {description} (not debootstrap: {why})"),
    )
}

fn debootstrap_line() -> String {
    format!("root: debootstrap bookworm minbase+{PACKAGES} from {MIRROR}")
}

/// One tar+gzip layer of the root file system, `NAME.tar.gz` (made once).
fn layer(work: &Path, rootfs: &Path, name: &str) -> Vec<u8> {
    let path = work.join(format!("{name}.tar.gz"));
    if !path.exists() {
        let partial = work.join(format!("{name}.tar.gz.partial"));
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
    let (rootfs, root_line) = rootfs(&work);
    // Each root's layer has a name of its own, so a cached one is never taken for the other's.
    let layer_name = if rootfs.ends_with("rootfs") {
        "layer"
    } else {
        "host-layer"
    };
    let layer = layer(&work, &rootfs, layer_name);
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
    println!("{root_line}");
    println!("image: that root, one tar+gzip layer of {size_mb:.1} MB");
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
