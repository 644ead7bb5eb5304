//! Lazy loading of gzip layers as they are (no conversion): the index that makes a tar+gzip
//! blob readable at random, SOCI's zTOC in substance.
//!
//! - [`inflate`]: a raw inflate stream that can start mid-stream (zlib's priming and preset
//!   dictionary, through `libz-rs-sys`).
//! - [`zinfo`]: gzip checkpoints every span, built in one pass, span digests, and extraction of
//!   any uncompressed range from its spans alone.
//! - [`toc`]: the tar's file table with each member's data offset, read in the same pass.
//!
//! Still to come (issue 17): the SOCI flatbuffer format (read and write), the synthesized
//! EROFS layer laid out from the table, and its lazy block source.

pub mod inflate;
pub mod toc;
pub mod zinfo;
