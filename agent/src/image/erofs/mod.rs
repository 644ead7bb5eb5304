//! Gantry's EROFS image writer (uncompressed, 4 KiB blocks, compatible with Linux 6.1).
//!
//! [`format`] has the on-disk structures, [`tree`] the in-memory file tree an image is made
//! from, and [`writer`] the streaming writer that lays both out.
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
//!   `ConvertOptions::detect_holes = false` stores zeros instead.
//! - Deterministic: every byte follows from the tar bytes. The uuid and volume name are zero,
//!   there is no superblock checksum, and the build time comes from the tree.
//!
//! # Known limits
//!
//! - Data blocks of a file replaced by a later tar entry stay in the image, unreferenced.
//! - Xattr namespaces Linux 6.1 EROFS cannot name (anything but `user.`, `trusted.`,
//!   `security.`, `lustre.` and the two POSIX ACL names) are dropped with a warning, as are
//!   `trusted.overlay.*` xattrs from the tar (only OCI whiteouts make overlay metadata).
//!   `LIBARCHIVE.xattr.*` pax records are not read.
//! - erofs-utils 1.5's `fsck.erofs --extract` mis-extracts files with holes (it skips holes
//!   without seeking) and drops setuid/setgid (it chowns after chmod); the images are correct
//!   for the kernel and for erofs-rs. Since that fsck also reads 12 bytes after every inode,
//!   the writer keeps that much image after the last one.

pub mod format;
pub mod tree;
pub mod writer;
