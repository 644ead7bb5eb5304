//! One VM's layer-store device: the vhost-user socket, the frontend (re)connect loop, and the
//! handle through which the agent maps and unmaps layers.
//!
//! Threads, all owned by this device (none shared with another device, no global lock): the
//! serving thread (accepts a frontend, waits for it to go away, repeats), and per frontend
//! session the vhost-user request thread and one worker thread per request queue.
//!
//! The extent table belongs to the device, not to a session: a frontend that reconnects sees
//! the same layers at the same offsets.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use thiserror::Error;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::layer_store::{DEFAULT_CAPACITY, LayerStore, LayerStoreError};
use super::offload::DEFAULT_OFFLOAD_THREADS;
use super::vhu_blk::{BlkBackend, wake_event};

/// Request queues offered when none is configured.
pub const DEFAULT_NUM_QUEUES: u16 = 2;
/// Most request queues (one worker thread each).
pub const MAX_NUM_QUEUES: u16 = 64;
/// Logical block size advertised when none is configured: the page size and EROFS's block size,
/// so every guest read is page-aligned.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Pause after a failed accept, so a persistent error does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(200);

/// Errors of the layer-store device.
#[derive(Debug, Error)]
pub enum LayerStoreDeviceError {
    /// The configuration is unusable.
    #[error("invalid layer store configuration: {0}")]
    InvalidConfig(&'static str),
    /// The extent table could not be created.
    #[error(transparent)]
    Table(#[from] LayerStoreError),
    /// The vhost-user socket could not be bound.
    #[error("cannot listen on vhost-user socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A system call failed.
    #[error("layer store I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Configuration of one VM's layer-store device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerStoreConfig {
    /// vhost-user socket the agent listens on; QEMU connects to it.
    pub socket_path: PathBuf,
    /// Request queues offered to the frontend (1..=[`MAX_NUM_QUEUES`]); QEMU's `num-queues`
    /// must not exceed it.
    pub num_queues: u16,
    /// Device capacity in bytes: a multiple of 1 MiB (default 1 PiB).
    pub capacity: u64,
    /// Logical block size advertised to the guest: 512 or 4096.
    pub block_size: u32,
    /// Helper threads per queue copying reads of at least 128 KiB (0: none, every read is
    /// copied by its queue's thread).
    pub large_read_threads: usize,
}

impl LayerStoreConfig {
    /// Defaults: [`DEFAULT_NUM_QUEUES`] queues, 1 PiB, 4 KiB blocks,
    /// [`DEFAULT_OFFLOAD_THREADS`] large-read helpers per queue.
    pub fn new(socket_path: impl Into<PathBuf>) -> LayerStoreConfig {
        LayerStoreConfig {
            socket_path: socket_path.into(),
            num_queues: DEFAULT_NUM_QUEUES,
            capacity: DEFAULT_CAPACITY,
            block_size: DEFAULT_BLOCK_SIZE,
            large_read_threads: DEFAULT_OFFLOAD_THREADS,
        }
    }

    fn validate(&self) -> Result<(), LayerStoreDeviceError> {
        if self.num_queues == 0 || self.num_queues > MAX_NUM_QUEUES {
            return Err(LayerStoreDeviceError::InvalidConfig(
                "num_queues must be in 1..=64",
            ));
        }
        if self.large_read_threads > 16 {
            return Err(LayerStoreDeviceError::InvalidConfig(
                "large_read_threads must be at most 16",
            ));
        }
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(LayerStoreDeviceError::InvalidConfig(
                "block_size must be 512 or 4096",
            ));
        }
        Ok(())
    }
}

/// State shared by the device handle and its serving thread.
struct Shared {
    config: LayerStoreConfig,
    store: LayerStore,
    stopping: AtomicBool,
    /// Disconnects the current frontend (on shutdown).
    frontend: Mutex<Option<ShutdownHandle>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One VM's layer-store device (vhost-user-blk backend).
#[derive(Debug)]
pub struct LayerStoreDevice {
    shared: Arc<Shared>,
    /// A second fd of the listening socket, used to wake the serving thread's `accept`.
    listener_waker: UnixListener,
    thread: Option<JoinHandle<()>>,
}

impl LayerStoreDevice {
    /// Binds the listening socket synchronously (so QEMU may be started right after this
    /// returns), then serves frontends on background threads. When a frontend disconnects, it
    /// goes back to listening for the next one, with the same extent table.
    pub fn start(config: LayerStoreConfig) -> Result<LayerStoreDevice, LayerStoreDeviceError> {
        config.validate()?;
        let store = LayerStore::new(config.capacity)?;
        let path = config.socket_path.clone();
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path).map_err(|source| LayerStoreDeviceError::Bind {
            path: path.clone(),
            source,
        })?;
        let listener_waker = listener.try_clone()?;
        let shared = Arc::new(Shared {
            config,
            store,
            stopping: AtomicBool::new(false),
            frontend: Mutex::new(None),
        });
        let thread_shared = shared.clone();
        let thread = thread::Builder::new()
            .name("layer-store".into())
            .spawn(move || serve(&thread_shared, Listener::from(listener)))?;
        info!(path = %path.display(), queues = shared.config.num_queues, "layer store: device listening");
        Ok(LayerStoreDevice {
            shared,
            listener_waker,
            thread: Some(thread),
        })
    }

