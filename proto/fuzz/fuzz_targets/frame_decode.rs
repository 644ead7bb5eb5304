//! Frame decoding on arbitrary bytes: no panic, both decoders agree, encoding is canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = gantry_proto::fuzzing::check_frame_bytes(data) {
        panic!("{violation}");
    }
});
