//! The lazy EROFS layer format of the draft erofs-image-spec v1: `application/vnd.erofs+zstd`
//! (zstd frames, one per chunk, then the chunk index in a skippable frame) and the raw
//! `application/vnd.erofs` (the image, then the raw index). containerd's older names
//! (`application/vnd.erofs.layer.v1+zstd`, `dev.containerd.erofs.zstd…`) are read as the zstd
//! form; Gantry writes only the spec's.
//!
//! The trust chain of a lazy read: the manifest's digest covers the layer descriptor, whose
//! `org.erofs.chunk-index.digest` covers the index payload ([`IndexLocation::parse`]), whose
//! SHA-256 per chunk covers that chunk's stored bytes ([`ChunkIndex::decode_chunk_into`]).
//!
//! - `media`: media types, annotation names, [`erofs_layer_kind`].
//! - `frame`: zstd data and skippable frames.
//! - `index`: the chunk-index binary format: parse, validate, serialize, look up.
//! - `location`: where a descriptor says the index is, and the checks on the fetched section.
//! - `decode`: decoding one chunk (lazy) or a whole blob (eager).
//! - `writer`: writing an image as a `+zstd` layer blob.
//!
//! Imports point one way: `media` ← `error` ← `index` ← {`location`, `decode`, `writer`}, with
//! `frame` and `hashing` below all three.

mod decode;
mod error;
mod frame;
mod hashing;
mod index;
mod location;
mod media;
mod writer;

pub use decode::decode_whole_layer;
pub use error::ChunkedError;
pub use index::{ChunkEntry, ChunkIndex, INDEX_HEADER_LEN, MAX_CHUNK_LEN, MAX_STORED_CHUNK_LEN};
pub use location::{IndexLocation, MAX_INDEX_SECTION_LEN, layer_diff_id};
pub use media::{
    ANNOTATION_INDEX_DIGEST, ANNOTATION_INDEX_MEDIA_TYPE, ANNOTATION_INDEX_RANGE,
    ANNOTATION_UNCOMPRESSED_DIGEST, ChunkCompression, DEFAULT_CHUNK_SIZE, MEDIA_TYPE_CHUNK_INDEX,
    MEDIA_TYPE_EROFS, MEDIA_TYPE_EROFS_ZSTD, erofs_layer_kind,
};
pub use writer::{ChunkedLayer, ChunkedLayerOptions, write_chunked_layer};
