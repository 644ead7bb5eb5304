//! A writer that counts and hashes what goes through it: a layer's digest and size, or a
//! decoded image's, come out of the one pass that writes it.

use std::io::{self, Write};

use sha2::{Digest as _, Sha256};

use crate::reference::Digest;

/// Passes writes on to `inner`, hashing and counting the bytes it accepted.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Flushes `inner`; the digest and length of everything written.
    pub(crate) fn finish(mut self) -> io::Result<(Digest, u64)> {
        self.inner.flush()?;
        Ok((
            Digest::from_sha256(self.hasher.finalize().into()),
            self.written,
        ))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
