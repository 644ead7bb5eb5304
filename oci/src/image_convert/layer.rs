//! One layer of a conversion: a tar layer is fetched into a work file (verified against its
//! digest), converted into an EROFS image ([`convert_layer`]), cut into zstd chunks with a
//! chunk index ([`write_chunked_layer`]) and stored; an EROFS layer is copied as it is (not
//! even fetched when the destination holds it or can mount it).
//!
//! Work files live in the conversion's temporary directory and are removed as soon as the next
//! step has its output, so a layer takes at most its EROFS image plus one compressed form on
//! disk at a time.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tracing::debug;

use super::{ConvertEvent, ImageConvertError, LayerDone, Run};
use crate::chunked::{
    ChunkedError, ChunkedLayer, ChunkedLayerOptions, MEDIA_TYPE_CHUNK_INDEX, erofs_layer_kind,
    layer_diff_id, write_chunked_layer,
};
use crate::convert::{ConvertError, ConvertOptions, convert_layer};
use crate::destination::{BlobData, ImageDestination};
use crate::manifest::{Descriptor, is_tar_layer};
use crate::reference::Digest;
use crate::source::{BlobSink, CountingSink, ImageSource, SinkError};

/// Why one layer could not be converted or copied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Neither a tar layer nor an EROFS one.
    #[error("unsupported layer media type {0:?} (neither a tar nor an EROFS layer)")]
    UnsupportedMediaType(String),
    /// An EROFS layer whose DiffID is nowhere.
    #[error(
        "no DiffID: no org.erofs.uncompressed-digest annotation and no rootfs.diff_ids entry {0}"
    )]
    MissingDiffId(usize),
    /// The tar → EROFS conversion refused the layer.
    #[error("converting to EROFS: {0}")]
    Convert(#[source] ConvertError),
    /// Writing the chunked blob failed, or a copied layer's annotations are malformed.
    #[error(transparent)]
    Chunked(#[from] ChunkedError),
    /// A work file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The chunked blob does not hold the image the converter wrote (a bug, not bad input).
    #[error("the chunked blob holds image {chunked}, the converter wrote {converted}")]
    ImageMismatch {
        /// What the chunked writer hashed.
        chunked: Digest,
        /// What the converter hashed.
        converted: String,
    },
    /// The blocking conversion thread died.
    #[error("conversion thread: {0}")]
    Thread(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which way a layer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LayerKind {
    /// A tar layer: converted.
    Tar,
    /// An EROFS layer (or a standalone chunk index): copied as it is.
    Erofs,
}

impl LayerKind {
    pub(super) fn of(media_type: &str) -> Result<LayerKind, LayerError> {
        if is_tar_layer(media_type) {
            Ok(LayerKind::Tar)
        } else if erofs_layer_kind(media_type).is_some() || media_type == MEDIA_TYPE_CHUNK_INDEX {
            Ok(LayerKind::Erofs)
        } else {
            Err(LayerError::UnsupportedMediaType(media_type.to_string()))
        }
    }
}

/// One layer to handle.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerJob<'a> {
    /// Unique within the conversion (progress keys on it).
    pub(super) id: usize,
    /// Position in the manifest.
    pub(super) index: usize,
    /// The source layer.
    pub(super) descriptor: &'a Descriptor,
    /// The image's lowest layer.
    pub(super) lowest: bool,
    /// The source config's `rootfs.diff_ids`.
    pub(super) config_diff_ids: &'a [String],
}

impl<S: ImageSource, D: ImageDestination> Run<'_, S, D> {
    /// Converts a tar layer, or copies an EROFS one; returns its new descriptor (without a
    /// role: that depends on its place, see `documents::place_layer`) and DiffID.
    pub(super) async fn layer(&self, job: LayerJob<'_>) -> Result<LayerDone, ImageConvertError> {
        let layer_error = |error| self.layer_error(job.descriptor, error);
        match LayerKind::of(&job.descriptor.media_type).map_err(layer_error)? {
            LayerKind::Tar => self.convert_tar_layer(job).await,
            LayerKind::Erofs => self.copy_erofs_layer(job).await,
        }
    }

    async fn convert_tar_layer(&self, job: LayerJob<'_>) -> Result<LayerDone, ImageConvertError> {
        let key = (job.descriptor.digest.clone(), job.lowest);
        if let Some(done) = self.remembered(&key) {
            return Ok(done);
        }
        let started = Instant::now();
        let source_file = self.fetch_to_file(job).await?;
        (self.progress)(&ConvertEvent::LayerConverting {
            id: job.id,
            index: job.index,
            digest: job.descriptor.digest.clone(),
        });
        let work = self.work.path().to_path_buf();
        let convert = ConvertOptions {
            lowest_layer: job.lowest,
            ..self.options.convert.clone()
        };
        let chunked_options = self.options.chunked.clone();
        let id = job.id;
        let (layer, blob) = tokio::task::spawn_blocking(move || {
            convert_file(&source_file, &work, id, &convert, &chunked_options)
        })
        .await
        .unwrap_or_else(|join| Err(LayerError::Thread(join.to_string())))
        .map_err(|error| self.layer_error(job.descriptor, error))?;
        let descriptor = layer.descriptor();
        (self.progress)(&ConvertEvent::LayerConverted {
            id: job.id,
            index: job.index,
            source: job.descriptor.digest.clone(),
            digest: layer.digest.clone(),
            size: layer.size,
            uncompressed_size: layer.uncompressed_size,
            chunks: layer.chunk_count,
            seconds: started.elapsed().as_secs_f64(),
        });
        let stored = self
            .destination
            .put_blob(&descriptor, BlobData::File(blob.clone()))
            .await;
        let _ = std::fs::remove_file(&blob);
        let outcome = stored.map_err(|error| self.destination_error(error))?;
        (self.progress)(&ConvertEvent::BlobStored {
            id: Some(job.id),
            what: "layer",
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            outcome,
        });
        let done = LayerDone {
            diff_id: layer.uncompressed_digest.clone(),
            descriptor,
            converted: true,
            chunks: Some(layer.chunk_count),
            outcome,
        };
        self.remember(key, &done);
        Ok(done)
    }

    async fn copy_erofs_layer(&self, job: LayerJob<'_>) -> Result<LayerDone, ImageConvertError> {
        let descriptor = job.descriptor;
        let annotated = if descriptor.media_type == MEDIA_TYPE_CHUNK_INDEX {
            // A standalone index is its own DiffID (§5.2).
            Some(descriptor.digest.clone())
        } else {
            layer_diff_id(descriptor).map_err(|error| self.layer_error(descriptor, error.into()))?
        };
        let diff_id = match annotated {
            Some(diff_id) => diff_id,
            None => job
                .config_diff_ids
                .get(job.index)
                .and_then(|d| d.parse().ok())
                .ok_or_else(|| {
                    self.layer_error(descriptor, LayerError::MissingDiffId(job.index))
                })?,
        };
        let reused = self
            .destination
            .reuse_blob(descriptor)
            .await
            .map_err(|error| self.destination_error(error))?;
        let outcome = match reused {
            Some(outcome) => outcome,
            None => {
                let file = self.fetch_to_file(job).await?;
                let stored = self
                    .destination
                    .put_blob(descriptor, BlobData::File(file.clone()))
                    .await;
                let _ = std::fs::remove_file(&file);
                stored.map_err(|error| self.destination_error(error))?
            }
        };
        (self.progress)(&ConvertEvent::BlobStored {
            id: Some(job.id),
            what: "EROFS layer (copied)",
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            outcome,
        });
        Ok(LayerDone {
            descriptor: descriptor.clone(),
            diff_id,
            converted: false,
            chunks: None,
            outcome,
        })
    }

    /// Fetches a layer blob into a work file, verified.
    async fn fetch_to_file(&self, job: LayerJob<'_>) -> Result<PathBuf, ImageConvertError> {
        let path = self.work.path().join(format!("{}.source", job.id));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|error| self.layer_error(job.descriptor, io_at(&path)(error)))?;
        (self.progress)(&ConvertEvent::LayerFetching {
            id: job.id,
            index: job.index,
            digest: job.descriptor.digest.clone(),
            size: job.descriptor.size,
        });
        let (id, size) = (job.id, job.descriptor.size);
        let mut sink = CountingSink::new(FileSink { file }, size, |received| {
            (self.progress)(&ConvertEvent::LayerBytes { id, received, size })
        });
        let fetched = self.source.fetch_blob(job.descriptor, &mut sink).await;
        let flushed = sink.into_inner().file.flush().await;
        match (fetched, flushed) {
            (Ok(_), Ok(())) => Ok(path),
            (Err(error), _) => {
                let _ = std::fs::remove_file(&path);
                Err(self.source_error(error))
            }
            (Ok(_), Err(error)) => {
                let _ = std::fs::remove_file(&path);
                Err(self.layer_error(job.descriptor, io_at(&path)(error)))
            }
        }
    }
}

