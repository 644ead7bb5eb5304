//! Writes OCI image layouts from layers described in code.
//!
//! The agent makes its embedded default image with it, and tests make the images they need
//! (several layers, whiteouts, users). Output is deterministic: the same description always
//! gives the same digests.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest as _, Sha256};

pub use crate::compression::Compression as LayerCompression;
use crate::layout::{LayoutError, LayoutWriter};
use crate::manifest::{Descriptor, OCI_CONFIG, OCI_MANIFEST};

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Writing the layout failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A path in a layer description is not relative and clean.
    #[error("layer path {0:?} must be relative, without '..'")]
    BadPath(String),
    /// Writing into the layout failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// Maps an I/O error at `path` into a [`BuildError`].
pub fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone)]
enum Node {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        data: Vec<u8>,
        uid: u64,
        gid: u64,
    },
    Symlink {
        target: String,
    },
}

/// One layer, as a set of paths (kept sorted, so the tar is deterministic), and how its blob
/// is compressed (gzip unless [`LayerBuilder::compression`] says otherwise).
#[derive(Debug, Clone, Default)]
pub struct LayerBuilder {
    nodes: BTreeMap<String, Node>,
    compression: Option<LayerCompression>,
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores the layer's blob with `compression` (tar, tar+gzip or tar+zstd).
    pub fn compression(&mut self, compression: LayerCompression) -> &mut Self {
        self.compression = Some(compression);
        self
    }

    /// The layer's blob and its media type.
    fn blob(&self, tar: &[u8], scratch: &Path) -> Result<(Vec<u8>, &'static str), BuildError> {
        Ok(match self.compression.unwrap_or(LayerCompression::Gzip) {
            LayerCompression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
            LayerCompression::Gzip => {
                // No file name or time in the gzip header: the same tar gives the same blob.
                let mut gzip = GzEncoder::new(Vec::new(), Compression::default());
                gzip.write_all(tar).map_err(io_at(scratch))?;
                (gzip.finish().map_err(io_at(scratch))?, LAYER_MEDIA_TYPE)
            }
            LayerCompression::Zstd => (
                // Single-threaded zstd at a fixed level is deterministic.
                zstd::encode_all(tar, 3).map_err(io_at(scratch))?,
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        })
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<&mut Self, BuildError> {
        let clean = path.trim_start_matches("./").trim_end_matches('/');
        if clean.is_empty()
            || clean.starts_with('/')
            || clean.split('/').any(|c| c == ".." || c.is_empty())
        {
            return Err(BuildError::BadPath(path.to_owned()));
        }
        self.nodes.insert(clean.to_owned(), node);
        Ok(self)
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, BuildError> {
        self.insert(path, Node::Dir { mode })
    }

    /// A regular file owned by root.
    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        data: impl Into<Vec<u8>>,
    ) -> Result<&mut Self, BuildError> {
        self.file_owned(path, mode, data, 0, 0)
    }

    /// A regular file with an owner.
    pub fn file_owned(
        &mut self,
        path: &str,
        mode: u32,
        data: impl Into<Vec<u8>>,
        uid: u64,
        gid: u64,
    ) -> Result<&mut Self, BuildError> {
        self.insert(
            path,
            Node::File {
                mode,
                data: data.into(),
                uid,
                gid,
            },
        )
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, BuildError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_owned(),
            },
        )
    }

    /// An OCI whiteout: `path` from lower layers is deleted.
    pub fn whiteout(&mut self, path: &str) -> Result<&mut Self, BuildError> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let marker = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&marker, 0o644, Vec::new())
    }

    /// An OCI opaque directory: lower layers' entries of `dir` are hidden.
    pub fn opaque(&mut self, dir: &str) -> Result<&mut Self, BuildError> {
        self.dir(dir, 0o755)?;
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, Vec::new())
    }

    /// The layer as an uncompressed tar.
    pub fn to_tar(&self) -> Result<Vec<u8>, BuildError> {
        let mut tar = tar::Builder::new(Vec::new());
        let scratch = Path::new("layer.tar");
        for (path, node) in &self.nodes {
            let mut header = tar::Header::new_gnu();
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            match node {
                Node::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{path}/"), std::io::empty())
                }
                Node::File {
                    mode,
                    data,
                    uid,
                    gid,
                } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_uid(*uid);
                    header.set_gid(*gid);
                    header.set_size(data.len() as u64);
                    tar.append_data(&mut header, path, data.as_slice())
                }
                Node::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, path, target)
                }
            }
            .map_err(io_at(scratch))?;
        }
        tar.into_inner().map_err(io_at(scratch))
    }
}

/// The parts of an image config that `run` uses.
#[derive(Debug, Clone, Default)]
pub struct ImageConfigSpec {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
}

