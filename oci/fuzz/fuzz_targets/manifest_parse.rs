//! Registry manifest and index bytes (with the media type a registry announced) through
//! `ManifestDocument::parse`, platform selection and re-serialization: no panic, consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gantry_oci::fuzzing::check_manifest(data);
});
