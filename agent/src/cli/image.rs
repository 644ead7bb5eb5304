//! `gantry-agent image convert-layer`: converts one layer file into an EROFS image.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use gantry_oci::{ConvertOptions, convert_layer};

use gantry_oci::builder::write_image;

use super::parse_size;
use crate::images::default_image::{DEFAULT_IMAGE_NAME, busybox_layer, default_image_config};

/// Arguments of `image convert-layer`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertLayerArgs {
    /// Layer to convert: tar, tar+gzip or tar+zstd (detected by magic bytes); `-` for stdin.
    #[arg(long, short)]
    pub input: String,
    /// Where to write the EROFS image (replaced atomically when complete).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Refuse layers whose uncompressed tar exceeds this size (suffixes K, M, G, T: powers of
    /// 1024).
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    pub max_uncompressed_size: u64,
    /// Refuse layers with more entries than this.
    #[arg(long, default_value_t = ConvertOptions::default().max_entries)]
    pub max_entries: u64,
    /// Store all-zero blocks as data instead of holes.
    #[arg(long)]
    pub no_holes: bool,
    /// fsync the image before renaming it into place.
    #[arg(long)]
    pub sync: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `image convert-layer`: prints the image digest and size on success.
pub fn run_convert_layer(args: &ConvertLayerArgs) -> anyhow::Result<()> {
    let options = ConvertOptions {
        max_uncompressed_size: args.max_uncompressed_size,
        max_entries: args.max_entries,
        detect_holes: !args.no_holes,
        sync: args.sync,
        ..ConvertOptions::default()
    };
    let input: Box<dyn Read> = if args.input == "-" {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(&args.input).with_context(|| format!("opening layer {}", args.input))?)
    };
    let summary = convert_layer(input, &args.output, &options)
        .with_context(|| format!("converting {} into {}", args.input, args.output.display()))?;
    let mut stdout = io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "digest": summary.oci_digest(),
            "size": summary.size,
            "entries": summary.entries,
            "inodes": summary.inodes,
            "compression": summary.compression.to_string(),
            "uncompressed_size": summary.uncompressed_size,
        });
        writeln!(stdout, "{json}")?;
    } else {
        writeln!(stdout, "digest: {}", summary.oci_digest())?;
        writeln!(stdout, "size: {}", summary.size)?;
    }
    Ok(())
}

/// Runs `image build-default`: writes the embedded default image as an OCI layout.
pub fn run_build_default(output: &Path, busybox: &Path) -> anyhow::Result<()> {
    let digest = write_image(
        output,
        DEFAULT_IMAGE_NAME,
        &[busybox_layer(busybox)?],
        &default_image_config(),
    )?;
    println!("{} {digest}", output.display());
    Ok(())
}
