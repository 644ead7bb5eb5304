//! `gantry-agent image …`: commands on image files, run locally (no agent needed).
//!
//! - `convert-layer`: one layer file into an EROFS image.
//! - `convert`: a whole image (registry or OCI layout) into the lazy EROFS format, pushed to a
//!   registry or written into a layout; the pipeline is `gantry_oci::image_convert`.
//! - `build-default`: the embedded default image as an OCI layout.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use gantry_api::{LayerProgress, RunUpdate};

use gantry_oci::builder::write_image;
use gantry_oci::chunked::{ChunkedLayerOptions, MAX_CHUNK_LEN};
use gantry_oci::image_convert::{
    self, ConvertEvent, ConvertedImage, ImageConvertOptions, PlatformSelection, convert_image,
};
use gantry_oci::layout::{LayoutDestination, LayoutWriter, OciLayout, OciLayoutSource};
use gantry_oci::registry::{RegistryClient, RegistryDestination, RegistrySource};
use gantry_oci::{ConvertOptions, ImageLocation, ImageSource, convert_layer};

use super::cache::registry_client;
use super::parse_size;
use super::progress::RunDisplay;
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

/// Arguments of `image convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// The image to convert: `[host[:port]/]repo[:tag][@sha256:…]`, or `oci:DIR[:NAME]` for an
    /// OCI image layout directory.
    pub source: String,
    /// Where the converted image goes: a registry reference `host[:port]/repo[:tag]` (pushed
    /// there), or `oci:DIR[:TAG]` (an OCI image layout, created or added to).
    pub destination: String,
    /// Registry configuration (TOML: mirrors, credentials file, CA files, insecure hosts).
    #[arg(long)]
    pub registry_config: Option<PathBuf>,
    /// Docker-style config.json with credentials (overrides the registry config's); used for
    /// both the pull and the push.
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Which platforms of a multi-platform image to convert: `all`, or one `os/arch[/variant]`
    /// (the result is then an index of that one platform).
    #[arg(long, default_value = "all")]
    pub platform: String,
    /// Uncompressed bytes per chunk of the lazy layers: a multiple of 4K, at most 64M
    /// (suffixes K, M: powers of 1024).
    #[arg(long, default_value = "1M", value_parser = parse_chunk_size)]
    pub chunk_size: u32,
    /// Directory for work files (downloaded layers, EROFS images being cut into chunks)
    /// [default: the system's temporary directory].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Print what was written as JSON (every manifest and layer, and how each blob got there).
    #[arg(long)]
    pub json: bool,
}

/// A `--chunk-size` that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk size {0:?} must be a multiple of 4K between 4K and 64M")]
pub struct ChunkSizeError(String);

/// Parses `--chunk-size`: whole 4 KiB EROFS blocks per chunk, and no chunk larger than the
/// readers accept.
pub fn parse_chunk_size(text: &str) -> Result<u32, ChunkSizeError> {
    let bad = || ChunkSizeError(text.to_string());
    let size = parse_size(text).map_err(|_| bad())?;
    if size == 0 || size % 4096 != 0 || size > MAX_CHUNK_LEN {
        return Err(bad());
    }
    u32::try_from(size).map_err(|_| bad())
}

/// Runs `image convert`: converts, stores, prints the destination and the image's digest
/// (or the whole result with `--json`).
pub async fn run_convert(args: &ConvertArgs) -> anyhow::Result<()> {
    let source: ImageLocation = args
        .source
        .parse()
        .with_context(|| format!("source {}", args.source))?;
    let destination: ImageLocation = args
        .destination
        .parse()
        .with_context(|| format!("destination {}", args.destination))?;
    if let ImageLocation::Registry(reference) = &destination
        && reference.digest.is_some()
    {
        anyhow::bail!(
            "destination {reference}: name a tag, not a digest (the converted image's digest \
             is known only once it is converted)"
        );
    }
    let options = ImageConvertOptions {
        platforms: match args.platform.as_str() {
            "all" => PlatformSelection::All,
            platform => PlatformSelection::Only(platform.parse()?),
        },
        chunked: ChunkedLayerOptions {
            chunk_size: args.chunk_size,
            ..ChunkedLayerOptions::default()
        },
        work_dir: args.work_dir.clone(),
        ..ImageConvertOptions::default()
    };
    // Built even for layout-to-layout conversions: loading it only reads the files named.
    let client = registry_client(
        args.registry_config.as_deref(),
        args.credentials.as_deref(),
        None,
    )?;
    // Blobs the destination lacks may be in the source's repository of the same registry:
    // the registry links them instead of receiving them again.
    let mount_from = match (&source, &destination) {
        (ImageLocation::Registry(from), ImageLocation::Registry(to))
            if from.registry == to.registry =>
        {
            Some(from.repository.clone())
        }
        _ => None,
    };

    let display = Mutex::new(RunDisplay::new(false));
    let progress = |event: &ConvertEvent| {
        let update = match event {
            ConvertEvent::LayerBytes { id, received, size } => RunUpdate::Layer(LayerProgress {
                index: *id,
                received: *received,
                size: *size,
            }),
            other => match image_convert::describe(other) {
                Some(line) => RunUpdate::Progress(line),
                None => return,
            },
        };
        crate::sync::lock(&display).show(&update);
    };
    let target = Target {
        location: &destination,
        client: &client,
        mount_from,
    };
    let converted = match &source {
        ImageLocation::Registry(reference) => {
            let source = RegistrySource {
                client: &client,
                reference,
            };
            target.convert(&source, &options, &progress).await
        }
        ImageLocation::Layout { dir, name } => match OciLayout::open(dir) {
            Ok(layout) => {
                let source = OciLayoutSource::new(&layout, name);
                target.convert(&source, &options, &progress).await
            }
            Err(error) => Err(error.into()),
        },
    };
    display
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .finish();
    let converted = converted?;
    let mut stdout = io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&converted)?)?;
    } else {
        writeln!(stdout, "{} {}", converted.destination, converted.digest)?;
    }
    Ok(())
}

/// Where `image convert` writes.
struct Target<'a> {
    location: &'a ImageLocation,
    client: &'a RegistryClient,
    mount_from: Option<String>,
}

impl Target<'_> {
    async fn convert<S: ImageSource>(
        &self,
        source: &S,
        options: &ImageConvertOptions,
        progress: image_convert::Progress<'_>,
    ) -> anyhow::Result<ConvertedImage> {
        match self.location {
            ImageLocation::Registry(reference) => {
                let destination = RegistryDestination {
                    client: self.client,
                    reference,
                    mount_from: self.mount_from.clone(),
                };
                Ok(convert_image(source, &destination, options, progress).await?)
            }
            ImageLocation::Layout { dir, name } => {
                let destination = LayoutDestination {
                    writer: LayoutWriter::create(dir)?,
                    name: name.clone(),
                };
                Ok(convert_image(source, &destination, options, progress).await?)
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_whole_blocks_within_what_readers_take() {
        assert_eq!(parse_chunk_size("1M"), Ok(1 << 20));
        assert_eq!(parse_chunk_size("4k"), Ok(4096));
        assert_eq!(parse_chunk_size("64M"), Ok(64 << 20));
        for bad in ["0", "1000", "6k", "65M", "1G", "x"] {
            assert!(parse_chunk_size(bad).is_err(), "{bad}");
        }
    }
}