    /// The device's extent table: map and unmap layers while the VM runs.
    pub fn extents(&self) -> LayerStore {
        self.shared.store.clone()
    }

    /// The configuration the device runs with.
    pub fn config(&self) -> &LayerStoreConfig {
        &self.shared.config
    }

    /// Stops the threads (the attached frontend, if any, is disconnected) and removes the
    /// socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a socket fd we own (`listener_waker` lives as long as `self`);
        // it only wakes a blocked accept and touches no memory.
        unsafe {
            libc::shutdown(self.listener_waker.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(frontend) = lock(&self.shared.frontend).as_ref() {
            frontend.shutdown();
        }
        if thread.join().is_err() {
            warn!("layer store: serving thread panicked");
        }
        let _ = std::fs::remove_file(&self.shared.config.socket_path);
    }
}

impl Drop for LayerStoreDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes a leftover socket file from an earlier run; refuses to delete anything else.
fn remove_stale_socket(path: &Path) -> Result<(), LayerStoreDeviceError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(std::fs::remove_file(path)?),
        Ok(_) => Err(LayerStoreDeviceError::Bind {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LayerStoreDeviceError::Io(e)),
    }
}

/// Builds one session's daemon: a fresh backend over the device's table, with each queue's
/// wake eventfd registered in that queue's worker thread.
fn new_session(
    shared: &Shared,
) -> Result<(Arc<BlkBackend>, VhostUserDaemon<Arc<BlkBackend>>), String> {
    let config = &shared.config;
    let backend = BlkBackend::new(
        shared.store.clone(),
        config.num_queues,
        config.block_size,
        config.large_read_threads,
    )
    .map_err(|e| format!("cannot create backend: {e}"))?;
    let backend = Arc::new(backend);
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let daemon = VhostUserDaemon::new("layer-store".into(), backend.clone(), memory)
        .map_err(|e| format!("cannot create vhost-user daemon: {e}"))?;
    let handlers = daemon.get_epoll_handlers();
    let event = wake_event(usize::from(config.num_queues));
    for (index, handler) in handlers.iter().enumerate() {
        let consumer = backend
            .wake_consumer(index)
            .ok_or_else(|| "more worker threads than queues".to_owned())?;
        handler
            .register_listener(consumer.as_raw_fd(), EventSet::IN, u64::from(event))
            .map_err(|e| format!("cannot watch queue {index}'s wake event: {e}"))?;
    }
    Ok((backend, daemon))
}

/// The serving loop: one frontend session after another until the device stops.
fn serve(shared: &Shared, mut listener: Listener) {
    while !shared.stopping.load(Ordering::SeqCst) {
        let (backend, mut daemon) = match new_session(shared) {
            Ok(session) => session,
            Err(e) => {
                warn!(error = %e, "layer store: cannot set up a session");
                thread::sleep(ACCEPT_RETRY_DELAY);
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            if !shared.stopping.load(Ordering::SeqCst) {
                warn!(error = %e, "layer store: accepting a frontend failed");
                thread::sleep(ACCEPT_RETRY_DELAY);
            }
            continue;
        }
        *lock(&shared.frontend) = daemon.shutdown_handle();
        if shared.stopping.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        info!("layer store: frontend attached");

        let result = daemon.wait();

        *lock(&shared.frontend) = None;
        backend.fail_all_parked();
        match result {
            Ok(()) => info!("layer store: frontend detached"),
            Err(e) => info!(error = %e, "layer store: frontend session ended"),
        }
        // Dropping the daemon stops and joins its worker threads.
        drop(daemon);
    }
}
