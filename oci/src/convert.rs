//! Converts an OCI layer (tar, tar+gzip, tar+zstd) into an EROFS image.
//!
//! The tar is read once, as a stream: file data goes straight into the image, the tree of
//! metadata is kept in memory and written at the end. Layer semantics follow the OCI image
//! spec and what Docker's extractor does:
//! - `.wh.NAME` becomes an overlayfs whiteout (character device 0:0) named `NAME`;
//!   `.wh..wh..opq` makes its directory opaque (`trusted.overlay.opaque=y`). A whiteout only
//!   hides lower layers: a real entry of the same layer wins over it, in either order.
//!   The lowest layer of an image has nothing below it to hide: with
//!   [`ConvertOptions::lowest_layer`] its whiteouts and opaque markers are dropped, as the
//!   erofs-image-spec requires of a bottom layer (§3.6).
//! - A later entry for the same path replaces the earlier one (a directory over a directory
//!   only updates its attributes, as extraction does). Data blocks of replaced files stay in
//!   the image, unreferenced.
//! - Input is untrusted: absolute paths, `..` components, hard links to missing or directory
//!   targets, impossible sizes, corrupt or truncated streams and decompression bombs end the
//!   conversion with an error naming the entry; nothing is ever written outside the output.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::compression::{self, CappedReader, Compression, CompressionError, SizeCapExceeded};
use crate::tar_stream::{TarEntry, TarError, TarStream};
use gantry_erofs::format::{self, BLOCK_SIZE, EXTENDED_INODE_SIZE, MAX_NAME_LEN};
use gantry_erofs::tree::{
    Directory, FileData, Metadata, Node, NodeId, NodeKind, ROOT, Tree, Xattr,
};
use gantry_erofs::writer::{self, ImageWriter, WriterError};

/// Limits and switches for [`convert_layer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Largest uncompressed tar stream accepted (the decompression-bomb cap).
    pub max_uncompressed_size: u64,
    /// Most tar entries accepted (memory grows with entries).
    pub max_entries: u64,
    /// Most bytes of long names, pax records and sparse maps per entry.
    pub max_entry_metadata: u64,
    /// Store all-zero 4 KiB blocks of regular files as holes (chunk-based inodes).
    pub detect_holes: bool,
    /// fsync the image before renaming it into place.
    pub sync: bool,
    /// The layer is its image's lowest: drop its whiteouts and opaque markers (they would hide
    /// nothing), rather than writing overlayfs whiteouts.
    pub lowest_layer: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            max_uncompressed_size: 64 << 30,
            max_entries: 4 << 20,
            max_entry_metadata: 1 << 20,
            detect_holes: true,
            sync: false,
            lowest_layer: false,
        }
    }
}

/// What a conversion produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertSummary {
    /// SHA-256 of the image bytes, lowercase hex.
    pub digest: String,
    /// Image size in bytes.
    pub size: u64,
    /// Tar entries read (members, not extension headers).
    pub entries: u64,
    /// Inodes in the image.
    pub inodes: u64,
    /// Detected compression of the input.
    pub compression: Compression,
    /// Size of the uncompressed tar stream.
    pub uncompressed_size: u64,
}

impl ConvertSummary {
    /// The digest in OCI form, `sha256:<hex>`.
    pub fn oci_digest(&self) -> String {
        format!("sha256:{}", self.digest)
    }
}

