//! A streaming tar reader for untrusted layers: ustar, GNU (long names, old sparse files) and
//! pax (records, global headers, the three GNU sparse formats), with every size checked.
//!
//! Why not the `tar` crate (used by the tests to build archives): its pax parser splits
//! records at newlines instead of using their length prefix, so a binary xattr value that
//! contains `\n` (a `security.capability` can) makes it drop the whole pax header — including a
//! `size` record, which then desynchronizes the stream. It also reads long names and pax
//! headers of any size into memory. Here, metadata per entry is bounded and records are parsed
//! by length.

use std::io::{self, Read};

/// Size of a tar block.
pub const TAR_BLOCK: usize = 512;
const TAR_BLOCK_U64: u64 = TAR_BLOCK as u64;

/// Errors while reading the tar structure.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The underlying stream failed (including decompression errors and the size cap).
    #[error("reading the tar stream: {0}")]
    Io(#[source] io::Error),
    /// The stream ended inside a header, an extension record or file data.
    #[error("the tar stream ends in the middle of {0} (truncated?)")]
    Truncated(&'static str),
    /// The stream ended without the two zero blocks that close an archive.
    #[error("the tar stream ends without its end-of-archive marker (truncated?)")]
    MissingEndMarker,
    /// A header's checksum does not match.
    #[error("header checksum mismatch (not a tar stream, or corrupt)")]
    Checksum,
    /// A numeric header field is not a number.
    #[error("invalid {0} field in the header")]
    Field(&'static str),
    /// A pax record is malformed.
    #[error("malformed pax record: {0}")]
    Pax(&'static str),
    /// Long names, pax records or a sparse map exceed the per-entry metadata limit.
    #[error("the entry's metadata (long names, pax records, sparse map) exceeds {0} bytes")]
    MetadataTooLarge(u64),
    /// A sparse map is malformed or inconsistent with the stored data.
    #[error("invalid sparse file map: {0}")]
    Sparse(&'static str),
    /// A zero block followed by a header: a corrupt end-of-archive marker.
    #[error("a zero block inside the archive (corrupt end-of-archive marker)")]
    LoneZeroBlock,
    /// Extension headers at the end of the archive describe no entry.
    #[error("extension headers (long name or pax) are not followed by an entry")]
    DanglingExtension,
}

/// One archive member (not an extension header), with pax and GNU extensions applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TarEntry {
    /// Path bytes as stored (not yet sanitized).
    pub path: Vec<u8>,
    /// Link target (hard or symbolic), as stored.
    pub link_name: Vec<u8>,
    /// The type flag byte (`'0'`, `'5'`, ...). GNU and pax sparse files are reported as `'0'`.
    pub type_flag: u8,
    /// The mode field (permission bits and possibly file type bits).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds (from a pax `mtime` record).
    pub mtime_nsec: u32,
    /// Size of the content the entry's data reader yields (for sparse files, the full size).
    pub size: u64,
    /// Device major number (device entries only).
    pub dev_major: u64,
    /// Device minor number (device entries only).
    pub dev_minor: u64,
    /// Xattrs from `SCHILY.xattr.*` records: full name and value, in record order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether the data was stored sparse (holes are not in the archive).
    pub sparse: bool,
}

/// A region of a sparse file that is stored in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    len: u64,
}

#[derive(Debug)]
struct SparseState {
    segments: Vec<Segment>,
    next: usize,
    position: u64,
    size: u64,
}

/// Reads entries from a tar stream one at a time; [`TarStream::data`] reads the current
/// entry's content. Unread content is skipped by the next [`TarStream::next_entry`].
#[derive(Debug)]
pub struct TarStream<R> {
    inner: R,
    /// Bytes of the current entry still stored in the stream (before padding).
    stored_remaining: u64,
    padding: u64,
    sparse: Option<SparseState>,
    globals: Vec<(Vec<u8>, Vec<u8>)>,
    max_metadata: u64,
    ended: bool,
}

/// Pax records of one header, in order.
type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

impl<R: Read> TarStream<R> {
    /// Reads tar from `inner`; `max_metadata` bounds the long names, pax records and sparse
    /// maps of one entry (the memory this reader may hold).
    pub fn new(inner: R, max_metadata: u64) -> Self {
        TarStream {
            inner,
            stored_remaining: 0,
            padding: 0,
            sparse: None,
            globals: Vec::new(),
            max_metadata,
            ended: false,
        }
    }

    /// The underlying reader, for draining what follows the archive.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The next entry, or `None` at the end-of-archive marker.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>, TarError> {
        if self.ended {
            return Ok(None);
        }
        self.skip(self.stored_remaining + self.padding)?;
        self.stored_remaining = 0;
        self.padding = 0;
        self.sparse = None;

        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: PaxRecords = Vec::new();
        let mut metadata_bytes = 0u64;
        let mut pending_extension = false;
        let mut header = [0u8; TAR_BLOCK];
        loop {
            match read_full(&mut self.inner, &mut header).map_err(TarError::Io)? {
                0 if pending_extension => return Err(TarError::DanglingExtension),
                0 => return Err(TarError::MissingEndMarker),
                TAR_BLOCK => {}
                _ => return Err(TarError::Truncated("a header")),
            }
            if header.iter().all(|&b| b == 0) {
                if pending_extension {
                    return Err(TarError::DanglingExtension);
                }
                // Two zero blocks end the archive; a lone zero block before EOF is accepted as
                // GNU tar does.
                let mut second = [0u8; TAR_BLOCK];
                let n = read_full(&mut self.inner, &mut second).map_err(TarError::Io)?;
                if n == TAR_BLOCK && second.iter().any(|&b| b != 0) {
                    return Err(TarError::LoneZeroBlock);
                }
                self.ended = true;
                return Ok(None);
            }
            verify_checksum(&header)?;
            let type_flag = header[156];
            let stored_size = parse_unsigned(&header[124..136]).ok_or(TarError::Field("size"))?;
            match type_flag {
                b'x' | b'g' | b'L' | b'K' => {
                    metadata_bytes = metadata_bytes.saturating_add(stored_size);
                    if metadata_bytes > self.max_metadata {
                        return Err(TarError::MetadataTooLarge(self.max_metadata));
                    }
                    let data = self.read_extension(stored_size)?;
                    match type_flag {
                        b'x' => pax.extend(parse_pax(&data)?),
                        b'g' => {
                            for (key, value) in parse_pax(&data)? {
                                self.globals.retain(|(k, _)| *k != key);
                                self.globals.push((key, value));
                            }
                            // Globals outlive the entry: bound all of them together too, or
                            // an archive of global headers with fresh keys grows without end.
                            let global_bytes: u64 = self
                                .globals
                                .iter()
                                .map(|(k, v)| (k.len() + v.len()) as u64)
                                .sum();
                            if global_bytes > self.max_metadata {
                                return Err(TarError::MetadataTooLarge(self.max_metadata));
                            }
                            continue;
                        }
                        b'L' => long_name = Some(trim_nuls(data)),
                        _ => long_link = Some(trim_nuls(data)),
                    }
                    pending_extension = true;
                }
                _ => {
                    let mut entry = parse_member(&header, type_flag)?;
                    if let Some(name) = long_name {
                        entry.path = name;
                    }
                    if let Some(link) = long_link {
                        entry.link_name = link;
                    }

                    let mut sparse = if type_flag == b'S' {
                        Some(self.read_gnu_sparse_map(&header, &mut metadata_bytes)?)
                    } else {
                        None
                    };
                    let mut stored = stored_size;
                    let records = self.globals.iter().chain(pax.iter());
                    let pax_sparse = apply_pax(&mut entry, records, &mut stored)?;
                    // Hard links, symlinks, devices and directories carry no data in practice,
                    // but whatever size the header declares is stored and must be skipped.
                    self.set_stored(stored)?;
                    if let Some(pax_sparse) = pax_sparse {
                        sparse = Some(match pax_sparse {
                            PaxSparse::Map(segments, size) => (segments, size),
                            PaxSparse::InData(size) => {
                                (self.read_sparse_map_from_data(&mut metadata_bytes)?, size)
                            }
                        });
                    }
                    if let Some((segments, size)) = sparse {
                        validate_segments(&segments, size, self.stored_remaining)?;
                        entry.size = size;
                        entry.sparse = true;
                        entry.type_flag = b'0';
                        self.sparse = Some(SparseState {
                            segments,
                            next: 0,
                            position: 0,
                            size,
                        });
                    } else {
                        entry.size = self.stored_remaining;
                    }
                    return Ok(Some(entry));
                }
            }
        }
    }

    fn set_stored(&mut self, stored_size: u64) -> Result<(), TarError> {
        let padded = stored_size
            .checked_next_multiple_of(TAR_BLOCK_U64)
            .ok_or(TarError::Field("size"))?;
        self.stored_remaining = stored_size;
        self.padding = padded - stored_size;
        Ok(())
    }

    /// Reads the data of an extension header (already checked against the metadata limit).
    fn read_extension(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        let len = usize::try_from(size).map_err(|_| TarError::MetadataTooLarge(size))?;
        let mut data = vec![0u8; len];
        if read_full(&mut self.inner, &mut data).map_err(TarError::Io)? != len {
            return Err(TarError::Truncated("an extension header"));
        }
        let padding = size.next_multiple_of(TAR_BLOCK_U64) - size;
        self.skip(padding)?;
        Ok(data)
    }

    /// Old GNU sparse ('S'): up to 4 segments in the header, more in extension blocks.
    fn read_gnu_sparse_map(
        &mut self,
        header: &[u8; TAR_BLOCK],
        metadata_bytes: &mut u64,
    ) -> Result<(Vec<Segment>, u64), TarError> {
        let real_size =
            parse_unsigned(&header[483..495]).ok_or(TarError::Sparse("real size field"))?;
        let mut segments = Vec::new();
        push_gnu_segments(&mut segments, &header[386..482])?;
        let mut extended = header[482] != 0;
        let mut block = [0u8; TAR_BLOCK];
        while extended {
            *metadata_bytes = metadata_bytes.saturating_add(TAR_BLOCK_U64);
            if *metadata_bytes > self.max_metadata {
                return Err(TarError::MetadataTooLarge(self.max_metadata));
            }
            if read_full(&mut self.inner, &mut block).map_err(TarError::Io)? != TAR_BLOCK {
                return Err(TarError::Truncated("a sparse map"));
            }
            push_gnu_segments(&mut segments, &block[..504])?;
            extended = block[504] != 0;
        }
        Ok((segments, real_size))
    }

    /// Pax sparse format 1.0: the map is text at the start of the data, padded to a block.
    fn read_sparse_map_from_data(
        &mut self,
        metadata_bytes: &mut u64,
    ) -> Result<Vec<Segment>, TarError> {
        let mut numbers = Vec::new();
        let mut wanted: Option<u64> = None;
        let mut block = [0u8; TAR_BLOCK];
        let mut current: Vec<u8> = Vec::new();
        while wanted.is_none_or(|w| (numbers.len() as u64) < w) {
            if self.stored_remaining < TAR_BLOCK_U64 {
                return Err(TarError::Sparse("map longer than the data"));
            }
            *metadata_bytes = metadata_bytes.saturating_add(TAR_BLOCK_U64);
            if *metadata_bytes > self.max_metadata {
                return Err(TarError::MetadataTooLarge(self.max_metadata));
            }
            if read_full(&mut self.inner, &mut block).map_err(TarError::Io)? != TAR_BLOCK {
                return Err(TarError::Truncated("a sparse map"));
            }
            self.stored_remaining -= TAR_BLOCK_U64;
            for &b in &block {
                if wanted.is_some_and(|w| numbers.len() as u64 >= w) {
                    break;
                }
                if b == b'\n' {
                    let n = parse_decimal(&current).ok_or(TarError::Sparse("map number"))?;
                    current.clear();
                    match wanted {
                        None => wanted = Some(n.checked_mul(2).ok_or(TarError::Sparse("count"))?),
                        Some(_) => numbers.push(n),
                    }
                } else {
                    if current.len() >= 20 {
                        return Err(TarError::Sparse("map number"));
                    }
                    current.push(b);
                }
            }
        }
        Ok(numbers
            .chunks_exact(2)
            .map(|pair| Segment {
                offset: pair[0],
                len: pair[1],
            })
            .collect())
    }

    /// A reader over the current entry's content (holes of sparse files read as zeros).
    pub fn data(&mut self) -> EntryData<'_, R> {
        EntryData { stream: self }
    }

    fn skip(&mut self, mut amount: u64) -> Result<(), TarError> {
        let mut buffer = [0u8; 8192];
        while amount > 0 {
            let want = amount.min(buffer.len() as u64) as usize;
            let n = read_full(&mut self.inner, &mut buffer[..want]).map_err(TarError::Io)?;
            if n < want {
                return Err(TarError::Truncated("file data"));
            }
            amount -= n as u64;
        }
        Ok(())
    }

    fn read_stored(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.stored_remaining).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                TarError::Truncated("file data"),
            ));
        }
        self.stored_remaining -= n as u64;
        Ok(n)
    }
}

