//! Gantry's agent: the daemon on the offload card.
//!
//! It is the device for each attached VM (vhost-user backends for the layer store and the vsock
//! control channel), it keeps the image cache, and it drives the shim inside each guest.

pub mod api;
pub mod blk;
pub mod cache;
pub mod cli;
pub mod config;
pub mod containers;
pub mod daemon;
pub mod image;
pub mod qemu;
pub mod session;
pub mod vhost_user;
pub mod vm;
pub mod vsock;