/// Converts the tar layer in `source` (removed once read) into a chunked EROFS blob in `work`;
/// returns what was written and the blob's path.
fn convert_file(
    source: &Path,
    work: &Path,
    id: usize,
    convert: &ConvertOptions,
    chunked: &ChunkedLayerOptions,
) -> Result<(ChunkedLayer, PathBuf), LayerError> {
    let erofs = work.join(format!("{id}.erofs"));
    let input = File::open(source).map_err(io_at(source))?;
    let summary = convert_layer(input, &erofs, convert).map_err(LayerError::Convert);
    let _ = std::fs::remove_file(source);
    let summary = summary?;
    let blob = work.join(format!("{id}.blob"));
    let written = (|| -> Result<ChunkedLayer, LayerError> {
        let image = BufReader::new(File::open(&erofs).map_err(io_at(&erofs))?);
        let mut out = BufWriter::new(File::create(&blob).map_err(io_at(&blob))?);
        let layer = write_chunked_layer(image, &mut out, chunked)?;
        out.flush().map_err(io_at(&blob))?;
        Ok(layer)
    })();
    let _ = std::fs::remove_file(&erofs);
    let layer = written.inspect_err(|_| {
        let _ = std::fs::remove_file(&blob);
    })?;
    // Two hashes of one image, by two writers: they must agree, or the DiffID would lie.
    if layer.uncompressed_digest.hex() != summary.digest {
        let _ = std::fs::remove_file(&blob);
        return Err(LayerError::ImageMismatch {
            chunked: layer.uncompressed_digest,
            converted: summary.oci_digest(),
        });
    }
    debug!(
        entries = summary.entries,
        image = summary.size,
        blob = layer.size,
        chunks = layer.chunk_count,
        "converted layer"
    );
    Ok((layer, blob))
}

/// Writes a downloading blob into a work file.
struct FileSink {
    file: tokio::fs::File,
}

fn local_failure(error: io::Error) -> SinkError {
    SinkError {
        fatal: true,
        message: format!("writing the work file: {error}"),
    }
}

impl BlobSink for FileSink {
    async fn write(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        self.file.write_all(&chunk).await.map_err(local_failure)
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        self.file.set_len(0).await.map_err(local_failure)?;
        self.file.rewind().await.map_err(local_failure)?;
        Ok(())
    }
}