/// The content of the current entry.
#[derive(Debug)]
pub struct EntryData<'a, R> {
    stream: &'a mut TarStream<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(mut sparse) = self.stream.sparse.take() else {
            return self.stream.read_stored(buf);
        };
        let result = read_sparse(self.stream, &mut sparse, buf);
        self.stream.sparse = Some(sparse);
        result
    }
}

fn read_sparse<R: Read>(
    stream: &mut TarStream<R>,
    sparse: &mut SparseState,
    buf: &mut [u8],
) -> io::Result<usize> {
    while let Some(segment) = sparse.segments.get(sparse.next) {
        if sparse.position < segment.offset + segment.len {
            break;
        }
        sparse.next += 1;
    }
    if sparse.position >= sparse.size || buf.is_empty() {
        return Ok(0);
    }
    let (data_until, zeros_until) = match sparse.segments.get(sparse.next) {
        Some(s) if sparse.position >= s.offset => (Some(s.offset + s.len), None),
        Some(s) => (None, Some(s.offset)),
        None => (None, Some(sparse.size)),
    };
    let n = if let Some(end) = data_until {
        let want = buf
            .len()
            .min(usize::try_from(end - sparse.position).unwrap_or(usize::MAX));
        stream.read_stored(&mut buf[..want])?
    } else {
        let end = zeros_until.unwrap_or(sparse.size);
        let want = buf
            .len()
            .min(usize::try_from(end - sparse.position).unwrap_or(usize::MAX));
        buf[..want].fill(0);
        want
    };
    sparse.position += n as u64;
    Ok(n)
}

