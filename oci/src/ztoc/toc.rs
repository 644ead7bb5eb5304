//! The tar's file table with each member's data offset in the uncompressed stream, built in the
//! same pass as the gzip index: what a synthesized EROFS layer is laid out from.

use std::io::Read;
use std::sync::mpsc;

use super::zinfo::{self, GzipIndex, ZinfoError};
use crate::tar_stream::{TarEntry, TarError, TarStream};

/// Most bytes of long names, pax records and sparse maps per entry (as the eager conversion).
pub const MAX_ENTRY_METADATA: u64 = 1 << 20;
/// Most members one table holds (as the eager conversion).
pub const MAX_ENTRIES: usize = 4 << 20;

/// Errors building a zTOC.
#[derive(Debug, thiserror::Error)]
pub enum ZtocError {
    /// The gzip stream.
    #[error(transparent)]
    Gzip(#[from] ZinfoError),
    /// The tar inside it.
    #[error("the layer's tar: {0}")]
    Tar(#[from] TarError),
    /// Too many members.
    #[error("the layer has more than {MAX_ENTRIES} members")]
    TooManyEntries,
    /// The tar reader's thread failed.
    #[error("the tar reader stopped: {0}")]
    Internal(String),
}

/// One member of the tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocEntry {
    /// The member as the tar reader reads it (pax and GNU extensions applied).
    pub entry: TarEntry,
    /// Where its stored data starts in the uncompressed tar (after its headers).
    pub offset: u64,
}

/// A gzip layer's zTOC: the file table and the gzip index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ztoc {
    /// The members, in tar order.
    pub entries: Vec<TocEntry>,
    /// Random access into the gzip stream.
    pub gzip: GzipIndex,
}

