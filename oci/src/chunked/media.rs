//! The media types and annotation names of erofs-image-spec v1 (§2.1–2.3), and which EROFS layer
//! form a media type names.

/// A zstd-compressed EROFS layer: zstd frames decoding to the image, optionally a chunk index
/// in a trailing skippable frame (§2.1).
pub const MEDIA_TYPE_EROFS_ZSTD: &str = "application/vnd.erofs+zstd";
/// A raw EROFS layer: the image bytes, optionally followed by a raw chunk index (§2.1).
pub const MEDIA_TYPE_EROFS: &str = "application/vnd.erofs";
/// The chunk-index format (§2.2), the default of [`ANNOTATION_INDEX_MEDIA_TYPE`].
pub const MEDIA_TYPE_CHUNK_INDEX: &str = "application/vnd.erofs.chunk-index.v1";

/// `offset[:end]` of the embedded chunk-index section in the blob.
pub const ANNOTATION_INDEX_RANGE: &str = "org.erofs.chunk-index.range";
/// Digest of the chunk-index payload (header and entries, no frame header).
pub const ANNOTATION_INDEX_DIGEST: &str = "org.erofs.chunk-index.digest";
/// Media type of the chunk index; absent means [`MEDIA_TYPE_CHUNK_INDEX`].
pub const ANNOTATION_INDEX_MEDIA_TYPE: &str = "org.erofs.chunk-index.mediaType";
/// Digest of the decompressed image data (the layer's DiffID).
pub const ANNOTATION_UNCOMPRESSED_DIGEST: &str = "org.erofs.uncompressed-digest";

/// The uncompressed chunk size Gantry writes (it reads any).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// containerd's seekable-EROFS proposal, which the spec superseded; read, never written.
const LEGACY_CONTAINERD_ZSTD: &str = "application/vnd.erofs.layer.v1+zstd";
/// containerd's development media types (`dev.containerd.erofs.zstd…`), also read only.
const LEGACY_CONTAINERD_DEV_PREFIX: &str = "dev.containerd.erofs.zstd";

/// How a layer's chunks are stored in its blob (the index header's `CompressionType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkCompression {
    /// Raw bytes (`CompressionType` 0, `application/vnd.erofs`).
    None,
    /// One zstd frame per chunk (`CompressionType` 1, `application/vnd.erofs+zstd`).
    Zstd,
}

impl ChunkCompression {
    /// The header's `CompressionType` byte.
    pub fn type_byte(self) -> u8 {
        match self {
            ChunkCompression::None => 0,
            ChunkCompression::Zstd => 1,
        }
    }

    /// The compression a `CompressionType` byte names; `None` for reserved values.
    pub fn from_type_byte(byte: u8) -> Option<ChunkCompression> {
        match byte {
            0 => Some(ChunkCompression::None),
            1 => Some(ChunkCompression::Zstd),
            _ => None,
        }
    }
}

impl std::fmt::Display for ChunkCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkCompression::None => "raw",
            ChunkCompression::Zstd => "zstd",
        })
    }
}

/// The EROFS layer form a layer media type names (legacy containerd names included), None for
/// non-EROFS types.
pub fn erofs_layer_kind(media_type: &str) -> Option<ChunkCompression> {
    match media_type {
        MEDIA_TYPE_EROFS => Some(ChunkCompression::None),
        MEDIA_TYPE_EROFS_ZSTD | LEGACY_CONTAINERD_ZSTD => Some(ChunkCompression::Zstd),
        other if other.starts_with(LEGACY_CONTAINERD_DEV_PREFIX) => Some(ChunkCompression::Zstd),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_name_their_layer_form() {
        assert_eq!(
            erofs_layer_kind("application/vnd.erofs"),
            Some(ChunkCompression::None)
        );
        assert_eq!(
            erofs_layer_kind("application/vnd.erofs+zstd"),
            Some(ChunkCompression::Zstd)
        );
        assert_eq!(
            erofs_layer_kind("application/vnd.erofs.layer.v1+zstd"),
            Some(ChunkCompression::Zstd)
        );
        assert_eq!(
            erofs_layer_kind("dev.containerd.erofs.zstd.v1"),
            Some(ChunkCompression::Zstd)
        );
        for other in [
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.erofs.chunk-index.v1",
            "application/vnd.erofs+gzip",
            "application/vnd.erofs.layer.v1",
            "APPLICATION/VND.EROFS",
            "",
        ] {
            assert_eq!(erofs_layer_kind(other), None, "{other}");
        }
        for kind in [ChunkCompression::None, ChunkCompression::Zstd] {
            assert_eq!(
                ChunkCompression::from_type_byte(kind.type_byte()),
                Some(kind)
            );
        }
        assert_eq!(ChunkCompression::from_type_byte(2), None);
    }
}
