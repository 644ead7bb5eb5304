//! Bytes as a gzip tar layer through the zTOC builder (gzip index and file table in one pass),
//! every span extracted alone against a plain decompression, tampered spans refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gantry_oci::fuzzing::gzip_index::check_gzip_index(data);
});
