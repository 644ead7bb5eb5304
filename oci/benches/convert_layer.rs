//! Benchmark (a command, not a timed test): converting a real root file system tarball with
//! Gantry's writer, against extracting the same tarball with GNU tar and running mkfs.erofs
//! (erofs-utils) on the tree, in one run on the same machine.
//!
//! ```text
//! cargo bench -p gantry-oci --bench convert_layer
//! GANTRY_BENCH_TAR=/path/to/rootfs.tar cargo bench -p gantry-oci --bench convert_layer
//! GANTRY_BENCH_ROOT=host cargo bench -p gantry-oci --bench convert_layer
//! ```
//!
//! Without `GANTRY_BENCH_TAR`, the input is a Debian bookworm minbase root made with
//! `debootstrap` and cached under the target directory (built on the first run, which needs
//! network and a few minutes). When debootstrap fails (no mirror reachable), or with
//! `GANTRY_BENCH_ROOT=host`, the input is instead the same package set copied from the host's
//! installed files (`qemu/host-root.sh`, cached under `gantry-test-cache/host-root`);
//! `GANTRY_BENCH_ROOT=debootstrap` refuses that fallback. The `root:` line of the output says
//! which input was measured. Every figure is the best of `GANTRY_BENCH_RUNS` (default 3)
//! runs, with all inputs in the page cache; MB/s is uncompressed tar bytes per second.

// The root choice and the host-root builder the other benchmarks use (gantry-testkit, which
// depends on this crate, so it is included by path rather than depended on).
#[path = "../../testkit/src/bench_root.rs"]
mod bench_root;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bench_root::{RootChoice, debootstrap_minbase, host_root};
use gantry_oci::{ConvertOptions, convert_layer};

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Debootstrap's mirror, as the rootfs test (`tests/erofs_rootfs.rs`) uses it.
const MIRROR: &str = "http://deb.debian.org/debian";

/// A root file system tree packed as a pax tarball at `tarball` (through a `.partial` file).
fn pack(root: &Path, tarball: &Path) {
    let partial = tarball.with_extension("tar.partial");
    run(Command::new("tar")
        .args([
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
        ])
        .arg("-cf")
        .arg(&partial)
        .arg("-C")
        .arg(root)
        .arg("."));
    fs::rename(&partial, tarball).unwrap();
}

/// The debootstrap minbase tarball, built once and cached (shared with the rootfs test); why
/// not, when debootstrap fails.
fn debootstrap_tarball() -> Result<PathBuf, String> {
    let cache = target_dir().join("gantry-test-cache/debootstrap");
    let tarball = cache.join("bookworm-minbase.tar");
    if tarball.exists() {
        return Ok(tarball);
    }
    fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    eprintln!(
        "building {} with debootstrap (first run only)...",
        tarball.display()
    );
    let root = cache.join("root");
    debootstrap_minbase(&root, &[], MIRROR)?;
    pack(&root, &tarball);
    Ok(tarball)
}

/// The same package set (Priority required, apt) copied from the host's installed files with
/// `qemu/host-root.sh`, as a tarball cached beside debootstrap's, and the script's description.
fn host_tarball() -> (PathBuf, String) {
    let cache = target_dir().join("gantry-test-cache/host-root");
    fs::create_dir_all(&cache).unwrap();
    let root = cache.join("root");
    let description = host_root(&root, &[]).unwrap_or_else(|why| panic!("{why}"));
    let tarball = cache.join("host-minbase.tar");
    if !tarball.exists() {
        pack(&root, &tarball);
    }
    (tarball, description)
}

/// The input tarball and the `root:` line saying what it is: `GANTRY_BENCH_TAR`, else
/// debootstrap's minbase, else (no mirror reachable, or `GANTRY_BENCH_ROOT=host`) the host's.
fn input_tarball() -> (PathBuf, String) {
    if let Some(tarball) = std::env::var_os("GANTRY_BENCH_TAR") {
        let tarball = PathBuf::from(tarball);
        let line = format!("root: GANTRY_BENCH_TAR={}", tarball.display());
        return (tarball, line);
    }
    let debootstrap_line = || format!("root: debootstrap bookworm minbase from {MIRROR}");
    let choice = RootChoice::from_env().unwrap_or_else(|why| panic!("{why}"));
    let why = match choice {
        RootChoice::Host => "GANTRY_BENCH_ROOT=host".to_owned(),
        RootChoice::Debootstrap | RootChoice::DebootstrapFirst => match debootstrap_tarball() {
            Ok(tarball) => return (tarball, debootstrap_line()),
            Err(why) if choice == RootChoice::DebootstrapFirst => {
                format!("no mirror reachable: {why}")
            }
            Err(why) => panic!("{why} (and GANTRY_BENCH_ROOT=debootstrap)"),
        },
    };
    let (tarball, description) = host_tarball();
    (
        tarball,
        format!("root: {description} (not debootstrap: {why})"),
    )
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..runs {
        let (time, value) = f();
        if best.as_ref().is_none_or(|(b, _)| time < *b) {
            best = Some((time, value));
        }
    }
    best.expect("at least one run")
}

