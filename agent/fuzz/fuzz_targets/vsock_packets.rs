//! Hostile vsock guest packets and host stream actions against the connection table: bounded
//! state, well-formed packets to the guest, credit respected, bytes intact both ways.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gantry_agent::fuzzing::check_vsock_input(data);
});
