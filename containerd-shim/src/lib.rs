//! `containerd-shim-gantry-v2`: containerd's runtime v2 shim for Gantry. containerd (and
//! Kubernetes through its CRI plugin) drive tasks; the shim carries each call out through the
//! agent's operator API, so that the task runs in one of the card's VMs, from an image the
//! card pulls itself.
//!
//! - [`spec`]: what a task asks for, read from its bundle's OCI spec and annotations.
//! - [`placement`]: which VM a shim's tasks run in.
//! - [`agent`]: the operator API calls.
//! - [`io`]: stdio between containerd's FIFOs and the agent.
//! - [`process`]: one process's state and exit.
//! - [`record`]: what the bundle keeps for cleaning up after a dead shim.
//! - [`task`]: the Task service.
//! - [`service`]: the shim's commands (`start`, serve, `delete`).
//!
//! Imports point down this list (a module uses only those above it).

pub mod agent;
pub mod io;
pub mod placement;
pub mod process;
pub mod record;
pub mod service;
pub mod spec;
pub mod task;

/// The runtime's name, as containerd's `--runtime` and CRI's `runtime_type` spell it.
pub const RUNTIME_ID: &str = "io.containerd.gantry.v2";