/// Parses the fields of a member header.
fn parse_member(header: &[u8; TAR_BLOCK], type_flag: u8) -> Result<TarEntry, TarError> {
    let is_ustar = &header[257..263] == b"ustar\0";
    let mut path = cstr(&header[0..100]).to_vec();
    if is_ustar {
        let prefix = cstr(&header[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&path);
            path = full;
        }
    }
    let is_device = matches!(type_flag, b'3' | b'4');
    let entry = TarEntry {
        path,
        link_name: cstr(&header[157..257]).to_vec(),
        type_flag,
        mode: parse_unsigned(&header[100..108])
            .and_then(|m| u32::try_from(m).ok())
            .ok_or(TarError::Field("mode"))?,
        uid: parse_unsigned(&header[108..116]).ok_or(TarError::Field("uid"))?,
        gid: parse_unsigned(&header[116..124]).ok_or(TarError::Field("gid"))?,
        mtime: parse_signed(&header[136..148]).ok_or(TarError::Field("mtime"))?,
        mtime_nsec: 0,
        size: 0,
        dev_major: if is_device {
            parse_unsigned(&header[329..337]).ok_or(TarError::Field("devmajor"))?
        } else {
            0
        },
        dev_minor: if is_device {
            parse_unsigned(&header[337..345]).ok_or(TarError::Field("devminor"))?
        } else {
            0
        },
        xattrs: Vec::new(),
        sparse: false,
    };
    Ok(entry)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn verify_checksum(header: &[u8; TAR_BLOCK]) -> Result<(), TarError> {
    let stored = parse_unsigned(&header[148..156]).ok_or(TarError::Checksum)?;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in header.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    // Some historic writers summed signed chars; accept both as GNU tar does.
    if stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed) {
        Ok(())
    } else {
        Err(TarError::Checksum)
    }
}

