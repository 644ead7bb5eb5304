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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use thiserror::Error;
use tracing::info;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::inflight::{InflightError, InflightFile};
use super::layer_store::{DEFAULT_CAPACITY, LayerStore, LayerStoreError};
use super::offload::DEFAULT_OFFLOAD_THREADS;
use super::vhu_blk::{BlkBackend, wake_event};
use crate::metrics::BlkMetrics;
use crate::vhost_user::{self, FrontendLoop, Session, SetupError};

/// Request queues offered when none is configured.
pub const DEFAULT_NUM_QUEUES: u16 = 2;
/// Most request queues (one worker thread each).
pub const MAX_NUM_QUEUES: u16 = 64;
/// Logical block size advertised when none is configured: the page size and EROFS's block size,
/// so every guest read is page-aligned.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

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
    /// The inflight record could not be opened.
    #[error(transparent)]
    Inflight(#[from] InflightError),
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
    /// Where requests in flight are recorded, so that the next agent resumes them after a
    /// crash or an upgrade (see `inflight`); `None`: not recorded.
    pub inflight_record: Option<PathBuf>,
    /// Where the requests it serves are counted (default: counters nothing exports).
    pub metrics: BlkMetrics,
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
            inflight_record: None,
            metrics: BlkMetrics::default(),
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

/// The backend of the frontend session attached now, if any (for gauges read at scrape time).
type CurrentBackend = Arc<Mutex<Weak<BlkBackend>>>;

/// One VM's layer-store device (vhost-user-blk backend).
///
/// Dropping it is leaving: the frontend is disconnected but nothing in flight is failed and the
/// inflight record is kept, so that the next agent's device resumes it (an upgrade, or the agent
/// exiting while its VMs run on). [`LayerStoreDevice::shutdown`] is the end of the VM's device.
#[derive(Debug)]
pub struct LayerStoreDevice {
    config: LayerStoreConfig,
    store: LayerStore,
    /// Locked only to stop it ([`Self::shutdown`] takes `&self`: the VM is shared).
    frontends: std::sync::Mutex<FrontendLoop>,
    /// Set when the agent leaves: the session's end then fails and clears nothing.
    leaving: Arc<AtomicBool>,
    current: CurrentBackend,
}

impl LayerStoreDevice {
    /// Binds the listening socket synchronously (so QEMU may be started right after this
    /// returns), then serves frontends on background threads. When a frontend disconnects, it
    /// goes back to listening for the next one, with the same extent table.
    pub fn start(config: LayerStoreConfig) -> Result<LayerStoreDevice, LayerStoreDeviceError> {
        let store = LayerStore::with_metrics(config.capacity, config.metrics.clone())?;
        Self::start_on(config, store)
    }

    /// The same, serving `store` (already holding the layers a previous agent mapped). Its
    /// capacity wins over the config's.
    pub fn start_on(
        mut config: LayerStoreConfig,
        store: LayerStore,
    ) -> Result<LayerStoreDevice, LayerStoreDeviceError> {
        config.capacity = store.capacity();
        config.validate()?;
        let inflight = match &config.inflight_record {
            Some(path) => Some(Arc::new(InflightFile::open(path, config.num_queues)?)),
            None => None,
        };
        let path = config.socket_path.clone();
        let listener = vhost_user::bind(&path).map_err(|e| LayerStoreDeviceError::Bind {
            path: e.path,
            source: e.source,
        })?;
        let (session_config, session_store) = (config.clone(), store.clone());
        let leaving = Arc::new(AtomicBool::new(false));
        let session_leaving = Arc::clone(&leaving);
        let current = CurrentBackend::default();
        let session_current = Arc::clone(&current);
        let frontends = FrontendLoop::start(listener, &path, "layer-store".into(), move || {
            new_session(
                &session_config,
                &session_store,
                inflight.clone(),
                &session_current,
                Arc::clone(&session_leaving),
            )
        })?;
        info!(path = %path.display(), queues = config.num_queues, "layer store: device listening");
        Ok(LayerStoreDevice {
            config,
            store,
            frontends: std::sync::Mutex::new(frontends),
            leaving,
            current,
        })
    }

    /// The device's extent table: map and unmap layers while the VM runs.
    pub fn extents(&self) -> LayerStore {
        self.store.clone()
    }

    /// The configuration the device runs with.
    pub fn config(&self) -> &LayerStoreConfig {
        &self.config
    }

    /// Requests parked now, over every queue of the attached frontend (0 without one).
    pub fn parked_requests(&self) -> usize {
        let backend = crate::sync::lock(&self.current).upgrade();
        backend.map_or(0, |backend| {
            (0..usize::from(self.config.num_queues))
                .map(|queue| backend.parked_requests(queue))
                .sum()
        })
    }

    /// Stops the threads (the attached frontend, if any, is disconnected, its parked requests
    /// failed and the inflight record cleared) and removes the socket file.
    pub fn shutdown(&self) {
        crate::sync::lock(&self.frontends).stop();
    }
}

impl Drop for LayerStoreDevice {
    fn drop(&mut self) {
        // After `shutdown` the frontends are stopped already and this changes nothing.
        self.leaving.store(true, Ordering::SeqCst);
        crate::sync::lock(&self.frontends).stop();
    }
}

/// Builds one session's daemon: a fresh backend over the device's table and inflight record,
/// with each queue's wake eventfd registered in that queue's worker thread. Parked requests
/// fail (and the record is cleared) when the frontend goes: its guest is gone.
fn new_session(
    config: &LayerStoreConfig,
    store: &LayerStore,
    inflight: Option<Arc<InflightFile>>,
    current: &CurrentBackend,
    leaving: Arc<AtomicBool>,
) -> Result<Session<Arc<BlkBackend>>, SetupError> {
    let retry = SetupError::Retry;
    let backend = BlkBackend::with_record(
        store.clone(),
        config.num_queues,
        config.block_size,
        config.large_read_threads,
        inflight,
    )
    .map_err(|e| retry(format!("cannot create backend: {e}")))?;
    let backend = Arc::new(backend);
    *crate::sync::lock(current) = Arc::downgrade(&backend);
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let daemon = VhostUserDaemon::new("layer-store".into(), backend.clone(), memory)
        .map_err(|e| retry(format!("cannot create vhost-user daemon: {e}")))?;
    let handlers = daemon.get_epoll_handlers();
    let event = wake_event(usize::from(config.num_queues));
    for (index, handler) in handlers.iter().enumerate() {
        let consumer = backend
            .wake_consumer(index)
            .ok_or_else(|| retry("more worker threads than queues".to_owned()))?;
        handler
            .register_listener(consumer.as_raw_fd(), EventSet::IN, u64::from(event))
            .map_err(|e| retry(format!("cannot watch queue {index}'s wake event: {e}")))?;
    }
    Ok(Session {
        daemon,
        on_attach: Box::new(|| {}),
        on_detach: Box::new(move || {
            // The frontend went (its guest is gone) unless the agent itself is leaving.
            if !leaving.load(Ordering::SeqCst) {
                backend.fail_all_parked();
            }
        }),
    })
}
