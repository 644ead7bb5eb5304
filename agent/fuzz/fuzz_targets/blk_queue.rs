//! A hostile virtio-blk driver (descriptor chains, indirect tables, headers, ring indices) against
//! the layer-store backend, every completion checked against a model of the spec.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gantry_agent::fuzzing::check_blk_input(data);
});
