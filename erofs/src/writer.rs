//! Writes an EROFS image in two phases, so memory never holds file data.
//!
//! 1. Streaming: [`ImageWriter::write_file_data`] stores each regular file's blocks at the next
//!    free block addresses as the bytes arrive (all-zero blocks become holes when hole detection
//!    is on), and puts a file's last partial block in a spool file if it can go inline.
//! 2. [`ImageWriter::finish`] lays out what only the whole tree determines, after the data:
//!    directory blocks, symlinks that do not fit inline, the shared xattr area, then the
//!    metadata area (inodes with their xattrs and inline tails), and finally the superblock in
//!    block 0, which points at all of it.
//!
//! Layout is a pure function of the tree and of the order data arrived in, so the same input
//! gives the same bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use crate::format::{
    self, BLOCK_MAP_ENTRY_SIZE, BLOCK_SIZE, BLOCK_SIZE_U64, COMPACT_INODE_SIZE, DIRENT_SIZE,
    DataLayout, EXTENDED_INODE_SIZE, FEATURE_INCOMPAT_CHUNKED_FILE, FileType, INODE_SLOT_SIZE,
    InodeFields, MAX_CHUNK_BITS, NULL_ADDR, SUPER_OFFSET, SuperBlock, XATTR_IBODY_HEADER_SIZE,
};
use crate::tree::{
    DataPlacement, Extent, FileData, Node, NodeId, NodeKind, ROOT, SpoolRef, Tree, Xattr,
};

/// Blocks read from a file's data per read call while streaming.
const STREAM_BUFFER_BLOCKS: usize = 256;
/// Capacity of the buffered writer in front of the image file.
const WRITE_BUFFER: usize = 1 << 20;
/// Xattrs larger than this are never shared, so a shared entry never crosses a block.
const MAX_SHARED_XATTR_ENTRY: usize = 1024;
/// At most this many shared xattr ids fit in an inode's xattr header (`h_shared_count`).
const MAX_SHARED_PER_INODE: usize = u8::MAX as usize;

/// Errors while writing an image.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// Writing or reading back the image or the tail spool failed.
    #[error("image I/O: {0}")]
    Io(#[from] io::Error),
    /// Reading a file's data from the input failed.
    #[error("reading file data: {0}")]
    Read(#[source] io::Error),
    /// A file's data ended early.
    #[error("file data ended after {got} of {expected} bytes")]
    Truncated {
        /// Declared size.
        expected: u64,
        /// Bytes actually available.
        got: u64,
    },
    /// The image would need block addresses beyond 32 bits (16 TiB).
    #[error("the image would exceed the 16 TiB an EROFS image with 4 KiB blocks can address")]
    ImageTooLarge,
    /// An inode's xattrs do not fit the inline xattr area (`i_xattr_icount` is 16 bits).
    #[error("the xattrs of one inode take more than the 256 KiB EROFS allows")]
    XattrsTooLarge,
    /// The tree is not a tree (a directory reachable twice); a bug in the caller.
    #[error("invalid tree: {0}")]
    InvalidTree(&'static str),
}

/// A finished image.
#[derive(Debug)]
pub struct FinishedImage {
    /// The image file, complete.
    pub file: File,
    /// Size in bytes (a multiple of the block size).
    pub size: u64,
    /// SHA-256 of the image bytes.
    pub digest: [u8; 32],
    /// Number of inodes in the image.
    pub inodes: u64,
}

/// Appends to a file through a buffer, tracking the position.
#[derive(Debug)]
struct PositionedWriter {
    inner: BufWriter<File>,
    pos: u64,
}

impl PositionedWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Moves to `target` without writing: what lies between stays a hole in the file.
    fn skip_to(&mut self, target: u64) -> io::Result<()> {
        self.inner.seek(SeekFrom::Start(target))?;
        self.pos = target;
        Ok(())
    }

    /// Writes zeros up to `target`.
    fn pad_to(&mut self, target: u64) -> io::Result<()> {
        const ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
        while self.pos < target {
            let n = (target - self.pos).min(BLOCK_SIZE_U64) as usize;
            self.write(&ZEROS[..n])?;
        }
        Ok(())
    }
}

/// Tails waiting for the metadata area, in an unlinked temporary file.
#[derive(Debug)]
struct TailSpool {
    writer: BufWriter<File>,
    len: u64,
}

impl TailSpool {
    fn push(&mut self, bytes: &[u8]) -> io::Result<SpoolRef> {
        let len = u16::try_from(bytes.len()).map_err(|_| io::Error::other("tail too long"))?;
        let offset = self.len;
        self.writer.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(SpoolRef { offset, len })
    }
}

/// Builds one image: data while streaming, everything else at [`ImageWriter::finish`].
#[derive(Debug)]
pub struct ImageWriter {
    out: PositionedWriter,
    spool: TailSpool,
    next_block: u32,
    detect_holes: bool,
    buffer: Vec<u8>,
}

/// How an inode is laid out: decided for every inode before anything is written.
#[derive(Debug)]
struct InodePlan {
    node: NodeId,
    parent: NodeId,
    nlink: u32,
    extended: bool,
    xattr_size: usize,
    layout: DataLayout,
    i_u: u32,
    size: u64,
    tail: MetaTail,
    /// Blocks in the area after the file data (directories, long symlinks).
    late_blocks: u32,
    late_start: u32,
    nid: u64,
}

/// What follows an inode and its xattrs in the metadata area.
#[derive(Debug, Clone, Copy)]
enum MetaTail {
    None,
    Spool(SpoolRef),
    DirectoryTail { len: usize },
    Symlink,
    BlockMap { chunk_bits: u32, entries: u64 },
}

impl MetaTail {
    fn len(&self, size: u64) -> Result<usize, WriterError> {
        Ok(match *self {
            MetaTail::None => 0,
            MetaTail::Spool(r) => usize::from(r.len),
            MetaTail::DirectoryTail { len } => len,
            MetaTail::Symlink => size as usize,
            MetaTail::BlockMap { entries, .. } => usize::try_from(entries)
                .ok()
                .and_then(|n| n.checked_mul(BLOCK_MAP_ENTRY_SIZE))
                .ok_or(WriterError::ImageTooLarge)?,
        })
    }
}

/// One entry of a directory, as written.
struct DirEntryOut<'a> {
    name: &'a [u8],
    node: NodeId,
}

