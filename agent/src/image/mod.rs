//! Images: layer conversion into EROFS (and, later, registries and the chunked format).
//!
//! - [`compression`]: detects tar / tar+gzip / tar+zstd and caps the decoded size.
//! - [`tar_stream`]: a streaming tar reader hardened for untrusted layers.
//! - [`erofs`]: the EROFS writer.
//! - [`layer`]: the conversion of an OCI layer into an EROFS image ([`convert_layer`]).
//! - [`cli`]: `gantry-agent image convert-layer`.

pub mod builder;
pub mod cli;
pub mod compression;
pub mod erofs;
pub mod layer;
pub mod oci_layout;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod tar_stream;

pub use layer::{ConvertError, ConvertOptions, ConvertSummary, convert_layer};