fn mb_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / 1e6 / time.as_secs_f64()
}

fn main() {
    // `cargo bench` passes --bench; a filter argument selects nothing here.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (tarball, root_line) = input_tarball();
    let runs: usize = std::env::var("GANTRY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let tar_size = fs::metadata(&tarball).expect("tarball").len();
    let work = target_dir().join("gantry-bench-work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    // Warm the page cache with the input.
    let _ = fs::read(&tarball).unwrap();

    // 1. Gantry: tar -> EROFS in one streaming pass (including the image's SHA-256).
    let gantry_image = work.join("gantry.erofs");
    let (gantry_time, summary) = best_of(runs, || {
        let start = Instant::now();
        let input = fs::File::open(&tarball).unwrap();
        let summary = convert_layer(input, &gantry_image, &ConvertOptions::default()).unwrap();
        (start.elapsed(), summary)
    });

    // 2. GNU tar extraction, then 3. mkfs.erofs (uncompressed) on the extracted tree.
    let tree = work.join("tree");
    let mkfs_image = work.join("mkfs.erofs");
    let (extract_time, mkfs_time) = {
        let mut best_extract = Duration::MAX;
        let mut best_mkfs = Duration::MAX;
        for _ in 0..runs {
            let _ = fs::remove_dir_all(&tree);
            fs::create_dir_all(&tree).unwrap();
            let start = Instant::now();
            run(Command::new("tar")
                .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
                .arg(&tarball)
                .arg("-C")
                .arg(&tree));
            let extract = start.elapsed();
            let _ = fs::remove_file(&mkfs_image);
            let start = Instant::now();
            run(Command::new("mkfs.erofs")
                .arg("--quiet")
                .arg(&mkfs_image)
                .arg(&tree));
            let mkfs = start.elapsed();
            best_extract = best_extract.min(extract);
            best_mkfs = best_mkfs.min(mkfs);
        }
        (best_extract, best_mkfs)
    };
    let extract_and_mkfs = extract_time + mkfs_time;
    let mkfs_size = fs::metadata(&mkfs_image).unwrap().len();

    println!("{root_line}");
    println!(
        "input: {} ({} bytes, {} entries)",
        tarball.display(),
        tar_size,
        summary.entries
    );
    println!("best of {runs} runs; MB/s = uncompressed tar MB per second");
    println!();
    println!(
        "{:<34} {:>10} {:>10} {:>14}",
        "", "seconds", "MB/s", "image bytes"
    );
    let row = |name: &str, time: Duration, size: Option<u64>| {
        println!(
            "{:<34} {:>10.3} {:>10.1} {:>14}",
            name,
            time.as_secs_f64(),
            mb_per_s(tar_size, time),
            size.map_or("-".to_string(), |s| s.to_string())
        );
    };
    row("gantry convert-layer", gantry_time, Some(summary.size));
    row("tar -x + mkfs.erofs", extract_and_mkfs, Some(mkfs_size));
    row("  tar -x alone", extract_time, None);
    row("  mkfs.erofs alone", mkfs_time, None);
    println!();
    println!(
        "gantry vs tar -x + mkfs.erofs: {:.2}x the throughput",
        extract_and_mkfs.as_secs_f64() / gantry_time.as_secs_f64()
    );
    println!(
        "gantry vs mkfs.erofs alone:    {:.2}x the throughput",
        mkfs_time.as_secs_f64() / gantry_time.as_secs_f64()
    );
    println!(
        "image size gantry / mkfs.erofs: {:.3}",
        summary.size as f64 / mkfs_size as f64
    );
    let _ = fs::remove_dir_all(&work);
}
