//! EROFS on-disk structures and their little-endian serialization.
//!
//! Follows the kernel's `fs/erofs/erofs_fs.h`, restricted to what Linux 6.1 mounts: 4 KiB
//! blocks, compact (32-byte) and extended (64-byte) inodes, the `FLAT_PLAIN`, `FLAT_INLINE` and
//! `CHUNK_BASED` (4-byte block map) data layouts, directory blocks of `erofs_dirent`, and inline
//! plus shared extended attributes. Nothing here allocates on behalf of untrusted input: the
//! callers validate sizes before serializing.

/// Byte offset of the superblock in the image.
pub const SUPER_OFFSET: usize = 1024;
/// Magic number of an EROFS superblock (`EROFS_SUPER_MAGIC_V1`).
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// Size of the on-disk superblock.
pub const SUPER_BLOCK_SIZE: usize = 128;
/// log2 of the block size; Linux 6.1 only mounts images whose block size equals the page size.
pub const BLOCK_SIZE_BITS: u8 = 12;
/// The block size of every image Gantry writes.
pub const BLOCK_SIZE: usize = 1 << BLOCK_SIZE_BITS;
/// [`BLOCK_SIZE`] as a `u64`, for offset arithmetic.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// Inodes are addressed in 32-byte slots: `nid = (inode offset - meta area start) / 32`.
pub const INODE_SLOT_SIZE: usize = 32;
/// Size of a compact on-disk inode.
pub const COMPACT_INODE_SIZE: usize = 32;
/// Size of an extended on-disk inode.
pub const EXTENDED_INODE_SIZE: usize = 64;
/// Size of `erofs_xattr_ibody_header`.
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
/// Size of `erofs_xattr_entry` without its name and value.
pub const XATTR_ENTRY_HEADER_SIZE: usize = 4;
/// Size of `erofs_dirent`.
pub const DIRENT_SIZE: usize = 12;
/// Longest file name a directory entry may hold (`EROFS_NAME_LEN`).
pub const MAX_NAME_LEN: usize = 255;
/// Size of one entry of a chunk-based inode's block map.
pub const BLOCK_MAP_ENTRY_SIZE: usize = 4;
/// Block address of a chunk that is a hole (`EROFS_NULL_ADDR`).
pub const NULL_ADDR: u32 = u32::MAX;

/// `feature_incompat` bit: the image has chunk-based inodes.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;

/// Largest chunk-size shift (over the block size) a chunk-based inode can express.
pub const MAX_CHUNK_BITS: u32 = 0x1f;

/// Data layout of an inode (`i_format` bits 1..=3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum DataLayout {
    /// Data in consecutive blocks starting at `raw_blkaddr`.
    FlatPlain = 0,
    /// Like `FlatPlain`, but the last partial block follows the inode in the metadata area.
    FlatInline = 2,
    /// A block map after the inode gives each chunk's block address, or a hole.
    ChunkBased = 4,
}

/// File types stored in directory entries (the kernel's `FT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FileType {
    /// Regular file.
    Regular = 1,
    /// Directory.
    Directory = 2,
    /// Character device (also overlayfs whiteouts).
    CharDevice = 3,
    /// Block device.
    BlockDevice = 4,
    /// Named pipe.
    Fifo = 5,
    /// Unix socket.
    Socket = 6,
    /// Symbolic link.
    Symlink = 7,
}

impl FileType {
    /// The `S_IFMT` bits of `st_mode` for this type.
    pub fn mode_bits(self) -> u16 {
        match self {
            FileType::Regular => 0o100000,
            FileType::Directory => 0o040000,
            FileType::CharDevice => 0o020000,
            FileType::BlockDevice => 0o060000,
            FileType::Fifo => 0o010000,
            FileType::Socket => 0o140000,
            FileType::Symlink => 0o120000,
        }
    }
}

/// Xattr name prefix indexes (`EROFS_XATTR_INDEX_*`), which replace the namespace prefix of the
/// name on disk.
pub mod xattr_index {
    /// `user.`
    pub const USER: u8 = 1;
    /// `system.posix_acl_access` (no suffix)
    pub const POSIX_ACL_ACCESS: u8 = 2;
    /// `system.posix_acl_default` (no suffix)
    pub const POSIX_ACL_DEFAULT: u8 = 3;
    /// `trusted.`
    pub const TRUSTED: u8 = 4;
    /// `lustre.`
    pub const LUSTRE: u8 = 5;
    /// `security.`
    pub const SECURITY: u8 = 6;
}

