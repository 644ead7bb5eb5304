//! The image `gantry-agent image convert` tests work on, and how they run the command.
//!
//! The source image is runnable (busybox, then two more layers), so tests that boot a guest
//! can run the original and the converted image and compare what they see: include this file
//! (beside `registry_common`, whose `noise` it uses) with `#[path]`, push [`source_layout`]'s
//! image with `Registry::push`, convert it with [`convert`], run both.
//!
//! Its layers cover the three tar forms and OCI's layer semantics:
//! - 0, tar+gzip: busybox and its applets, files of several chunks, an owned file, a
//!   directory to delete later, and a whiteout that hides nothing (the lowest layer's are
//!   dropped by the conversion);
//! - 1, tar+zstd: a whiteout of a file, an opaque directory, a file replaced, more data;
//! - 2, plain tar: a whiteout of a directory, a new file, a symlink.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gantry_agent::images::default_image::{DEFAULT_BUSYBOX, busybox_layer, default_image_config};
use gantry_oci::builder::{ImageConfigSpec, LayerBuilder, LayerCompression, write_image};

use super::registry_common::noise;

/// The tag of the source image in its layout.
pub const SOURCE_TAG: &str = "1";

/// The source image's layers, bottom first.
pub fn source_layers() -> Vec<LayerBuilder> {
    let mut base = busybox_layer(Path::new(DEFAULT_BUSYBOX)).expect("busybox-static is needed");
    base.compression(LayerCompression::Gzip);
    base.file("etc/os-release", 0o644, "ID=gantry-convert-test\n")
        .unwrap()
        .file("etc/removed", 0o644, "deleted by layer 1\n")
        .unwrap()
        .dir("var/cache", 0o755)
        .unwrap()
        .file(
            "var/cache/old",
            0o644,
            "hidden by layer 1's opaque directory\n",
        )
        .unwrap()
        .file("srv/big.bin", 0o644, noise(2_500_000, 1))
        .unwrap()
        .file_owned("home/user/.profile", 0o600, "export X=1\n", 1000, 1000)
        .unwrap()
        .dir("opt/tool", 0o755)
        .unwrap()
        .file("opt/tool/run", 0o755, "#!/bin/sh\necho tool\n")
        .unwrap()
        .whiteout("etc/never-there")
        .unwrap();

    let mut middle = LayerBuilder::new();
    middle
        .compression(LayerCompression::Zstd)
        .whiteout("etc/removed")
        .unwrap()
        .opaque("var/cache")
        .unwrap()
        .file("var/cache/new", 0o644, "only in layer 1\n")
        .unwrap()
        .file(
            "etc/os-release",
            0o644,
            "ID=gantry-convert-test\nVERSION=2\n",
        )
        .unwrap()
        .file("srv/more.bin", 0o640, noise(1_500_000, 2))
        .unwrap();

    let mut top = LayerBuilder::new();
    top.compression(LayerCompression::None)
        .whiteout("opt/tool")
        .unwrap()
        .file("etc/motd", 0o644, "converted\n")
        .unwrap()
        .symlink("etc/release", "os-release")
        .unwrap();
    vec![base, middle, top]
}

/// The source image's config.
pub fn source_config() -> ImageConfigSpec {
    ImageConfigSpec {
        working_dir: "/srv".into(),
        ..default_image_config()
    }
}

/// Writes the source image as `SOURCE_TAG` into a layout at `dir`; returns the layout path.
pub fn source_layout(dir: &Path) -> PathBuf {
    let layout = dir.join("source-layout");
    write_image(&layout, SOURCE_TAG, &source_layers(), &source_config()).unwrap();
    layout
}

/// Runs `gantry-agent ARGS` (quiet logs).
pub fn gantry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gantry-agent"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running gantry-agent")
}

/// Runs `gantry-agent image convert --json ARGS`, which must succeed; returns its JSON.
pub fn convert(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["image", "convert", "--json"];
    full.extend_from_slice(args);
    let output = gantry(&full);
    assert!(
        output.status.success(),
        "gantry-agent {}: {}",
        full.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("image convert --json prints JSON")
}