/// The bytes of a NUL-terminated (or full-width) header field.
fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn trim_nuls(mut data: Vec<u8>) -> Vec<u8> {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    data.truncate(end);
    data
}

/// A numeric header field: octal text (spaces or NULs around it), or GNU base-256.
fn parse_signed(field: &[u8]) -> Option<i64> {
    let first = *field.first()?;
    if first & 0x80 != 0 {
        // GNU base-256: big-endian two's complement; 0x80 marks a positive number, 0xff a
        // negative one. Fields are at most 12 bytes, so u128 holds them.
        let negative = first == 0xff;
        if field.len() > 12 {
            return None;
        }
        let mut value: u128 = 0;
        for (i, &b) in field.iter().enumerate() {
            let b = if i == 0 && !negative { b & 0x7f } else { b };
            value = (value << 8) | u128::from(b);
        }
        let value = if negative {
            value as i128 - (1i128 << (8 * field.len()))
        } else {
            value as i128
        };
        return i64::try_from(value).ok();
    }
    let text = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0);
    // Anything after the terminator is ignored; an empty field reads as 0.
    let mut value: i64 = 0;
    for b in text {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        value = value.checked_mul(8)?.checked_add(i64::from(b - b'0'))?;
    }
    Some(value)
}

fn parse_unsigned(field: &[u8]) -> Option<u64> {
    parse_signed(field).and_then(|v| u64::try_from(v).ok())
}

