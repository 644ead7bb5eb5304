//! Where a mapped layer's bytes come from: the [`BlockSource`] trait (the one seam between the data
//! path and where bytes come from: the lazy layer source implements it too), and [`FileSource`], a
//! layer whose bytes are all present in a file (the cache's uncompressed EROFS image).
//!
//! A source reads straight into guest memory (a list of [`VolatileSlice`]s), so the data path
//! has no intermediate buffer. A source may answer "not yet" ([`Poll::Pending`]) for a range
//! whose chunks are still being fetched: it then keeps the [`Waker`] it was given and wakes it
//! when the range may be read. The device parks that request and polls it again after the wake,
//! while other requests go on (virtio completes requests in any order).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::task::{Poll, Waker};

use vm_memory::VolatileSlice;

/// Largest number of buffers passed to one `preadv` (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// The bytes of one mapped layer.
///
/// Implementations must be cheap to call from the queue threads (they run on the data path)
/// and must never block for a long time: a slow range answers [`Poll::Pending`] instead.
pub trait BlockSource: Send + Sync + fmt::Debug {
    /// Length of the layer in bytes. Must not change while the source is mapped.
    fn len(&self) -> u64;

    /// Whether the layer has no bytes (such a layer cannot be mapped).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `bufs`, in order, with the layer's bytes starting at `offset`.
    ///
    /// The caller guarantees `offset + total length of bufs <= self.len()`.
    /// Returns [`Poll::Pending`] if some of the range is not available yet; the source must then
    /// wake `waker` (a clone of it) once the range may be available. Waking spuriously is
    /// allowed; losing a wake-up is not (if the range became available between the check and
    /// storing the waker, wake at once). The buffers may have been partly written when
    /// `Pending` or an error is returned; the caller polls the whole range again later.
    fn read_at(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        waker: &Waker,
    ) -> Poll<io::Result<()>>;
}

/// A layer fully present in a file, read with `preadv` straight into guest memory.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Opens `path` read-only; the layer is the whole file as it is now.
    pub fn open(path: &Path) -> io::Result<FileSource> {
        let file = File::open(path)?;
        FileSource::from_file(file)
    }

    /// A source over an open file; the layer is the whole file as it is now.
    pub fn from_file(file: File) -> io::Result<FileSource> {
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }

    /// A source over the first `len` bytes of an open file (for example a sparse cache file
    /// whose logical size is the layer's).
    pub fn with_len(file: File, len: u64) -> FileSource {
        FileSource { file, len }
    }
}

impl BlockSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        _waker: &Waker,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(preadv_exact(&self.file, offset, bufs))
    }
}

/// Reads exactly the total length of `bufs` from `file` at `offset` into guest memory, with as
/// few `preadv` calls as the kernel allows. A file shorter than asked is an error
/// (`UnexpectedEof`), never a silent zero fill.
pub fn preadv_exact(file: &File, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
    if let [buf] = bufs {
        return pread_exact(file, offset, buf);
    }
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(IOV_MAX));
    // Position: buffer index and offset inside it.
    let mut index = 0usize;
    let mut skip = 0usize;
    let mut file_offset = offset;
    // Keeps the pointer guards alive for as long as the iovecs built from them are used.
    let guards: Vec<_> = bufs.iter().map(VolatileSlice::ptr_guard_mut).collect();
    while index < bufs.len() {
        iovecs.clear();
        for (position, guard) in guards.iter().enumerate().skip(index).take(IOV_MAX) {
            let start = if position == index { skip } else { 0 };
            let len = guard.len().saturating_sub(start);
            iovecs.push(libc::iovec {
                // SAFETY: `start <= guard.len()`, so the pointer stays inside (or one past the
                // end of) the mapping the guard describes.
                iov_base: unsafe { guard.as_ptr().add(start) }.cast(),
                iov_len: len,
            });
        }
        let file_offset_arg = libc::off_t::try_from(file_offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: each iovec points into guest memory described by a live `VolatileSlice`
        // guard, valid for writes of `iov_len` bytes; the kernel writes at most that much. The
        // count is at most IOV_MAX.
        let read = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
                file_offset_arg,
            )
        };
        if read < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "layer file shorter than its mapping",
            ));
        }
        let mut advanced = read as usize;
        file_offset = file_offset.saturating_add(advanced as u64);
        while advanced > 0 && index < bufs.len() {
            let remaining = guards
                .get(index)
                .map_or(0, |guard| guard.len().saturating_sub(skip));
            if advanced >= remaining {
                advanced -= remaining;
                index += 1;
                skip = 0;
            } else {
                skip += advanced;
                advanced = 0;
            }
        }
        // Skip empty buffers so the loop ends.
        while guards.get(index).is_some_and(|guard| guard.len() <= skip) {
            index += 1;
            skip = 0;
        }
    }
    Ok(())
}

/// [`preadv_exact`] for one buffer: the common case, without allocating.
fn pread_exact(file: &File, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
    let guard = buf.ptr_guard_mut();
    let mut done = 0usize;
    while done < guard.len() {
        let file_offset = offset
            .checked_add(done as u64)
            .and_then(|offset| libc::off_t::try_from(offset).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: `done < guard.len()`: the destination lies inside the guest memory the guard
        // describes, valid for writes of `guard.len() - done` bytes.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                guard.len() - done,
                file_offset,
            )
        };
        if read < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "layer file shorter than its mapping",
            ));
        }
        done += read as usize;
    }
    Ok(())
}
