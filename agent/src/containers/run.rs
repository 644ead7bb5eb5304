//! `run`: the image into the cache, its layers into the VM's layer store, the container into the
//! guest. Also where images are found: the embedded default, OCI layouts, registries.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gantry_proto::{ContainerSpec, Op, Reply};
use sha2::{Digest as _, Sha256};

use super::ContainerTableError;
use super::spec::{self, DEFAULT_WRITABLE_LAYER_BYTES, ImageDefaults, RunOptions, RunSpecError};
use crate::cache::{Cache, CacheError, ImageRecord};
use crate::image::builder::{self, BuildError, DEFAULT_IMAGE_NAME};
use crate::image::oci_layout::{OciLayout, OciLayoutSource};
use crate::image::pull::{PullError, PullEvent};
use crate::image::reference::Reference;
use crate::image::registry::client::{RegistryClient, RegistrySource};
use crate::vm::{Vm, VmError};

/// How long `run` waits for a booting guest's shim.
const SHIM_WAIT: Duration = Duration::from_secs(120);

/// Errors of `run` and image lookups.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
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
    Build(#[from] BuildError),
    /// Pulling failed.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The request is unusable.
    #[error(transparent)]
    Spec(#[from] RunSpecError),
    /// The container table refused.
    #[error(transparent)]
    Table(#[from] ContainerTableError),
    /// The VM or its shim failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The shim answered something unexpected.
    #[error("the shim answered {0:?} to a container request")]
    UnexpectedReply(Box<Reply>),
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
pub fn parse_image(image: &str) -> Result<ImageRef, RunError> {
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
        .map_err(|err| RunError::BadImage {
            image: image.to_owned(),
            reason: err.to_string(),
        })
}

/// The card's images: the cache and where images come from.
#[derive(Debug)]
pub struct ImageService {
    /// The shared layer cache.
    pub cache: Cache,
    /// The registry client.
    pub registry: RegistryClient,
    default_layout: PathBuf,
    busybox: PathBuf,
    /// One build of the default image at a time: concurrent first `run`s must not race.
    default_build: tokio::sync::Mutex<()>,
}

impl ImageService {
    /// Images cached in `cache`, the default image kept under `state_dir` and built from `busybox`.
    pub fn new(cache: Cache, registry: RegistryClient, state_dir: &Path, busybox: &Path) -> Self {
        Self {
            cache,
            registry,
            default_layout: state_dir.join("images").join("default"),
            busybox: busybox.to_owned(),
            default_build: tokio::sync::Mutex::new(()),
        }
    }

    /// Pulls `image` into the cache (a no-op for layers already there).
    pub async fn pull(
        &self,
        image: &str,
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
    ) -> Result<ImageRecord, RunError> {
        match parse_image(image)? {
            ImageRef::Default => {
                let _single_flight = self.default_build.lock().await;
                let (layout, busybox) = (self.default_layout.clone(), self.busybox.clone());
                let dir = tokio::task::spawn_blocking(move || {
                    builder::ensure_default_image(&layout, &busybox)
                })
                .await
                .map_err(|err| RunError::Internal(err.to_string()))??;
                self.pull_layout(&dir, DEFAULT_IMAGE_NAME, progress).await
            }
            ImageRef::Layout { dir, name } => self.pull_layout(&dir, &name, progress).await,
            ImageRef::Registry(reference) => {
                let source = RegistrySource {
                    client: &self.registry,
                    reference: &reference,
                };
                Ok(self.cache.pull(&source, progress).await?)
            }
        }
    }

    async fn pull_layout(
        &self,
        dir: &Path,
        name: &str,
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
    ) -> Result<ImageRecord, RunError> {
        let layout = OciLayout::open(dir).map_err(|err| RunError::BadImage {
            image: format!("oci:{}", dir.display()),
            reason: err.to_string(),
        })?;
        let source = OciLayoutSource::new(&layout, name);
        Ok(self.cache.pull(&source, progress).await?)
    }
}

/// A fresh container name: `gantry-` and 12 hex digits.
pub fn generate_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = format!(
        "{:?}-{}-{}",
        std::time::SystemTime::now(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let hash = Sha256::digest(seed.as_bytes());
    let hex: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("gantry-{hex}")
}

/// The image config's defaults, as `run` uses them.
pub fn image_defaults(record: &ImageRecord) -> ImageDefaults {
    let config = record.config.config.clone().unwrap_or_default();
    ImageDefaults {
        entrypoint: config.entrypoint.unwrap_or_default(),
        cmd: config.cmd.unwrap_or_default(),
        env: config.env.unwrap_or_default(),
        working_dir: config.working_dir.unwrap_or_default(),
        user: config.user.unwrap_or_default(),
    }
}

/// A progress line for a pull event.
pub fn describe(event: &PullEvent) -> String {
    match event {
        PullEvent::Resolved {
            image,
            manifest_digest,
            layers,
            total_bytes,
        } => {
            format!(
                "{image}: {manifest_digest}, {layers} layer(s), {:.1} MiB",
                *total_bytes as f64 / (1 << 20) as f64
            )
        }
        PullEvent::LayerCached { index, digest } => format!("layer {index} {digest}: cached"),
        PullEvent::LayerStarted {
            index,
            digest,
            size,
        } => {
            format!(
                "layer {index} {digest}: fetching and converting {:.1} MiB",
                *size as f64 / (1 << 20) as f64
            )
        }
        PullEvent::LayerDone {
            index,
            erofs_size,
            source,
            seconds,
            ..
        } => format!(
            "layer {index}: converted to EROFS ({:.1} MiB) from {source} in {seconds:.2} s",
            *erofs_size as f64 / (1 << 20) as f64
        ),
    }
}

/// Receives `run`'s progress lines.
pub type RunProgress = Arc<dyn Fn(String) + Send + Sync>;

/// Creates and starts a container; returns its name. Output goes to the VM's container table.
pub async fn run_container(
    images: &ImageService,
    vm: &Vm,
    options: RunOptions,
    progress: RunProgress,
) -> Result<String, RunError> {
    let id = options.name.clone().unwrap_or_else(generate_name);
    progress(format!(
        "pulling {}",
        if options.image.is_empty() {
            "default"
        } else {
            &options.image
        }
    ));
    // Typed as a trait object up front: an inferred closure type here trips rustc's
    // higher-ranked `Send` check once the future is spawned.
    let pull_progress: Box<dyn Fn(&PullEvent) + Send + Sync> = {
        let progress = Arc::clone(&progress);
        Box::new(move |event| progress(describe(event)))
    };
    let record = images.pull(&options.image, pull_progress.as_ref()).await?;
    let process = spec::process_spec(&image_defaults(&record), &options)?;
    let resources = spec::resources(&options)?;

    let mut layers = Vec::with_capacity(record.layers.len());
    for layer in &record.layers {
        let pin = images.cache.pin(layer)?;
        let extent = vm.map_layer(layer, pin)?;
        progress(format!(
            "layer {} mapped at {:#x} ({} bytes)",
            layer.erofs_digest, extent.offset, extent.length
        ));
        layers.push(extent);
    }
    let hostname = options.hostname.clone().unwrap_or_else(|| {
        id.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(63)
            .collect()
    });
    vm.containers().insert(
        &id,
        if options.image.is_empty() {
            "default"
        } else {
            &options.image
        },
        &process,
    )?;
    let spec = ContainerSpec {
        container_id: id.clone(),
        layers,
        process,
        hostname,
        resources,
        writable_layer_bytes: options
            .writable_layer_bytes
            .unwrap_or(DEFAULT_WRITABLE_LAYER_BYTES),
    };
    if let Err(err) = expect_done(vm.request(Op::CreateContainer(spec), SHIM_WAIT).await) {
        vm.containers().remove(&id);
        return Err(err);
    }
    progress(format!("created {id}"));
    if let Err(err) = expect_done(
        vm.request(
            Op::StartContainer {
                container_id: id.clone(),
            },
            SHIM_WAIT,
        )
        .await,
    ) {
        // Leave nothing half-made behind: the container never ran.
        let _ = vm
            .request(
                Op::DeleteContainer {
                    container_id: id.clone(),
                },
                Duration::ZERO,
            )
            .await;
        vm.containers().remove(&id);
        return Err(err);
    }
    Ok(id)
}

/// Accepts only `Reply::Done`.
pub fn expect_done(reply: Result<Reply, VmError>) -> Result<(), RunError> {
    match reply? {
        Reply::Done => Ok(()),
        other => Err(RunError::UnexpectedReply(Box::new(other))),
    }
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

    #[test]
    fn generated_names_are_unique_and_valid() {
        let a = generate_name();
        let b = generate_name();
        assert_ne!(a, b);
        assert!(a.starts_with("gantry-") && a.len() == 19, "{a}");
    }
}
