//! Decoding never allocates what a hostile frame merely claims.
//!
//! A counting global allocator records the largest single allocation while frames that claim far
//! more than they carry are decoded. One test function only, so no other test allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};

use gantry_proto::{DEFAULT_MAX_FRAME_LEN, FrameCodec, FrameError, read_frame};

struct LargestAllocation;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only records sizes.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout, via `alloc` above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, which we pass on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

fn largest_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    let value = f();
    (value, LARGEST.load(Ordering::Relaxed))
}

#[test]
fn claimed_lengths_are_not_allocated_up_front() {
    const CLAIMED: u32 = DEFAULT_MAX_FRAME_LEN - 1;

    // A header that claims ~4 MiB followed by 100 bytes, read by the blocking reader.
    let mut frame = CLAIMED.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0u8; 100]);
    let (result, largest) =
        largest_during(|| read_frame(&mut Cursor::new(&frame), DEFAULT_MAX_FRAME_LEN));
    assert!(
        matches!(result, Err(FrameError::Truncated { got: 100, .. })),
        "{result:?}"
    );
    assert!(
        largest < 64 * 1024,
        "blocking reader allocated {largest} bytes for a 100-byte frame"
    );

    // The same through the tokio codec on a real byte stream.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (result, largest) = largest_during(|| {
        runtime.block_on(async {
            use futures::StreamExt;
            let reader = tokio_util::codec::FramedRead::new(&frame[..], FrameCodec::default());
            reader.collect::<Vec<_>>().await
        })
    });
    assert!(
        matches!(result.as_slice(), [Err(FrameError::Truncated { .. })]),
        "{result:?}"
    );
    assert!(
        largest < 64 * 1024,
        "tokio codec allocated {largest} bytes for a 100-byte frame"
    );

    // A small, complete payload whose inner string claims 3 MiB: Goodbye { reason }.
    let mut payload = 4u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&(3u64 << 20).to_le_bytes());
    payload.extend_from_slice(b"short");
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&payload);
    let (result, largest) =
        largest_during(|| read_frame(&mut Cursor::new(&frame), DEFAULT_MAX_FRAME_LEN));
    assert!(matches!(result, Err(FrameError::Decode(_))), "{result:?}");
    assert!(
        largest < 64 * 1024,
        "decoder allocated {largest} bytes for an inner length claim"
    );
}
