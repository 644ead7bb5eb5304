//! The card's images: where an image name leads (the embedded default, an OCI layout, a
//! registry) and the cache they are pulled into.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use gantry_api::PullMode;
use gantry_oci::manifest::Descriptor;

use arc_swap::ArcSwap;
use gantry_oci::Reference;
use gantry_oci::layout::{OciLayout, OciLayoutSource};
use gantry_oci::registry::auth::CredentialStore;
use gantry_oci::registry::{RegistryClient, RegistryConfig, RegistryError, RegistrySource};
use tracing::warn;

use super::default_image::{self, DEFAULT_IMAGE_NAME, DefaultImageError};
use super::pull::{self, LazyPull, PullError, PullEvent};
use super::traces::{self, RemoteTraces};
use crate::blk::{BlockSource, FileSource};
use crate::cache::{Cache, ImageRecord, PinGuard};
use crate::lazy::layer::LazyLayer;
use crate::lazy::origin::{BlobOrigin, FileOrigin, RegistryOrigin};
use crate::lazy::{LazyConfig, LazyLayers};
use crate::manifest::document::RegistryEntry;
use crate::metrics::metered::MeteredSource;
use crate::metrics::{Metrics, SourceKind};

/// Errors finding or pulling an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image name is not usable.
    #[error("bad image name {image:?}: {reason}")]
    BadImage {
        /// The name.
        image: String,
        /// Why.
        reason: String,
    },
    /// The default image could not be built.
    #[error(transparent)]
    Default(#[from] DefaultImageError),
    /// Pulling failed.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// A blocking task failed.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// The embedded default image (busybox).
    Default,
    /// An image in an OCI layout directory: `oci:DIR[:NAME]`.
    Layout {
        /// The layout.
        dir: PathBuf,
        /// The image's name in it (empty: the only image).
        name: String,
    },
    /// A registry reference.
    Registry(Reference),
}

/// Parses what the operator typed.
pub fn parse_image(image: &str) -> Result<ImageRef, ImageError> {
    if image.is_empty() || image == "default" {
        return Ok(ImageRef::Default);
    }
    if let Some(rest) = image.strip_prefix("oci:") {
        // The name follows the last ':' unless that ':' is part of the path.
        let (dir, name) = match rest.rsplit_once(':') {
            Some((dir, name)) if !name.contains('/') && !dir.is_empty() => (dir, name),
            _ => (rest, ""),
        };
        return Ok(ImageRef::Layout {
            dir: PathBuf::from(dir),
            name: name.to_owned(),
        });
    }
    Reference::from_str(image)
        .map(ImageRef::Registry)
        .map_err(|err| ImageError::BadImage {
            image: image.to_owned(),
            reason: err.to_string(),
        })
}

/// The card's images: the cache and where images come from.
#[derive(Debug)]
pub struct ImageService {
    /// The shared layer cache.
    pub cache: Cache,
    /// The registry client in use: built from `agent.toml`'s `[registry]`, rebuilt when a
    /// cluster manifest names registries (in-flight fetches keep the client they started with).
    registry: ArcSwap<RegistryClient>,
    /// `agent.toml`'s `[registry]`, what a manifest's registries are added to.
    base_registry: RegistryConfig,
    /// Layers fetched while mapped, and their fetcher.
    pub lazy: LazyLayers,
    default_layout: PathBuf,
    busybox: PathBuf,
    /// One build of the default image at a time: concurrent first `run`s must not race.
    default_build: tokio::sync::Mutex<()>,
    /// Where registry requests are counted (the lazy fetcher's too).
    metrics: Metrics,
}

/// A pulled image, ready to map: its record, the pins holding its layers, and the lazy layers
/// among them (by position).
#[derive(Debug)]
pub struct PulledImage {
    /// The image record.
    pub record: ImageRecord,
    /// One pin per layer, in order.
    pub pins: Vec<PinGuard>,
    /// The block source of each layer, in order.
    pub sources: Vec<Arc<dyn BlockSource>>,
    /// The lazy layers, in order (a subset of the layers).
    pub lazy_layers: Vec<Arc<LazyLayer>>,
}

