//! Operator commands on the cache directory: `pull`, `images`, `rmi`, `cache gc`.
//!
//! They work on the cache directory directly, with or without a running agent: every change
//! takes the cache's own locks (the metadata lock for records and gc, per-layer locks for
//! fetches, shared pins), so a CLI process and the agent can act on one cache at once.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use gantry_oci::Reference;
use gantry_oci::layout::{OciLayout, OciLayoutSource};
use gantry_oci::manifest::{Descriptor, OCI_MANIFEST};
use gantry_oci::registry::auth::CredentialStore;
use gantry_oci::registry::referrers::ReferrerListing;
use gantry_oci::registry::{RegistryClient, RegistryConfig, RegistrySource};

use super::parse_size;
use crate::cache::trace::{StartupTrace, read_trace, trace_artifact};
use crate::cache::{Cache, CacheConfig};
use crate::images::bundle;
use crate::images::pull::{self, PullEvent};
use crate::manifest::document::ClusterManifest;

/// The default cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/gantry/cache";

/// Where the cache is and how big it may grow.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheDirArgs {
    /// The cache directory.
    #[arg(long, env = "GANTRY_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Evict least recently used layers beyond this size (suffixes K, M, G, T); 0 = no limit.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub cache_budget: u64,
}

impl CacheDirArgs {
    /// Opens the cache.
    pub fn open(&self) -> anyhow::Result<Cache> {
        let config = CacheConfig {
            budget_bytes: self.cache_budget,
            ..CacheConfig::default()
        };
        Cache::open(&self.cache_dir, config)
            .with_context(|| format!("opening the cache at {}", self.cache_dir.display()))
    }
}

/// Arguments of `pull`.
#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    /// The image: `[host[:port]/]repo[:tag][@sha256:…]`, or `oci:DIR[:NAME]` for an OCI
    /// image layout directory.
    pub reference: String,
    /// Registry configuration (TOML: mirrors, credentials file, CA files, insecure hosts).
    #[arg(long)]
    pub registry_config: Option<PathBuf>,
    /// Docker-style config.json with credentials (overrides the registry config's).
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Platform to pick from multi-platform images, `os/arch[/variant]`.
    #[arg(long)]
    pub platform: Option<String>,
    /// Print the image record as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cache: CacheDirArgs,
}

/// Arguments of `images`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImagesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cache: CacheDirArgs,
}

/// Arguments of `rmi`.
#[derive(Debug, Clone, clap::Args)]
pub struct RmiArgs {
    /// The image name as `images` shows it (short names are expanded as for `pull`).
    pub reference: String,
    #[command(flatten)]
    pub cache: CacheDirArgs,
}

/// Arguments of `image trace`.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// The image name as `images` shows it (short names are expanded as for `pull`).
    pub reference: String,
    /// Print the trace as JSON.
    #[arg(long)]
    pub json: bool,
    /// Store the trace in the image's repository as an OCI referrer of its manifest, where
    /// other cards find it on their first start of the image.
    #[arg(long)]
    pub push: bool,
    /// Registry configuration for `--push` (TOML: credentials file, CA files, insecure hosts).
    #[arg(long, requires = "push")]
    pub registry_config: Option<PathBuf>,
    /// Docker-style config.json with credentials for `--push`.
    #[arg(long, requires = "push")]
    pub credentials: Option<PathBuf>,
    #[command(flatten)]
    pub cache: CacheDirArgs,
}

/// Arguments of `cache gc`.
#[derive(Debug, Clone, clap::Args)]
pub struct GcArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cache: CacheDirArgs,
}

/// Arguments of `cache export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Export the images a cluster manifest names (each as it was prefetched).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// The images (names as `images` shows them), then the bundle: an OCI image layout
    /// directory, created or extended.
    #[arg(required = true, value_name = "IMAGE… BUNDLE")]
    pub images_and_bundle: Vec<String>,
    /// Print what was exported as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cache: CacheDirArgs,
}

/// Arguments of `cache import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The bundle: an OCI image layout directory (as `cache export` writes it).
    pub bundle: PathBuf,
    /// Platform to pick from multi-platform images, `os/arch[/variant]`.
    #[arg(long)]
    pub platform: Option<String>,
    /// Print what was imported as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cache: CacheDirArgs,
}