impl ImageWriter {
    /// Starts an image in `output` (truncated), using `spool` (an empty scratch file, best
    /// already unlinked) for inline tails until the metadata is written.
    pub fn new(output: File, spool: File, detect_holes: bool) -> io::Result<Self> {
        output.set_len(0)?;
        let mut out = PositionedWriter {
            inner: BufWriter::with_capacity(WRITE_BUFFER, output),
            pos: 0,
        };
        // Block 0 holds the superblock at offset 1024; it is written last.
        out.pad_to(BLOCK_SIZE_U64)?;
        Ok(ImageWriter {
            out,
            spool: TailSpool {
                writer: BufWriter::new(spool),
                len: 0,
            },
            next_block: 1,
            detect_holes,
            buffer: Vec::new(),
        })
    }

    /// Data blocks written so far, including block 0.
    pub fn blocks_written(&self) -> u32 {
        self.next_block
    }

    /// Appends whole blocks and returns the address of the first.
    fn write_blocks(&mut self, bytes: &[u8]) -> Result<u32, WriterError> {
        let count =
            u32::try_from(bytes.len() / BLOCK_SIZE).map_err(|_| WriterError::ImageTooLarge)?;
        let start = self.next_block;
        // NULL_ADDR (u32::MAX) marks holes, so the last usable block is below it.
        let end = start
            .checked_add(count)
            .filter(|&end| end < NULL_ADDR)
            .ok_or(WriterError::ImageTooLarge)?;
        self.out.write(bytes)?;
        self.next_block = end;
        Ok(start)
    }

    /// Places `size` bytes of one regular file without their bytes: whole blocks at the next
    /// free address (the last one zero padded, no inline tail, no holes detected), left as a
    /// hole in the image file. For a layer whose file data is filled in later, block by block,
    /// from elsewhere (a gzip layer read lazily): the caller keeps where each file's blocks are.
    /// The finished image's digest then covers those blocks as zeros, not the filled image.
    pub fn reserve_file_data(&mut self, size: u64) -> Result<FileData, WriterError> {
        let blocks = size.div_ceil(BLOCK_SIZE_U64);
        if blocks == 0 {
            return Ok(FileData {
                size,
                placement: DataPlacement::Flat {
                    start_block: 0,
                    tail: None,
                },
            });
        }
        let count = u32::try_from(blocks).map_err(|_| WriterError::ImageTooLarge)?;
        let start = self.next_block;
        let end = start
            .checked_add(count)
            .filter(|&end| end < NULL_ADDR)
            .ok_or(WriterError::ImageTooLarge)?;
        self.out.skip_to(u64::from(end) * BLOCK_SIZE_U64)?;
        self.next_block = end;
        Ok(FileData {
            size,
            placement: DataPlacement::Flat {
                start_block: start,
                tail: None,
            },
        })
    }

    /// Streams `size` bytes of one regular file from `data` into the image.
    ///
    /// The last partial block goes inline after the inode if it is at most `max_inline_tail`
    /// bytes and the file has no holes; the caller computes that limit from the inode's
    /// worst-case size and its xattrs, so the inline part always fits in one block.
    pub fn write_file_data(
        &mut self,
        data: &mut dyn Read,
        size: u64,
        max_inline_tail: usize,
    ) -> Result<FileData, WriterError> {
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.resize(STREAM_BUFFER_BLOCKS * BLOCK_SIZE, 0);
        let result = self.stream_file(data, size, max_inline_tail, &mut buffer);
        self.buffer = buffer;
        result
    }

    fn stream_file(
        &mut self,
        data: &mut dyn Read,
        size: u64,
        max_inline_tail: usize,
        buffer: &mut [u8],
    ) -> Result<FileData, WriterError> {
        let full_blocks = size / BLOCK_SIZE_U64;
        let mut holes = HoleTracker::new(size);
        let mut file_block = 0u64;
        while file_block < full_blocks {
            let count = (full_blocks - file_block).min(STREAM_BUFFER_BLOCKS as u64) as usize;
            let chunk = &mut buffer[..count * BLOCK_SIZE];
            read_full(data, chunk, size, file_block * BLOCK_SIZE_U64)?;
            for block in chunk.chunks_exact(BLOCK_SIZE) {
                self.feed_block(&mut holes, file_block, block)?;
                file_block += 1;
            }
        }

        let tail_len = (size % BLOCK_SIZE_U64) as usize;
        let mut tail = None;
        if tail_len > 0 {
            let tail_bytes = &mut buffer[..BLOCK_SIZE];
            read_full(
                data,
                &mut tail_bytes[..tail_len],
                size,
                full_blocks * BLOCK_SIZE_U64,
            )?;
            tail_bytes[tail_len..].fill(0);
            holes.start_block(full_blocks);
            let tail_zero = self.detect_holes && is_zero(tail_bytes);
            let chunk_keeps_data = holes.chunk_has_data || !tail_zero;
            if !holes.has_holes() && chunk_keeps_data && tail_len <= max_inline_tail {
                self.flush_pending_zeros(&mut holes, full_blocks)?;
                tail = Some(self.spool.push(&tail_bytes[..tail_len])?);
            } else {
                self.feed_block(&mut holes, full_blocks, tail_bytes)?;
            }
        }
        holes.start_block(
            size.div_ceil(BLOCK_SIZE_U64)
                .next_multiple_of(holes.chunk_blocks),
        );

        let placement = if holes.has_holes() {
            DataPlacement::Chunked {
                extents: holes.extents,
            }
        } else {
            DataPlacement::Flat {
                start_block: holes
                    .extents
                    .first()
                    .and_then(|e| e.disk_block)
                    .unwrap_or(0),
                tail,
            }
        };
        Ok(FileData { size, placement })
    }

