//! Gantry's agent: the daemon on the offload card.
//!
//! It is the device for each attached VM (vhost-user backends for the layer store and the vsock
//! control channel), it keeps the image cache, and it drives the shim inside each guest.
//!
//! Devices: [`blk`] (the layer store), [`vsock`] (the control channel), [`vhost_user`] (what the
//! two share). Images: [`cache`] (content-addressed layers), [`images`] (image service, pull,
//! default image), [`lazy`] (layers fetched chunk by chunk while mapped). Containers: [`containers`] (run, logs, specs), [`session`] (one shim session),
//! [`vm`] (one attached VM), [`keeper`] (the per-VM process that outlives the agent: vsock device,
//! QEMU's parent), [`mapped`] (a VM's mapped layers as recorded for the next agent), [`qemu`] (the
//! launch recipe). The daemon: [`config`], [`state`], [`daemon`], [`api`] (the server),
//! [`metrics`] (Prometheus metrics, `GET /metrics`). The operator: [`cli`]. Formats, the registry
//! client and the API types are the `gantry-erofs`, `gantry-oci` and `gantry-api` crates.

pub mod api;
pub mod blk;
pub mod cache;
pub mod cli;
pub mod config;
pub mod containers;
pub mod daemon;
mod fuzz_input;
#[doc(hidden)]
pub mod fuzzing;
pub mod images;
pub mod keeper;
pub mod lazy;
pub mod manifest;
pub mod mapped;
pub mod metrics;
pub mod peer;
pub mod qemu;
pub mod session;
pub mod state;
pub mod sync;
pub mod units;
pub mod vhost_user;
pub mod vm;
pub mod vms;
pub mod vsock;
