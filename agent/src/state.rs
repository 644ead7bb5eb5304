//! [`Agent`]: the state every part of the running daemon shares (the API's handlers, the
//! daemon's start and shutdown).

use std::sync::Arc;

use crate::images::ImageService;
use crate::manifest::{ClusterManifest, ManifestScheduler};
use crate::metrics::{Metrics, StateGauges};
use crate::peer::routes::PeerSet;
use crate::vms::VmTable;

/// Everything the agent serves: its VMs and the card's images.
#[derive(Debug)]
pub struct Agent {
    /// The attached VMs, by name.
    pub vms: VmTable,
    /// The shared image cache and image sources.
    pub images: Arc<ImageService>,
    /// Whether `baseline` (a command as guest root outside any container) is served.
    pub enable_baseline: bool,
    /// The cluster manifest in force and its prefetch.
    pub manifest: ManifestScheduler,
    /// The peer agents asked for chunks (`agent.toml`'s and the manifest's).
    pub peers: Arc<PeerSet>,
    /// What `GET /metrics` exports.
    pub metrics: Metrics,
}

impl Agent {
    /// Puts a checked manifest in force ([`crate::manifest::put_in_force`]) and its peers
    /// beside `agent.toml`'s. Returns the new generation.
    pub fn apply_manifest(&self, manifest: ClusterManifest) -> Result<u64, String> {
        let peers = manifest_peer_urls(&manifest);
        let generation = crate::manifest::put_in_force(&self.images, &self.manifest, manifest)?;
        self.peers.set_manifest_peers(&peers);
        Ok(generation)
    }

    /// The state the metrics read at scrape time: parked requests per VM, the cache's size
    /// (a scan of its directory: blocking) and budget.
    pub fn state_gauges(&self) -> StateGauges {
        StateGauges {
            parked_requests: self
                .vms
                .all()
                .iter()
                .map(|vm| (vm.name().to_owned(), vm.parked_requests() as u64))
                .collect(),
            cache_bytes: self.images.cache.layers_bytes().ok(),
            cache_budget_bytes: self.images.cache.config().budget_bytes,
        }
    }
}

/// The manifest's peer URLs, normalized; one that is not a scheme and a host is left out.
pub fn manifest_peer_urls(manifest: &ClusterManifest) -> Vec<String> {
    manifest
        .peers
        .iter()
        .filter_map(|peer| match crate::peer::normalize_url(&peer.url) {
            Ok(url) => Some(url),
            Err(reason) => {
                tracing::warn!(%reason, "cluster manifest: peer left out");
                None
            }
        })
        .collect()
}