    /// Stores one block of a file (or holds it back if it may be part of a hole).
    fn feed_block(
        &mut self,
        holes: &mut HoleTracker,
        file_block: u64,
        block: &[u8],
    ) -> Result<(), WriterError> {
        holes.start_block(file_block);
        if !holes.chunk_has_data && self.detect_holes && is_zero(block) {
            holes.pending_zeros += 1;
            return Ok(());
        }
        self.flush_pending_zeros(holes, file_block)?;
        let disk = self.write_blocks(block)?;
        push_extent(&mut holes.extents, file_block, 1, Some(disk));
        Ok(())
    }

    /// The current chunk has data after all: its held-back zero blocks are stored as data.
    fn flush_pending_zeros(
        &mut self,
        holes: &mut HoleTracker,
        file_block: u64,
    ) -> Result<(), WriterError> {
        const ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
        let first = file_block - holes.pending_zeros;
        for i in 0..holes.pending_zeros {
            let disk = self.write_blocks(&ZEROS)?;
            push_extent(&mut holes.extents, first + i, 1, Some(disk));
        }
        holes.pending_zeros = 0;
        holes.chunk_has_data = true;
        Ok(())
    }

    /// Lays out and writes everything but file data, then the superblock, and hashes the image.
    pub fn finish(self, tree: &Tree) -> Result<FinishedImage, WriterError> {
        let ImageWriter {
            mut out,
            spool,
            next_block,
            ..
        } = self;
        let spool = spool.writer.into_inner().map_err(|e| e.into_error())?;

        let (mut plans, index_of) = plan_inodes(tree)?;
        let build_time = most_common_mtime(tree, &plans);
        let shared = SharedXattrs::select(tree, &plans);

        // Decide each inode's form, xattr size and data layout.
        let mut feature_incompat = 0;
        for plan in &mut plans {
            decide_layout(tree, plan, &shared, build_time)?;
            if plan.layout == DataLayout::ChunkBased {
                feature_incompat |= FEATURE_INCOMPAT_CHUNKED_FILE;
            }
        }

        // Blocks after the file data: directories and long symlinks, then shared xattrs.
        let mut block = u64::from(next_block);
        for plan in &mut plans {
            if plan.late_blocks > 0 {
                plan.late_start = u32::try_from(block).map_err(|_| WriterError::ImageTooLarge)?;
                if plan.layout != DataLayout::ChunkBased {
                    plan.i_u = plan.late_start;
                }
                block += u64::from(plan.late_blocks);
            }
        }
        let xattr_blkaddr = if shared.area_size > 0 {
            let start = block;
            block += shared.area_size.div_ceil(BLOCK_SIZE_U64);
            start
        } else {
            0
        };
        let meta_blkaddr = block;

        // Inode positions in the metadata area.
        let mut allocator = MetaAllocator::default();
        for plan in &mut plans {
            let inode_size = if plan.extended {
                EXTENDED_INODE_SIZE
            } else {
                COMPACT_INODE_SIZE
            };
            let footprint = (inode_size + plan.xattr_size + plan.tail.len(plan.size)?) as u64;
            plan.nid = allocator.place(footprint) / INODE_SLOT_SIZE as u64;
        }
        // fsck.erofs 1.5 reads an xattr header after every inode, even one without xattrs, so
        // keep that many bytes of image after the last inode.
        let meta_end =
            (allocator.end + XATTR_IBODY_HEADER_SIZE as u64).max(allocator.blocks * BLOCK_SIZE_U64);
        let total_blocks = meta_blkaddr + meta_end.div_ceil(BLOCK_SIZE_U64);
        let total_blocks = u32::try_from(total_blocks)
            .ok()
            .filter(|&b| b < NULL_ADDR)
            .ok_or(WriterError::ImageTooLarge)?;
        let root_nid = u16::try_from(plans.first().map_or(0, |p| p.nid))
            .map_err(|_| WriterError::InvalidTree("root nid beyond 16 bits"))?;

        // Write the late area, the shared xattrs and the metadata, in address order.
        debug_assert_eq!(out.pos, u64::from(next_block) * BLOCK_SIZE_U64);
        for plan in &plans {
            if plan.late_blocks == 0 {
                continue;
            }
            out.pad_to(u64::from(plan.late_start) * BLOCK_SIZE_U64)?;
            match &tree.node(plan.node).kind {
                NodeKind::Directory(_) => {
                    let entries = dir_entries(tree, plan);
                    let blocks = pack_dir(&entries);
                    for range in blocks.iter().take(plan.late_blocks as usize) {
                        let mut bytes = dir_block(&entries[range.clone()], &plans, &index_of, tree);
                        // Zeros after the last name end it (the kernel uses strnlen).
                        bytes.resize(BLOCK_SIZE, 0);
                        out.write(&bytes)?;
                    }
                }
                NodeKind::Symlink(target) => out.write(target)?,
                _ => return Err(WriterError::InvalidTree("late blocks for a file")),
            }
        }
        if shared.area_size > 0 {
            out.pad_to(xattr_blkaddr * BLOCK_SIZE_U64)?;
            let base = out.pos;
            let mut entry = Vec::new();
            for (xattr, id) in &shared.ids {
                out.pad_to(base + u64::from(*id) * 4)?;
                entry.clear();
                format::push_xattr_entry(&mut entry, xattr.index, &xattr.name, &xattr.value);
                out.write(&entry)?;
            }
        }
        let meta_start = meta_blkaddr * BLOCK_SIZE_U64;
        out.pad_to(meta_start)?;
        let mut scratch = Vec::new();
        let mut by_address: Vec<usize> = (0..plans.len()).collect();
        by_address.sort_unstable_by_key(|&i| plans[i].nid);
        for i in by_address {
            let plan = &plans[i];
            out.pad_to(meta_start + plan.nid * INODE_SLOT_SIZE as u64)?;
            scratch.clear();
            serialize_inode(
                &mut scratch,
                tree,
                plan,
                i,
                &plans,
                &index_of,
                &shared,
                &spool,
            )?;
            out.write(&scratch)?;
        }
        out.pad_to(u64::from(total_blocks) * BLOCK_SIZE_U64)?;

        let file = out.inner.into_inner().map_err(|e| e.into_error())?;
        let superblock = SuperBlock {
            root_nid,
            inodes: plans.len() as u64,
            build_time: build_time.0 as u64,
            build_time_nsec: build_time.1,
            blocks: total_blocks,
            meta_blkaddr: u32::try_from(meta_blkaddr).map_err(|_| WriterError::ImageTooLarge)?,
            xattr_blkaddr: u32::try_from(xattr_blkaddr).map_err(|_| WriterError::ImageTooLarge)?,
            feature_incompat,
        };
        file.write_all_at(&superblock.to_bytes(), SUPER_OFFSET as u64)?;

        let size = u64::from(total_blocks) * BLOCK_SIZE_U64;
        let digest = hash_file(&file, size)?;
        Ok(FinishedImage {
            file,
            size,
            digest,
            inodes: plans.len() as u64,
        })
    }
}

