//! SOCI's zTOC flatbuffer (`ztoc.fbs`: tables `Ztoc`, `TOC`, `FileMetadata`, `Xattr`,
//! `CompressionInfo`), read and written with the `flatbuffers` crate's builder and verifier.
//!
//! Written by hand rather than generated: `flatc` is not part of the build, and the accessors
//! are few. Every buffer is verified (`flatbuffers::root_with_opts`) before any accessor reads
//! it; the accessors exist only on verified tables. String fields are read as byte vectors: the
//! Go implementation writes whatever bytes a tar holds (names and PAX values need not be
//! UTF-8).

use flatbuffers::{
    FlatBufferBuilder, Follow, ForwardsUOffset, InvalidFlatbuffer, Table, Vector, Verifiable,
    Verifier, VerifierOptions, WIPOffset,
};

/// Field slots (vtable offsets) of each table, in schema order.
mod slot {
    pub const XATTR_KEY: u16 = 4;
    pub const XATTR_VALUE: u16 = 6;

    pub const FILE_NAME: u16 = 4;
    pub const FILE_TYPE: u16 = 6;
    pub const FILE_UNCOMPRESSED_OFFSET: u16 = 8;
    pub const FILE_UNCOMPRESSED_SIZE: u16 = 10;
    pub const FILE_LINKNAME: u16 = 12;
    pub const FILE_MODE: u16 = 14;
    pub const FILE_UID: u16 = 16;
    pub const FILE_GID: u16 = 18;
    pub const FILE_UNAME: u16 = 20;
    pub const FILE_GNAME: u16 = 22;
    pub const FILE_MOD_TIME: u16 = 24;
    pub const FILE_DEVMAJOR: u16 = 26;
    pub const FILE_DEVMINOR: u16 = 28;
    pub const FILE_XATTRS: u16 = 30;

    pub const INFO_ALGORITHM: u16 = 4;
    pub const INFO_MAX_SPAN_ID: u16 = 6;
    pub const INFO_SPAN_DIGESTS: u16 = 8;
    pub const INFO_CHECKPOINTS: u16 = 10;

    pub const TOC_METADATA: u16 = 4;

    pub const ZTOC_VERSION: u16 = 4;
    pub const ZTOC_BUILD_TOOL: u16 = 6;
    pub const ZTOC_COMPRESSED_SIZE: u16 = 8;
    pub const ZTOC_UNCOMPRESSED_SIZE: u16 = 10;
    pub const ZTOC_TOC: u16 = 12;
    pub const ZTOC_COMPRESSION_INFO: u16 = 14;
}

/// `CompressionAlgorithm.Gzip`, the schema's default.
pub const ALGORITHM_GZIP: i8 = 1;

type Bytes<'a> = ForwardsUOffset<Vector<'a, u8>>;
type Tables<'a, T> = ForwardsUOffset<Vector<'a, ForwardsUOffset<T>>>;

