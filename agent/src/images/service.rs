//! The card's images: where an image name leads (the embedded default, an OCI layout, a
//! registry) and the cache they are pulled into.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use gantry_oci::Reference;
use gantry_oci::layout::{OciLayout, OciLayoutSource};
use gantry_oci::registry::{RegistryClient, RegistrySource};

use super::default_image::{self, DEFAULT_IMAGE_NAME, DefaultImageError};
use super::pull::{self, PullError, PullEvent};
use crate::cache::{Cache, ImageRecord, PinGuard};

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

    /// Pulls `image` into the cache (a no-op for layers already there); returns its record and
    /// the pins holding its layers, one per layer in order.
    pub async fn pull(
        &self,
        image: &str,
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
    ) -> Result<(ImageRecord, Vec<PinGuard>), ImageError> {
        match parse_image(image)? {
            ImageRef::Default => {
                let _single_flight = self.default_build.lock().await;
                let (layout, busybox) = (self.default_layout.clone(), self.busybox.clone());
                let dir = tokio::task::spawn_blocking(move || {
                    default_image::ensure_default_image(&layout, &busybox)
                })
                .await
                .map_err(|err| ImageError::Internal(err.to_string()))??;
                self.pull_layout(&dir, DEFAULT_IMAGE_NAME, progress).await
            }
            ImageRef::Layout { dir, name } => self.pull_layout(&dir, &name, progress).await,
            ImageRef::Registry(reference) => {
                let source = RegistrySource {
                    client: &self.registry,
                    reference: &reference,
                };
                Ok(pull::pull_pinned(&self.cache, &source, progress).await?)
            }
        }
    }

    async fn pull_layout(
        &self,
        dir: &Path,
        name: &str,
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
    ) -> Result<(ImageRecord, Vec<PinGuard>), ImageError> {
        let layout = OciLayout::open(dir).map_err(|err| ImageError::BadImage {
            image: format!("oci:{}", dir.display()),
            reason: err.to_string(),
        })?;
        let source = OciLayoutSource::new(&layout, name);
        Ok(pull::pull_pinned(&self.cache, &source, progress).await?)
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
}
