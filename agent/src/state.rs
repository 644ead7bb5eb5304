//! [`Agent`]: the state every part of the running daemon shares (the API's handlers, the
//! daemon's start and shutdown).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::images::ImageService;
use crate::manifest::ManifestScheduler;
use crate::vm::Vm;

/// Everything the agent serves: its VMs and the card's images.
#[derive(Debug)]
pub struct Agent {
    /// The attached VMs, by name.
    pub vms: BTreeMap<String, Vm>,
    /// The shared image cache and image sources.
    pub images: Arc<ImageService>,
    /// Whether `baseline` (a command as guest root outside any container) is served.
    pub enable_baseline: bool,
    /// The cluster manifest in force and its prefetch.
    pub manifest: ManifestScheduler,
}