/// Declares a verified table: its `Follow`, its verifier over `fields`, and readers.
macro_rules! table {
    ($name:ident { $($field:literal: $kind:ty = $slot:expr),* $(,)? }) => {
        /// A verified table of the zTOC flatbuffer.
        #[derive(Debug, Clone, Copy)]
        pub struct $name<'a> {
            table: Table<'a>,
        }

        impl<'a> Follow<'a> for $name<'a> {
            type Inner = $name<'a>;

            unsafe fn follow(buf: &'a [u8], loc: usize) -> Self::Inner {
                // SAFETY: the caller guarantees `buf[loc..]` holds this table (the verifier
                // checked it: see `decode`).
                Self { table: unsafe { Table::new(buf, loc) } }
            }
        }

        impl Verifiable for $name<'_> {
            fn run_verifier(verifier: &mut Verifier, pos: usize) -> Result<(), InvalidFlatbuffer> {
                verifier
                    .visit_table(pos)?
                    $(.visit_field::<$kind>($field, $slot, false)?)*
                    .finish();
                Ok(())
            }
        }

        impl<'a> $name<'a> {
            /// A byte-vector (or string) field; empty when absent.
            #[allow(dead_code)]
            fn bytes(&self, slot: u16) -> &'a [u8] {
                // SAFETY: tables are only reached through `decode`, which verified the buffer,
                // including this field's type.
                unsafe { self.table.get::<Bytes<'a>>(slot, None) }
                    .map(|vector| vector.bytes())
                    .unwrap_or_default()
            }

            /// A scalar field, or its default.
            #[allow(dead_code)]
            fn scalar<T: Follow<'a, Inner = T> + 'a>(&self, slot: u16, default: T) -> T {
                // SAFETY: as for `bytes`.
                unsafe { self.table.get::<T>(slot, None) }.unwrap_or(default)
            }

            /// A vector-of-tables field; empty when absent.
            #[allow(dead_code)]
            fn tables<T: Follow<'a> + 'a>(&self, slot: u16) -> Vec<T::Inner> {
                // SAFETY: as for `bytes`.
                unsafe { self.table.get::<Tables<'a, T>>(slot, None) }
                    .map(|vector| vector.iter().collect())
                    .unwrap_or_default()
            }
        }
    };
}

table!(FbXattr {
    "key": Bytes = slot::XATTR_KEY,
    "value": Bytes = slot::XATTR_VALUE,
});

table!(FbFileMetadata {
    "name": Bytes = slot::FILE_NAME,
    "type": Bytes = slot::FILE_TYPE,
    "uncompressed_offset": i64 = slot::FILE_UNCOMPRESSED_OFFSET,
    "uncompressed_size": i64 = slot::FILE_UNCOMPRESSED_SIZE,
    "linkname": Bytes = slot::FILE_LINKNAME,
    "mode": i64 = slot::FILE_MODE,
    "uid": u32 = slot::FILE_UID,
    "gid": u32 = slot::FILE_GID,
    "uname": Bytes = slot::FILE_UNAME,
    "gname": Bytes = slot::FILE_GNAME,
    "mod_time": Bytes = slot::FILE_MOD_TIME,
    "devmajor": i64 = slot::FILE_DEVMAJOR,
    "devminor": i64 = slot::FILE_DEVMINOR,
    "xattrs": Tables<FbXattr> = slot::FILE_XATTRS,
});

table!(FbCompressionInfo {
    "compression_algorithm": i8 = slot::INFO_ALGORITHM,
    "max_span_id": i32 = slot::INFO_MAX_SPAN_ID,
    "span_digests": Tables<Vector<u8>> = slot::INFO_SPAN_DIGESTS,
    "checkpoints": Bytes = slot::INFO_CHECKPOINTS,
});

table!(FbToc {
    "metadata": Tables<FbFileMetadata> = slot::TOC_METADATA,
});

table!(FbZtoc {
    "version": Bytes = slot::ZTOC_VERSION,
    "build_tool_identifier": Bytes = slot::ZTOC_BUILD_TOOL,
    "compressed_archive_size": i64 = slot::ZTOC_COMPRESSED_SIZE,
    "uncompressed_archive_size": i64 = slot::ZTOC_UNCOMPRESSED_SIZE,
    "toc": ForwardsUOffset<FbToc> = slot::ZTOC_TOC,
    "compression_info": ForwardsUOffset<FbCompressionInfo> = slot::ZTOC_COMPRESSION_INFO,
});

