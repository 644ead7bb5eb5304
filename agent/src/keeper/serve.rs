//! The keeper process (`gantry-agent vm-keeper --config keeper.json`): the VM's vsock device,
//! its QEMU's parent, and the control socket the agent asks for streams.
//!
//! It runs until its QEMU exits, or until it is told to stop (`Stop`, or `SIGTERM`), and then
//! removes its socket and pid files. QEMU is spawned from the main thread with a parent-death
//! signal (`SIGKILL`), so it never outlives the keeper.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UnixListener;
use tracing::{info, warn};

use super::protocol::{self, KeeperStatus, Reply, Request};
use super::{KeeperConfig, KeeperPaths};
use crate::sync::lock;
use crate::vsock::{VsockConnector, VsockDevice, VsockDeviceConfig, VsockError};

/// How long a control connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the keeper could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `keeper.json` is unreadable.
    #[error("keeper config {path}: {reason}")]
    Config {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The vsock device did not start.
    #[error("vsock device: {0}")]
    Device(#[from] VsockError),
    /// A file or socket of the keeper could not be made.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

#[derive(Debug, Default)]
struct QemuState {
    pid: Option<u32>,
    exit: Option<String>,
    started_unix_ms: Option<u64>,
}

/// Runs the keeper described by `config_path` until its QEMU exits or it is stopped.
pub async fn run(config_path: &Path) -> Result<(), ServeError> {
    let config: KeeperConfig = std::fs::read(config_path)
        .map_err(|err| err.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|err| err.to_string()))
        .map_err(|reason| ServeError::Config {
            path: config_path.to_owned(),
            reason,
        })?;
    let paths = KeeperPaths::new(config_path.parent().unwrap_or(Path::new(".")));
    let device_config = VsockDeviceConfig::new(config.vsock_socket.clone(), config.guest_cid);
    let vsock_metrics = device_config.metrics.clone();
    let device = VsockDevice::start(device_config)?;
    let control = crate::vhost_user::bind(&paths.control()).map_err(|err| ServeError::Io {
        what: format!("control socket {}", err.path.display()),
        source: err.source,
    })?;
    control
        .set_nonblocking(true)
        .map_err(io_error("control socket"))?;
    let control = UnixListener::from_std(control).map_err(io_error("control socket"))?;
    std::fs::write(paths.pid(), format!("{}\n", std::process::id()))
        .map_err(io_error("pid file"))?;

    let qemu_state = Arc::new(Mutex::new(QemuState::default()));
    // Spawned from this (the main) thread: the parent-death signal follows the thread that
    // forked, and this thread lives as long as the keeper.
    let mut qemu = match &config.qemu {
        Some(command) => {
            let mut child = tokio::process::Command::new(&command.binary);
            child.args(&command.args).stdin(std::process::Stdio::null());
            // SAFETY: between fork and exec the closure only calls prctl(2), which is
            // async-signal-safe and touches no memory of the parent.
            unsafe {
                child.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                        .map_err(std::io::Error::from)
                });
            }
            let child = child
                .spawn()
                .map_err(io_error(format!("starting {}", command.binary.display())))?;
            let started = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut state = lock(&qemu_state);
            state.pid = child.id();
            state.started_unix_ms = Some(started);
            info!(vm = %config.vm, pid = ?state.pid, "QEMU started");
            Some(child)
        }
        None => None,
    };

    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_error("signal handler"))?;
    let connector = device.connector();
    let config = Arc::new(config);
    info!(vm = %config.vm, control = %paths.control().display(), "keeper serving");
    loop {
        tokio::select! {
            accepted = control.accept() => match accepted {
                Ok((stream, _)) => {
                    let (connector, config, qemu_state, stop_tx, vsock_metrics) = (
                        connector.clone(),
                        Arc::clone(&config),
                        Arc::clone(&qemu_state),
                        stop_tx.clone(),
                        vsock_metrics.clone(),
                    );
                    tokio::spawn(async move {
                        let served = Served { config: &config, qemu: &qemu_state, vsock: &vsock_metrics };
                        if let Err(err) = answer(stream, connector, served, stop_tx).await
                        {
                            warn!(%err, "keeper: control request failed");
                        }
                    });
                }
                Err(err) => {
                    warn!(%err, "keeper: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            status = async {
                match qemu.as_mut() {
                    Some(child) => child.wait().await,
                    None => std::future::pending().await,
                }
            } => {
                let exit = match status {
                    Ok(status) => status.to_string(),
                    Err(err) => format!("cannot wait for QEMU: {err}"),
                };
                info!(vm = %config.vm, %exit, "QEMU exited; keeper stopping");
                if let Err(err) = std::fs::write(paths.qemu_exit(), &exit) {
                    warn!(%err, "cannot record how QEMU ended");
                }
                lock(&qemu_state).exit = Some(exit);
                qemu = None;
                break;
            }
            _ = stop_rx.recv() => {
                info!(vm = %config.vm, "keeper: asked to stop");
                break;
            }
            _ = terminate.recv() => {
                info!(vm = %config.vm, "keeper: SIGTERM");
                break;
            }
        }
    }
    if let Some(mut child) = qemu {
        let _ = child.kill().await;
    }
    device.shutdown();
    let _ = std::fs::remove_file(paths.control());
    let _ = std::fs::remove_file(paths.pid());
    Ok(())
}

/// Answers one control connection.
/// What a status reply describes.
struct Served<'a> {
    config: &'a KeeperConfig,
    qemu: &'a Mutex<QemuState>,
    vsock: &'a crate::metrics::VsockMetrics,
}

async fn answer(
    stream: tokio::net::UnixStream,
    connector: VsockConnector,
    served: Served<'_>,
    stop: tokio::sync::mpsc::Sender<()>,
) -> std::io::Result<()> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let (stream, request) = tokio::task::spawn_blocking(move || {
        let request = protocol::receive::<Request>(&stream);
        (stream, request)
    })
    .await
    .map_err(std::io::Error::other)?;
    let (request, _) = request?;
    match request {
        Request::Connect { port } => match connector.connect(port).await {
            Ok(guest) => {
                let guest = guest.into_std()?;
                reply(&stream, &Reply::Connected, Some(&guest))
            }
            Err(err) => reply(
                &stream,
                &Reply::Error {
                    not_ready: matches!(err, VsockError::NotReady | VsockError::Refused),
                    message: err.to_string(),
                },
                None,
            ),
        },
        Request::Status => {
            let state = lock(served.qemu);
            let status = KeeperStatus {
                pid: std::process::id(),
                version: concat!("gantry-agent ", env!("CARGO_PKG_VERSION")).to_owned(),
                config: served.config.clone(),
                qemu_pid: state.pid,
                qemu_exit: state.exit.clone(),
                qemu_started_unix_ms: state.started_unix_ms,
                vsock: Some(served.vsock.totals()),
            };
            drop(state);
            reply(&stream, &Reply::Status(status), None)
        }
        Request::Stop => {
            reply(&stream, &Reply::Stopping, None)?;
            let _ = stop.send(()).await;
            Ok(())
        }
    }
}

fn reply(stream: &UnixStream, reply: &Reply, fd: Option<&UnixStream>) -> std::io::Result<()> {
    protocol::send(stream, reply, fd.map(|fd| fd.as_fd()))
}
