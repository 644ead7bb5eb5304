//! The agent's side of a keeper: start one or adopt the one already running, open streams into
//! the guest through it, ask its state, stop it.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::protocol::{self, KeeperStatus, Reply, Request};
use super::{KeeperConfig, KeeperPaths};

/// How long a control request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new keeper has to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping keeper has to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to a keeper.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// The keeper's device cannot open streams yet (no frontend, guest driver down, or nothing
    /// listening on the port): expected while the guest boots.
    #[error("the guest is not reachable yet: {0}")]
    NotReady(String),
    /// The keeper refused or failed the request.
    #[error("keeper: {0}")]
    Failed(String),
    /// The keeper is not running (its control socket does not answer).
    #[error("the VM's keeper is not running ({path}): {source}")]
    Gone {
        /// The control socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The keeper could not be started.
    #[error("cannot start the VM's keeper: {0}")]
    Start(String),
}

/// Whether [`KeeperClient::start_or_adopt`] found the keeper running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new keeper was started (and with it, QEMU if configured).
    Started,
    /// A keeper with the same configuration was running, and its QEMU with it.
    Adopted,
}

/// One VM's keeper, as the agent reaches it.
#[derive(Clone, Debug)]
pub struct KeeperClient {
    paths: KeeperPaths,
}

impl KeeperClient {
    /// The keeper's state directory.
    pub fn dir(&self) -> PathBuf {
        self.paths.dir.clone()
    }

    /// The keeper whose files are in `dir` (running or not).
    pub fn new(dir: &Path) -> KeeperClient {
        KeeperClient {
            paths: KeeperPaths::new(dir),
        }
    }

    /// Adopts the keeper running `config` in `dir`, or (when none runs, or one runs something
    /// else) starts one with `agent_binary vm-keeper`.
    pub async fn start_or_adopt(
        dir: &Path,
        config: &KeeperConfig,
        agent_binary: &Path,
    ) -> Result<(KeeperClient, Start), KeeperError> {
        let client = KeeperClient::new(dir);
        match client.status().await {
            Ok(status) if status.runs(config) => {
                info!(vm = %config.vm, keeper = status.pid, qemu = ?status.qemu_pid, "keeper adopted");
                return Ok((client, Start::Adopted));
            }
            Ok(status) => {
                warn!(
                    vm = %config.vm,
                    keeper = status.pid,
                    "a keeper with another configuration (or an exited QEMU) runs; replacing it"
                );
                client.stop().await?;
            }
            Err(_) => {}
        }
        client.spawn(config, agent_binary)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match client.status().await {
                Ok(_) => return Ok((client, Start::Started)),
                Err(err) if Instant::now() >= deadline => {
                    return Err(KeeperError::Start(format!(
                        "it did not answer within {START_TIMEOUT:?} ({err}); see {}",
                        client.paths.log().display()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn spawn(&self, config: &KeeperConfig, agent_binary: &Path) -> Result<(), KeeperError> {
        let fail = |what: &str, err: std::io::Error| KeeperError::Start(format!("{what}: {err}"));
        std::fs::create_dir_all(&self.paths.dir).map_err(|e| fail("state directory", e))?;
        let _ = std::fs::remove_file(self.paths.qemu_exit());
        let json =
            serde_json::to_vec_pretty(config).map_err(|e| KeeperError::Start(e.to_string()))?;
        gantry_oci::fsutil::write_atomic(&self.paths.config(), &json)
            .map_err(|e| fail("keeper.json", e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.paths.log())
            .map_err(|e| fail("keeper.log", e))?;
        let log_err = log.try_clone().map_err(|e| fail("keeper.log", e))?;
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(agent_binary)
            .arg("vm-keeper")
            .arg("--config")
            .arg(self.paths.config())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a terminal's Ctrl-C to the agent does not reach the VM.
            .process_group(0)
            .spawn()
            .map_err(|e| fail(&agent_binary.display().to_string(), e))?;
        // Reaped here while this agent lives; after the agent is gone, by init.
        let _ = std::thread::Builder::new()
            .name("keeper-reaper".into())
            .spawn(move || child.wait());
        Ok(())
    }

    async fn ask(
        &self,
        request: Request,
    ) -> Result<(Reply, Option<std::os::fd::OwnedFd>), KeeperError> {
        let path = self.paths.control();
        tokio::task::spawn_blocking(move || {
            let gone = |source| KeeperError::Gone {
                path: path.clone(),
                source,
            };
            let stream = UnixStream::connect(&path).map_err(gone)?;
            stream
                .set_read_timeout(Some(CONTROL_TIMEOUT))
                .map_err(gone)?;
            stream
                .set_write_timeout(Some(CONTROL_TIMEOUT))
                .map_err(gone)?;
            protocol::send(&stream, &request, None).map_err(gone)?;
            protocol::receive::<Reply>(&stream).map_err(gone)
        })
        .await
        .map_err(|err| KeeperError::Failed(err.to_string()))?
    }

    /// Opens a stream to `port` in the guest.
    pub async fn connect(&self, port: u32) -> Result<tokio::net::UnixStream, KeeperError> {
        match self.ask(Request::Connect { port }).await? {
            (Reply::Connected, Some(fd)) => {
                let stream = UnixStream::from(fd);
                stream
                    .set_nonblocking(true)
                    .map_err(|e| KeeperError::Failed(e.to_string()))?;
                tokio::net::UnixStream::from_std(stream)
                    .map_err(|e| KeeperError::Failed(e.to_string()))
            }
            (Reply::Connected, None) => {
                Err(KeeperError::Failed("connected without a stream".into()))
            }
            (
                Reply::Error {
                    message,
                    not_ready: true,
                },
                _,
            ) => Err(KeeperError::NotReady(message)),
            (Reply::Error { message, .. }, _) => Err(KeeperError::Failed(message)),
            (other, _) => Err(KeeperError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// The keeper's state.
    pub async fn status(&self) -> Result<KeeperStatus, KeeperError> {
        match self.ask(Request::Status).await? {
            (Reply::Status(status), _) => Ok(status),
            (other, _) => Err(KeeperError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// Stops the keeper (and its QEMU) and waits for it to exit; kills it if it does not.
    pub async fn stop(&self) -> Result<(), KeeperError> {
        let pid = self.pid();
        match self.ask(Request::Stop).await {
            Ok(_) => {}
            Err(KeeperError::Gone { .. }) if pid.is_none() => return Ok(()),
            Err(err) => warn!(%err, "keeper did not take the stop request; killing it"),
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while let Some(pid) = pid.filter(|pid| process_alive(*pid)) {
            if Instant::now() >= deadline {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_file(self.paths.control());
        let _ = std::fs::remove_file(self.paths.pid());
        Ok(())
    }

    /// How the QEMU of a keeper that has exited ended, if it recorded that.
    pub fn qemu_exit(&self) -> Option<String> {
        std::fs::read_to_string(self.paths.qemu_exit()).ok()
    }

    /// The keeper's pid from its pid file, if it has one.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.paths.pid())
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
