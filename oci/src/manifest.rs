//! OCI and Docker schema-2 manifests, indexes, image configs and platforms.
//!
//! Only the fields Gantry uses are modelled; unknown fields are ignored so that newer
//! registries and tools stay compatible. Parsing is separate from fetching: everything here
//! works on bytes whose digest was already checked.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::reference::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image configuration.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The empty JSON document `{}`: the config of artifacts that have none (OCI 1.1).
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The bytes of [`OCI_EMPTY`].
pub const EMPTY_JSON: &[u8] = b"{}";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The `Accept` header for manifest requests, most preferred first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Layer media types Gantry converts (the compression is detected from the bytes anyway).
const LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

/// Errors of parsing manifests, configs and platforms.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The JSON does not parse as the expected document.
    #[error("malformed {what}: {source}")]
    Json {
        /// Which document.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A media type Gantry does not handle.
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    /// A schema version other than 2.
    #[error("unsupported manifest schema version {0}")]
    UnsupportedSchema(u32),
    /// A layer Gantry cannot convert (foreign or non-distributable, or unknown type).
    #[error("layer {digest} has unsupported media type {media_type:?}")]
    UnsupportedLayer {
        /// The layer's digest.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
    /// The index lists no manifest for the wanted platform.
    #[error("no manifest for platform {wanted} (available: {available})")]
    NoMatchingPlatform {
        /// The platform asked for.
        wanted: Platform,
        /// What the index offers.
        available: String,
    },
    /// A platform string that is not `os/arch[/variant]`.
    #[error("invalid platform {0:?} (expected os/arch[/variant])")]
    InvalidPlatform(String),
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// For index entries: the platform the manifest is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Alternative download locations (foreign layers); Gantry ignores them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// For artifacts (OCI 1.1), in index entries and referrer listings: the artifact's type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// A descriptor of `size` bytes with `digest`, without platform, annotations or URLs.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
            artifact_type: None,
        }
    }

    /// The descriptor of `bytes`.
    pub fn of(media_type: impl Into<String>, bytes: &[u8]) -> Self {
        Descriptor::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's media type, when it states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image configuration blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// For artifacts (OCI 1.1): what kind of artifact this manifest is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// For referrers (OCI 1.1): the manifest this one is about (a signature's image, a
    /// startup trace's image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Box<Descriptor>>,
}

/// An image index / manifest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u32,
    /// The index's media type, when it states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests it lists.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A parsed manifest document: either an image manifest or an index.
#[derive(Debug, Clone, PartialEq, Eq)]
// A few hundred bytes, one per document parsed (a handful per pull): boxing the larger variant
// would only add an allocation and a deref at every use.
#[allow(clippy::large_enum_variant)]
pub enum ManifestDocument {
    /// An image manifest.
    Image(ImageManifest),
    /// An index of manifests per platform.
    Index(ImageIndex),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    layers: Option<serde::de::IgnoredAny>,
}

/// Whether a layer media type is one of the tar forms (plain, gzip, zstd; OCI or Docker).
pub fn is_tar_layer(media_type: &str) -> bool {
    LAYER_MEDIA_TYPES.contains(&media_type)
}

impl ManifestDocument {
    /// Parses a manifest whose layers must be tar layers (what a pull converts), using the
    /// document's own `mediaType`, else the one the server sent, else its shape.
    pub fn parse(bytes: &[u8], served_media_type: Option<&str>) -> Result<Self, ManifestError> {
        Self::parse_with(bytes, served_media_type, is_tar_layer)
    }

    /// Parses a manifest as [`ManifestDocument::parse`] does, with the layer media types
    /// `accepted` says (for callers that handle other layer forms too, such as the lazy EROFS
    /// format).
    pub fn parse_with(
        bytes: &[u8],
        served_media_type: Option<&str>,
        accepted: impl Fn(&str) -> bool,
    ) -> Result<Self, ManifestError> {
        let document = Self::parse_structure(bytes, served_media_type)?;
        if let ManifestDocument::Image(manifest) = &document
            && let Some(layer) = manifest.layers.iter().find(|l| !accepted(&l.media_type))
        {
            return Err(ManifestError::UnsupportedLayer {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
        Ok(document)
    }

    fn parse_structure(
        bytes: &[u8],
        served_media_type: Option<&str>,
    ) -> Result<Self, ManifestError> {
        let probe: Probe = serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
            what: "manifest",
            source,
        })?;
        let schema = probe.schema_version.unwrap_or(0);
        if schema != 2 {
            return Err(ManifestError::UnsupportedSchema(schema));
        }
        let media_type = probe
            .media_type
            .or_else(|| served_media_type.map(|m| m.split(';').next().unwrap_or(m).trim().into()))
            .filter(|m| !m.is_empty() && m != "application/json");
        let is_index = match media_type.as_deref() {
            Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
            Some(other) => return Err(ManifestError::UnsupportedMediaType(other.to_string())),
            None => probe.manifests.is_some() && probe.layers.is_none(),
        };
        if is_index {
            let index = serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                what: "image index",
                source,
            })?;
            Ok(ManifestDocument::Index(index))
        } else {
            let manifest: ImageManifest =
                serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                    what: "image manifest",
                    source,
                })?;
            Ok(ManifestDocument::Image(manifest))
        }
    }
}