/// Why one entry was rejected.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The path starts with `/`.
    #[error("absolute path")]
    AbsolutePath,
    /// The path has a `..` component.
    #[error("path has a '..' component")]
    DotDot,
    /// The path has a NUL byte.
    #[error("path has a NUL byte")]
    NulByte,
    /// A path component exceeds 255 bytes.
    #[error("a path component is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    /// An entry for the root that is not a directory.
    #[error("the layer root must be a directory")]
    RootNotDirectory,
    /// A parent component exists and is not a directory.
    #[error("parent {0} is not a directory")]
    ParentNotDirectory(String),
    /// A hard link's target path is invalid.
    #[error("hard link target {target}: {reason}")]
    HardlinkTarget {
        /// Target path.
        target: String,
        /// What is wrong with it.
        reason: Box<EntryError>,
    },
    /// A hard link's target is not in the layer (so far).
    #[error("hard link target {0} does not exist in the layer")]
    HardlinkTargetMissing(String),
    /// A hard link's target is a directory or a whiteout.
    #[error("hard link target {0} is a directory or a whiteout")]
    HardlinkTargetNotFile(String),
    /// A link entry without a target.
    #[error("link without a target")]
    MissingLinkTarget,
    /// A symlink target is too long for Linux.
    #[error("symlink target is longer than 4095 bytes")]
    SymlinkTooLong,
    /// A whiteout with an empty, `.` or `..` name, or a whiteout used as a directory.
    #[error("invalid whiteout")]
    InvalidWhiteout,
    /// An entry type the converter does not handle.
    #[error("unsupported entry type {0:?}")]
    UnsupportedType(char),
    /// A uid, gid or device number out of range.
    #[error("{field} {value} is out of range")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// An xattr EROFS cannot hold.
    #[error("xattr {name}: {problem}")]
    Xattr {
        /// Full xattr name.
        name: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// The entry declares more data than the size cap allows.
    #[error("size {size} exceeds the uncompressed size cap of {cap} bytes")]
    ImpossibleSize {
        /// Declared size.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// Storing the entry's data failed.
    #[error("{0}")]
    Data(#[source] WriterError),
}

/// Errors of [`convert_layer`].
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The input's compression could not be detected or is not supported.
    #[error(transparent)]
    Compression(#[from] CompressionError),
    /// The uncompressed stream exceeded the configured cap.
    #[error("{cap} (while reading {context})")]
    SizeCap {
        /// The cap error.
        cap: SizeCapExceeded,
        /// Where it happened.
        context: String,
    },
    /// A tar entry was rejected.
    #[error("tar entry #{index} {path}: {reason}")]
    Entry {
        /// 1-based entry number.
        index: u64,
        /// The entry's path as stored (escaped).
        path: String,
        /// Why.
        reason: EntryError,
    },
    /// The tar structure is broken.
    #[error("tar stream after entry #{index} {path}: {source}")]
    Tar {
        /// Number of the last good entry (0 if none).
        index: u64,
        /// Path of the last good entry.
        path: String,
        /// What broke.
        #[source]
        source: TarError,
    },
    /// More entries than allowed.
    #[error("the layer has more than {0} entries")]
    TooManyEntries(u64),
    /// Bytes after the archive failed to decode (a corrupt compressed trailer).
    #[error("reading past the end of the tar archive: {0}")]
    Trailer(#[source] io::Error),
    /// The output could not be created or renamed into place.
    #[error("output {path}: {source}")]
    Output {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing the image failed.
    #[error("writing the image: {0}")]
    Writer(#[from] WriterError),
}

/// Converts the layer read from `input` into an EROFS image at `output`.
///
/// The image is written next to `output` under a temporary name and renamed into place only
/// when complete, so `output` never holds a partial image.
pub fn convert_layer(
    input: impl Read,
    output: &Path,
    options: &ConvertOptions,
) -> Result<ConvertSummary, ConvertError> {
    let output_error = |path: &Path, source| ConvertError::Output {
        path: path.to_path_buf(),
        source,
    };
    let file_name = output
        .file_name()
        .ok_or_else(|| output_error(output, io::Error::other("not a file path")))?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let unique = crate::fsutil::unique_suffix();
    let mut partial_name = std::ffi::OsString::from(".");
    partial_name.push(file_name);
    let mut spool_name = partial_name.clone();
    partial_name.push(format!(".partial-{unique}"));
    spool_name.push(format!(".tails-{unique}"));
    let partial = dir.join(partial_name);
    let spool_path = dir.join(spool_name);

    let create = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| output_error(path, e))
    };
    let spool = create(&spool_path)?;
    // The spool only lives as long as its descriptor.
    fs::remove_file(&spool_path).map_err(|e| output_error(&spool_path, e))?;
    let image = create(&partial)?;

    let result = convert_to_file(input, image, spool, options).and_then(|(summary, file)| {
        if options.sync {
            file.sync_all().map_err(|e| output_error(&partial, e))?;
        }
        drop(file);
        fs::rename(&partial, output).map_err(|e| output_error(output, e))?;
        Ok(summary)
    });
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

/// Converts the layer from `input` into `image` (truncated first), using `spool` as scratch
/// space for inline tails. Returns the summary and the image file.
pub fn convert_to_file(
    input: impl Read,
    image: File,
    spool: File,
    options: &ConvertOptions,
) -> Result<(ConvertSummary, File), ConvertError> {
    let (compression, decoded) = compression::decoder(input)?;
    let (capped, limits) = CappedReader::new(decoded, options.max_uncompressed_size);
    let writer = ImageWriter::new(image, spool, options.detect_holes).map_err(WriterError::Io)?;
    let tar = TarStream::new(capped, options.max_entry_metadata);
    let LayerTree {
        tree,
        writer,
        members: tar,
        entries,
    } = build_tree(tar, writer, options)?;

    // Read to the end so a corrupt gzip/zstd trailer or checksum is noticed.
    let mut rest = tar.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| match size_cap(&e) {
        Some(cap) => ConvertError::SizeCap {
            cap,
            context: "the end of the stream".into(),
        },
        None => ConvertError::Trailer(e),
    })?;
    let uncompressed_size = limits.total();

    let image = writer.finish(&tree)?;
    let summary = ConvertSummary {
        digest: image.digest.iter().map(|b| format!("{b:02x}")).collect(),
        size: image.size,
        entries,
        inodes: image.inodes,
        compression,
        uncompressed_size,
    };
    debug!(?summary, "converted layer");
    Ok((summary, image.file))
}

/// Whether an I/O error is the size cap tripping.
fn size_cap(error: &io::Error) -> Option<SizeCapExceeded> {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<SizeCapExceeded>())
        .copied()
}

/// Escaped display of a path that may not be UTF-8.
fn escaped(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// Longest xattr name Linux accepts (`XATTR_NAME_MAX`).
const XATTR_NAME_MAX: usize = 255;

/// An xattr's prefix index and name.
type XattrKey = (u8, Box<[u8]>);

/// Where the converter's tar members and their file data come from: the tar stream itself
/// (data copied into the image), or a layer's file table (data placed, fetched later).
pub(crate) trait Members {
    /// The next member; `None` at the end of the archive.
    fn next_member(&mut self) -> Result<Option<TarEntry>, TarError>;

    /// Places the data of the member just returned, `size` bytes, in the image; the last
    /// partial block may go inline if it is at most `max_inline_tail` bytes.
    fn place_data(
        &mut self,
        writer: &mut ImageWriter,
        size: u64,
        max_inline_tail: usize,
    ) -> Result<FileData, WriterError>;
}

impl<R: Read> Members for TarStream<R> {
    fn next_member(&mut self) -> Result<Option<TarEntry>, TarError> {
        self.next_entry()
    }

    fn place_data(
        &mut self,
        writer: &mut ImageWriter,
        size: u64,
        max_inline_tail: usize,
    ) -> Result<FileData, WriterError> {
        writer.write_file_data(&mut self.data(), size, max_inline_tail)
    }
}

/// A layer's tree, with the writer holding its data blocks, ready for
/// [`ImageWriter::finish`].
pub(crate) struct LayerTree<M> {
    /// The file tree, with OCI layer semantics applied.
    pub tree: Tree,
    /// The writer, data placed.
    pub writer: ImageWriter,
    /// The member source, at the end of the archive.
    pub members: M,
    /// Members read.
    pub entries: u64,
}

/// Reads every member of `members` into a tree, placing file data through `writer`.
pub(crate) fn build_tree<M: Members>(
    members: M,
    writer: ImageWriter,
    options: &ConvertOptions,
) -> Result<LayerTree<M>, ConvertError> {
    let mut converter = Converter {
        tree: Tree::new(),
        writer,
        options,
        members,
        entries: 0,
        last_path: Vec::new(),
    };
    converter.run()?;
    Ok(LayerTree {
        tree: converter.tree,
        writer: converter.writer,
        members: converter.members,
        entries: converter.entries,
    })
}

struct Converter<'o, M> {
    tree: Tree,
    writer: ImageWriter,
    options: &'o ConvertOptions,
    members: M,
    entries: u64,
    last_path: Vec<u8>,
}

impl<M: Members> Converter<'_, M> {
    fn run(&mut self) -> Result<(), ConvertError> {
        loop {
            let entry = match self.members.next_member() {
                Ok(Some(entry)) => entry,
                Ok(None) => return Ok(()),
                Err(source) => return Err(self.tar_error(source)),
            };
            self.entries += 1;
            if self.entries > self.options.max_entries {
                return Err(ConvertError::TooManyEntries(self.options.max_entries));
            }
            if let Err(reason) = self.add_entry(&entry) {
                let path = escaped(&entry.path);
                if let EntryError::Data(WriterError::Read(e)) = &reason
                    && let Some(cap) = size_cap(e)
                {
                    return Err(ConvertError::SizeCap {
                        cap,
                        context: format!("tar entry #{} {path}", self.entries),
                    });
                }
                return Err(ConvertError::Entry {
                    index: self.entries,
                    path,
                    reason,
                });
            }
            self.last_path = entry.path;
        }
    }

    fn tar_error(&self, source: TarError) -> ConvertError {
        let context = || {
            if self.entries == 0 {
                "the first tar header".to_string()
            } else {
                format!(
                    "tar data after entry #{} {}",
                    self.entries,
                    escaped(&self.last_path)
                )
            }
        };
        if let TarError::Io(e) = &source
            && let Some(cap) = size_cap(e)
        {
            return ConvertError::SizeCap {
                cap,
                context: context(),
            };
        }
        ConvertError::Tar {
            index: self.entries,
            path: escaped(&self.last_path),
            source,
        }
    }

    fn add_entry(&mut self, entry: &TarEntry) -> Result<(), EntryError> {
        if entry.type_flag == b'V' {
            // A GNU volume label names the archive, not a file.
            return Ok(());
        }
        let components = split_path(&entry.path)?;
        let Some((&name, parents)) = components.split_last() else {
            return self.set_root(entry);
        };

        // aufs bookkeeping (.wh..wh.plnk and friends) is not content.
        if components
            .iter()
            .any(|c| c.starts_with(b".wh..wh.") && *c != b".wh..wh..opq")
        {
            debug!(path = %escaped(&entry.path), "skipping aufs metadata");
            return Ok(());
        }
        if parents.iter().any(|c| c.starts_with(b".wh.")) {
            return Err(EntryError::InvalidWhiteout);
        }
        if name == b".wh..wh..opq" {
            if self.options.lowest_layer {
                debug!(path = %escaped(&entry.path), "opaque marker of the lowest layer dropped");
                return Ok(());
            }
            let dir = self.ensure_directories(parents)?;
            if let Some(d) = self.tree.directory_mut(dir) {
                d.opaque = true;
            }
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(EntryError::InvalidWhiteout);
            }
            if self.options.lowest_layer {
                // Like an extractor on an empty root: nothing to delete, no directory made.
                debug!(path = %escaped(&entry.path), "whiteout of the lowest layer dropped");
                return Ok(());
            }
            let parent = self.ensure_directories(parents)?;
            let mut meta = self.metadata(entry, false)?;
            meta.xattrs.clear();
            let node = Node {
                meta,
                kind: NodeKind::Whiteout,
            };
            return self.place(parent, hidden, node);
        }

        let parent = self.ensure_directories(parents)?;
        let type_flag = effective_type(entry);
        if type_flag == b'1' {
            return self.add_hardlink(entry, parent, name);
        }
        let is_dir = type_flag == b'5';
        let meta = self.metadata(entry, is_dir)?;
        let opaque = is_dir && has_opaque_marker(entry);
        let kind = match type_flag {
            b'0' => {
                let cap = self.options.max_uncompressed_size;
                if entry.size > cap {
                    return Err(EntryError::ImpossibleSize {
                        size: entry.size,
                        cap,
                    });
                }
                // Inline tails must fit in one block with the inode (extended in the worst
                // case) and its xattrs (all inline in the worst case).
                let max_inline = BLOCK_SIZE
                    .saturating_sub(EXTENDED_INODE_SIZE + writer::inline_xattr_size(&meta.xattrs));
                let data = self
                    .members
                    .place_data(&mut self.writer, entry.size, max_inline)
                    .map_err(EntryError::Data)?;
                NodeKind::Regular(data)
            }
            b'5' => NodeKind::Directory(Directory {
                entries: BTreeMap::new(),
                opaque,
            }),
            b'2' => {
                let target = &entry.link_name;
                if target.is_empty() {
                    return Err(EntryError::MissingLinkTarget);
                }
                if target.contains(&0) {
                    return Err(EntryError::NulByte);
                }
                if target.len() >= BLOCK_SIZE {
                    return Err(EntryError::SymlinkTooLong);
                }
                NodeKind::Symlink(target.as_slice().into())
            }
            b'3' | b'4' => {
                let major = device_number("device major", entry.dev_major, format::MAX_DEV_MAJOR)?;
                let minor = device_number("device minor", entry.dev_minor, format::MAX_DEV_MINOR)?;
                if type_flag == b'3' {
                    NodeKind::CharDevice { major, minor }
                } else {
                    NodeKind::BlockDevice { major, minor }
                }
            }
            b'6' => NodeKind::Fifo,
            other => return Err(EntryError::UnsupportedType(char::from(other))),
        };
        self.place(parent, name, Node { meta, kind })
    }

    /// An entry for the root (`./`): only attributes change.
    fn set_root(&mut self, entry: &TarEntry) -> Result<(), EntryError> {
        match effective_type(entry) {
            b'5' => {
                let meta = self.metadata(entry, true)?;
                let opaque = has_opaque_marker(entry);
                let root = self.tree.node_mut(ROOT);
                root.meta = meta;
                if let NodeKind::Directory(dir) = &mut root.kind {
                    dir.opaque |= opaque;
                }
                Ok(())
            }
            _ => Err(EntryError::RootNotDirectory),
        }
    }

    /// Walks to the directory `components`, creating missing directories as a tar extractor
    /// does. A whiteout in the way becomes an opaque directory: the layer deletes the lower
    /// path and creates a new directory there.
    fn ensure_directories(&mut self, components: &[&[u8]]) -> Result<NodeId, EntryError> {
        let mut dir = ROOT;
        for (i, &name) in components.iter().enumerate() {
            let next = match self.tree.child(dir, name) {
                Some(child) => match &self.tree.node(child).kind {
                    NodeKind::Directory(_) => child,
                    NodeKind::Whiteout => self.new_directory(dir, name, true)?,
                    _ => {
                        return Err(EntryError::ParentNotDirectory(escaped(
                            &components[..=i].join(&b'/'),
                        )));
                    }
                },
                None => self.new_directory(dir, name, false)?,
            };
            dir = next;
        }
        Ok(dir)
    }

    fn new_directory(
        &mut self,
        parent: NodeId,
        name: &[u8],
        opaque: bool,
    ) -> Result<NodeId, EntryError> {
        let node = Node {
            meta: Metadata::implicit_directory(),
            kind: NodeKind::Directory(Directory {
                entries: BTreeMap::new(),
                opaque,
            }),
        };
        let id = self.add_node(node)?;
        self.tree.set_child(parent, name, id);
        Ok(id)
    }

    fn add_node(&mut self, node: Node) -> Result<NodeId, EntryError> {
        self.tree.add(node).ok_or(EntryError::OutOfRange {
            field: "node count",
            value: u64::from(u32::MAX),
        })
    }

    /// Links `node` as `name` in `parent`, with tar-extraction semantics for an existing entry.
    fn place(&mut self, parent: NodeId, name: &[u8], node: Node) -> Result<(), EntryError> {
        if let Some(existing) = self.tree.child(parent, name) {
            let old = self.tree.node_mut(existing);
            match (&mut old.kind, &node.kind) {
                // Extracting a directory over a directory keeps its content.
                (NodeKind::Directory(old_dir), NodeKind::Directory(new_dir)) => {
                    old_dir.opaque |= new_dir.opaque;
                    old.meta = node.meta;
                    return Ok(());
                }
                // A whiteout never hides an entry of its own layer.
                (old_kind, NodeKind::Whiteout) if !matches!(old_kind, NodeKind::Whiteout) => {
                    debug!("whiteout ignored: the same layer has the entry");
                    return Ok(());
                }
                _ => {}
            }
        }
        let id = self.add_node(node)?;
        self.tree.set_child(parent, name, id);
        Ok(())
    }

    fn add_hardlink(
        &mut self,
        entry: &TarEntry,
        parent: NodeId,
        name: &[u8],
    ) -> Result<(), EntryError> {
        let target_name = escaped(&entry.link_name);
        if entry.link_name.is_empty() {
            return Err(EntryError::MissingLinkTarget);
        }
        let target_components =
            split_path(&entry.link_name).map_err(|reason| EntryError::HardlinkTarget {
                target: target_name.clone(),
                reason: Box::new(reason),
            })?;
        let mut target = ROOT;
        for &component in &target_components {
            target = self
                .tree
                .child(target, component)
                .ok_or_else(|| EntryError::HardlinkTargetMissing(target_name.clone()))?;
        }
        if matches!(
            self.tree.node(target).kind,
            NodeKind::Directory(_) | NodeKind::Whiteout
        ) {
            return Err(EntryError::HardlinkTargetNotFile(target_name));
        }
        self.tree.set_child(parent, name, target);
        Ok(())
    }

    fn metadata(&self, entry: &TarEntry, is_dir: bool) -> Result<Metadata, EntryError> {
        let uid = u32::try_from(entry.uid).map_err(|_| EntryError::OutOfRange {
            field: "uid",
            value: entry.uid,
        })?;
        let gid = u32::try_from(entry.gid).map_err(|_| EntryError::OutOfRange {
            field: "gid",
            value: entry.gid,
        })?;
        // Keyed by (prefix index, name): a later record for the same name wins.
        let mut xattrs: BTreeMap<XattrKey, Box<[u8]>> = BTreeMap::new();
        for (full, value) in &entry.xattrs {
            let Some((index, name)) = format::split_xattr_name(full) else {
                warn!(
                    path = %escaped(&entry.path),
                    xattr = %escaped(full),
                    "dropping an xattr EROFS cannot store"
                );
                continue;
            };
            if index == format::xattr_index::TRUSTED && name.starts_with(b"overlay.") {
                // Overlay metadata comes only from OCI whiteouts (see has_opaque_marker);
                // other trusted.overlay.* from a layer could redirect lookups in the guest.
                if !(is_dir && name == b"overlay.opaque") {
                    warn!(path = %escaped(&entry.path), xattr = %escaped(full), "dropping overlay xattr");
                }
                continue;
            }
            // Linux's XATTR_NAME_MAX bounds the full name, which also keeps the suffix within
            // EROFS's 8-bit name length.
            if full.len() > XATTR_NAME_MAX {
                return Err(EntryError::Xattr {
                    name: escaped(full),
                    problem: "name longer than 255 bytes",
                });
            }
            if value.len() > usize::from(u16::MAX) {
                return Err(EntryError::Xattr {
                    name: escaped(full),
                    problem: "value larger than 65535 bytes",
                });
            }
            xattrs.insert((index, name.into()), value.as_slice().into());
        }
        let xattrs: Vec<Xattr> = xattrs
            .into_iter()
            .map(|((index, name), value)| Xattr { index, name, value })
            .collect();
        if format::xattr_icount(writer::inline_xattr_size(&xattrs)).is_none() {
            return Err(EntryError::Xattr {
                name: "(all)".into(),
                problem: "xattrs of one file exceed the 256 KiB EROFS can hold",
            });
        }
        Ok(Metadata {
            permissions: (entry.mode & 0o7777) as u16,
            uid,
            gid,
            mtime: entry.mtime,
            mtime_nsec: entry.mtime_nsec,
            xattrs,
        })
    }
}

