//! An EROFS image writer in pure Rust: streaming, deterministic, uncompressed, 4 KiB blocks,
//! mountable by Linux 6.1 and later.
//!
//! No crate on crates.io writes EROFS (readers exist, e.g. `erofs-rs`), so Gantry wrote this one for
//! converting container image layers on an offload card; it has no dependency on the rest of
//! Gantry and no `unsafe`. File data is streamed into the image as it arrives, so memory grows
//! with the number of entries, never with the size of the files.
//!
//! - [`format`](mod@format): the on-disk structures (superblock, inodes, directory entries, xattrs).
//! - [`tree`]: the in-memory file tree (metadata only) an image is made from.
//! - [`writer`]: [`ImageWriter`], which streams file data first and lays out the metadata last.
//!
//! # Example
//!
//! ```
//! use gantry_erofs::format::{BLOCK_SIZE, EXTENDED_INODE_SIZE};
//! use gantry_erofs::tree::{Metadata, Node, NodeKind, ROOT, Tree};
//! use gantry_erofs::ImageWriter;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // Read and write: the writer hashes the finished image by reading it back.
//! let output = std::fs::OpenOptions::new()
//!     .read(true)
//!     .write(true)
//!     .create_new(true)
//!     .open(dir.path().join("hello.erofs"))?;
//! let mut writer = ImageWriter::new(output, tempfile::tempfile()?, true)?;
//!
//! // File data goes into the image first; the tree remembers where it went.
//! let greeting = b"hello from EROFS\n";
//! let max_inline_tail = BLOCK_SIZE - EXTENDED_INODE_SIZE;
//! let data = writer.write_file_data(&mut &greeting[..], greeting.len() as u64, max_inline_tail)?;
//! let mut tree = Tree::new();
//! let meta = Metadata { permissions: 0o644, ..Metadata::implicit_directory() };
//! let file = tree.add(Node { meta, kind: NodeKind::Regular(data) }).expect("room in the tree");
//! tree.set_child(ROOT, b"greeting", file);
//!
//! // Then the directories, inodes and superblock.
//! let image = writer.finish(&tree)?;
//! assert_eq!(image.size % BLOCK_SIZE as u64, 0);
//! assert_eq!(image.inodes, 2);
//! // Mount it with `mount -t erofs -o loop hello.erofs /mnt`: /mnt/greeting holds the greeting.
//! # Ok(())
//! # }
//! ```
//!
//! # Image layout
//!
//! ```text
//! block 0          superblock at byte 1024 (written last)
//! blocks 1..       regular-file data, in tar order, written while the tar streams
//! then             directory blocks and symlinks too long to inline
//! then             shared xattrs (xattrs carried by two or more inodes)
//! meta_blkaddr..   inodes, each followed by its inline xattrs and then its inline tail
//!                  (last partial block of a file, directory or symlink) or its block map
//! ```
//!
//! - Inodes are compact (32 bytes) unless they need the extended form: uid/gid or nlink over
//!   65535, size of 4 GiB or more, or an mtime other than the superblock's build time, which
//!   is the most common mtime of the tree (so most inodes are compact).
//! - An inode and everything after it stays within one block when it fits in one (the kernel
//!   refuses inline data that crosses a block); inodes are placed best-fit into the metadata
//!   blocks, so padding costs little. The root is always nid 0 (Linux 6.1 has a 16-bit
//!   `root_nid`).
//! - Holes: all-zero regions of regular files become holes of a chunk-based inode (4-byte
//!   block map, `EROFS_NULL_ADDR`). The hole granularity is a power-of-two number of blocks
//!   chosen per file so the block map has at most 16 Ki entries (4 KiB granularity up to
//!   64 MiB files). This covers sparse files from any tar format and zero-filled files alike;
//!   `ImageWriter::new(.., false)` stores zeros instead.
//! - Deterministic: every byte follows from the tar bytes. The uuid and volume name are zero,
//!   there is no superblock checksum, and the build time comes from the tree.
//!
//! # Known limits
//!
//! - Data blocks of a file replaced by a later tar entry stay in the image, unreferenced.
//! - Xattr namespaces Linux 6.1 EROFS cannot name (anything but `user.`, `trusted.`,
//!   `security.`, `lustre.` and the two POSIX ACL names) cannot be expressed (see
//!   [`format::xattr_index`]); callers decide what to do with them.
//! - erofs-utils 1.5's `fsck.erofs --extract` mis-extracts files with holes (it skips holes
//!   without seeking) and drops setuid/setgid (it chowns after chmod); the images are correct
//!   for the kernel and for erofs-rs. Since that fsck also reads 12 bytes after every inode,
//!   the writer keeps that much image after the last one.

#![forbid(unsafe_code)]

pub mod format;
pub mod tree;
pub mod writer;

pub use writer::{FinishedImage, ImageWriter, WriterError};