impl ImageIndex {
    /// The entry for `wanted`: an exact variant match first, then an entry without variant.
    pub fn select(&self, wanted: &Platform) -> Result<&Descriptor, ManifestError> {
        let candidates = || {
            self.manifests.iter().filter(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == wanted.os && p.architecture == wanted.architecture)
            })
        };
        candidates()
            .find(|d| {
                d.platform.as_ref().and_then(|p| p.variant.as_ref()) == wanted.variant.as_ref()
            })
            .or_else(|| {
                candidates().find(|d| {
                    wanted.variant.is_none()
                        || d.platform.as_ref().is_some_and(|p| p.variant.is_none())
                })
            })
            .ok_or_else(|| ManifestError::NoMatchingPlatform {
                wanted: wanted.clone(),
                available: self
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// A platform (`os/architecture[/variant]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture in Go's naming (`amd64`, `arm64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v8`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        }
    }
}

impl FromStr for Platform {
    type Err = ManifestError;

    fn from_str(text: &str) -> Result<Platform, ManifestError> {
        let parts: Vec<&str> = text.split('/').collect();
        let valid =
            |s: &&str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if valid(os) && valid(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(ManifestError::InvalidPlatform(text.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// The image configuration blob (the parts a runtime needs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfiguration {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// CPU variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The default process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ContainerConfig>,
    /// The layers' uncompressed digests.
    #[serde(default)]
    pub rootfs: RootFs,
}

impl ImageConfiguration {
    /// Parses a config blob.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
            what: "image config",
            source,
        })
    }
}

/// The default process of an image (`config` in the image config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `NAME=value` entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// The entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// The working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// The signal that stops the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// Digests of the uncompressed layers.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn manifests_and_indexes_are_told_apart() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":3}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":9}}]}}"#,
            digest(1),
            digest(2)
        );
        let ManifestDocument::Image(m) =
            ManifestDocument::parse(manifest.as_bytes(), None).unwrap()
        else {
            panic!("not an image manifest");
        };
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].size, 9);

        // No mediaType in the document: the served type or the shape decides.
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            digest(3),
            digest(4)
        );
        let ManifestDocument::Index(i) = ManifestDocument::parse(index.as_bytes(), None).unwrap()
        else {
            panic!("not an index");
        };
        assert_eq!(
            i.select(&Platform::default()).unwrap().digest.to_string(),
            digest(4)
        );
        let arm: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(i.select(&arm).unwrap().digest.to_string(), digest(3));
        let arm: Platform = "linux/arm64".parse().unwrap();
        assert_eq!(i.select(&arm).unwrap().digest.to_string(), digest(3));
        let err = i.select(&"linux/s390x".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("linux/arm64/v8, linux/amd64"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_documents_are_rejected() {
        assert!(matches!(
            ManifestDocument::parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, None),
            Err(ManifestError::UnsupportedSchema(1))
        ));
        assert!(ManifestDocument::parse(b"not json", None).is_err());
        let foreign = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"x","digest":"{}","size":3}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{}","size":9}}]}}"#,
            digest(1),
            digest(2)
        );
        assert!(matches!(
            ManifestDocument::parse(foreign.as_bytes(), None),
            Err(ManifestError::UnsupportedLayer { .. })
        ));
        assert!(ManifestDocument::parse(br#"{"schemaVersion":2}"#, Some("text/html")).is_err());
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux/amd64/v1/x".parse::<Platform>().is_err());
    }

    #[test]
    fn image_config_fields() {
        let config = ImageConfiguration::parse(
            br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/sh"],
            "Cmd":["-c","true"],"Env":["A=1"],"WorkingDir":"/w","User":"1:2"},
            "rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let c = config.config.unwrap();
        assert_eq!(c.entrypoint.unwrap(), ["/bin/sh"]);
        assert_eq!(c.cmd.unwrap(), ["-c", "true"]);
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
        assert_eq!(c.user.as_deref(), Some("1:2"));
    }
}
