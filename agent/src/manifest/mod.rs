//! The cluster manifest (`shared/DESIGN.md` §6): what a cluster's operator tells a card about
//! the images it will likely run, and the prefetch that brings them in before any VM asks.
//!
//! - [`document`]: the manifest file (TOML, or JSON over the API), parsed and checked whole.
//! - [`scheduler`]: the manifest in force, diff-applied, and the task that prefetches its images
//!   in priority order at background priority.

pub mod document;
pub mod scheduler;

pub use document::{ClusterManifest, ManifestError};
pub use scheduler::ManifestScheduler;

use crate::images::ImageService;

/// Puts a checked manifest in force: its registries into `images` first (a client that cannot
/// be built — an unreadable CA or credentials file — refuses the manifest, and the one in force
/// stays), its bandwidth budget into the fill (or `lazy.background_bytes_per_sec` again when it
/// has none), then its images into `scheduler`. Returns the new generation.
pub fn put_in_force(
    images: &ImageService,
    scheduler: &ManifestScheduler,
    manifest: ClusterManifest,
) -> Result<u64, String> {
    let client = images.registry_for(&manifest.registries)?;
    Ok(put_in_force_with(images, scheduler, manifest, client))
}

/// [`put_in_force`] with the manifest's registry client already built (and so checked).
pub fn put_in_force_with(
    images: &ImageService,
    scheduler: &ManifestScheduler,
    manifest: ClusterManifest,
    client: gantry_oci::registry::RegistryClient,
) -> u64 {
    images.use_registry(client);
    let limit = manifest
        .bandwidth_budget()
        .unwrap_or(images.lazy.config().background_bytes_per_sec);
    images.lazy.fetcher().set_fill_limit(limit);
    images
        .lazy
        .fetcher()
        .set_registry_limits(manifest.fill_limits());
    scheduler.apply(manifest)
}