/// Runs `cache export`.
pub async fn run_export(args: &ExportArgs) -> anyhow::Result<()> {
    let (bundle, images) = args
        .images_and_bundle
        .split_last()
        .context("name the bundle directory")?;
    let mut wanted: Vec<(String, Vec<String>)> = images
        .iter()
        .map(|image| (image.clone(), Vec::new()))
        .collect();
    if let Some(path) = &args.manifest {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let manifest = ClusterManifest::from_toml(&text)
            .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
        // A tag is exported under the name its prefetch resolved it to and under the tag
        // itself, so a card without the registry finds it by either.
        wanted.extend(
            manifest
                .images
                .iter()
                .map(|entry| (entry.reference.clone(), vec![record_name(&entry.reference)])),
        );
    }
    if wanted.is_empty() {
        anyhow::bail!("name the images to export, or a cluster manifest with --manifest");
    }
    let (cache_args, bundle) = (args.cache.clone(), PathBuf::from(bundle));
    let exported = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let cache = cache_args.open()?;
        let mut resolved = Vec::with_capacity(wanted.len());
        for (name, aliases) in wanted {
            resolved.push((bundle::find_image(&cache, &name)?, aliases));
        }
        Ok(bundle::export(&cache, &resolved, &bundle)?)
    })
    .await??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&exported)?);
        return Ok(());
    }
    for image in &exported {
        let form = if image.layers_rechunked == 0 {
            "as cached".to_string()
        } else {
            format!(
                "{} of {} layers re-chunked into the lazy format",
                image.layers_rechunked,
                image.layers_rechunked + image.layers_copied
            )
        };
        println!(
            "exported {} {} ({form}, {:.1} MiB of layers{})",
            image.name,
            image.manifest_digest,
            image.layer_bytes as f64 / 1048576.0,
            if image.trace {
                ", with its startup trace"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Runs `cache import`: fails (after importing what it could) if any image was left out.
pub async fn run_import(args: &ImportArgs) -> anyhow::Result<()> {
    let cache = args.cache.open()?;
    let platform = args.platform.as_deref().map(str::parse).transpose()?;
    let report = bundle::import(&cache, &args.bundle, platform, &print_progress).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for image in &report.imported {
            println!(
                "imported {} {} ({} layers, {} chunks stored{})",
                image.name,
                image.manifest_digest,
                image.layers,
                image.chunks_stored,
                if image.trace {
                    ", startup trace kept"
                } else {
                    ""
                }
            );
        }
        for failure in &report.failed {
            eprintln!("not imported: {}: {}", failure.name, failure.error);
        }
    }
    if !report.failed.is_empty() {
        anyhow::bail!(
            "{} of {} images of {} were not imported",
            report.failed.len(),
            report.failed.len() + report.imported.len(),
            args.bundle.display()
        );
    }
    Ok(())
}

/// Builds the registry client a `pull` asks for.
pub fn registry_client(
    config: Option<&std::path::Path>,
    credentials: Option<&std::path::Path>,
    platform: Option<&str>,
) -> anyhow::Result<RegistryClient> {
    let mut config = match config {
        Some(path) => RegistryConfig::load(path)?,
        None => RegistryConfig::default(),
    };
    if let Some(platform) = platform {
        config.platform = platform.to_string();
    }
    let mut client = RegistryClient::new(config)?;
    if let Some(path) = credentials {
        client = client.with_credentials(CredentialStore::load(path)?);
    }
    Ok(client)
}

fn print_progress(event: &PullEvent) {
    // Byte counts are for live displays; plain lines say when each layer starts and ends.
    if !matches!(event, PullEvent::LayerBytes { .. }) {
        eprintln!("{}", pull::describe(event));
    }
}

/// Runs `pull`.
pub async fn run_pull(args: &PullArgs) -> anyhow::Result<()> {
    let cache = args.cache.open()?;
    let record = if let Some(layout_ref) = args.reference.strip_prefix("oci:") {
        // oci:DIR[:NAME]; a DIR containing ':' needs the NAME part.
        let (dir, name) = match layout_ref.rsplit_once(':') {
            Some((dir, name)) if !name.contains('/') => (dir, name),
            _ => (layout_ref, ""),
        };
        let layout = OciLayout::open(std::path::Path::new(dir))?;
        let mut source = OciLayoutSource::new(&layout, name);
        if let Some(platform) = &args.platform {
            source.platform = platform.parse()?;
        }
        pull::pull(&cache, &source, &print_progress).await?
    } else {
        let reference: Reference = args.reference.parse()?;
        let client = registry_client(
            args.registry_config.as_deref(),
            args.credentials.as_deref(),
            args.platform.as_deref(),
        )?;
        let source = RegistrySource {
            client: &client,
            reference: &reference,
        };
        pull::pull(&cache, &source, &print_progress).await?
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&record)?)?;
    } else {
        writeln!(stdout, "{} {}", record.name, record.manifest_digest)?;
    }
    Ok(())
}

/// Runs `images`.
pub async fn run_images(args: &ImagesArgs) -> anyhow::Result<()> {
    let cache = args.cache.open()?;
    let images = cache.images()?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&images)?)?;
        return Ok(());
    }
    writeln!(
        stdout,
        "{:<50} {:<20} {:>7} {:>10}  STATUS",
        "NAME", "MANIFEST", "LAYERS", "EROFS MiB"
    )?;
    for image in images {
        let record = &image.record;
        let status = if image.missing_layers.is_empty() {
            "complete".to_string()
        } else {
            format!("{} layers evicted", image.missing_layers.len())
        };
        writeln!(
            stdout,
            "{:<50} {:<20} {:>7} {:>10.1}  {status}",
            record.name,
            record
                .manifest_digest
                .to_string()
                .get(..19)
                .unwrap_or_default(),
            record.layers.len(),
            record.erofs_size() as f64 / 1048576.0,
        )?;
    }
    Ok(())
}