fn parse_decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 20 {
        return None;
    }
    let mut value = 0u64;
    for &b in text {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(value)
}

/// Parses pax records (`"<len> <key>=<value>\n"`), by their length prefix.
fn parse_pax(mut data: &[u8]) -> Result<PaxRecords, TarError> {
    let mut records = Vec::new();
    while !data.is_empty() {
        // Some writers pad the data with NULs.
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let space = data
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .ok_or(TarError::Pax("no length"))?;
        let len = parse_decimal(&data[..space]).ok_or(TarError::Pax("bad length"))?;
        let len = usize::try_from(len).map_err(|_| TarError::Pax("bad length"))?;
        if len <= space + 1 || len > data.len() {
            return Err(TarError::Pax("length out of range"));
        }
        let record = &data[space + 1..len];
        let Some((&b'\n', body)) = record.split_last() else {
            return Err(TarError::Pax("record does not end with a newline"));
        };
        let equals = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TarError::Pax("no '=' in record"))?;
        records.push((body[..equals].to_vec(), body[equals + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(records)
}

/// Sparse information found in pax records.
enum PaxSparse {
    /// Formats 0.0 and 0.1: the map is in the records.
    Map(Vec<Segment>, u64),
    /// Format 1.0: the map starts the data; the value is the real size.
    InData(u64),
}

/// Applies pax records (globals first, then the entry's) to `entry`. A `size` record
/// replaces the stored size. Returns what the records say about sparse storage.
fn apply_pax<'r>(
    entry: &mut TarEntry,
    records: impl Iterator<Item = &'r (Vec<u8>, Vec<u8>)>,
    stored_remaining: &mut u64,
) -> Result<Option<PaxSparse>, TarError> {
    let mut sparse_name = None;
    let mut sparse_major = None;
    let mut sparse_minor = None;
    let mut real_size = None;
    let mut map: Option<Vec<u64>> = None;
    let mut pairs: Vec<u64> = Vec::new();
    for (key, value) in records {
        match key.as_slice() {
            b"path" => entry.path = value.clone(),
            b"linkpath" => entry.link_name = value.clone(),
            b"size" => {
                *stored_remaining = parse_decimal(value).ok_or(TarError::Pax("size"))?;
            }
            b"uid" => entry.uid = parse_decimal(value).ok_or(TarError::Pax("uid"))?,
            b"gid" => entry.gid = parse_decimal(value).ok_or(TarError::Pax("gid"))?,
            b"mtime" => {
                (entry.mtime, entry.mtime_nsec) =
                    parse_pax_time(value).ok_or(TarError::Pax("mtime"))?;
            }
            b"GNU.sparse.name" => sparse_name = Some(value.clone()),
            b"GNU.sparse.major" => sparse_major = parse_decimal(value),
            b"GNU.sparse.minor" => sparse_minor = parse_decimal(value),
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                real_size = Some(parse_decimal(value).ok_or(TarError::Pax("sparse size"))?);
            }
            b"GNU.sparse.map" => {
                let numbers = value
                    .split(|&b| b == b',')
                    .map(parse_decimal)
                    .collect::<Option<Vec<u64>>>()
                    .ok_or(TarError::Sparse("map"))?;
                map = Some(numbers);
            }
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                pairs.push(parse_decimal(value).ok_or(TarError::Sparse("map"))?);
            }
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    entry.xattrs.push((name.to_vec(), value.clone()));
                }
            }
        }
    }
    if let Some(name) = sparse_name {
        entry.path = name;
    }
    let Some(size) = real_size else {
        return Ok(None);
    };
    if sparse_major == Some(1) && sparse_minor == Some(0) {
        return Ok(Some(PaxSparse::InData(size)));
    }
    let numbers = map.unwrap_or(pairs);
    if !numbers.len().is_multiple_of(2) {
        return Err(TarError::Sparse("odd number of map entries"));
    }
    let segments = numbers
        .chunks_exact(2)
        .map(|pair| Segment {
            offset: pair[0],
            len: pair[1],
        })
        .collect();
    Ok(Some(PaxSparse::Map(segments, size)))
}