/// One file of a zTOC, as the flatbuffer holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileMetadata {
    /// Its path.
    pub name: Vec<u8>,
    /// `reg`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo`.
    pub kind: Vec<u8>,
    /// Where its data starts in the uncompressed tar.
    pub uncompressed_offset: i64,
    /// Its data's size.
    pub uncompressed_size: i64,
    /// A link's target.
    pub linkname: Vec<u8>,
    /// The tar mode field.
    pub mode: i64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Owner's name.
    pub uname: Vec<u8>,
    /// Group's name.
    pub gname: Vec<u8>,
    /// RFC 3339 with nanoseconds.
    pub mod_time: Vec<u8>,
    /// Device major.
    pub devmajor: i64,
    /// Device minor.
    pub devminor: i64,
    /// PAX records (SOCI calls them xattrs), by key.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A zTOC, field for field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZtocDocument {
    /// `major.minor`.
    pub version: Vec<u8>,
    /// Who built it.
    pub build_tool_identifier: Vec<u8>,
    /// The blob's size.
    pub compressed_archive_size: i64,
    /// The tar's size.
    pub uncompressed_archive_size: i64,
    /// The files.
    pub metadata: Vec<FileMetadata>,
    /// `CompressionAlgorithm`.
    pub compression_algorithm: i8,
    /// Spans - 1.
    pub max_span_id: i32,
    /// `sha256:…` per span.
    pub span_digests: Vec<Vec<u8>>,
    /// The zinfo checkpoint blob.
    pub checkpoints: Vec<u8>,
}

/// Reads a zTOC flatbuffer, verifying it first; `max_tables` bounds how many tables (files and
/// their PAX records) it may hold.
pub fn decode(buffer: &[u8], max_tables: usize) -> Result<ZtocDocument, InvalidFlatbuffer> {
    let options = VerifierOptions {
        max_tables,
        max_apparent_size: usize::MAX,
        ..VerifierOptions::default()
    };
    let root = flatbuffers::root_with_opts::<FbZtoc>(&options, buffer)?;
    // SAFETY: the buffer was verified above, the `toc` field included.
    let toc = unsafe {
        root.table
            .get::<ForwardsUOffset<FbToc>>(slot::ZTOC_TOC, None)
    };
    // SAFETY: as above, for `compression_info`.
    let info = unsafe {
        root.table
            .get::<ForwardsUOffset<FbCompressionInfo>>(slot::ZTOC_COMPRESSION_INFO, None)
    };
    let files = toc
        .map(|toc| toc.tables::<FbFileMetadata>(slot::TOC_METADATA))
        .unwrap_or_default()
        .into_iter()
        .map(|file| FileMetadata {
            name: file.bytes(slot::FILE_NAME).to_vec(),
            kind: file.bytes(slot::FILE_TYPE).to_vec(),
            uncompressed_offset: file.scalar(slot::FILE_UNCOMPRESSED_OFFSET, 0),
            uncompressed_size: file.scalar(slot::FILE_UNCOMPRESSED_SIZE, 0),
            linkname: file.bytes(slot::FILE_LINKNAME).to_vec(),
            mode: file.scalar(slot::FILE_MODE, 0),
            uid: file.scalar(slot::FILE_UID, 0),
            gid: file.scalar(slot::FILE_GID, 0),
            uname: file.bytes(slot::FILE_UNAME).to_vec(),
            gname: file.bytes(slot::FILE_GNAME).to_vec(),
            mod_time: file.bytes(slot::FILE_MOD_TIME).to_vec(),
            devmajor: file.scalar(slot::FILE_DEVMAJOR, 0),
            devminor: file.scalar(slot::FILE_DEVMINOR, 0),
            xattrs: file
                .tables::<FbXattr>(slot::FILE_XATTRS)
                .into_iter()
                .map(|x| {
                    (
                        x.bytes(slot::XATTR_KEY).to_vec(),
                        x.bytes(slot::XATTR_VALUE).to_vec(),
                    )
                })
                .collect(),
        })
        .collect();
    Ok(ZtocDocument {
        version: root.bytes(slot::ZTOC_VERSION).to_vec(),
        build_tool_identifier: root.bytes(slot::ZTOC_BUILD_TOOL).to_vec(),
        compressed_archive_size: root.scalar(slot::ZTOC_COMPRESSED_SIZE, 0),
        uncompressed_archive_size: root.scalar(slot::ZTOC_UNCOMPRESSED_SIZE, 0),
        metadata: files,
        compression_algorithm: info.map_or(ALGORITHM_GZIP, |i| {
            i.scalar(slot::INFO_ALGORITHM, ALGORITHM_GZIP)
        }),
        max_span_id: info.map_or(0, |i| i.scalar(slot::INFO_MAX_SPAN_ID, 0)),
        span_digests: info
            .map(|i| i.tables::<Vector<u8>>(slot::INFO_SPAN_DIGESTS))
            .unwrap_or_default()
            .into_iter()
            .map(|digest| digest.bytes().to_vec())
            .collect(),
        checkpoints: info
            .map(|i| i.bytes(slot::INFO_CHECKPOINTS).to_vec())
            .unwrap_or_default(),
    })
}

