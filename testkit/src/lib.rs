//! Test support shared by the agent's registry tests and the end-to-end tests: a real
//! `docker-registry` ([`Registry`]), a fault-injecting proxy in front of it ([`FaultProxy`]),
//! and a shaping proxy that imitates a slower, longer link ([`ShapingProxy`]).

pub mod bench_root;
pub mod proxy;
pub mod registry;
pub mod shaping;

pub use proxy::{FaultProxy, Faults, ProxyLog};
pub use registry::{
    Registry, RegistryOptions, docker_config, free_port, tools_available, watchdog,
};
pub use shaping::{Shaping, ShapingProxy};

/// Deterministic incompressible bytes (xorshift): test files and layers that a compressor
/// cannot shrink.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
