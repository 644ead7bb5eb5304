//! The converted image's documents: config, manifest and index rewritten from the source's.
//!
//! The rules are erofs-image-spec v1's (§4–§6): the manifest is an OCI image manifest whose
//! layers are EROFS layers; the config keeps every field of the source's but `rootfs`
//! (`type` `layers`, `diff_ids` the digests of the uncompressed EROFS images) and adds `erofs`
//! to `os.features`; every index entry's platform carries `os.features: ["erofs"]` too, so
//! hosts that do not know the format skip the image. Source documents are handled as JSON
//! values, so fields Gantry does not model (history, `subject`, annotations, …) are kept.
//!
//! Serialization is serde_json's with sorted keys: the same input gives the same bytes.

use serde_json::{Map, Value, json};

use crate::manifest::{Descriptor, OCI_INDEX, OCI_MANIFEST};
use crate::reference::Digest;

/// The annotation naming a layer's part in composition (§2.4).
pub const ANNOTATION_ROLE: &str = "org.erofs.role";
/// The role of an EROFS layer used as an overlayfs lower directory.
pub const ROLE_OVERLAY_LOWER: &str = "overlay-lower";
/// The `os.features` value of EROFS images (§5.4).
pub const OS_FEATURE_EROFS: &str = "erofs";
/// The platform's and the config's key for OS features.
const OS_FEATURES: &str = "os.features";

/// A source document that cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// Not JSON.
    #[error("malformed {what}: {reason}")]
    Json {
        /// Which document.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// JSON of the wrong shape.
    #[error("{what}: {reason}")]
    Shape {
        /// Which document.
        what: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

fn parse_object(bytes: &[u8], what: &'static str) -> Result<Map<String, Value>, DocumentError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(DocumentError::Shape {
            what,
            reason: "not a JSON object",
        }),
        Err(error) => Err(DocumentError::Json {
            what,
            reason: error.to_string(),
        }),
    }
}

fn to_bytes(value: &Map<String, Value>) -> Vec<u8> {
    // A map of JSON values always serializes.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Adds `erofs` to the `os.features` array of `object` (a config or a platform).
fn add_erofs_feature(
    object: &mut Map<String, Value>,
    what: &'static str,
) -> Result<(), DocumentError> {
    let features = object
        .entry(OS_FEATURES)
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or(DocumentError::Shape {
            what,
            reason: "os.features is not an array",
        })?;
    if !features.iter().any(|f| f == OS_FEATURE_EROFS) {
        features.push(OS_FEATURE_EROFS.into());
    }
    Ok(())
}

/// The converted image config: the source's with `rootfs` = `layers` of `diff_ids` and
/// `erofs` in `os.features`. A config that already says exactly that is returned as it is (so
/// converting a converted image changes nothing).
pub fn config(source: &[u8], diff_ids: &[Digest]) -> Result<Vec<u8>, DocumentError> {
    const WHAT: &str = "image config";
    let original = parse_object(source, WHAT)?;
    let mut config = original.clone();
    let rootfs = config
        .entry("rootfs")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or(DocumentError::Shape {
            what: WHAT,
            reason: "rootfs is not an object",
        })?;
    rootfs.insert("type".into(), "layers".into());
    rootfs.insert("diff_ids".into(), json!(diff_ids));
    add_erofs_feature(&mut config, WHAT)?;
    if config == original {
        return Ok(source.to_vec());
    }
    Ok(to_bytes(&config))
}

/// The platform of a converted index entry: the source entry's (or, when it names none, the
/// one the config states) with `erofs` in `os.features`.
pub fn platform(source_entry: Option<&Value>, config: &[u8]) -> Result<Value, DocumentError> {
    const WHAT: &str = "index entry";
    let mut platform = match source_entry.and_then(|entry| entry.get("platform")) {
        Some(Value::Object(platform)) => platform.clone(),
        Some(_) => {
            return Err(DocumentError::Shape {
                what: WHAT,
                reason: "platform is not an object",
            });
        }
        None => {
            let config = parse_object(config, "image config")?;
            let mut platform = Map::new();
            for key in ["architecture", "os", "variant", "os.version"] {
                if let Some(value) = config.get(key) {
                    platform.insert(key.into(), value.clone());
                }
            }
            platform
        }
    };
    add_erofs_feature(&mut platform, WHAT)?;
    Ok(Value::Object(platform))
}

/// The converted manifest: the source's fields (annotations, `subject`, `artifactType`, …)
/// with the OCI media type, the new config and the EROFS layers.
pub fn manifest(
    source: &[u8],
    config: &Descriptor,
    layers: &[Descriptor],
) -> Result<Vec<u8>, DocumentError> {
    let mut manifest = parse_object(source, "image manifest")?;
    manifest.insert("schemaVersion".into(), 2.into());
    manifest.insert("mediaType".into(), OCI_MANIFEST.into());
    manifest.insert("config".into(), json!(config));
    manifest.insert("layers".into(), json!(layers));
    Ok(to_bytes(&manifest))
}

/// One entry of the converted index.
#[derive(Debug, Clone)]
pub struct IndexEntry<'a> {
    /// The source index's entry, as JSON (its annotations are kept).
    pub source: Option<&'a Value>,
    /// The converted manifest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its platform, from [`platform`].
    pub platform: Value,
}

