//! A raw inflate stream that can start in the middle of a deflate stream: zlib's
//! `inflatePrime` (the bits of a byte shared with the previous block) and
//! `inflateSetDictionary` (the 32 KiB of output before the start), as `libz-rs-sys` implements
//! them. flate2 has neither, and `Z_BLOCK`, which the index builder needs to stop at block
//! boundaries, only through this API.

use std::ffi::c_int;

use libz_rs_sys::{
    Z_BLOCK, Z_BUF_ERROR, Z_NEED_DICT, Z_NO_FLUSH, Z_OK, Z_STREAM_END, inflate, inflateEnd,
    inflateInit2_, inflatePrime, inflateSetDictionary, z_stream, zlibVersion,
};

/// What inflate said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// It made progress (or needs more input or output space).
    Ok,
    /// The deflate stream (or the gzip member) ended.
    StreamEnd,
}

/// A zlib error code, with zlib's message if it gave one.
#[derive(Debug, thiserror::Error)]
#[error("inflate: {message} (zlib code {code})")]
pub struct InflateError {
    /// zlib's return code.
    pub code: c_int,
    /// zlib's message, or a description of the code.
    pub message: String,
}

/// The stream's format, as `inflateInit2`'s window bits say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A gzip member (header and trailer checked).
    Gzip,
    /// Raw deflate, as after a checkpoint.
    Raw,
}

/// One inflate stream. The `z_stream` is boxed: zlib's state points back at it, so it must not
/// move once initialized.
pub struct Inflater {
    stream: Box<z_stream>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("total_in", &self.stream.total_in)
            .field("total_out", &self.stream.total_out)
            .finish()
    }
}

fn error(stream: &z_stream, code: c_int) -> InflateError {
    let message = if stream.msg.is_null() {
        match code {
            Z_NEED_DICT => "a preset dictionary is needed".to_owned(),
            Z_BUF_ERROR => "no progress possible".to_owned(),
            _ => "failed".to_owned(),
        }
    } else {
        // SAFETY: zlib sets `msg` to a NUL-terminated static string or leaves it null.
        unsafe { std::ffi::CStr::from_ptr(stream.msg) }
            .to_string_lossy()
            .into_owned()
    };
    InflateError { code, message }
}

impl Inflater {
    /// A stream of `format`.
    pub fn new(format: Format) -> Result<Self, InflateError> {
        let mut stream = Box::new(z_stream::default());
        let window_bits = match format {
            Format::Gzip => 15 + 16,
            Format::Raw => -15,
        };
        // SAFETY: `stream` is a default-initialized z_stream (the allocator fields are set), it
        // lives in a Box that is never moved out of, and the version string is zlib's own.
        let code = unsafe {
            inflateInit2_(
                &mut *stream,
                window_bits,
                zlibVersion(),
                std::mem::size_of::<z_stream>() as c_int,
            )
        };
        if code != Z_OK {
            return Err(error(&stream, code));
        }
        Ok(Self { stream })
    }

    /// Feeds the low `bits` bits of `value` ahead of the input (a block that starts inside a
    /// byte).
    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), InflateError> {
        // SAFETY: the stream was initialized by `new` and is not in use elsewhere.
        let code =
            unsafe { inflatePrime(&mut *self.stream, c_int::from(bits), c_int::from(value)) };
        match code {
            Z_OK => Ok(()),
            code => Err(error(&self.stream, code)),
        }
    }

    /// Sets the output that came before the stream's start (at most 32 KiB are used).
    pub fn set_dictionary(&mut self, dictionary: &[u8]) -> Result<(), InflateError> {
        if dictionary.is_empty() {
            return Ok(());
        }
        // SAFETY: the pointer and length describe `dictionary`, which zlib copies before
        // returning; the stream was initialized by `new`.
        let code = unsafe {
            inflateSetDictionary(
                &mut *self.stream,
                dictionary.as_ptr(),
                dictionary.len() as u32,
            )
        };
        match code {
            Z_OK => Ok(()),
            code => Err(error(&self.stream, code)),
        }
    }

    /// Inflates from `input` into `output`; returns how many bytes of each it used and whether
    /// the stream ended. With `stop_at_blocks`, it returns at each deflate block boundary
    /// (zlib's `Z_BLOCK`), where [`Self::at_block_boundary`] and [`Self::pending_bits`] say
    /// where it stopped.
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_blocks: bool,
    ) -> Result<(usize, usize, Progress), InflateError> {
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(output.len()).unwrap_or(u32::MAX);
        self.stream.next_in = input.as_ptr();
        self.stream.avail_in = avail_in;
        self.stream.next_out = output.as_mut_ptr();
        self.stream.avail_out = avail_out;
        let flush = if stop_at_blocks { Z_BLOCK } else { Z_NO_FLUSH };
        // SAFETY: next_in/avail_in and next_out/avail_out describe `input` and `output`, which
        // outlive the call; the stream was initialized by `new`.
        let code = unsafe { inflate(&mut *self.stream, flush) };
        let used_in = (avail_in - self.stream.avail_in) as usize;
        let used_out = (avail_out - self.stream.avail_out) as usize;
        // Nothing may point into the caller's buffers after the call.
        self.stream.next_in = std::ptr::null();
        self.stream.avail_in = 0;
        self.stream.next_out = std::ptr::null_mut();
        self.stream.avail_out = 0;
        match code {
            Z_OK => Ok((used_in, used_out, Progress::Ok)),
            // No progress for want of input or output space: the caller gives more.
            Z_BUF_ERROR if used_in == 0 && used_out == 0 => Ok((0, 0, Progress::Ok)),
            Z_STREAM_END => Ok((used_in, used_out, Progress::StreamEnd)),
            code => Err(error(&self.stream, code)),
        }
    }

    /// After a `stop_at_blocks` call: whether it stopped at a deflate block boundary (bit 128
    /// of zlib's `data_type`), and not after the stream's last block (bit 64).
    pub fn at_block_boundary(&self) -> bool {
        self.stream.data_type & 128 != 0 && self.stream.data_type & 64 == 0
    }

    /// After a `stop_at_blocks` call: the bits of the last input byte not consumed yet (0–7).
    pub fn pending_bits(&self) -> u8 {
        (self.stream.data_type & 7) as u8
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialized by `new`; it is ended once, here.
        unsafe {
            inflateEnd(&mut *self.stream);
        }
    }
}

// SAFETY: the stream's state is owned by this value alone (no thread-local or shared state in
// zlib-rs), so moving it to another thread is sound; it is not Sync.
unsafe impl Send for Inflater {}