/// Places inodes (each with its xattrs and inline data) in the metadata area.
///
/// An inode of at most one block never crosses a block boundary (inline data must not, and
/// keeping the inode whole is simplest for every reader); it goes into the fullest block that
/// still has room (best fit), so little space is lost to padding. Larger ones (big xattrs or
/// block maps) start on fresh blocks. The first inode (the root) lands at offset 0.
#[derive(Debug, Default)]
struct MetaAllocator {
    /// Blocks with free space at their end, as (free bytes, block).
    open: BTreeSet<(u64, u64)>,
    /// Blocks used so far.
    blocks: u64,
    /// End of the highest inode placed.
    end: u64,
}

impl MetaAllocator {
    /// Returns the byte offset (32-byte aligned) for `footprint` bytes.
    fn place(&mut self, footprint: u64) -> u64 {
        let need = footprint.next_multiple_of(INODE_SLOT_SIZE as u64);
        let (position, block, left) = if need <= BLOCK_SIZE_U64 {
            match self.open.range((need, 0)..).next().copied() {
                Some((free, block)) => {
                    self.open.remove(&(free, block));
                    (
                        block * BLOCK_SIZE_U64 + (BLOCK_SIZE_U64 - free),
                        block,
                        free - need,
                    )
                }
                None => {
                    let block = self.blocks;
                    self.blocks += 1;
                    (block * BLOCK_SIZE_U64, block, BLOCK_SIZE_U64 - need)
                }
            }
        } else {
            let first = self.blocks;
            let count = need.div_ceil(BLOCK_SIZE_U64);
            self.blocks += count;
            (
                first * BLOCK_SIZE_U64,
                first + count - 1,
                count * BLOCK_SIZE_U64 - need,
            )
        };
        if left >= INODE_SLOT_SIZE as u64 {
            self.open.insert((left, block));
        }
        self.end = self.end.max(position + footprint);
        position
    }
}

/// Decides which parts of a streaming file become holes.
///
/// A file is cut into chunks of `chunk_blocks` blocks (a power of two, aligned in the file),
/// sized so a chunk-based inode's block map has at most [`MAX_BLOCK_MAP_ENTRIES`] entries. A
/// chunk becomes a hole only if every block in it is zero. Zero blocks at the start of a chunk
/// are held back, as a count, until the chunk shows data (then they are written as zeros) or
/// ends (then they are a hole): memory stays constant whatever the file.
#[derive(Debug)]
struct HoleTracker {
    chunk_blocks: u64,
    pending_zeros: u64,
    chunk_has_data: bool,
    extents: Vec<Extent>,
}

/// Upper bound on a chunk-based inode's block map (64 KiB of metadata per file): files up to
/// 64 MiB get 4 KiB hole granularity, a 4 GiB file 256 KiB.
const MAX_BLOCK_MAP_ENTRIES: u64 = 16 * 1024;

impl HoleTracker {
    fn new(size: u64) -> Self {
        let blocks = size.div_ceil(BLOCK_SIZE_U64);
        let chunk_blocks = blocks
            .div_ceil(MAX_BLOCK_MAP_ENTRIES)
            .next_power_of_two()
            .clamp(1, 1 << MAX_CHUNK_BITS);
        HoleTracker {
            chunk_blocks,
            pending_zeros: 0,
            chunk_has_data: false,
            extents: Vec::new(),
        }
    }

    /// Called before block `file_block`: closes the previous chunk at a chunk boundary.
    fn start_block(&mut self, file_block: u64) {
        if !file_block.is_multiple_of(self.chunk_blocks) {
            return;
        }
        if !self.chunk_has_data && self.pending_zeros > 0 {
            let first = file_block - self.pending_zeros;
            push_extent(&mut self.extents, first, self.pending_zeros, None);
        }
        self.pending_zeros = 0;
        self.chunk_has_data = false;
    }

    fn has_holes(&self) -> bool {
        self.extents.iter().any(|e| e.disk_block.is_none())
    }
}

/// Fills `buf` from `data`; a short read is a truncated file.
fn read_full(
    data: &mut dyn Read,
    buf: &mut [u8],
    size: u64,
    offset: u64,
) -> Result<(), WriterError> {
    let mut filled = 0;
    while filled < buf.len() {
        match data.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(WriterError::Truncated {
                    expected: size,
                    got: offset + filled as u64,
                });
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WriterError::Read(e)),
        }
    }
    Ok(())
}

