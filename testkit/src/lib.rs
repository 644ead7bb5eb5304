//! Test support shared by the agent's registry tests and the end-to-end tests: a real
//! `docker-registry` ([`Registry`]), a fault-injecting proxy in front of it ([`FaultProxy`]),
//! and a shaping proxy that imitates a slower, longer link ([`ShapingProxy`]).

pub mod proxy;
pub mod registry;
pub mod shaping;

pub use proxy::{FaultProxy, Faults, ProxyLog};
pub use registry::{
    Registry, RegistryOptions, docker_config, free_port, tools_available, watchdog,
};
pub use shaping::{Shaping, ShapingProxy};