/// The type flag after normalizing: regular-file variants to `'0'`, GNU dumpdir to `'5'`, and
/// an old-style regular entry whose name ends in `/` to a directory.
fn effective_type(entry: &TarEntry) -> u8 {
    match entry.type_flag {
        b'\0' if entry.path.ends_with(b"/") => b'5',
        b'\0' | b'7' | b'0' => b'0',
        b'D' => b'5',
        other => other,
    }
}

/// A `trusted.overlay.opaque=y` xattr in the tar itself (as some tools write opaque
/// directories) means the same as `.wh..wh..opq`.
fn has_opaque_marker(entry: &TarEntry) -> bool {
    entry
        .xattrs
        .iter()
        .any(|(name, value)| name == b"trusted.overlay.opaque" && value == b"y")
}

fn device_number(field: &'static str, value: u64, max: u32) -> Result<u32, EntryError> {
    u32::try_from(value)
        .ok()
        .filter(|&v| v <= max)
        .ok_or(EntryError::OutOfRange { field, value })
}

/// Splits a tar path into components, dropping empty and `.` components. Rejects absolute
/// paths, `..`, NUL bytes and over-long names.
pub fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, EntryError> {
    if path.first() == Some(&b'/') {
        return Err(EntryError::AbsolutePath);
    }
    if path.contains(&0) {
        return Err(EntryError::NulByte);
    }
    let mut components = Vec::new();
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(EntryError::DotDot),
            c if c.len() > MAX_NAME_LEN => return Err(EntryError::NameTooLong),
            c => components.push(c),
        }
    }
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_split_and_checked() {
        assert_eq!(
            split_path(b"./a//b/./c/").unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(split_path(b"./").unwrap().is_empty());
        assert!(matches!(split_path(b"/etc"), Err(EntryError::AbsolutePath)));
        assert!(matches!(split_path(b"a/../b"), Err(EntryError::DotDot)));
        assert!(matches!(split_path(b"a/\0"), Err(EntryError::NulByte)));
        assert!(matches!(
            split_path(&[b'x'; 256]),
            Err(EntryError::NameTooLong)
        ));
        assert_eq!(split_path(b"\xff\xfe").unwrap(), vec![&b"\xff\xfe"[..]]);
    }
}