fn is_zero(bytes: &[u8]) -> bool {
    // Slice equality compiles to memcmp, fast even in debug builds.
    static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
    bytes
        .chunks(BLOCK_SIZE)
        .all(|chunk| chunk == &ZEROS[..chunk.len()])
}

/// Adds a run of blocks, merging it with the previous run when both are holes or both are
/// consecutive data.
fn push_extent(extents: &mut Vec<Extent>, file_block: u64, blocks: u64, disk_block: Option<u32>) {
    if let Some(last) = extents.last_mut() {
        let mergeable = match (last.disk_block, disk_block) {
            (None, None) => true,
            (Some(a), Some(b)) => u64::from(a) + last.blocks == u64::from(b),
            _ => false,
        };
        if mergeable && last.file_block + last.blocks == file_block {
            last.blocks += blocks;
            return;
        }
    }
    extents.push(Extent {
        file_block,
        blocks,
        disk_block,
    });
}

/// Orders reachable inodes breadth-first from the root (siblings by name), and counts links.
/// Returns the plans (layout still undecided) and, per node id, its index in the plans.
fn plan_inodes(tree: &Tree) -> Result<(Vec<InodePlan>, Vec<u32>), WriterError> {
    const UNVISITED: u32 = u32::MAX;
    let mut index_of = vec![UNVISITED; tree.node_count()];
    let mut plans = Vec::new();
    let new_plan = |node, parent| InodePlan {
        node,
        parent,
        nlink: 0,
        extended: false,
        xattr_size: 0,
        layout: DataLayout::FlatPlain,
        i_u: 0,
        size: 0,
        tail: MetaTail::None,
        late_blocks: 0,
        late_start: 0,
        nid: 0,
    };
    index_of[ROOT as usize] = 0;
    plans.push(new_plan(ROOT, ROOT));
    let mut queue = VecDeque::from([ROOT]);
    while let Some(dir_id) = queue.pop_front() {
        let Some(dir) = tree.directory(dir_id) else {
            continue;
        };
        let mut subdirs = 0u32;
        for &child in dir.entries.values() {
            let is_dir = tree.directory(child).is_some();
            let slot = &mut index_of[child as usize];
            if *slot == UNVISITED {
                *slot = u32::try_from(plans.len())
                    .ok()
                    .filter(|&i| i != UNVISITED)
                    .ok_or(WriterError::InvalidTree("too many inodes"))?;
                plans.push(new_plan(child, dir_id));
                if is_dir {
                    queue.push_back(child);
                }
            } else if is_dir {
                return Err(WriterError::InvalidTree("directory linked twice"));
            }
            if is_dir {
                subdirs += 1;
            } else {
                let plan = &mut plans[index_of[child as usize] as usize];
                plan.nlink = plan.nlink.saturating_add(1);
            }
        }
        plans[index_of[dir_id as usize] as usize].nlink = subdirs.saturating_add(2);
    }
    Ok((plans, index_of))
}

/// The most frequent modification time: the superblock's build time, which every compact inode
/// shares. Ties go to the earliest time, so the choice is deterministic.
fn most_common_mtime(tree: &Tree, plans: &[InodePlan]) -> (i64, u32) {
    let mut counts: HashMap<(i64, u32), u64> = HashMap::new();
    for plan in plans {
        let meta = &tree.node(plan.node).meta;
        *counts.entry((meta.mtime, meta.mtime_nsec)).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map_or((0, 0), |(time, _)| time)
}

/// The xattrs written for a node: its own plus the overlayfs opaque marker.
fn effective_xattrs(node: &Node) -> std::borrow::Cow<'_, [Xattr]> {
    match &node.kind {
        NodeKind::Directory(dir) if dir.opaque => {
            let opaque = opaque_xattr();
            let mut all: Vec<Xattr> = node
                .meta
                .xattrs
                .iter()
                .filter(|x| (x.index, &x.name) != (opaque.index, &opaque.name))
                .cloned()
                .collect();
            all.push(opaque);
            all.sort();
            std::borrow::Cow::Owned(all)
        }
        _ => std::borrow::Cow::Borrowed(&node.meta.xattrs),
    }
}

/// `trusted.overlay.opaque=y`.
pub fn opaque_xattr() -> Xattr {
    Xattr {
        index: format::xattr_index::TRUSTED,
        name: b"overlay.opaque".as_slice().into(),
        value: b"y".as_slice().into(),
    }
}

/// Xattrs stored once in the shared area because several inodes carry them.
#[derive(Debug, Default)]
struct SharedXattrs {
    ids: BTreeMap<Xattr, u32>,
    area_size: u64,
}

impl SharedXattrs {
    fn select(tree: &Tree, plans: &[InodePlan]) -> Self {
        let mut counts: BTreeMap<Xattr, u32> = BTreeMap::new();
        for plan in plans {
            for xattr in effective_xattrs(tree.node(plan.node)).iter() {
                if format::xattr_entry_size(xattr.name.len(), xattr.value.len())
                    <= MAX_SHARED_XATTR_ENTRY
                {
                    let count = counts.entry(xattr.clone()).or_default();
                    *count = count.saturating_add(1);
                }
            }
        }
        let mut shared = SharedXattrs::default();
        let mut pos = 0u64;
        for (xattr, count) in counts {
            if count < 2 {
                continue;
            }
            let size = format::xattr_entry_size(xattr.name.len(), xattr.value.len()) as u64;
            if pos % BLOCK_SIZE_U64 + size > BLOCK_SIZE_U64 {
                pos = pos.next_multiple_of(BLOCK_SIZE_U64);
            }
            let Ok(id) = u32::try_from(pos / 4) else {
                break;
            };
            shared.ids.insert(xattr, id);
            pos += size;
        }
        shared.area_size = pos;
        shared
    }

