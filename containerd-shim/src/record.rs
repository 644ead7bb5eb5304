//! What a shim leaves in a task's bundle so that `containerd-shim-gantry-v2 delete` (run by
//! containerd after the shim died) can clean up without it: the agent, the VM, the container.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file in the bundle.
pub const RECORD_FILE: &str = "gantry-task.json";

/// A task's placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The agent's API socket.
    pub api_socket: PathBuf,
    /// The VM the task runs in.
    pub vm: String,
    /// Whether the shim launched the VM (so that cleaning up removes it).
    pub launched: bool,
    /// The container in the VM; `None` for a sandbox task.
    pub container: Option<String>,
}

/// Errors reading or writing the record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file system failed.
    #[error("task record {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds something else.
    #[error("task record {path}: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

impl TaskRecord {
    /// Writes the record into `bundle`.
    pub fn save(&self, bundle: &Path) -> Result<(), RecordError> {
        let path = bundle.join(RECORD_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Decode {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, json).map_err(|source| RecordError::Io { path, source })
    }

    /// The record in `bundle`, if there is one.
    pub fn load(bundle: &Path) -> Result<Option<Self>, RecordError> {
        let path = bundle.join(RECORD_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RecordError::Decode { path, source }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RecordError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TaskRecord::load(dir.path()).unwrap(), None);
        let record = TaskRecord {
            api_socket: "/run/gantry/agent.sock".into(),
            vm: "ctrd-0123".into(),
            launched: true,
            container: Some("t1".into()),
        };
        record.save(dir.path()).unwrap();
        assert_eq!(TaskRecord::load(dir.path()).unwrap(), Some(record));
        std::fs::write(dir.path().join(RECORD_FILE), b"{").unwrap();
        assert!(TaskRecord::load(dir.path()).is_err());
    }
}