/// Counts what is read through it.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// The uncompressed bytes, handed over from the inflating thread.
struct Handed {
    chunks: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for Handed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.chunks.recv() {
                Ok(chunk) => {
                    self.current = chunk;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn read_table(tar: impl Read) -> Result<Vec<TocEntry>, ZtocError> {
    let mut stream = TarStream::new(
        Counting {
            inner: tar,
            read: 0,
        },
        MAX_ENTRY_METADATA,
    );
    let mut entries = Vec::new();
    while let Some(entry) = stream.next_entry()? {
        if entries.len() == MAX_ENTRIES {
            return Err(ZtocError::TooManyEntries);
        }
        let offset = stream.get_ref().read;
        entries.push(TocEntry { entry, offset });
    }
    // What follows the end marker (zero padding) is drained, so the inflating side never waits.
    let mut rest = stream.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(TarError::Io)?;
    Ok(entries)
}

/// Builds the zTOC of gzip layer `blob` in one pass: the gzip index with a checkpoint every
/// `span_size` uncompressed bytes, and the tar's file table read from the same bytes on a
/// second thread.
pub fn build(blob: impl Read, span_size: u64) -> Result<Ztoc, ZtocError> {
    let (sender, chunks) = mpsc::sync_channel::<Vec<u8>>(16);
    let reader = std::thread::Builder::new()
        .name("ztoc-tar".into())
        .spawn(move || {
            read_table(Handed {
                chunks,
                current: Vec::new(),
                at: 0,
            })
        })
        .map_err(|err| ZtocError::Internal(err.to_string()))?;
    let gzip = zinfo::build(blob, span_size, |bytes| {
        // A reader that stopped (on an error it reports below) takes no more.
        let _ = sender.send(bytes.to_vec());
    });
    drop(sender);
    let entries = reader
        .join()
        .map_err(|_| ZtocError::Internal("it panicked".into()))?;
    let gzip = gzip?;
    Ok(Ztoc {
        entries: entries?,
        gzip,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 251) as u8
            })
            .collect()
    }

    /// A layer with a file larger than a span, a hard link, a symlink, a long name, xattrs,
    /// a whiteout and an opaque directory.
    fn layer() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let mut builder = tar::Builder::new(Vec::new());
        let mut files = Vec::new();
        let mut add = |builder: &mut tar::Builder<Vec<u8>>, path: &str, data: Vec<u8>| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(1_700_000_000);
            builder
                .append_data(&mut header, path, data.as_slice())
                .unwrap();
            files.push((path.to_owned(), data));
        };
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        builder
            .append_data(&mut dir, "etc/", std::io::empty())
            .unwrap();
        add(&mut builder, "etc/big.bin", noise(600 << 10, 1));
        add(&mut builder, "etc/small.txt", b"hello\n".to_vec());
        let long = format!("etc/{}/name.txt", "d".repeat(200));
        add(&mut builder, &long, b"long\n".to_vec());
        add(&mut builder, "etc/.wh.gone", Vec::new());
        add(&mut builder, "etc/.wh..wh..opq", Vec::new());
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Link);
        link.set_size(0);
        builder
            .append_link(&mut link, "etc/hard", "etc/small.txt")
            .unwrap();
        let mut symlink = tar::Header::new_gnu();
        symlink.set_entry_type(tar::EntryType::Symlink);
        symlink.set_size(0);
        builder
            .append_link(&mut symlink, "etc/soft", "small.txt")
            .unwrap();
        builder
            .append_pax_extensions([("SCHILY.xattr.user.note", b"a\nb".as_slice())])
            .unwrap();
        add(&mut builder, "etc/with-xattr", b"x".to_vec());
        let tar = builder.into_inner().unwrap();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        encoder.write_all(&tar).unwrap();
        (encoder.finish().unwrap(), files)
    }

    #[test]
    fn the_table_names_every_member_and_where_its_data_is() {
        let (blob, files) = layer();
        let ztoc = build(blob.as_slice(), 64 << 10).unwrap();
        let names: Vec<String> = ztoc
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.entry.path).into_owned())
            .collect();
        for expected in [
            "etc/",
            "etc/big.bin",
            "etc/.wh.gone",
            "etc/.wh..wh..opq",
            "etc/hard",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
        let hard = ztoc
            .entries
            .iter()
            .find(|e| e.entry.path == b"etc/hard")
            .unwrap();
        assert_eq!(hard.entry.link_name, b"etc/small.txt");
        assert_eq!(hard.entry.type_flag, b'1');
        let xattr = ztoc
            .entries
            .iter()
            .find(|e| e.entry.path == b"etc/with-xattr")
            .unwrap();
        assert_eq!(
            xattr.entry.xattrs,
            [(b"user.note".to_vec(), b"a\nb".to_vec())]
        );
        assert!(
            ztoc.gzip.checkpoints.len() > 1,
            "the big file spans checkpoints"
        );
        // Each file's bytes, read through the index from its offset alone.
        for (path, data) in &files {
            let member = ztoc
                .entries
                .iter()
                .find(|e| e.entry.path == path.as_bytes())
                .unwrap_or_else(|| panic!("{path}"));
            assert_eq!(member.entry.size, data.len() as u64);
            if data.is_empty() {
                continue;
            }
            let range = member.offset..member.offset + data.len() as u64;
            let spans = ztoc.gzip.spans_for(range.clone()).unwrap();
            let first = ztoc.gzip.span(spans.start).unwrap();
            let last = ztoc.gzip.span(spans.end - 1).unwrap();
            let compressed = &blob[first.compressed.start as usize..last.compressed.end as usize];
            assert_eq!(
                &ztoc.gzip.extract(spans, compressed, range).unwrap(),
                data,
                "{path}"
            );
        }
    }

    #[test]
    fn a_broken_tar_or_gzip_is_an_error() {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        encoder.write_all(&[7u8; 2048]).unwrap();
        let not_tar = encoder.finish().unwrap();
        assert!(matches!(
            build(not_tar.as_slice(), 64 << 10),
            Err(ZtocError::Tar(_))
        ));
        let (blob, _) = layer();
        assert!(matches!(
            build(&blob[..blob.len() - 20], 64 << 10),
            Err(ZtocError::Gzip(_))
        ));
    }
}
