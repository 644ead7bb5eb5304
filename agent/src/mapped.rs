//! The layers mapped into a VM's layer store, recorded (`layers.json`) so that a restarted agent
//! puts each back at the offset where the guest has it mounted.

use std::path::Path;

use gantry_proto::LayerExtent;
use serde::{Deserialize, Serialize};

/// One VM's mappings and the table's position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedRecord {
    /// Where the next fresh layer goes: offsets below it are never handed out again.
    pub next_offset: u64,
    /// The table's generation.
    pub generation: u64,
    /// The mapped layers.
    pub layers: Vec<MappedEntry>,
}

/// One mapped layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedEntry {
    /// The EROFS digest.
    pub digest: String,
    /// Its offset on the device.
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// The image it was mapped for, as the operator named it: where its source is found again.
    pub image: String,
}

impl MappedEntry {
    /// Where the guest finds it.
    pub fn extent(&self) -> LayerExtent {
        LayerExtent {
            digest: self.digest.clone(),
            offset: self.offset,
            length: self.length,
        }
    }
}

impl MappedRecord {
    /// The record at `path`, `None` if there is none.
    pub fn load(path: &Path) -> Result<Option<MappedRecord>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|err| format!("{}: {err}", path.display())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(format!("{}: {err}", path.display())),
        }
    }

    /// Replaces the record at `path` atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        gantry_oci::fsutil::write_atomic(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_record_loads_back_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layers.json");
        assert_eq!(MappedRecord::load(&path).unwrap(), None);
        let record = MappedRecord {
            next_offset: 5 << 20,
            generation: 3,
            layers: vec![MappedEntry {
                digest: "sha256:ab".into(),
                offset: 1 << 20,
                length: 4096,
                image: "default".into(),
            }],
        };
        record.save(&path).unwrap();
        assert_eq!(MappedRecord::load(&path).unwrap(), Some(record));
        std::fs::write(&path, b"{").unwrap();
        assert!(MappedRecord::load(&path).is_err());
    }
}