fn sha256_hex(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes an image of `layers` (lowest first) named `name` into the OCI layout at `layout`
/// (created, or added to); returns the manifest digest.
pub fn write_image(
    layout: &Path,
    name: &str,
    layers: &[LayerBuilder],
    config: &ImageConfigSpec,
) -> Result<String, BuildError> {
    let writer = LayoutWriter::create(layout)?;
    let mut layer_descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let tar = layer.to_tar()?;
        diff_ids.push(format!("sha256:{}", sha256_hex(&tar)));
        let (blob, media_type) = layer.blob(&tar, layout)?;
        let digest = writer.write_blob(&blob)?;
        layer_descriptors.push(json!({
            "mediaType": media_type, "digest": digest, "size": blob.len()
        }));
    }
    let mut image_config = serde_json::Map::new();
    let mut put = |key: &str, value: serde_json::Value, present: bool| {
        if present {
            image_config.insert(key.to_owned(), value);
        }
    };
    put(
        "Entrypoint",
        json!(config.entrypoint),
        !config.entrypoint.is_empty(),
    );
    put("Cmd", json!(config.cmd), !config.cmd.is_empty());
    put("Env", json!(config.env), !config.env.is_empty());
    put(
        "WorkingDir",
        json!(config.working_dir),
        !config.working_dir.is_empty(),
    );
    put("User", json!(config.user), !config.user.is_empty());
    let config_json = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .map_err(|err| io_at(layout)(err.into()))?;
    let config_digest = writer.write_blob(&config_json)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config_json.len() },
        "layers": layer_descriptors,
    }))
    .map_err(|err| io_at(layout)(err.into()))?;
    let manifest_digest = writer.write_blob(&manifest)?;
    // Keeps the layout's other images; replaces one of the same name.
    writer.name_image(&Descriptor::of(OCI_MANIFEST, &manifest), name)?;
    Ok(manifest_digest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_layers() -> Vec<LayerBuilder> {
        let mut base = LayerBuilder::new();
        base.dir("etc", 0o755)
            .unwrap()
            .file("etc/a", 0o644, "a")
            .unwrap()
            .file("etc/b", 0o600, "b")
            .unwrap();
        let mut top = LayerBuilder::new();
        top.whiteout("etc/a")
            .unwrap()
            .opaque("var")
            .unwrap()
            .symlink("etc/c", "b")
            .unwrap();
        vec![base, top]
    }

    #[test]
    fn the_same_description_gives_the_same_digest() {
        let dir = tempfile::tempdir().unwrap();
        let config = ImageConfigSpec::default();
        let first = write_image(&dir.path().join("one"), "x", &two_layers(), &config).unwrap();
        let second = write_image(&dir.path().join("two"), "x", &two_layers(), &config).unwrap();
        assert_eq!(first, second);
        let mut different = two_layers();
        different[0].file("etc/d", 0o644, "d").unwrap();
        assert_ne!(
            first,
            write_image(&dir.path().join("three"), "x", &different, &config).unwrap()
        );
    }

    #[test]
    fn layers_are_stored_as_their_compression_says() {
        let dir = tempfile::tempdir().unwrap();
        let mut layers = two_layers();
        layers[0].compression(LayerCompression::Zstd);
        layers[1].compression(LayerCompression::None);
        let digest = write_image(dir.path(), "x", &layers, &ImageConfigSpec::default()).unwrap();
        let blob = |digest: &str| {
            let hex = digest.strip_prefix("sha256:").unwrap();
            std::fs::read(dir.path().join("blobs/sha256").join(hex)).unwrap()
        };
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&digest)).unwrap();
        let media_types: Vec<&str> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap())
            .collect();
        assert_eq!(
            media_types,
            [
                "application/vnd.oci.image.layer.v1.tar+zstd",
                "application/vnd.oci.image.layer.v1.tar"
            ]
        );
        let zstd_layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
        assert_eq!(
            zstd::decode_all(&zstd_layer[..]).unwrap(),
            layers[0].to_tar().unwrap()
        );
        let plain = blob(manifest["layers"][1]["digest"].as_str().unwrap());
        assert_eq!(plain, layers[1].to_tar().unwrap());
    }

    #[test]
    fn whiteouts_and_opaque_markers_are_named_as_oci_says() {
        let tar = two_layers()[1].to_tar().unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"etc/.wh.a".to_owned()), "{names:?}");
        assert!(names.contains(&"var/.wh..wh..opq".to_owned()), "{names:?}");
    }

    #[test]
    fn escaping_paths_are_refused() {
        for bad in ["/abs", "a/../b", "", "a//b"] {
            assert!(LayerBuilder::new().file(bad, 0o644, "").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_index_names_every_image_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = ImageConfigSpec::default();
        write_image(dir.path(), "a", &two_layers(), &config).unwrap();
        write_image(dir.path(), "b", &two_layers()[..1], &config).unwrap();
        let again = write_image(dir.path(), "a", &two_layers()[..1], &config).unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 2);
        assert!(manifests.iter().any(|m| m["digest"] == again.as_str()));
    }
}
