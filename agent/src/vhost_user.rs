//! What every vhost-user device of the agent shares: the listening socket, and a thread that
//! serves one frontend (QEMU) after another until the device stops.
//!
//! A device supplies only its session: a fresh `VhostUserDaemon` over its backend, and what to do
//! when a frontend attaches and detaches. A restarted QEMU re-attaches to the same device.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::sync::lock;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock};

/// Pause before retrying after a failed session setup or accept, so a persistent failure does
/// not spin.
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// The socket path could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {path}: {source}")]
pub struct BindError {
    /// The socket path.
    pub path: PathBuf,
    /// Why.
    pub source: io::Error,
}

/// Binds `path`, replacing a socket left by an earlier run; refuses to delete anything else.
/// The socket is the VM's device: only its owner (the VMM's user, root here) may connect, so
/// it is made mode 0600 at once.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let fail = |source| BindError {
        path: path.to_owned(),
        source,
    };
    remove_socket(path).map_err(fail)?;
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    Ok(listener)
}

/// Removes the socket file at `path` (one a device left); nothing there is fine, anything
/// else there is an error and stays.
pub fn remove_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why a session could not be set up.
#[derive(Debug)]
pub enum SetupError {
    /// Worth retrying after a pause.
    Retry(String),
    /// The device cannot serve at all; the serving thread ends.
    Fatal(String),
}

/// The backends the agent's devices use: no dirty-page bitmap, `VringRwLock` queues.
pub trait PlainBackend:
    VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static
{
}

impl<B> PlainBackend for B where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static
{
}

/// A hook run when a frontend attaches or detaches.
pub type Hook = Box<dyn FnOnce() + Send>;

/// One frontend session of a device.
pub struct Session<B: PlainBackend> {
    /// The daemon, over a fresh backend.
    pub daemon: VhostUserDaemon<B>,
    /// Run once a frontend is attached.
    pub on_attach: Hook,
    /// Run once it is gone (the daemon's threads still exist until the session is dropped).
    pub on_detach: Hook,
}

impl<B: PlainBackend> std::fmt::Debug for Session<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Control {
    stopping: AtomicBool,
    /// Disconnects the current frontend (on stop).
    frontend: Mutex<Option<ShutdownHandle>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("stopping", &self.stopping)
            .field("attached", &lock(&self.frontend).is_some())
            .finish()
    }
}

/// The serving thread of one device. Stopping it (or dropping it) disconnects the frontend, joins
/// the thread and removes the socket file.
#[derive(Debug)]
pub struct FrontendLoop {
    control: Arc<Control>,
    /// A second fd of the listening socket, used to wake the thread's blocked `accept`.
    listener_waker: UnixListener,
    thread: Option<JoinHandle<()>>,
    socket_path: PathBuf,
    name: String,
}

impl FrontendLoop {
    /// Serves frontends on `listener` (bound at `socket_path`) from a thread called `name`,
    /// building each session with `new_session`.
    pub fn start<B, F>(
        listener: UnixListener,
        socket_path: &Path,
        name: String,
        mut new_session: F,
    ) -> io::Result<FrontendLoop>
    where
        B: PlainBackend,
        F: FnMut() -> Result<Session<B>, SetupError> + Send + 'static,
    {
        let listener_waker = listener.try_clone()?;
        let control = Arc::new(Control::default());
        let thread_control = control.clone();
        let thread_name = name.clone();
        let thread = thread::Builder::new().name(name.clone()).spawn(move || {
            serve(
                &thread_control,
                &thread_name,
                Listener::from(listener),
                &mut new_session,
            );
        })?;
        Ok(FrontendLoop {
            control,
            listener_waker,
            thread: Some(thread),
            socket_path: socket_path.to_owned(),
            name,
        })
    }

    /// Stops serving; a second call does nothing.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.control.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a socket fd we own (`listener_waker` lives as long as `self`);
        // it only wakes a blocked accept and touches no memory.
        unsafe {
            libc::shutdown(self.listener_waker.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(frontend) = lock(&self.control.frontend).as_ref() {
            frontend.shutdown();
        }
        if thread.join().is_err() {
            warn!(device = %self.name, "serving thread panicked");
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

impl Drop for FrontendLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One frontend session after another until the device stops.
fn serve<B, F>(control: &Control, name: &str, mut listener: Listener, new_session: &mut F)
where
    B: PlainBackend,
    F: FnMut() -> Result<Session<B>, SetupError>,
{
    let stopping = || control.stopping.load(Ordering::SeqCst);
    while !stopping() {
        let Session {
            mut daemon,
            on_attach,
            on_detach,
        } = match new_session() {
            Ok(session) => session,
            Err(SetupError::Retry(e)) => {
                warn!(device = %name, error = %e, "cannot set up a session");
                thread::sleep(RETRY_DELAY);
                continue;
            }
            Err(SetupError::Fatal(e)) => {
                warn!(device = %name, error = %e, "cannot serve; giving up");
                return;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            if !stopping() {
                warn!(device = %name, error = %e, "accepting a frontend failed");
                thread::sleep(RETRY_DELAY);
            }
            continue;
        }
        *lock(&control.frontend) = daemon.shutdown_handle();
        if stopping() {
            daemon.request_shutdown();
        }
        on_attach();
        info!(device = %name, "frontend attached");

        let result = daemon.wait();

        *lock(&control.frontend) = None;
        on_detach();
        match result {
            Ok(()) => info!(device = %name, "frontend detached"),
            Err(e) => info!(device = %name, error = %e, "frontend session ended"),
        }
        // Dropping the daemon stops and joins its worker threads.
        drop(daemon);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_replaces_a_stale_socket_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dead listener leaves its socket file");
        bind(&path).expect("a stale socket is replaced");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "keep me").unwrap();
        let err = bind(&file).unwrap_err();
        assert_eq!(err.source.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }
}
