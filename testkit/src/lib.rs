//! Test support shared by the agent's registry tests and the end-to-end tests: a real
//! `docker-registry` ([`Registry`]) and a fault-injecting proxy in front of it ([`FaultProxy`]).

pub mod proxy;
pub mod registry;

pub use proxy::{FaultProxy, Faults, ProxyLog};
pub use registry::{
    Registry, RegistryOptions, docker_config, free_port, tools_available, watchdog,
};