/// Prefixes Linux 6.1's EROFS knows, longest match first where prefixes overlap.
const XATTR_PREFIXES: [(&[u8], u8, bool); 6] = [
    (b"user.", xattr_index::USER, false),
    (
        b"system.posix_acl_access",
        xattr_index::POSIX_ACL_ACCESS,
        true,
    ),
    (
        b"system.posix_acl_default",
        xattr_index::POSIX_ACL_DEFAULT,
        true,
    ),
    (b"trusted.", xattr_index::TRUSTED, false),
    (b"lustre.", xattr_index::LUSTRE, false),
    (b"security.", xattr_index::SECURITY, false),
];

/// Splits a full xattr name (`security.capability`) into its EROFS prefix index and the rest of
/// the name. Returns `None` for namespaces EROFS cannot store, and for names that are just a
/// prefix (`user.`), which Linux does not allow either.
pub fn split_xattr_name(full: &[u8]) -> Option<(u8, &[u8])> {
    XATTR_PREFIXES.iter().find_map(|&(prefix, index, exact)| {
        if exact {
            (full == prefix).then_some((index, &full[full.len()..]))
        } else {
            full.strip_prefix(prefix)
                .filter(|rest| !rest.is_empty())
                .map(|rest| (index, rest))
        }
    })
}

/// The full name of an xattr from its prefix index and suffix: the inverse of
/// [`split_xattr_name`].
pub fn join_xattr_name(index: u8, suffix: &[u8]) -> Option<Vec<u8>> {
    let (prefix, _, _) = XATTR_PREFIXES.iter().find(|(_, i, _)| *i == index)?;
    let mut name = prefix.to_vec();
    name.extend_from_slice(suffix);
    Some(name)
}

