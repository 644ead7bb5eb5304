//! Bytes as an EROFS layer blob ending in its chunk-index section (plus a mode byte and the
//! section's length) through `IndexLocation::parse`, `ChunkIndex::decode_chunk_into` and
//! `decode_whole_layer`: no panic, no allocation from a lying index, lazy and eager agree.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gantry_oci::fuzzing::check_chunk_index(data);
});
