//! The operator API as the agent serves it. The types, the streamed formats and the client are
//! in `gantry-api`, shared with the CLI and the containerd shim.
//!
//! - [`access`]: who may connect (socket mode and owner, peer credentials).
//! - [`progress`]: the `run` answer stream, which never drops a state update.
//! - [`server`]: the HTTP+JSON server on the unix socket.

pub mod access;
pub mod progress;
pub mod server;