/// The record name for a user-typed reference: normalized if it parses as one.
pub fn record_name(reference: &str) -> String {
    reference
        .parse::<Reference>()
        .map_or_else(|_| reference.to_string(), |r| r.to_string())
}

/// The record name of a user-typed image: as typed when the cache holds that name (a bundle's
/// or a layout's name), else normalized as `pull` names it.
fn cached_name(cache: &Cache, reference: &str) -> anyhow::Result<String> {
    Ok(if cache.image(reference)?.is_some() {
        reference.to_string()
    } else {
        record_name(reference)
    })
}

/// Runs `rmi`.
pub async fn run_rmi(args: &RmiArgs) -> anyhow::Result<()> {
    let cache = args.cache.open()?;
    let name = cached_name(&cache, &args.reference)?;
    let report = cache.remove_image(&name).await?;
    println!(
        "removed {name}; {} layers freed, {} kept (pinned)",
        report.layers_removed.len(),
        report.pinned_kept.len()
    );
    Ok(())
}

/// Runs `image trace`: the startup trace the cache holds for an image.
pub async fn run_trace(args: &TraceArgs) -> anyhow::Result<()> {
    let cache = args.cache.open()?;
    let name = cached_name(&cache, &args.reference)?;
    let record = cache.image(&name)?.with_context(|| {
        format!(
            "no image named {name:?} in {}",
            args.cache.cache_dir.display()
        )
    })?;
    let trace = read_trace(cache.root(), &record.manifest_digest)?.with_context(|| {
        format!(
            "no startup trace for {name} ({}): it is recorded during the first lazy start",
            record.manifest_digest
        )
    })?;
    if args.push {
        return push_trace(args, &name, &trace).await;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&trace)?);
        return Ok(());
    }
    println!(
        "{name} {}: {} chunks read in the first {} ms",
        trace.manifest_digest,
        trace.chunk_count(),
        trace.window_ms
    );
    for layer in &trace.layers {
        let chunks: Vec<String> = layer.chunks.iter().map(u32::to_string).collect();
        println!("  {} [{}]", layer.blob_digest, chunks.join(" "));
    }
    Ok(())
}

/// Pushes `trace` beside the registry image `name` as a referrer of its manifest.
async fn push_trace(args: &TraceArgs, name: &str, trace: &StartupTrace) -> anyhow::Result<()> {
    let reference: Reference = name
        .parse()
        .with_context(|| format!("{name} is not a registry image: its trace cannot be pushed"))?;
    let client = registry_client(
        args.registry_config.as_deref(),
        args.credentials.as_deref(),
        None,
    )?;
    // The subject's media type and size come from the registry itself, which also shows the
    // manifest is in the repository the referrer goes to.
    let manifest = client
        .fetch_manifest(&reference, &trace.manifest_digest.to_string())
        .await
        .with_context(|| format!("fetching the manifest {} of {name}", trace.manifest_digest))?;
    let media_type = manifest
        .media_type
        .as_deref()
        .map_or(OCI_MANIFEST, |m| m.split(';').next().unwrap_or(m).trim());
    let subject = Descriptor::new(
        media_type,
        manifest.digest.clone(),
        manifest.bytes.len() as u64,
    );
    let artifact = trace_artifact(trace)?;
    let pushed = client
        .push_referrer(&reference, &subject, &artifact)
        .await
        .with_context(|| format!("pushing the startup trace of {name}"))?;
    let listing = match &pushed.listing {
        ReferrerListing::ReferrersApi => "listed by the registry's referrers API".to_string(),
        ReferrerListing::Tag(tag) => format!("listed under the tag {tag}"),
    };
    println!(
        "pushed the startup trace of {name} ({} chunks) as {}, a referrer of {}, {listing}",
        trace.chunk_count(),
        pushed.manifest.digest,
        trace.manifest_digest
    );
    Ok(())
}

/// Runs `cache gc`.
pub async fn run_gc(args: &GcArgs) -> anyhow::Result<()> {
    let cache = args.cache.open()?;
    let report = cache.gc().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let freed: u64 = report.layers_removed.iter().map(|(_, size)| size).sum();
        println!(
            "removed {} temporary entries, {} layers ({:.1} MiB) and {} startup traces; {} pinned kept; layers now {:.1} MiB",
            report.temp_removed,
            report.layers_removed.len(),
            freed as f64 / 1048576.0,
            report.traces_removed,
            report.pinned_kept.len(),
            report.layers_bytes as f64 / 1048576.0
        );
    }
    Ok(())
}