impl ImageService {
    /// Images cached in `cache`, the default image kept under `state_dir` and built from
    /// `busybox`; registry and peer requests counted into `metrics`. Starts the lazy fetcher
    /// on the current runtime.
    pub fn new(
        cache: Cache,
        registry: RegistryClient,
        lazy: LazyConfig,
        state_dir: &Path,
        busybox: &Path,
        metrics: Metrics,
    ) -> Self {
        let lazy = LazyLayers::new(lazy);
        lazy.fetcher().count_sources_into(metrics.clone());
        Self {
            cache,
            base_registry: registry.config().clone(),
            registry: ArcSwap::from_pointee(registry),
            lazy,
            default_layout: state_dir.join("images").join("default"),
            busybox: busybox.to_owned(),
            default_build: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// The registry client in use now.
    pub fn registry(&self) -> Arc<RegistryClient> {
        self.registry.load_full()
    }

    /// A client for `agent.toml`'s registries with a cluster manifest's `registries` added:
    /// each one's mirrors (in order, tried before it; a failing one falls through to the
    /// next), insecure flag, CA file and credentials. Nothing changes until
    /// [`ImageService::use_registry`]; an unusable CA or credentials file is an error here.
    pub fn registry_for(&self, registries: &[RegistryEntry]) -> Result<RegistryClient, String> {
        registry_client_for(&self.base_registry, registries)
    }

    /// Makes `client` the one later pulls use.
    pub fn use_registry(&self, client: RegistryClient) {
        self.registry.store(Arc::new(client));
    }

    /// Pulls `image` into the cache (a no-op for layers already there) and prepares its layers
    /// for mapping. Lazy-format layers are brought in as `mode` (default: the agent's) says:
    /// `lazy` returns once their chunk indexes are verified, `fill` also starts their
    /// background fill, `eager` waits until every chunk is present.
    pub async fn pull(
        &self,
        image: &str,
        mode: Option<PullMode>,
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
    ) -> Result<PulledImage, ImageError> {
        let (record, pins, origin, remote_traces) = match parse_image(image)? {
            ImageRef::Default => {
                let _single_flight = self.default_build.lock().await;
                let (layout, busybox) = (self.default_layout.clone(), self.busybox.clone());
                let dir = tokio::task::spawn_blocking(move || {
                    default_image::ensure_default_image(&layout, &busybox)
                })
                .await
                .map_err(|err| ImageError::Internal(err.to_string()))??;
                let (record, pins, origin) =
                    self.pull_layout(&dir, DEFAULT_IMAGE_NAME, progress).await?;
                (record, pins, origin, None)
            }
            ImageRef::Layout { dir, name } => {
                let (record, pins, origin) = self.pull_layout(&dir, &name, progress).await?;
                (record, pins, origin, None)
            }
            ImageRef::Registry(reference) => {
                let registry = self.registry();
                let source = RegistrySource {
                    client: &registry,
                    reference: &reference,
                };
                let source = MeteredSource::new(
                    &source,
                    self.metrics
                        .source(SourceKind::Registry, &reference.registry),
                );
                let origin = registry_origin(&registry, &reference);
                let lazy = LazyPull {
                    origin: &origin,
                    metrics: Some(&self.metrics),
                };
                let (record, pins) =
                    match pull::pull_lazy(&self.cache, &source, progress, Some(&lazy)).await {
                        Ok(pulled) => pulled,
                        Err(error) => self.cached_if_unreachable(&reference, error)?,
                    };
                let remote = RemoteTraces {
                    client: Arc::clone(&registry),
                    reference: reference.clone(),
                };
                (
                    record,
                    pins,
                    Box::new(origin) as Box<OriginFor>,
                    Some(remote),
                )
            }
        };
        self.prepare(
            record,
            pins,
            origin.as_ref(),
            mode.unwrap_or(self.lazy.config().mode),
            remote_traces,
        )
        .await
    }

    /// The cached image `reference` names, pinned, when `error` says its registry is out of
    /// reach (an image imported from a bundle, or pulled before, runs without it); `error`
    /// otherwise, or when the cache lacks the image or any of its layers. An answer from the
    /// registry (not found, unauthorized) is never overridden.
    fn cached_if_unreachable(
        &self,
        reference: &Reference,
        error: PullError,
    ) -> Result<(ImageRecord, Vec<PinGuard>), ImageError> {
        let unreachable = matches!(&error, PullError::Source { error, .. }
            if error.downcast_ref::<RegistryError>().is_some_and(RegistryError::is_unreachable));
        if !unreachable {
            return Err(error.into());
        }
        let name = reference.to_string();
        let Some(record) = self.cache.image(&name).map_err(PullError::from)? else {
            return Err(error.into());
        };
        match self.cache.pin_image(&record) {
            Ok(pins) => {
                warn!(image = name, %error, "the registry is out of reach: using the cached image");
                Ok((record, pins))
            }
            Err(_) => Err(error.into()),
        }
    }

    async fn pull_layout(
        &self,
        dir: &Path,
        name: &str,
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
    ) -> Result<(ImageRecord, Vec<PinGuard>, Box<OriginFor>), ImageError> {
        let layout = OciLayout::open(dir).map_err(|err| ImageError::BadImage {
            image: format!("oci:{}", dir.display()),
            reason: err.to_string(),
        })?;
        let source = OciLayoutSource::new(&layout, name);
        let origin = layout_origin(layout.clone());
        let lazy = LazyPull {
            origin: &origin,
            metrics: Some(&self.metrics),
        };
        let (record, pins) = pull::pull_lazy(&self.cache, &source, progress, Some(&lazy)).await?;
        Ok((record, pins, Box::new(origin)))
    }

    /// Opens the image's lazy layers (adding this image's origin to each), starts or awaits
    /// their fill as `mode` says, and gives every layer its block source.
    async fn prepare(
        &self,
        record: ImageRecord,
        pins: Vec<PinGuard>,
        origin: &OriginFor,
        mode: PullMode,
        remote_traces: Option<RemoteTraces>,
    ) -> Result<PulledImage, ImageError> {
        let mut sources: Vec<Arc<dyn BlockSource>> = Vec::with_capacity(record.layers.len());
        let mut lazy_layers = Vec::new();
        for layer in &record.layers {
            if !layer.lazy {
                let source = FileSource::open(&layer.erofs_path).map_err(|err| {
                    ImageError::Internal(format!("{}: {err}", layer.erofs_path.display()))
                })?;
                sources.push(Arc::new(source));
                continue;
            }
            let lazy = self
                .lazy
                .open(&self.cache, layer)
                .map_err(|err| ImageError::Internal(err.to_string()))?;
            lazy.add_origin(origin(&Descriptor::new(
                String::new(),
                layer.blob_digest.clone(),
                layer.blob_size,
            )));
            if mode != PullMode::Lazy && !lazy.is_complete() {
                self.lazy.fill(Arc::clone(&lazy));
            }
            sources.push(Arc::clone(&lazy) as Arc<dyn BlockSource>);
            lazy_layers.push(lazy);
        }
        if !lazy_layers.is_empty() {
            traces::start(
                &self.lazy,
                self.cache.root().to_path_buf(),
                record.manifest_digest.clone(),
                &lazy_layers,
                remote_traces,
            )
            .await;
        }
        if mode == PullMode::Eager {
            for layer in &lazy_layers {
                layer.wait_complete().await;
            }
        }
        Ok(PulledImage {
            record,
            pins,
            sources,
            lazy_layers,
        })
    }
}

/// Makes the origin of one layer blob of an image.
type OriginFor = dyn Fn(&Descriptor) -> Arc<dyn BlobOrigin> + Send + Sync;

fn registry_origin(
    client: &Arc<RegistryClient>,
    reference: &Reference,
) -> impl Fn(&Descriptor) -> Arc<dyn BlobOrigin> + Send + Sync + 'static {
    let (client, reference) = (Arc::clone(client), reference.clone());
    move |descriptor: &Descriptor| {
        Arc::new(RegistryOrigin::new(
            Arc::clone(&client),
            reference.clone(),
            descriptor.clone(),
        )) as Arc<dyn BlobOrigin>
    }
}

fn layout_origin(
    layout: OciLayout,
) -> impl Fn(&Descriptor) -> Arc<dyn BlobOrigin> + Send + Sync + 'static {
    move |descriptor: &Descriptor| {
        Arc::new(FileOrigin::new(layout.blob_path(&descriptor.digest))) as Arc<dyn BlobOrigin>
    }
}

