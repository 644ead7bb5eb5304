//! Startup traces: the chunks an image's lazy layers served during a container's first seconds,
//! recorded once per image and replayed as the first prefetch of later cold starts.
//!
//! Stored as `traces/<manifest hex>.json` in the cache, keyed by the platform manifest's digest
//! (a trace belongs to exactly those layers), replaced atomically. The same JSON is what
//! `image trace --push` stores in a registry as an OCI referrer of the manifest
//! ([`TRACE_ARTIFACT_TYPE`]), and what other cards fetch from there on a cold start.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use gantry_oci::Digest;
use gantry_oci::registry::referrers::Artifact;
use serde::{Deserialize, Serialize};

use gantry_oci::fsutil::{read_capped, write_atomic};

/// Current trace format version.
pub const TRACE_VERSION: u32 = 1;
/// Largest trace file read back (and largest trace blob fetched from a registry).
pub const MAX_TRACE_BYTES: u64 = 16 << 20;
/// The artifact type (and blob media type) of a startup trace stored as a referrer.
pub const TRACE_ARTIFACT_TYPE: &str = "application/vnd.gantry.startup-trace.v1+json";
/// Annotation of a trace referrer: how many chunks the trace names (shown in listings).
pub const TRACE_CHUNKS_ANNOTATION: &str = "dev.gantry.startup-trace.chunks";

/// Errors of trace files.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Reading or writing failed.
    #[error("trace {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file does not parse or is of another version.
    #[error("trace {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// An image's startup trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartupTrace {
    /// [`TRACE_VERSION`].
    pub version: u32,
    /// The platform manifest the trace was recorded for.
    pub manifest_digest: Digest,
    /// How long the recording lasted, in milliseconds.
    pub window_ms: u64,
    /// When it was recorded (Unix seconds).
    pub recorded_unix: u64,
    /// The lazy layers, in manifest order, with the chunks read, first touch first.
    pub layers: Vec<TracedLayer>,
}

/// One layer of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracedLayer {
    /// The layer blob.
    pub blob_digest: Digest,
    /// Chunk indexes, in the order they were first read.
    pub chunks: Vec<u32>,
}

impl StartupTrace {
    /// Chunks in all layers.
    pub fn chunk_count(&self) -> usize {
        self.layers.iter().map(|layer| layer.chunks.len()).sum()
    }
}

/// Where the trace of `manifest` lives under the cache root.
pub fn trace_path(root: &Path, manifest: &Digest) -> PathBuf {
    root.join("traces").join(format!("{}.json", manifest.hex()))
}

/// Reads the trace of `manifest`, if there is one.
pub fn read_trace(root: &Path, manifest: &Digest) -> Result<Option<StartupTrace>, TraceError> {
    let path = trace_path(root, manifest);
    let bytes = match read_capped(&path, MAX_TRACE_BYTES) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TraceError::Io { path, source }),
    };
    decode_trace(&bytes, manifest)
        .map(Some)
        .map_err(|reason| TraceError::Corrupt { path, reason })
}

/// Parses trace JSON (a file's, or a registry's referrer blob) that must be the trace of
/// `manifest`; says what is wrong otherwise.
pub fn decode_trace(bytes: &[u8], manifest: &Digest) -> Result<StartupTrace, String> {
    let trace: StartupTrace = serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
    if trace.version != TRACE_VERSION {
        return Err(format!("unsupported version {}", trace.version));
    }
    if trace.manifest_digest != *manifest {
        return Err(format!(
            "the trace is of manifest {}, not {manifest}",
            trace.manifest_digest
        ));
    }
    Ok(trace)
}

/// The trace as an OCI artifact (a referrer of its manifest, in a registry or a bundle).
pub fn trace_artifact(trace: &StartupTrace) -> serde_json::Result<Artifact> {
    Ok(Artifact {
        artifact_type: TRACE_ARTIFACT_TYPE.into(),
        media_type: TRACE_ARTIFACT_TYPE.into(),
        bytes: encode_trace(trace)?.into(),
        annotations: [(
            TRACE_CHUNKS_ANNOTATION.to_string(),
            trace.chunk_count().to_string(),
        )]
        .into(),
    })
}

/// The JSON of a trace, as files and referrers hold it.
pub fn encode_trace(trace: &StartupTrace) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec_pretty(trace)
}

/// Writes the trace unless the cache holds one for its manifest already (the first trace of
/// an image stays: later starts were helped by it, so they read less); whether it wrote.
pub fn write_trace_if_absent(root: &Path, trace: &StartupTrace) -> Result<bool, TraceError> {
    match read_trace(root, &trace.manifest_digest) {
        Ok(Some(_)) => Ok(false),
        _ => write_trace(root, trace).map(|()| true),
    }
}

/// Writes (or replaces) a trace.
pub fn write_trace(root: &Path, trace: &StartupTrace) -> Result<(), TraceError> {
    let path = trace_path(root, &trace.manifest_digest);
    let io_error = |source| TraceError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_error)?;
    }
    let json = encode_trace(trace).map_err(|error| TraceError::Corrupt {
        path: path.clone(),
        reason: error.to_string(),
    })?;
    write_atomic(&path, &json).map_err(io_error)
}

/// Removes the traces of manifests not in `keep` (their images were removed); how many.
pub fn remove_traces_except(root: &Path, keep: &HashSet<Digest>) -> io::Result<usize> {
    let dir = root.join("traces");
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        // Only files this module names: anything else in the directory is left alone.
        let Some(manifest) = name
            .to_str()
            .and_then(|name| name.strip_suffix(".json"))
            .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
        else {
            continue;
        };
        if !keep.contains(&manifest) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_round_trip_and_refuse_another_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Digest::of(b"manifest");
        assert!(read_trace(dir.path(), &manifest).unwrap().is_none());
        let trace = StartupTrace {
            version: TRACE_VERSION,
            manifest_digest: manifest.clone(),
            window_ms: 5000,
            recorded_unix: 1,
            layers: vec![TracedLayer {
                blob_digest: Digest::of(b"layer"),
                chunks: vec![0, 7, 3],
            }],
        };
        write_trace(dir.path(), &trace).unwrap();
        assert_eq!(
            read_trace(dir.path(), &manifest).unwrap(),
            Some(trace.clone())
        );
        // A file copied under another manifest's name is refused, not replayed.
        let other = Digest::of(b"other");
        fs::copy(
            trace_path(dir.path(), &manifest),
            trace_path(dir.path(), &other),
        )
        .unwrap();
        assert!(matches!(
            read_trace(dir.path(), &other),
            Err(TraceError::Corrupt { .. })
        ));
        // Traces of manifests no image names any more go; other files stay.
        fs::write(dir.path().join("traces").join("notes.txt"), b"x").unwrap();
        let keep = HashSet::from([manifest.clone()]);
        assert_eq!(remove_traces_except(dir.path(), &keep).unwrap(), 1);
        assert!(read_trace(dir.path(), &manifest).unwrap().is_some());
        assert!(!trace_path(dir.path(), &other).exists());
        assert!(dir.path().join("traces").join("notes.txt").exists());
        assert_eq!(
            remove_traces_except(dir.path(), &HashSet::new()).unwrap(),
            1
        );
        assert!(read_trace(dir.path(), &manifest).unwrap().is_none());
    }
}
