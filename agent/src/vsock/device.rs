//! One VM's vsock device: the vhost-user socket, the frontend (re)connect loop, and the
//! connector the rest of the agent uses to open streams into the guest.
//!
//! Threads, all owned by this device (none is shared with another device, and there is no global
//! lock): the serving thread (accepts a frontend, waits for it to go away, repeats), and per
//! frontend session the vhost-user request thread and the worker thread of `vhost-user-backend`.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::oneshot;
use tracing::info;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::backend::{BACKEND_EVENT, VsockBackend};
use super::requests::{ConnectRequest, RequestQueue};
use crate::metrics::VsockMetrics;
use crate::sync::lock;
use crate::vhost_user::{self, FrontendLoop, Session, SetupError};

/// Default receive buffer advertised to the guest per connection.
pub const DEFAULT_CONN_BUFFER_SIZE: u32 = 256 * 1024;
/// Default connection limit per VM.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default time the guest has to accept a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the vsock device and its connector.
#[derive(Debug, Error)]
pub enum VsockError {
    /// No frontend is attached, or the guest driver has not started the device.
    #[error("vsock device not ready: no frontend attached or guest driver inactive")]
    NotReady,
    /// The guest answered the connection request with `OP_RST` (nothing listens on the port).
    #[error("connection refused by the guest")]
    Refused,
    /// The guest did not answer the connection request in time.
    #[error("connection to the guest timed out")]
    TimedOut,
    /// The VM's connection limit is reached.
    #[error("too many vsock connections for this VM")]
    TooManyConnections,
    /// The device was reset or the frontend left while the connection was being set up.
    #[error("vsock device reset while connecting")]
    Reset,
    /// The configuration is unusable.
    #[error("invalid vsock device configuration: {0}")]
    InvalidConfig(&'static str),
    /// The vhost-user socket could not be bound.
    #[error("cannot listen on vhost-user socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A system call failed.
    #[error("vsock I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Configuration of one VM's vsock device.
#[derive(Clone, Debug)]
pub struct VsockDeviceConfig {
    /// vhost-user socket the agent listens on; QEMU connects to it.
    pub socket_path: PathBuf,
    /// The guest's CID, exposed in the device config space.
    pub guest_cid: u64,
    /// Receive buffer (`buf_alloc`) advertised to the guest per connection.
    pub conn_buffer_size: u32,
    /// Most connections open at once for this VM.
    pub max_connections: usize,
    /// How long [`VsockConnector::connect`] waits for the guest's answer.
    pub connect_timeout: Duration,
    /// Where its connections and bytes are counted (default: counters nothing exports).
    pub metrics: VsockMetrics,
}

impl VsockDeviceConfig {
    /// Defaults: 256 KiB per connection, 64 connections, 5 s connect timeout.
    pub fn new(socket_path: impl Into<PathBuf>, guest_cid: u64) -> VsockDeviceConfig {
        VsockDeviceConfig {
            socket_path: socket_path.into(),
            guest_cid,
            conn_buffer_size: DEFAULT_CONN_BUFFER_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            metrics: VsockMetrics::default(),
        }
    }

    fn validate(&self) -> Result<(), VsockError> {
        // 0, 1 and 2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
        if self.guest_cid < 3 || self.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidConfig(
                "guest_cid must be in 3..0xffffffff",
            ));
        }
        if self.conn_buffer_size == 0 {
            return Err(VsockError::InvalidConfig("conn_buffer_size must not be 0"));
        }
        if self.max_connections == 0 {
            return Err(VsockError::InvalidConfig("max_connections must not be 0"));
        }
        Ok(())
    }
}

/// State shared by the device handle, its serving thread and its connectors.
struct Shared {
    config: VsockDeviceConfig,
    /// The current frontend session's request queue, if a frontend is attached.
    session: Mutex<Option<Arc<RequestQueue>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("attached", &lock(&self.session).is_some())
            .finish_non_exhaustive()
    }
}

/// One VM's vhost-user-vsock device.
#[derive(Debug)]
pub struct VsockDevice {
    shared: Arc<Shared>,
    frontends: FrontendLoop,
}