/// The converted index: the source's fields with the OCI media type and `entries`.
pub fn index(source: &[u8], entries: &[IndexEntry<'_>]) -> Result<Vec<u8>, DocumentError> {
    let mut index = parse_object(source, "image index")?;
    let manifests: Vec<Value> = entries
        .iter()
        .map(|entry| {
            let mut descriptor = json!({
                "mediaType": OCI_MANIFEST,
                "digest": entry.digest,
                "size": entry.size,
                "platform": entry.platform,
            });
            // Only the annotations carry over: `data`, `urls` and the like described the
            // source manifest's bytes.
            if let Some(annotations) = entry.source.and_then(|s| s.get("annotations")) {
                descriptor["annotations"] = annotations.clone();
            }
            descriptor
        })
        .collect();
    index.insert("schemaVersion".into(), 2.into());
    index.insert("mediaType".into(), OCI_INDEX.into());
    index.insert("manifests".into(), Value::Array(manifests));
    Ok(to_bytes(&index))
}

/// The source index's entries as JSON, in order (for [`IndexEntry::source`]).
pub fn index_entries(source: &[u8]) -> Result<Vec<Value>, DocumentError> {
    let mut index = parse_object(source, "image index")?;
    match index.remove("manifests") {
        Some(Value::Array(entries)) => Ok(entries),
        None => Ok(Vec::new()),
        Some(_) => Err(DocumentError::Shape {
            what: "image index",
            reason: "manifests is not an array",
        }),
    }
}

/// A layer descriptor placed in the stack: every layer below the top one is an overlayfs lower
/// layer (so the layers above may hold whiteouts, §3.6), the top one has no role (§11.1). A
/// role the source gave is kept.
pub fn place_layer(mut layer: Descriptor, is_top: bool) -> Descriptor {
    if !is_top {
        layer
            .annotations
            .entry(ANNOTATION_ROLE.to_string())
            .or_insert_with(|| ROLE_OVERLAY_LOWER.to_string());
    }
    layer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn the_config_keeps_its_fields_and_gains_rootfs_and_the_feature() {
        let source = br#"{"architecture":"arm64","os":"linux","variant":"v8",
            "config":{"Env":["A=1"]},"history":[{"created_by":"x"}],"created":"2024-01-01T00:00:00Z",
            "rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]},
            "os.features":["win32k"]}"#;
        let converted = config(source, &[digest(1), digest(2)]).unwrap();
        let value: Value = serde_json::from_slice(&converted).unwrap();
        assert_eq!(value["rootfs"]["type"], "layers");
        assert_eq!(value["rootfs"]["diff_ids"], json!([digest(1), digest(2)]));
        assert_eq!(value["os.features"], json!(["win32k", "erofs"]));
        assert_eq!(value["history"], json!([{"created_by": "x"}]));
        assert_eq!(value["config"]["Env"], json!(["A=1"]));
        assert_eq!(value["variant"], "v8");
        assert_eq!(value["created"], "2024-01-01T00:00:00Z");
        // Converting again changes nothing, byte for byte.
        assert_eq!(
            config(&converted, &[digest(1), digest(2)]).unwrap(),
            converted
        );
        // A config with no rootfs gets one.
        let bare: Value =
            serde_json::from_slice(&config(br#"{"os":"linux"}"#, &[digest(3)]).unwrap()).unwrap();
        assert_eq!(bare["rootfs"]["diff_ids"], json!([digest(3)]));
        for bad in [
            &b"[]"[..],
            b"{",
            br#"{"rootfs":3}"#,
            br#"{"os.features":"erofs"}"#,
        ] {
            assert!(
                config(bad, &[]).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn platforms_gain_the_feature_from_the_entry_or_the_config() {
        let entry =
            json!({"platform": {"os": "linux", "architecture": "amd64", "os.version": "x"}});
        assert_eq!(
            platform(Some(&entry), b"{}").unwrap(),
            json!({"os": "linux", "architecture": "amd64", "os.version": "x", "os.features": ["erofs"]})
        );
        let config = br#"{"os":"linux","architecture":"arm","variant":"v7","config":{}}"#;
        assert_eq!(
            platform(Some(&json!({})), config).unwrap(),
            json!({"os": "linux", "architecture": "arm", "variant": "v7", "os.features": ["erofs"]})
        );
        let twice =
            json!({"platform": {"os": "linux", "architecture": "amd64", "os.features": ["erofs"]}});
        assert_eq!(
            platform(Some(&twice), b"{}").unwrap()["os.features"],
            json!(["erofs"])
        );
    }

    #[test]
    fn manifests_and_indexes_keep_their_other_fields() {
        let layer = |n, top| {
            place_layer(
                Descriptor {
                    media_type: "application/vnd.erofs+zstd".into(),
                    digest: digest(n),
                    size: 10,
                    platform: None,
                    annotations: Default::default(),
                    urls: Vec::new(),
                    artifact_type: None,
                },
                top,
            )
        };
        let config_descriptor = Descriptor {
            media_type: crate::manifest::OCI_CONFIG.into(),
            digest: digest(9),
            size: 5,
            platform: None,
            annotations: Default::default(),
            urls: Vec::new(),
            artifact_type: None,
        };
        let source = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{},"layers":[{}],"annotations":{"a":"b"},"subject":{"digest":"x"}}"#;
        let bytes = manifest(
            source,
            &config_descriptor,
            &[layer(1, false), layer(2, true)],
        )
        .unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["mediaType"], OCI_MANIFEST);
        assert_eq!(value["annotations"], json!({"a": "b"}));
        assert_eq!(value["subject"], json!({"digest": "x"}));
        assert_eq!(value["config"]["digest"], json!(digest(9)));
        assert_eq!(
            value["layers"][0]["annotations"][ANNOTATION_ROLE],
            ROLE_OVERLAY_LOWER
        );
        assert!(value["layers"][1].get("annotations").is_none());
        assert_eq!(
            manifest(
                source,
                &config_descriptor,
                &[layer(1, false), layer(2, true)]
            )
            .unwrap(),
            bytes
        );

        let source = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
            "annotations":{"i":"j"},"manifests":[{"digest":"old","data":"eA==","annotations":{"k":"v"},
            "platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let entries = index_entries(source).unwrap();
        let entry = IndexEntry {
            source: entries.first(),
            digest: digest(5),
            size: 77,
            platform: platform(entries.first(), b"{}").unwrap(),
        };
        let value: Value = serde_json::from_slice(&index(source, &[entry]).unwrap()).unwrap();
        assert_eq!(value["mediaType"], OCI_INDEX);
        assert_eq!(value["annotations"], json!({"i": "j"}));
        assert_eq!(
            value["manifests"],
            json!([{"mediaType": OCI_MANIFEST, "digest": digest(5), "size": 77, "annotations": {"k": "v"},
                "platform": {"os": "linux", "architecture": "amd64", "os.features": ["erofs"]}}])
        );
    }
}