/// Writes `document` as a zTOC flatbuffer.
pub fn encode(document: &ZtocDocument) -> Vec<u8> {
    let mut builder = FlatBufferBuilder::new();
    let version = builder.create_byte_string(&document.version);
    let build_tool = builder.create_byte_string(&document.build_tool_identifier);
    let files: Vec<WIPOffset<_>> = document
        .metadata
        .iter()
        .map(|file| encode_file(&mut builder, file))
        .collect();
    let files = builder.create_vector(&files);
    let toc_start = builder.start_table();
    builder.push_slot_always(slot::TOC_METADATA, files);
    let toc = builder.end_table(toc_start);

    let checkpoints = builder.create_vector(&document.checkpoints);
    let digests: Vec<_> = document
        .span_digests
        .iter()
        .map(|digest| builder.create_byte_string(digest))
        .collect();
    let digests = builder.create_vector(&digests);
    let info_start = builder.start_table();
    builder.push_slot(
        slot::INFO_ALGORITHM,
        document.compression_algorithm,
        ALGORITHM_GZIP,
    );
    builder.push_slot(slot::INFO_MAX_SPAN_ID, document.max_span_id, 0);
    builder.push_slot_always(slot::INFO_SPAN_DIGESTS, digests);
    builder.push_slot_always(slot::INFO_CHECKPOINTS, checkpoints);
    let info = builder.end_table(info_start);

    let start = builder.start_table();
    builder.push_slot_always(slot::ZTOC_VERSION, version);
    builder.push_slot_always(slot::ZTOC_BUILD_TOOL, build_tool);
    builder.push_slot(
        slot::ZTOC_COMPRESSED_SIZE,
        document.compressed_archive_size,
        0,
    );
    builder.push_slot(
        slot::ZTOC_UNCOMPRESSED_SIZE,
        document.uncompressed_archive_size,
        0,
    );
    builder.push_slot_always(slot::ZTOC_TOC, toc);
    builder.push_slot_always(slot::ZTOC_COMPRESSION_INFO, info);
    let root = builder.end_table(start);
    builder.finish(root, None);
    builder.finished_data().to_vec()
}

