//! The persisted bitmap of present chunks of a layer's sparse EROFS file.
//!
//! File format (little endian):
//! ```text
//! 0   8  magic "GNTYCHNK"
//! 8   4  version (1)
//! 12  4  chunk size in bytes (a power of two, at least 4096), or 0: chunks of varying
//!        size, as the layer's chunk index lays them out (lazy layers)
//! 16  8  image size in bytes
//! 24  8  number of chunks
//! 32  …  one bit per chunk, LSB first; bit set = the chunk's bytes are in the image file
//! ```
//! A bit is set only after the chunk's data is durable (the writer fsyncs the image first), so
//! after a crash a set bit never covers missing data. A fully converted layer has every bit set;
//! the lazy fetcher fills partially present layers in the same files.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"GNTYCHNK";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 32;
/// Default chunk size (1 MiB, DESIGN §4).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// Errors of bitmap files.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// Reading or writing failed.
    #[error("chunk bitmap I/O: {0}")]
    Io(#[from] io::Error),
    /// The file is not a chunk bitmap of a supported version, or is inconsistent.
    #[error("corrupt chunk bitmap: {0}")]
    Corrupt(&'static str),
    /// A chunk index past the end.
    #[error("chunk {index} out of range ({count} chunks)")]
    OutOfRange {
        /// The index.
        index: u64,
        /// Number of chunks.
        count: u64,
    },
}

/// A chunk bitmap, in memory and on disk.
#[derive(Debug)]
pub struct ChunkBitmap {
    file: File,
    chunk_size: u32,
    image_size: u64,
    count: u64,
    bits: Vec<u8>,
}

impl ChunkBitmap {
    /// Creates `path` for an image of `image_size` bytes, every chunk present (or none), and
    /// fsyncs it.
    pub fn create(
        path: &Path,
        image_size: u64,
        chunk_size: u32,
        all_present: bool,
    ) -> Result<ChunkBitmap, BitmapError> {
        if !chunk_size.is_power_of_two() || chunk_size < 4096 {
            return Err(BitmapError::Corrupt(
                "chunk size must be a power of two >= 4096",
            ));
        }
        let count = image_size.div_ceil(u64::from(chunk_size));
        Self::create_counted(path, image_size, chunk_size, count, all_present)
    }

    /// Creates `path` for an image of `image_size` bytes cut into `count` chunks of varying
    /// sizes (a lazy layer's chunk index says where each starts), none present, and fsyncs it.
    pub fn create_variable(
        path: &Path,
        image_size: u64,
        count: u64,
    ) -> Result<ChunkBitmap, BitmapError> {
        if count > image_size {
            return Err(BitmapError::Corrupt("more chunks than bytes"));
        }
        Self::create_counted(path, image_size, 0, count, false)
    }

    fn create_counted(
        path: &Path,
        image_size: u64,
        chunk_size: u32,
        count: u64,
        all_present: bool,
    ) -> Result<ChunkBitmap, BitmapError> {
        let len = usize::try_from(count.div_ceil(8))
            .map_err(|_| BitmapError::Corrupt("too many chunks"))?;
        let mut bits = vec![if all_present { 0xff } else { 0 }; len];
        // Bits past the last chunk stay clear.
        let tail = count % 8;
        if all_present
            && tail != 0
            && let Some(last) = bits.last_mut()
        {
            *last = (1u8 << tail) - 1;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&chunk_size.to_le_bytes());
        header.extend_from_slice(&image_size.to_le_bytes());
        header.extend_from_slice(&count.to_le_bytes());
        file.write_all(&header)?;
        file.write_all(&bits)?;
        file.sync_all()?;
        Ok(ChunkBitmap {
            file,
            chunk_size,
            image_size,
            count,
            bits,
        })
    }

    /// Opens and checks an existing bitmap.
    pub fn open(path: &Path) -> Result<ChunkBitmap, BitmapError> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact(&mut header)?;
        let field = |range: std::ops::Range<usize>| header.get(range).unwrap_or_default();
        if field(0..8) != MAGIC {
            return Err(BitmapError::Corrupt("bad magic"));
        }
        let le32 = |b: &[u8]| b.try_into().map(u32::from_le_bytes).unwrap_or(0);
        let le64 = |b: &[u8]| b.try_into().map(u64::from_le_bytes).unwrap_or(0);
        if le32(field(8..12)) != VERSION {
            return Err(BitmapError::Corrupt("unsupported version"));
        }
        let chunk_size = le32(field(12..16));
        let image_size = le64(field(16..24));
        let count = le64(field(24..32));
        let consistent = if chunk_size == 0 {
            count <= image_size
        } else {
            chunk_size.is_power_of_two()
                && chunk_size >= 4096
                && count == image_size.div_ceil(u64::from(chunk_size))
        };
        if !consistent {
            return Err(BitmapError::Corrupt("inconsistent header"));
        }
        let len = count.div_ceil(8);
        if file.metadata()?.len() != HEADER_LEN + len {
            return Err(BitmapError::Corrupt("wrong length"));
        }
        let mut bits = vec![0; usize::try_from(len).map_err(|_| BitmapError::Corrupt("too long"))?];
        file.read_exact(&mut bits)?;
        Ok(ChunkBitmap {
            file,
            chunk_size,
            image_size,
            count,
            bits,
        })
    }

    /// Chunk size in bytes; 0 when chunks vary in size (see the layer's chunk index).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Image size in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.count
    }

    /// Whether chunk `index` is present.
    pub fn is_present(&self, index: u64) -> bool {
        usize::try_from(index / 8)
            .ok()
            .and_then(|byte| self.bits.get(byte))
            .is_some_and(|b| b & (1 << (index % 8)) != 0)
    }

    /// Number of present chunks.
    pub fn present_count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Whether every chunk is present.
    pub fn is_complete(&self) -> bool {
        self.present_count() == self.count
    }

    /// Marks chunk `index` present and makes that durable. The caller must have made the
    /// chunk's data durable first.
    pub fn set_present(&mut self, index: u64) -> Result<(), BitmapError> {
        let out_of_range = BitmapError::OutOfRange {
            index,
            count: self.count,
        };
        if index >= self.count {
            return Err(out_of_range);
        }
        let byte_index = index / 8;
        let byte = usize::try_from(byte_index)
            .ok()
            .and_then(|i| self.bits.get_mut(i))
            .ok_or(out_of_range)?;
        *byte |= 1 << (index % 8);
        let value = *byte;
        self.file.seek(SeekFrom::Start(HEADER_LEN + byte_index))?;
        self.file.write_all(&[value])?;
        self.file.sync_data()?;
        Ok(())
    }

    /// Marks every chunk in `indexes` present and makes that durable with one sync. The caller
    /// must have made the chunks' data durable first. Nothing is marked if an index is out of
    /// range.
    pub fn set_present_many(&mut self, indexes: &[u64]) -> Result<(), BitmapError> {
        if let Some(&index) = indexes.iter().find(|&&index| index >= self.count) {
            return Err(BitmapError::OutOfRange {
                index,
                count: self.count,
            });
        }
        let (mut low, mut high) = (usize::MAX, 0usize);
        for &index in indexes {
            // In range (checked above), so the byte exists.
            let byte = (index / 8) as usize;
            if let Some(bits) = self.bits.get_mut(byte) {
                *bits |= 1 << (index % 8);
            }
            low = low.min(byte);
            high = high.max(byte);
        }
        if let Some(changed) = self.bits.get(low..=high) {
            self.file.seek(SeekFrom::Start(HEADER_LEN + low as u64))?;
            self.file.write_all(changed)?;
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let size = 10 * 4096 + 1;
        let bitmap = ChunkBitmap::create(&path, size, 4096, true).unwrap();
        assert_eq!(bitmap.chunk_count(), 11);
        assert!(bitmap.is_complete());
        assert!(!bitmap.is_present(11));
        let path2 = dir.path().join("c");
        let mut partial = ChunkBitmap::create(&path2, size, 4096, false).unwrap();
        assert_eq!(partial.present_count(), 0);
        partial.set_present(3).unwrap();
        partial.set_present(10).unwrap();
        assert!(partial.set_present(11).is_err());
        let reopened = ChunkBitmap::open(&path2).unwrap();
        assert!(reopened.is_present(3) && reopened.is_present(10) && !reopened.is_present(4));
        assert_eq!(reopened.present_count(), 2);
        assert_eq!(reopened.image_size(), size);

        let path3 = dir.path().join("v");
        let mut variable = ChunkBitmap::create_variable(&path3, 3 << 20, 17).unwrap();
        assert_eq!((variable.chunk_size(), variable.chunk_count()), (0, 17));
        variable.set_present_many(&[0, 7, 8, 16]).unwrap();
        assert!(variable.set_present_many(&[1, 17]).is_err());
        assert!(
            !variable.is_present(1),
            "nothing is marked when one index is out of range"
        );
        let reopened = ChunkBitmap::open(&path3).unwrap();
        assert_eq!(reopened.present_count(), 4);
        assert!(reopened.is_present(16) && reopened.is_present(8) && !reopened.is_present(9));
        assert!(ChunkBitmap::create_variable(&dir.path().join("w"), 3, 4).is_err());

        std::fs::write(&path2, b"GNTYCHNK garbage").unwrap();
        assert!(ChunkBitmap::open(&path2).is_err());
        assert!(ChunkBitmap::create(&dir.path().join("d"), 1, 1000, true).is_err());
    }
}
