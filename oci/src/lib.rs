//! OCI images for Gantry: everything about images that is not the agent's policy.
//!
//! - [`reference`](mod@reference): image references (`host[:port]/repo:tag@digest`, Docker Hub short names) and
//!   content digests.
//! - [`manifest`]: descriptors, image manifests, indexes, configs, platform selection.
//! - [`source`]: what an image source provides ([`ImageSource`]) and how blobs are verified.
//! - [`destination`]: what an image destination provides ([`ImageDestination`]).
//! - [`layout`]: OCI image layout directories as a source and a destination.
//! - [`fsutil`]: atomic, durable file replacement.
//! - [`builder`]: tar layers and OCI layouts described in code (default images, tests, bundles).
//! - [`compression`]: tar / tar+gzip / tar+zstd detection and the decompression cap.
//! - [`tar_stream`]: a streaming tar reader hardened for untrusted layers.
//! - [`ztoc`]: random access into gzip layers (checkpoints, span digests) for lazy loading
//!   without conversion.
//! - [`convert`]: an OCI layer converted into an EROFS image ([`convert_layer`]), with
//!   whiteouts and opaque directories for overlayfs.
//! - [`chunked`]: the lazy EROFS layer format (erofs-image-spec v1): media types, the chunk
//!   index, the `+zstd` blob writer, chunk and whole-blob decoding.
//! - [`layer_index`]: a lazy layer's chunk map in either lazy format (chunked EROFS, or a gzip
//!   layer's synthesized image): which blob bytes hold a chunk, and how they are verified.
//! - [`image_convert`]: whole images converted into the lazy EROFS format (every layer through
//!   `convert` and `chunked`) and written to a destination (registry or layout).
//! - [`registry`]: the distribution API client: auth, credentials, mirrors, retries, ranged
//!   blob reads, pushes.
//!
//! Imports point one way: `reference` ← `manifest` ← {`source`, `destination`} ←
//! {`layout`, `registry`};
//! `compression`, `tar_stream` ← `convert` (which writes through `gantry-erofs`);
//! `tar_stream`, `convert` ← `ztoc`;
//! `reference`, `manifest` ← `chunked`; `chunked`, `ztoc` ← `layer_index`; everything but `builder` ← `image_convert`.

pub mod builder;
pub mod chunked;
pub mod compression;
pub mod convert;
pub mod destination;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod image_convert;
pub mod layer_index;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod source;
pub mod tar_stream;
pub mod ztoc;

pub use convert::{ConvertError, ConvertOptions, ConvertSummary, convert_layer};
pub use destination::{BlobData, BlobOutcome, EncodedManifest, ImageDestination};
pub use reference::{Digest, ImageLocation, Reference};
pub use source::{BlobSink, BlobVerifier, FetchedManifest, ImageSource, SinkError, VerifyError};