fn encode_file<'b>(
    builder: &mut FlatBufferBuilder<'b>,
    file: &FileMetadata,
) -> WIPOffset<flatbuffers::TableFinishedWIPOffset> {
    let name = builder.create_byte_string(&file.name);
    let kind = builder.create_byte_string(&file.kind);
    let linkname = builder.create_byte_string(&file.linkname);
    let uname = builder.create_byte_string(&file.uname);
    let gname = builder.create_byte_string(&file.gname);
    let mod_time = builder.create_byte_string(&file.mod_time);
    let xattrs: Vec<_> = file
        .xattrs
        .iter()
        .map(|(key, value)| {
            let key = builder.create_byte_string(key);
            let value = builder.create_byte_string(value);
            let start = builder.start_table();
            builder.push_slot_always(slot::XATTR_KEY, key);
            builder.push_slot_always(slot::XATTR_VALUE, value);
            builder.end_table(start)
        })
        .collect();
    let xattrs = builder.create_vector(&xattrs);
    let start = builder.start_table();
    builder.push_slot_always(slot::FILE_NAME, name);
    builder.push_slot_always(slot::FILE_TYPE, kind);
    builder.push_slot(slot::FILE_UNCOMPRESSED_OFFSET, file.uncompressed_offset, 0);
    builder.push_slot(slot::FILE_UNCOMPRESSED_SIZE, file.uncompressed_size, 0);
    builder.push_slot_always(slot::FILE_LINKNAME, linkname);
    builder.push_slot(slot::FILE_MODE, file.mode, 0);
    builder.push_slot(slot::FILE_UID, file.uid, 0);
    builder.push_slot(slot::FILE_GID, file.gid, 0);
    builder.push_slot_always(slot::FILE_UNAME, uname);
    builder.push_slot_always(slot::FILE_GNAME, gname);
    builder.push_slot_always(slot::FILE_MOD_TIME, mod_time);
    builder.push_slot(slot::FILE_DEVMAJOR, file.devmajor, 0);
    builder.push_slot(slot::FILE_DEVMINOR, file.devminor, 0);
    builder.push_slot_always(slot::FILE_XATTRS, xattrs);
    builder.end_table(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> ZtocDocument {
        ZtocDocument {
            version: b"0.9".to_vec(),
            build_tool_identifier: b"gantry".to_vec(),
            compressed_archive_size: 1234,
            uncompressed_archive_size: 10240,
            metadata: vec![
                FileMetadata {
                    name: b"etc/".to_vec(),
                    kind: b"dir".to_vec(),
                    uncompressed_offset: 512,
                    mode: 0o755,
                    mod_time: b"2023-11-14T22:13:20Z".to_vec(),
                    ..FileMetadata::default()
                },
                FileMetadata {
                    name: b"etc/\xffnot-utf8".to_vec(),
                    kind: b"reg".to_vec(),
                    uncompressed_offset: 1536,
                    uncompressed_size: 6,
                    mode: 0o644,
                    uid: 1000,
                    gid: 100,
                    uname: b"user".to_vec(),
                    mod_time: b"2023-11-14T22:13:20.5Z".to_vec(),
                    xattrs: vec![(b"SCHILY.xattr.user.x".to_vec(), b"\x00\x01".to_vec())],
                    ..FileMetadata::default()
                },
            ],
            compression_algorithm: ALGORITHM_GZIP,
            max_span_id: 1,
            span_digests: vec![b"sha256:aa".to_vec(), b"sha256:bb".to_vec()],
            checkpoints: vec![1, 2, 3],
        }
    }

    #[test]
    fn documents_round_trip_field_by_field() {
        let original = document();
        let buffer = encode(&original);
        assert_eq!(decode(&buffer, 1000).unwrap(), original);
    }

    #[test]
    fn the_layout_is_the_schemas() {
        // Read back with the generic table API at the schema's slots, independently of the
        // readers above: field order and types are ztoc.fbs's.
        let buffer = encode(&document());
        let root = flatbuffers::root::<FbZtoc>(&buffer).unwrap();
        assert_eq!(root.bytes(4), b"0.9");
        assert_eq!(root.scalar::<i64>(8, 0), 1234);
        assert_eq!(root.scalar::<i64>(10, 0), 10240);
        // SAFETY: verified by `root` above.
        let info = unsafe {
            root.table
                .get::<ForwardsUOffset<FbCompressionInfo>>(14, None)
        }
        .unwrap();
        assert_eq!(info.scalar::<i32>(6, 0), 1);
        assert_eq!(info.bytes(10), [1, 2, 3]);
        // Strings keep flatbuffers' NUL terminator after their bytes.
        let name = root.bytes(4).as_ptr() as usize - buffer.as_ptr() as usize;
        assert_eq!(buffer[name + 3], 0);
    }

    #[test]
    fn damaged_buffers_are_refused_not_read() {
        let buffer = encode(&document());
        assert!(decode(&buffer[..buffer.len() / 2], 1000).is_err());
        assert!(decode(&[], 1000).is_err());
        assert!(decode(&buffer, 2).is_err(), "more tables than allowed");
        let mut lying = buffer.clone();
        lying[0] = 0xff;
        lying[1] = 0xff;
        assert!(decode(&lying, 1000).is_err());
    }
}
