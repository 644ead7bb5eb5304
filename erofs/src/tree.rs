//! The in-memory file tree an image is built from.
//!
//! It holds metadata only: names, inode attributes, xattrs, symlink targets, and for regular
//! files where their data already sits in the image ([`FileData`]). File contents never live
//! here, so memory grows with the number of entries, not with the size of the layer.

use std::collections::BTreeMap;

/// Index of a node in a [`Tree`].
pub type NodeId = u32;

/// The root directory's id in every [`Tree`].
pub const ROOT: NodeId = 0;

/// One extended attribute, with its name already split into the EROFS prefix index and suffix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Xattr {
    /// EROFS name prefix index (see [`crate::format::xattr_index`]).
    pub index: u8,
    /// Name without the namespace prefix (at most 255 bytes).
    pub name: Box<[u8]>,
    /// Value (at most 65535 bytes).
    pub value: Box<[u8]>,
}

/// Attributes every inode has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub permissions: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Extended attributes, sorted, at most one per name.
    pub xattrs: Vec<Xattr>,
}

impl Metadata {
    /// Metadata of a directory that the archive never described (a missing parent): root-owned,
    /// `0755`, mtime 0 — fixed values so the image stays deterministic.
    pub fn implicit_directory() -> Self {
        Metadata {
            permissions: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }
}

/// A tail (the last, partial block of a file) kept in the tail spool until the metadata is
/// written, where it goes right after its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolRef {
    /// Offset in the spool file.
    pub offset: u64,
    /// Length in bytes (less than one block).
    pub len: u16,
}

/// A run of file blocks that are either stored consecutively in the image or all holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Index of the first file block of the run.
    pub file_block: u64,
    /// Number of blocks in the run.
    pub blocks: u64,
    /// Image block holding the first file block, `None` for a hole.
    pub disk_block: Option<u32>,
}

/// Where a regular file's data was placed while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataPlacement {
    /// Blocks stored consecutively from `start_block`; the last partial block is either among
    /// them (zero padded) or, if `tail` is set, inline after the inode.
    Flat {
        /// First data block (0 if the file has no data blocks).
        start_block: u32,
        /// Inline tail, if any.
        tail: Option<SpoolRef>,
    },
    /// The file has holes: runs of data and holes covering every block of the file.
    Chunked {
        /// Runs in file order.
        extents: Vec<Extent>,
    },
}

/// A regular file's size and data placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    /// Size in bytes.
    pub size: u64,
    /// Where the bytes are.
    pub placement: DataPlacement,
}

/// A directory's entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    /// Entries by name (sorted byte-wise, as EROFS requires), without `.` and `..`.
    pub entries: BTreeMap<Box<[u8]>, NodeId>,
    /// Whether the directory hides the content of lower layers (`trusted.overlay.opaque=y`).
    pub opaque: bool,
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Directory(Directory),
    /// A regular file.
    Regular(FileData),
    /// A symbolic link and its target.
    Symlink(Box<[u8]>),
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
    /// An overlayfs whiteout (written as a character device 0:0).
    Whiteout,
}

/// A file, directory or other inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Attributes.
    pub meta: Metadata,
    /// Type and type-specific content.
    pub kind: NodeKind,
}

/// A file tree, rooted at [`ROOT`]. Nodes that lose their last name stay in the arena (they are
/// not written); hard links are several names for one node.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    /// A tree with only an implicit root directory.
    pub fn new() -> Self {
        Tree {
            nodes: vec![Node {
                meta: Metadata::implicit_directory(),
                kind: NodeKind::Directory(Directory::default()),
            }],
        }
    }

    /// Number of nodes ever added, including unreachable ones.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The node with id `id`.
    ///
    /// # Panics
    /// If `id` did not come from this tree.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// The node with id `id`, mutably.
    ///
    /// # Panics
    /// If `id` did not come from this tree.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// Adds a node without linking it anywhere; `None` if the tree is full (2^32 nodes).
    pub fn add(&mut self, node: Node) -> Option<NodeId> {
        let id = NodeId::try_from(self.nodes.len()).ok()?;
        self.nodes.push(node);
        Some(id)
    }

    /// The directory `id`, if it is one.
    pub fn directory(&self, id: NodeId) -> Option<&Directory> {
        match &self.node(id).kind {
            NodeKind::Directory(dir) => Some(dir),
            _ => None,
        }
    }

    /// The directory `id`, mutably, if it is one.
    pub fn directory_mut(&mut self, id: NodeId) -> Option<&mut Directory> {
        match &mut self.node_mut(id).kind {
            NodeKind::Directory(dir) => Some(dir),
            _ => None,
        }
    }

    /// The child `name` of directory `dir`.
    pub fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.directory(dir)?.entries.get(name).copied()
    }

    /// Links `child` as `name` in directory `dir`, replacing an existing entry. Returns false
    /// if `dir` is not a directory.
    pub fn set_child(&mut self, dir: NodeId, name: &[u8], child: NodeId) -> bool {
        match self.directory_mut(dir) {
            Some(d) => {
                d.entries.insert(name.into(), child);
                true
            }
            None => false,
        }
    }
}