impl VsockDevice {
    /// Binds the listening socket synchronously (so QEMU may be started right after this
    /// returns), then serves frontends on background threads. When a frontend disconnects (QEMU
    /// exited), it goes back to listening for the next one (a restarted QEMU re-attaches to the
    /// same agent).
    pub fn start(config: VsockDeviceConfig) -> Result<VsockDevice, VsockError> {
        config.validate()?;
        let path = config.socket_path.clone();
        let listener = vhost_user::bind(&path).map_err(|e| VsockError::Bind {
            path: e.path,
            source: e.source,
        })?;
        let shared = Arc::new(Shared {
            config,
            session: Mutex::new(None),
        });
        let session_shared = shared.clone();
        let name = format!("vsock-cid{}", shared.config.guest_cid);
        let frontends =
            FrontendLoop::start(listener, &path, name, move || new_session(&session_shared))?;
        info!(path = %path.display(), cid = shared.config.guest_cid, "vsock: device listening");
        Ok(VsockDevice { shared, frontends })
    }

    /// A handle that opens streams into this device's guest.
    pub fn connector(&self) -> VsockConnector {
        VsockConnector {
            shared: self.shared.clone(),
        }
    }

    /// Stops the threads (the attached frontend, if any, is disconnected and every stream
    /// closed) and removes the socket file.
    pub fn shutdown(mut self) {
        self.frontends.stop();
    }
}

/// Builds one session: a fresh backend whose host-stream events are watched by the daemon's
/// worker; connectors reach the guest through it while the frontend is attached.
fn new_session(shared: &Arc<Shared>) -> Result<Session<Arc<VsockBackend>>, SetupError> {
    let config = &shared.config;
    let backend = VsockBackend::new(
        config.guest_cid,
        config.conn_buffer_size,
        config.max_connections,
    )
    .map(Arc::new)
    .map_err(|e| SetupError::Retry(format!("cannot create backend: {e}")))?;
    backend.count_into(config.metrics.clone());
    let name = format!("vsock-cid{}-vhost", config.guest_cid);
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let daemon = VhostUserDaemon::new(name, backend.clone(), memory)
        .map_err(|e| SetupError::Retry(format!("cannot create vhost-user daemon: {e}")))?;
    let handler = daemon
        .get_epoll_handlers()
        .first()
        .cloned()
        .ok_or_else(|| SetupError::Fatal("vhost-user daemon has no worker".into()))?;
    handler
        .register_listener(
            backend.host_events_fd(),
            EventSet::IN,
            u64::from(BACKEND_EVENT),
        )
        .map_err(|e| SetupError::Retry(format!("cannot watch host streams: {e}")))?;
    let (attach_shared, requests) = (shared.clone(), backend.requests());
    let detach_shared = shared.clone();
    Ok(Session {
        daemon,
        on_attach: Box::new(move || *lock(&attach_shared.session) = Some(requests)),
        on_detach: Box::new(move || {
            *lock(&detach_shared.session) = None;
            backend.disconnect();
        }),
    })
}

/// Opens streams into one VM's guest. Cheap to clone; usable from any thread or task.
#[derive(Clone, Debug)]
pub struct VsockConnector {
    shared: Arc<Shared>,
}

/// Wakes the worker if the connect is abandoned (timed out or cancelled), so that it drops the
/// half-open connection instead of keeping it until the guest answers.
struct AbandonGuard {
    queue: Arc<RequestQueue>,
    receiver: Option<oneshot::Receiver<Result<std::os::unix::net::UnixStream, VsockError>>>,
    settled: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        // Close the receiver first: the worker checks for closed replies when woken.
        drop(self.receiver.take());
        if !self.settled {
            self.queue.wake();
        }
    }
}

impl VsockConnector {
    /// Opens a stream connection from the host (CID 2, an ephemeral local port) to `port` in the
    /// guest. Resolves once the guest answered `OP_RESPONSE`. The returned stream is one end of a
    /// unix socketpair whose other end the device thread shuttles to/from the virtqueues.
    pub async fn connect(&self, port: u32) -> Result<tokio::net::UnixStream, VsockError> {
        let queue = lock(&self.shared.session)
            .clone()
            .ok_or(VsockError::NotReady)?;
        let (reply, receiver) = oneshot::channel();
        queue.submit(ConnectRequest { port, reply })?;
        let mut guard = AbandonGuard {
            queue,
            receiver: Some(receiver),
            settled: false,
        };
        let Some(receiver) = guard.receiver.as_mut() else {
            return Err(VsockError::Reset);
        };
        let outcome = tokio::time::timeout(self.shared.config.connect_timeout, receiver).await;
        let stream = match outcome {
            Err(_elapsed) => return Err(VsockError::TimedOut),
            Ok(Err(_closed)) => {
                guard.settled = true;
                return Err(VsockError::Reset);
            }
            Ok(Ok(result)) => {
                guard.settled = true;
                result?
            }
        };
        // The worker made it non-blocking, as tokio requires.
        Ok(tokio::net::UnixStream::from_std(stream)?)
    }
}