/// Rounds `n` up to a multiple of 4 (`EROFS_XATTR_ALIGN`).
pub fn xattr_align(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// On-disk size of one xattr entry, padded to 4 bytes.
pub fn xattr_entry_size(name_len: usize, value_len: usize) -> usize {
    xattr_align(XATTR_ENTRY_HEADER_SIZE + name_len + value_len)
}

/// Appends one `erofs_xattr_entry` with its name and value, padded to 4 bytes.
///
/// The caller guarantees `name.len() <= 255` and `value.len() <= 65535`.
pub fn push_xattr_entry(out: &mut Vec<u8>, index: u8, name: &[u8], value: &[u8]) {
    let start = out.len();
    out.push(name.len() as u8);
    out.push(index);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(value);
    out.resize(start + xattr_entry_size(name.len(), value.len()), 0);
}

/// Appends the inline xattr body header (`erofs_xattr_ibody_header`) and the shared xattr ids.
pub fn push_xattr_ibody_header(out: &mut Vec<u8>, shared_ids: &[u32]) {
    // h_name_filter is only read when the superblock has the XATTR_FILTER feature, which Gantry
    // never sets; Linux 6.1 calls the field reserved.
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(shared_ids.len() as u8);
    out.extend_from_slice(&[0u8; 7]);
    for id in shared_ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

/// `i_xattr_icount` for an inline xattr body of `ibody_size` bytes (0 when there is none).
pub fn xattr_icount(ibody_size: usize) -> Option<u16> {
    if ibody_size == 0 {
        return Some(0);
    }
    let extra = ibody_size.checked_sub(XATTR_IBODY_HEADER_SIZE)?;
    u16::try_from(1 + extra / 4).ok()
}

/// Encodes a device number as Linux's `new_encode_dev` does (the `rdev` of device inodes).
pub fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Largest major number [`encode_rdev`] can represent.
pub const MAX_DEV_MAJOR: u32 = 0xfff;
/// Largest minor number [`encode_rdev`] can represent.
pub const MAX_DEV_MINOR: u32 = 0xf_ffff;

/// The superblock fields Gantry sets; everything else is zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuperBlock {
    /// nid of the root directory (16 bits in Linux 6.1).
    pub root_nid: u16,
    /// Number of inodes.
    pub inodes: u64,
    /// Modification time of every compact inode.
    pub build_time: u64,
    /// Nanoseconds of [`SuperBlock::build_time`].
    pub build_time_nsec: u32,
    /// Total blocks in the image.
    pub blocks: u32,
    /// First block of the metadata (inode) area.
    pub meta_blkaddr: u32,
    /// First block of the shared xattr area.
    pub xattr_blkaddr: u32,
    /// Incompatible feature bits.
    pub feature_incompat: u32,
}

impl SuperBlock {
    /// Serializes the 128-byte on-disk superblock. The uuid and volume name stay zero so that
    /// the image depends only on its content.
    pub fn to_bytes(&self) -> [u8; SUPER_BLOCK_SIZE] {
        let mut b = [0u8; SUPER_BLOCK_SIZE];
        b[0..4].copy_from_slice(&SUPER_MAGIC.to_le_bytes());
        // checksum (4..8) and feature_compat (8..12) stay zero: no SB_CHKSUM feature.
        b[12] = BLOCK_SIZE_BITS;
        // sb_extslots (13) = 0
        b[14..16].copy_from_slice(&self.root_nid.to_le_bytes());
        b[16..24].copy_from_slice(&self.inodes.to_le_bytes());
        b[24..32].copy_from_slice(&self.build_time.to_le_bytes());
        b[32..36].copy_from_slice(&self.build_time_nsec.to_le_bytes());
        b[36..40].copy_from_slice(&self.blocks.to_le_bytes());
        b[40..44].copy_from_slice(&self.meta_blkaddr.to_le_bytes());
        b[44..48].copy_from_slice(&self.xattr_blkaddr.to_le_bytes());
        // uuid (48..64) and volume_name (64..80) stay zero.
        b[80..84].copy_from_slice(&self.feature_incompat.to_le_bytes());
        b
    }
}

/// The fields of an on-disk inode, before choosing its compact or extended form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeFields {
    /// Data layout.
    pub layout: DataLayout,
    /// `i_xattr_icount`.
    pub xattr_icount: u16,
    /// `st_mode`: type and permission bits.
    pub mode: u16,
    /// Link count.
    pub nlink: u32,
    /// File size in bytes.
    pub size: u64,
    /// `i_u`: block address, encoded rdev, or chunk format.
    pub i_u: u32,
    /// 32-bit inode number for `stat`.
    pub ino: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds (two's complement for times before 1970).
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
}

impl InodeFields {
    /// Whether the compact form can hold this inode, given the superblock's build time (which
    /// is every compact inode's mtime).
    pub fn fits_compact(&self, build_time: u64, build_time_nsec: u32) -> bool {
        u16::try_from(self.uid).is_ok()
            && u16::try_from(self.gid).is_ok()
            && u16::try_from(self.nlink).is_ok()
            && u32::try_from(self.size).is_ok()
            && self.mtime as u64 == build_time
            && self.mtime_nsec == build_time_nsec
    }

    /// Serializes the compact (32-byte) form. The caller checked [`InodeFields::fits_compact`].
    pub fn to_compact(&self) -> [u8; COMPACT_INODE_SIZE] {
        let mut b = [0u8; COMPACT_INODE_SIZE];
        b[0..2].copy_from_slice(&((self.layout as u16) << 1).to_le_bytes());
        b[2..4].copy_from_slice(&self.xattr_icount.to_le_bytes());
        b[4..6].copy_from_slice(&self.mode.to_le_bytes());
        b[6..8].copy_from_slice(&(self.nlink as u16).to_le_bytes());
        b[8..12].copy_from_slice(&(self.size as u32).to_le_bytes());
        // 12..16: zero, so the mtime is exactly the superblock's build time (newer kernels
        // read this field as an offset from it).
        b[16..20].copy_from_slice(&self.i_u.to_le_bytes());
        b[20..24].copy_from_slice(&self.ino.to_le_bytes());
        b[24..26].copy_from_slice(&(self.uid as u16).to_le_bytes());
        b[26..28].copy_from_slice(&(self.gid as u16).to_le_bytes());
        b
    }

    /// Serializes the extended (64-byte) form.
    pub fn to_extended(&self) -> [u8; EXTENDED_INODE_SIZE] {
        let mut b = [0u8; EXTENDED_INODE_SIZE];
        b[0..2].copy_from_slice(&(((self.layout as u16) << 1) | 1).to_le_bytes());
        b[2..4].copy_from_slice(&self.xattr_icount.to_le_bytes());
        b[4..6].copy_from_slice(&self.mode.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..20].copy_from_slice(&self.i_u.to_le_bytes());
        b[20..24].copy_from_slice(&self.ino.to_le_bytes());
        b[24..28].copy_from_slice(&self.uid.to_le_bytes());
        b[28..32].copy_from_slice(&self.gid.to_le_bytes());
        b[32..40].copy_from_slice(&self.mtime.to_le_bytes());
        b[40..44].copy_from_slice(&self.mtime_nsec.to_le_bytes());
        b[44..48].copy_from_slice(&self.nlink.to_le_bytes());
        b
    }
}

/// Appends one `erofs_dirent`.
pub fn push_dirent(out: &mut Vec<u8>, nid: u64, nameoff: u16, file_type: FileType) {
    out.extend_from_slice(&nid.to_le_bytes());
    out.extend_from_slice(&nameoff.to_le_bytes());
    out.push(file_type as u8);
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_names_map_to_kernel_prefix_indexes() {
        assert_eq!(
            split_xattr_name(b"security.capability"),
            Some((xattr_index::SECURITY, &b"capability"[..]))
        );
        assert_eq!(
            split_xattr_name(b"trusted.overlay.opaque"),
            Some((xattr_index::TRUSTED, &b"overlay.opaque"[..]))
        );
        assert_eq!(
            split_xattr_name(b"system.posix_acl_access"),
            Some((xattr_index::POSIX_ACL_ACCESS, &b""[..]))
        );
        assert_eq!(split_xattr_name(b"system.posix_acl_accessX"), None);
        assert_eq!(split_xattr_name(b"user."), None);
        assert_eq!(split_xattr_name(b"system.nfs4_acl"), None);
        assert_eq!(
            join_xattr_name(xattr_index::USER, b"x").as_deref(),
            Some(&b"user.x"[..])
        );
    }

    #[test]
    fn xattr_entries_are_padded_to_four_bytes() {
        let mut out = Vec::new();
        push_xattr_entry(&mut out, xattr_index::USER, b"ab", b"xyz");
        assert_eq!(out, [2, 1, 3, 0, b'a', b'b', b'x', b'y', b'z', 0, 0, 0]);
        assert_eq!(xattr_entry_size(2, 3), 12);
        assert_eq!(xattr_icount(0), Some(0));
        assert_eq!(xattr_icount(12), Some(1));
        assert_eq!(xattr_icount(24), Some(4));
    }

    #[test]
    fn rdev_encoding_matches_linux_new_encode_dev() {
        assert_eq!(encode_rdev(0, 0), 0);
        assert_eq!(encode_rdev(1, 3), 0x103);
        assert_eq!(encode_rdev(8, 0x12345), 0x1230_0845);
    }

    #[test]
    fn inode_forms_have_kernel_sizes_and_version_bit() {
        let fields = InodeFields {
            layout: DataLayout::FlatInline,
            xattr_icount: 0,
            mode: 0o100644,
            nlink: 1,
            size: 10,
            i_u: 7,
            ino: 3,
            uid: 1,
            gid: 2,
            mtime: 100,
            mtime_nsec: 0,
        };
        assert!(fields.fits_compact(100, 0));
        assert!(!fields.fits_compact(99, 0));
        let compact = fields.to_compact();
        assert_eq!(compact[0], 4);
        let extended = fields.to_extended();
        assert_eq!(extended[0], 5);
        assert_eq!(&extended[32..40], &100i64.to_le_bytes());
    }

    #[test]
    fn superblock_places_fields_at_kernel_offsets() {
        let sb = SuperBlock {
            root_nid: 0x1234,
            blocks: 9,
            meta_blkaddr: 5,
            ..Default::default()
        };
        let b = sb.to_bytes();
        assert_eq!(&b[0..4], &[0xe2, 0xe1, 0xf5, 0xe0]);
        assert_eq!(b[12], 12);
        assert_eq!(&b[14..16], &[0x34, 0x12]);
        assert_eq!(&b[36..40], &9u32.to_le_bytes());
        assert_eq!(&b[40..44], &5u32.to_le_bytes());
    }
}
