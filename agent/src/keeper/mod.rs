//! The VM keeper: a small process per VM that holds what must outlive the agent.
//!
//! QEMU 7.2 cannot reconnect a `vhost-user-vsock` device (with `reconnect=` on its chardev the
//! device fails to start: "Failed to set msg fds … vhost_backend_init failed: Protocol error";
//! measured, see `docs/decisions.md`), and a QEMU that is the agent's child dies or is orphaned
//! with it. So each VM gets a keeper, started by the agent in its own process group, which
//! outlives the agent:
//! - it is the VM's vsock device (the same [`crate::vsock::VsockDevice`] the agent used to run
//!   in-process), and hands the agent each stream it opens into the guest as a file descriptor
//!   over its control socket (`SCM_RIGHTS`), so no byte is copied twice. When the agent dies its
//!   streams close, the guest's shim sees its connection reset, keeps its containers running,
//!   and the next agent connects again.
//! - it is the parent of the VM's QEMU (when the agent launches one), started with a
//!   parent-death signal: killing the keeper kills its QEMU, and the keeper exits when QEMU does.
//!
//! The layer store stays in the agent (it needs the cache and the fetcher): QEMU's
//! `vhost-user-blk` reconnects (`reconnect=1`), and the inflight record (`blk::inflight`) lets
//! the next agent finish what was in flight.
//!
//! Files, in the VM's state directory: `keeper.json` (what the keeper was started with; an
//! agent adopts a live keeper only if it matches), `keeper.sock` (the control socket, 0600),
//! `keeper.pid`, `keeper.log` (its and QEMU's output), `qemu.exit` (how QEMU ended, once it has:
//! the keeper exits with it).
//!
//! Modules: `protocol` (the control messages), `serve` (the keeper process), `client` (the
//! agent's side: start or adopt, connect, status, stop).

pub mod client;
pub mod protocol;
pub mod serve;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use client::{KeeperClient, KeeperError};

/// What a keeper runs: written by the agent to `keeper.json`, read by the keeper at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperConfig {
    /// The VM's name (for logs).
    pub vm: String,
    /// The vhost-user-vsock socket QEMU connects to.
    pub vsock_socket: PathBuf,
    /// The guest's CID.
    pub guest_cid: u64,
    /// The QEMU to run as the keeper's child, if the agent launches the VM.
    pub qemu: Option<QemuCommand>,
}

/// A QEMU command line, exactly as the launch recipe built it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuCommand {
    /// The binary.
    pub binary: PathBuf,
    /// Its arguments.
    pub args: Vec<std::ffi::OsString>,
}

/// Where one VM's keeper keeps its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeeperPaths {
    /// The VM's state directory.
    pub dir: PathBuf,
}

impl KeeperPaths {
    /// The files of the keeper whose state directory is `dir`.
    pub fn new(dir: &Path) -> KeeperPaths {
        KeeperPaths {
            dir: dir.to_owned(),
        }
    }

    /// `keeper.json`.
    pub fn config(&self) -> PathBuf {
        self.dir.join("keeper.json")
    }

    /// `keeper.sock`.
    pub fn control(&self) -> PathBuf {
        self.dir.join("keeper.sock")
    }

    /// `keeper.pid`.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("keeper.pid")
    }

    /// `qemu.exit`: how the keeper's QEMU ended, written as the keeper exits after it.
    pub fn qemu_exit(&self) -> PathBuf {
        self.dir.join("qemu.exit")
    }

    /// `keeper.log`.
    pub fn log(&self) -> PathBuf {
        self.dir.join("keeper.log")
    }
}