/// A pax time: decimal seconds, optionally negative, optionally with a fraction.
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let (negative, rest) = match value.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, value),
    };
    let (whole, fraction) = match rest.iter().position(|&b| b == b'.') {
        Some(dot) => (&rest[..dot], &rest[dot + 1..]),
        None => (rest, &b""[..]),
    };
    let seconds = i64::try_from(parse_decimal(whole)?).ok()?;
    if !fraction.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut nanos = 0u32;
    for i in 0..9 {
        let digit = fraction.get(i).map_or(0, |d| u32::from(d - b'0'));
        nanos = nanos * 10 + digit;
    }
    if !negative {
        return Some((seconds, nanos));
    }
    if nanos == 0 {
        Some((seconds.checked_neg()?, 0))
    } else {
        Some((
            seconds.checked_neg()?.checked_sub(1)?,
            1_000_000_000 - nanos,
        ))
    }
}

fn push_gnu_segments(segments: &mut Vec<Segment>, area: &[u8]) -> Result<(), TarError> {
    for slot in area.chunks_exact(24) {
        if slot.iter().all(|&b| b == 0) {
            continue;
        }
        segments.push(Segment {
            offset: parse_unsigned(&slot[..12]).ok_or(TarError::Sparse("offset field"))?,
            len: parse_unsigned(&slot[12..]).ok_or(TarError::Sparse("length field"))?,
        });
    }
    Ok(())
}