    /// Splits a node's xattrs into shared ids and inline entries.
    fn split<'a>(&self, xattrs: &'a [Xattr]) -> (Vec<u32>, Vec<&'a Xattr>) {
        let mut ids = Vec::new();
        let mut inline = Vec::new();
        for xattr in xattrs {
            match self.ids.get(xattr) {
                Some(&id) if ids.len() < MAX_SHARED_PER_INODE => ids.push(id),
                _ => inline.push(xattr),
            }
        }
        (ids, inline)
    }
}

/// Size of the inline xattr body when every xattr is stored inline (the worst case).
pub fn inline_xattr_size(xattrs: &[Xattr]) -> usize {
    if xattrs.is_empty() {
        return 0;
    }
    XATTR_IBODY_HEADER_SIZE
        + xattrs
            .iter()
            .map(|x| format::xattr_entry_size(x.name.len(), x.value.len()))
            .sum::<usize>()
}

fn file_type(kind: &NodeKind) -> FileType {
    match kind {
        NodeKind::Directory(_) => FileType::Directory,
        NodeKind::Regular(_) => FileType::Regular,
        NodeKind::Symlink(_) => FileType::Symlink,
        NodeKind::CharDevice { .. } | NodeKind::Whiteout => FileType::CharDevice,
        NodeKind::BlockDevice { .. } => FileType::BlockDevice,
        NodeKind::Fifo => FileType::Fifo,
    }
}

/// Entries of a directory including `.` and `..`, sorted byte-wise as EROFS lookups require.
fn dir_entries<'a>(tree: &'a Tree, plan: &InodePlan) -> Vec<DirEntryOut<'a>> {
    let mut entries = vec![
        DirEntryOut {
            name: b".",
            node: plan.node,
        },
        DirEntryOut {
            name: b"..",
            node: plan.parent,
        },
    ];
    if let Some(dir) = tree.directory(plan.node) {
        entries.extend(dir.entries.iter().map(|(name, &node)| DirEntryOut {
            name: name.as_ref(),
            node,
        }));
    }
    entries.sort_by(|a, b| a.name.cmp(b.name));
    entries
}

/// Splits sorted entries into directory blocks: each block holds dirents then names.
fn pack_dir(entries: &[DirEntryOut<'_>]) -> Vec<std::ops::Range<usize>> {
    let mut blocks = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, entry) in entries.iter().enumerate() {
        let need = DIRENT_SIZE + entry.name.len();
        if used + need > BLOCK_SIZE {
            blocks.push(start..i);
            start = i;
            used = 0;
        }
        used += need;
    }
    blocks.push(start..entries.len());
    blocks
}

