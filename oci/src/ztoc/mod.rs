//! Lazy loading of gzip layers as they are (no conversion): the index that makes a tar+gzip
//! blob readable at random, SOCI's zTOC in substance.
//!
//! - [`inflate`]: a raw inflate stream that can start mid-stream (zlib's priming and preset
//!   dictionary, through `libz-rs-sys`).
//! - [`zinfo`]: gzip checkpoints every span, built in one pass, span digests, and extraction of
//!   any uncompressed range from its spans alone.
//! - [`toc`]: the tar's file table with each member's data offset, read in the same pass.
//! - [`soci`]: SOCI's zinfo checkpoint blob (versions 1 and 2), and the mapping between a zTOC
//!   document and [`toc::Ztoc`] (types, times, PAX xattrs, span digests), checked both ways.
//! - [`fbs`]: SOCI's zTOC flatbuffer, verified, read and written field for field.
//! - [`synth`]: the synthesized EROFS layer laid out from the table (metadata complete, data
//!   blocks holes), and the map from its chunks to gzip spans that fills them.
//!
//! Imports point one way: `synth` → `toc` → `zinfo` → `inflate`; `soci` → `fbs`, `toc`, `zinfo`.

pub mod fbs;
pub mod inflate;
pub mod soci;
pub mod synth;
pub mod toc;
pub mod zinfo;