/// Segments must be in order, not overlap, stay within the file, and add up to the stored
/// data.
fn validate_segments(segments: &[Segment], size: u64, stored: u64) -> Result<(), TarError> {
    let mut end = 0u64;
    let mut total = 0u64;
    for segment in segments {
        if segment.offset < end {
            return Err(TarError::Sparse("segments out of order or overlapping"));
        }
        end = segment
            .offset
            .checked_add(segment.len)
            .ok_or(TarError::Sparse("segment beyond 2^64"))?;
        if end > size {
            return Err(TarError::Sparse("segment beyond the file size"));
        }
        total = total
            .checked_add(segment.len)
            .ok_or(TarError::Sparse("segment lengths overflow"))?;
    }
    if total != stored {
        return Err(TarError::Sparse(
            "segment lengths differ from the stored data",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar header block of `type_flag` with `size` bytes of data following.
    fn header(name: &[u8], type_flag: u8, size: usize) -> [u8; TAR_BLOCK] {
        let mut block = [0u8; TAR_BLOCK];
        block[..name.len()].copy_from_slice(name);
        block[100..107].copy_from_slice(b"0000644");
        block[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        block[136..147].copy_from_slice(b"00000000000");
        block[156] = type_flag;
        block[257..263].copy_from_slice(b"ustar\0");
        block[263..265].copy_from_slice(b"00");
        block[148..156].copy_from_slice(b"        ");
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        block
    }

    fn padded(data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        out.resize(data.len().div_ceil(TAR_BLOCK) * TAR_BLOCK, 0);
        out
    }

    #[test]
    fn global_pax_headers_are_bounded_across_entries() {
        // Each global header adds a fresh 1 KiB key: small per entry, unbounded in sum.
        let mut tar = Vec::new();
        for i in 0..64 {
            let record = format!("user.k{i:04}={}\n", "v".repeat(1000));
            let record = format!("{} {record}", record.len() + 5);
            tar.extend_from_slice(&header(b"pax_global_header", b'g', record.len()));
            tar.extend(padded(record.as_bytes()));
            tar.extend_from_slice(&header(format!("f{i}").as_bytes(), b'0', 0));
        }
        tar.extend_from_slice(&[0u8; 2 * TAR_BLOCK]);
        let mut stream = TarStream::new(tar.as_slice(), 16 << 10);
        let mut entries = 0;
        let err = loop {
            match stream.next_entry() {
                Ok(Some(_)) => entries += 1,
                Ok(None) => panic!("the globals were never bounded"),
                Err(err) => break err,
            }
        };
        assert!(matches!(err, TarError::MetadataTooLarge(_)), "{err:?}");
        assert!(
            (10..20).contains(&entries),
            "{entries} entries before the limit"
        );
        // Within the bound, globals apply to every entry.
        let record = b"14 uid=424242\n";
        let mut tar = header(b"pax_global_header", b'g', record.len()).to_vec();
        tar.extend(padded(record));
        tar.extend_from_slice(&header(b"a", b'0', 0));
        tar.extend_from_slice(&header(b"b", b'0', 0));
        tar.extend_from_slice(&[0u8; 2 * TAR_BLOCK]);
        let mut stream = TarStream::new(tar.as_slice(), 16 << 10);
        for _ in 0..2 {
            assert_eq!(stream.next_entry().unwrap().unwrap().uid, 424242);
        }
    }

    #[test]
    fn numeric_fields_in_octal_and_base256() {
        assert_eq!(parse_unsigned(b"0000644\0"), Some(0o644));
        assert_eq!(parse_unsigned(b"  644 \0"), Some(0o644));
        assert_eq!(parse_unsigned(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_unsigned(b"0009\0"), None);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[4..].copy_from_slice(&(5u64 << 33).to_be_bytes());
        assert_eq!(parse_unsigned(&big), Some(5 << 33));
        let negative = [0xffu8; 12];
        assert_eq!(parse_signed(&negative), Some(-1));
        assert_eq!(parse_unsigned(&negative), None);
    }

    #[test]
    fn pax_records_may_contain_newlines() {
        let value = b"a\nb";
        let body = [b"SCHILY.xattr.user.x=".as_slice(), value, b"\n"].concat();
        let len = body.len() + 3; // "NN " prefix
        let record = [format!("{len} ").into_bytes(), body].concat();
        assert_eq!(record.len(), len);
        let records = parse_pax(&record).unwrap();
        assert_eq!(
            records,
            vec![(b"SCHILY.xattr.user.x".to_vec(), value.to_vec())]
        );
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"5 a=b\n").is_err());
    }

    #[test]
    fn pax_times_with_fractions_and_sign() {
        assert_eq!(parse_pax_time(b"100"), Some((100, 0)));
        assert_eq!(parse_pax_time(b"100.5"), Some((100, 500_000_000)));
        assert_eq!(parse_pax_time(b"1.0000000019"), Some((1, 1)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"-3"), Some((-3, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b"1.x"), None);
    }

    #[test]
    fn sparse_segments_are_validated() {
        let seg = |offset, len| Segment { offset, len };
        assert!(validate_segments(&[seg(0, 10), seg(20, 5)], 30, 15).is_ok());
        assert!(validate_segments(&[seg(20, 5), seg(0, 10)], 30, 15).is_err());
        assert!(validate_segments(&[seg(0, 10)], 5, 10).is_err());
        assert!(validate_segments(&[seg(0, 10)], 10, 11).is_err());
        assert!(validate_segments(&[seg(u64::MAX, 10)], u64::MAX, 10).is_err());
    }
}