/// A client for `base` with a cluster manifest's `registries` added (see
/// [`ImageService::registry_for`]); also what `serve --check` builds to check them.
pub fn registry_client_for(
    base: &RegistryConfig,
    registries: &[RegistryEntry],
) -> Result<RegistryClient, String> {
    let mut config = base.clone();
    for entry in registries {
        if !entry.mirrors.is_empty() {
            config
                .mirrors
                .insert(entry.host.clone(), entry.mirrors.clone());
        }
        if entry.insecure && !config.insecure_registries.contains(&entry.host) {
            config.insecure_registries.push(entry.host.clone());
        }
        if let Some(ca) = &entry.ca {
            config.ca_files.push(ca.clone());
        }
    }
    let client = RegistryClient::new(config).map_err(|error| error.to_string())?;
    let mut credentials = client.credentials().clone();
    for entry in registries {
        if let Some(path) = &entry.credentials {
            let store = CredentialStore::load(path).map_err(|error| error.to_string())?;
            let credential = store.get(&entry.host).ok_or_else(|| {
                format!(
                    "registry {}: {} has no credentials for it",
                    entry.host,
                    path.display()
                )
            })?;
            credentials.insert(&entry.host, credential.clone());
        }
    }
    Ok(client.with_credentials(credentials))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_parse() {
        assert_eq!(parse_image("default").unwrap(), ImageRef::Default);
        assert_eq!(
            parse_image("oci:/srv/layout:web").unwrap(),
            ImageRef::Layout {
                dir: "/srv/layout".into(),
                name: "web".into()
            }
        );
        assert_eq!(
            parse_image("oci:/srv/layout").unwrap(),
            ImageRef::Layout {
                dir: "/srv/layout".into(),
                name: String::new()
            }
        );
        assert!(matches!(
            parse_image("127.0.0.1:5000/repo:tag").unwrap(),
            ImageRef::Registry(_)
        ));
        assert!(parse_image("UPPER/Case").is_err());
    }
}
