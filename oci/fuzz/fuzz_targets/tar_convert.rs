//! A layer's bytes through compression detection, the tar reader and tar → EROFS conversion
//! (small caps, output on tmpfs): no panic, the three agree, a failure leaves no file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gantry_oci::fuzzing::check_tar_layer(data);
});