/// Bytes a directory occupies: full blocks plus the used part of the last.
fn dir_size(entries: &[DirEntryOut<'_>], blocks: &[std::ops::Range<usize>]) -> u64 {
    let last = blocks.last().cloned().unwrap_or(0..0);
    let last_used: usize = entries[last]
        .iter()
        .map(|e| DIRENT_SIZE + e.name.len())
        .sum();
    (blocks.len() as u64 - 1) * BLOCK_SIZE_U64 + last_used as u64
}

/// One directory block (unpadded): dirents, then the names they point into.
fn dir_block(
    entries: &[DirEntryOut<'_>],
    plans: &[InodePlan],
    index_of: &[u32],
    tree: &Tree,
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(BLOCK_SIZE);
    let mut nameoff = entries.len() * DIRENT_SIZE;
    for entry in entries {
        let nid = plans[index_of[entry.node as usize] as usize].nid;
        // pack_dir keeps every block within BLOCK_SIZE, so nameoff fits in 16 bits.
        format::push_dirent(
            &mut bytes,
            nid,
            nameoff as u16,
            file_type(&tree.node(entry.node).kind),
        );
        nameoff += entry.name.len();
    }
    for entry in entries {
        bytes.extend_from_slice(entry.name);
    }
    bytes
}

/// Fills in an inode's form, xattr size and data layout.
fn decide_layout(
    tree: &Tree,
    plan: &mut InodePlan,
    shared: &SharedXattrs,
    build_time: (i64, u32),
) -> Result<(), WriterError> {
    let node = tree.node(plan.node);
    let xattrs = effective_xattrs(node);
    let (ids, inline) = shared.split(&xattrs);
    plan.xattr_size = if xattrs.is_empty() {
        0
    } else {
        XATTR_IBODY_HEADER_SIZE
            + ids.len() * 4
            + inline
                .iter()
                .map(|x| format::xattr_entry_size(x.name.len(), x.value.len()))
                .sum::<usize>()
    };
    if format::xattr_icount(plan.xattr_size).is_none() {
        return Err(WriterError::XattrsTooLarge);
    }

    plan.size = match &node.kind {
        NodeKind::Regular(data) => data.size,
        NodeKind::Symlink(target) => target.len() as u64,
        NodeKind::Directory(_) => {
            let entries = dir_entries(tree, plan);
            dir_size(&entries, &pack_dir(&entries))
        }
        _ => 0,
    };
    let fields = InodeFields {
        layout: DataLayout::FlatPlain,
        xattr_icount: 0,
        mode: 0,
        nlink: plan.nlink,
        size: plan.size,
        i_u: 0,
        ino: 0,
        uid: node.meta.uid,
        gid: node.meta.gid,
        mtime: node.meta.mtime,
        mtime_nsec: node.meta.mtime_nsec,
    };
    plan.extended = !fields.fits_compact(build_time.0 as u64, build_time.1);
    let inode_size = if plan.extended {
        EXTENDED_INODE_SIZE
    } else {
        COMPACT_INODE_SIZE
    };
    let room_for_inline = BLOCK_SIZE.saturating_sub(inode_size + plan.xattr_size);

    match &node.kind {
        NodeKind::Regular(data) => match &data.placement {
            DataPlacement::Flat { start_block, tail } => {
                plan.i_u = *start_block;
                match tail {
                    Some(spool) => {
                        plan.layout = DataLayout::FlatInline;
                        plan.tail = MetaTail::Spool(*spool);
                    }
                    None => plan.layout = DataLayout::FlatPlain,
                }
            }
            DataPlacement::Chunked { extents } => {
                let blocks = data.size.div_ceil(BLOCK_SIZE_U64);
                // Chunks as large as the runs allow: every run must start on a chunk boundary.
                let mut chunk_bits = MAX_CHUNK_BITS.min(ceil_log2(blocks));
                for extent in extents.iter().skip(1) {
                    chunk_bits = chunk_bits.min(extent.file_block.trailing_zeros());
                }
                plan.layout = DataLayout::ChunkBased;
                plan.i_u = chunk_bits;
                plan.tail = MetaTail::BlockMap {
                    chunk_bits,
                    entries: blocks.div_ceil(1u64 << chunk_bits),
                };
            }
        },
        NodeKind::Directory(_) => {
            let tail_len = (plan.size % BLOCK_SIZE_U64) as usize;
            let full_blocks = plan.size / BLOCK_SIZE_U64;
            if tail_len > 0 && tail_len <= room_for_inline {
                plan.layout = DataLayout::FlatInline;
                plan.tail = MetaTail::DirectoryTail { len: tail_len };
                plan.late_blocks =
                    u32::try_from(full_blocks).map_err(|_| WriterError::ImageTooLarge)?;
            } else {
                plan.layout = DataLayout::FlatPlain;
                plan.late_blocks = u32::try_from(plan.size.div_ceil(BLOCK_SIZE_U64))
                    .map_err(|_| WriterError::ImageTooLarge)?;
            }
        }
        NodeKind::Symlink(target) => {
            if target.len() <= room_for_inline && !target.is_empty() {
                plan.layout = DataLayout::FlatInline;
                plan.tail = MetaTail::Symlink;
            } else {
                plan.layout = DataLayout::FlatPlain;
                plan.late_blocks = u32::try_from(plan.size.div_ceil(BLOCK_SIZE_U64))
                    .map_err(|_| WriterError::ImageTooLarge)?;
            }
        }
        NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
            plan.i_u = format::encode_rdev(*major, *minor);
        }
        NodeKind::Whiteout | NodeKind::Fifo => {}
    }
    Ok(())
}

fn ceil_log2(n: u64) -> u32 {
    if n <= 1 {
        0
    } else {
        64 - (n - 1).leading_zeros()
    }
}

/// Serializes inode `plan` with its xattrs and what follows them.
#[allow(clippy::too_many_arguments)]
fn serialize_inode(
    out: &mut Vec<u8>,
    tree: &Tree,
    plan: &InodePlan,
    index: usize,
    plans: &[InodePlan],
    index_of: &[u32],
    shared: &SharedXattrs,
    spool: &File,
) -> Result<(), WriterError> {
    let node = tree.node(plan.node);
    let xattrs = effective_xattrs(node);
    let icount = format::xattr_icount(plan.xattr_size).ok_or(WriterError::XattrsTooLarge)?;
    let fields = InodeFields {
        layout: plan.layout,
        xattr_icount: icount,
        mode: file_type(&node.kind).mode_bits() | (node.meta.permissions & 0o7777),
        nlink: plan.nlink,
        size: plan.size,
        i_u: plan.i_u,
        // Inode numbers for 32-bit stat: 1-based in layout order.
        ino: u32::try_from(index + 1).unwrap_or(u32::MAX),
        uid: node.meta.uid,
        gid: node.meta.gid,
        mtime: node.meta.mtime,
        mtime_nsec: node.meta.mtime_nsec,
    };
    if plan.extended {
        out.extend_from_slice(&fields.to_extended());
    } else {
        out.extend_from_slice(&fields.to_compact());
    }
    if !xattrs.is_empty() {
        let (ids, inline) = shared.split(&xattrs);
        format::push_xattr_ibody_header(out, &ids);
        for xattr in inline {
            format::push_xattr_entry(out, xattr.index, &xattr.name, &xattr.value);
        }
    }
    match plan.tail {
        MetaTail::None => {}
        MetaTail::Spool(r) => {
            let start = out.len();
            out.resize(start + usize::from(r.len), 0);
            spool.read_exact_at(&mut out[start..], r.offset)?;
        }
        MetaTail::DirectoryTail { .. } => {
            let entries = dir_entries(tree, plan);
            let blocks = pack_dir(&entries);
            if let Some(last) = blocks.last() {
                out.extend_from_slice(&dir_block(&entries[last.clone()], plans, index_of, tree));
            }
        }
        MetaTail::Symlink => {
            if let NodeKind::Symlink(target) = &node.kind {
                out.extend_from_slice(target);
            }
        }
        MetaTail::BlockMap {
            chunk_bits,
            entries,
        } => {
            let NodeKind::Regular(FileData {
                placement: DataPlacement::Chunked { extents },
                ..
            }) = &node.kind
            else {
                return Err(WriterError::InvalidTree("block map without extents"));
            };
            let mut extent = extents.iter().peekable();
            for chunk in 0..entries {
                let file_block = chunk << chunk_bits;
                while extent
                    .peek()
                    .is_some_and(|e| e.file_block + e.blocks <= file_block)
                {
                    extent.next();
                }
                let addr = match extent.peek() {
                    Some(Extent {
                        file_block: first,
                        disk_block: Some(disk),
                        ..
                    }) if *first <= file_block => {
                        u32::try_from(u64::from(*disk) + (file_block - first))
                            .map_err(|_| WriterError::ImageTooLarge)?
                    }
                    _ => NULL_ADDR,
                };
                out.extend_from_slice(&addr.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// SHA-256 of the first `size` bytes of `file`.
fn hash_file(file: &File, size: u64) -> io::Result<[u8; 32]> {
    let mut reader = file;
    reader.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut limited = reader.take(size);
    loop {
        let n = limited.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Extracts `image` with `fsck.erofs` (the reference reader) into a new directory.
    fn extract(image: &std::path::Path) -> tempfile::TempDir {
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("root");
        let status = std::process::Command::new("fsck.erofs")
            .arg(format!("--extract={}", target.display()))
            .arg(image)
            .status()
            .expect("fsck.erofs runs (erofs-utils; qemu/setup-host.sh installs it)");
        assert!(status.success(), "fsck.erofs --extract: {status}");
        out
    }

    #[test]
    fn reserved_file_data_is_a_hole_until_filled_and_then_reads_back() {
        use std::os::unix::fs::FileExt as _;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.erofs");
        let output = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut writer = ImageWriter::new(output, tempfile::tempfile().unwrap(), true).unwrap();
        let files: [(&[u8], Vec<u8>); 3] = [
            (
                b"big",
                (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect(),
            ),
            (b"empty", Vec::new()),
            (b"small", b"hello\n".to_vec()),
        ];
        let mut tree = Tree::new();
        let mut placed = Vec::new();
        for (name, content) in &files {
            let data = writer.reserve_file_data(content.len() as u64).unwrap();
            let DataPlacement::Flat { start_block, tail } = data.placement else {
                panic!("reserved data is flat");
            };
            assert_eq!(tail, None, "no inline tail: the bytes are not here");
            placed.push(start_block);
            let node = Node {
                meta: crate::tree::Metadata {
                    permissions: 0o644,
                    ..crate::tree::Metadata::implicit_directory()
                },
                kind: NodeKind::Regular(data),
            };
            let id = tree.add(node).unwrap();
            assert!(tree.set_child(crate::tree::ROOT, name, id));
        }
        let finished = writer.finish(&tree).unwrap();
        // The reserved blocks are holes: the image takes less disk than its size.
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&finished.file.metadata().unwrap()) * 512;
        assert!(
            allocated < finished.size,
            "{allocated} bytes allocated of {}",
            finished.size
        );
        // Filled in later, block-aligned, the files read back through the reference reader.
        for ((_, content), start_block) in files.iter().zip(&placed) {
            if !content.is_empty() {
                finished
                    .file
                    .write_all_at(content, u64::from(*start_block) * BLOCK_SIZE_U64)
                    .unwrap();
            }
        }
        let extracted = extract(&path);
        for (name, content) in &files {
            let read = std::fs::read(
                extracted
                    .path()
                    .join("root")
                    .join(std::str::from_utf8(name).unwrap()),
            )
            .unwrap();
            assert_eq!(&read, content, "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn extents_merge_consecutive_runs_only() {
        let mut extents = Vec::new();
        push_extent(&mut extents, 0, 2, Some(10));
        push_extent(&mut extents, 2, 1, Some(12));
        push_extent(&mut extents, 3, 1, None);
        push_extent(&mut extents, 4, 1, None);
        push_extent(&mut extents, 5, 1, Some(13));
        assert_eq!(
            extents,
            vec![
                Extent {
                    file_block: 0,
                    blocks: 3,
                    disk_block: Some(10)
                },
                Extent {
                    file_block: 3,
                    blocks: 2,
                    disk_block: None
                },
                Extent {
                    file_block: 5,
                    blocks: 1,
                    disk_block: Some(13)
                },
            ]
        );
    }

    #[test]
    fn metadata_allocation_fills_gaps_without_crossing_blocks() {
        let mut allocator = MetaAllocator::default();
        assert_eq!(allocator.place(100), 0);
        assert_eq!(allocator.place(4000), 4096);
        // 100 fits after the first inode (at 128), not after the 4000-byte one.
        assert_eq!(allocator.place(60), 4096 + 4000);
        assert_eq!(allocator.place(100), 128);
        assert_eq!(allocator.place(5000), 2 * 4096);
        assert_eq!(allocator.blocks, 4);
        for _ in 0..200 {
            let at = allocator.place(1000);
            assert_eq!(at % 32, 0);
            assert!(at % 4096 + 1000 <= 4096);
        }
    }

    #[test]
    fn ceil_log2_rounds_up() {
        assert_eq!(ceil_log2(0), 0);
        assert_eq!(ceil_log2(1), 0);
        assert_eq!(ceil_log2(2), 1);
        assert_eq!(ceil_log2(3), 2);
        assert_eq!(ceil_log2(1024), 10);
        assert_eq!(ceil_log2(1025), 11);
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut block = vec![0u8; BLOCK_SIZE];
        assert!(is_zero(&block));
        block[BLOCK_SIZE - 1] = 1;
        assert!(!is_zero(&block));
        assert!(is_zero(&[0u8; 7]));
        assert!(!is_zero(&[0, 0, 0, 1, 0, 0, 0]));
    }

    #[test]
    fn directory_blocks_never_overflow() {
        let names: Vec<Vec<u8>> = (0..100).map(|i| vec![b'a' + (i % 26) as u8; 200]).collect();
        let entries: Vec<DirEntryOut<'_>> = names
            .iter()
            .map(|n| DirEntryOut { name: n, node: 0 })
            .collect();
        let blocks = pack_dir(&entries);
        for block in &blocks {
            let used: usize = entries[block.clone()]
                .iter()
                .map(|e| DIRENT_SIZE + e.name.len())
                .sum();
            assert!(used <= BLOCK_SIZE);
        }
        assert_eq!(blocks.iter().map(|b| b.len()).sum::<usize>(), 100);
        let size = dir_size(&entries, &blocks);
        assert_eq!(size / BLOCK_SIZE_U64, blocks.len() as u64 - 1);
    }
}
