//! Containers in the guest: create, start, exec, signal, wait, delete, list, stats.
//!
//! A container is its layers (shared EROFS mounts), an overlay root on a size-limited tmpfs, a
//! cgroup, and processes started through the helper in [`nsinit`]. Containers belong to the shim,
//! not to a connection: they outlive an agent that disconnects, and a new connection sees them.

pub mod cgroup;
pub mod device_filter;
pub mod io;
pub mod launch;
pub mod masked_paths;
pub mod nsinit;
pub mod pidfd;
pub mod seccomp;
pub mod spec;
pub mod tty;
pub mod user;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gantry_proto::{
    ContainerId, ContainerSpec, ContainerState, ContainerSummary, ErrorKind, ErrorReply, Event,
    ExecId, ExitStatus, Op, OutputStream, ProcessSpec, Reply, TtySize,
};
use nix::sys::signal::Signal;
use tokio::sync::watch;

use crate::reaper::Reaper;
use crate::storage::{LayerMounts, LayerRef, Rootfs, StorageError};
use cgroup::{Cgroup, CgroupError, CgroupTree};
use io::{EventSink, OutputWindow, ProcessKey};
use launch::{Helper, LaunchError, ProcessStdio, StatusReader};
use nsinit::{DEFAULT_PATH, EXEC_ARG, ExecPlan, INIT_ARG, InitPlan, ProcessPlan};
use pidfd::PidFd;
use spec::SpecError;

/// Where containers' writable layers and root file systems live.
const CONTAINERS_DIR: &str = "/run/gantry/containers";
/// How long a helper may take to report a pid, or a container to get ready or exec.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// Output still in a process's pipes when it exits is forwarded for at most this long (a
/// daemonised child may hold the pipe open forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How often a running container's `memory.events` is checked for OOM kills.
const OOM_POLL: Duration = Duration::from_millis(200);

/// Errors of container operations.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The request is malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// No such container or exec.
    #[error("no {what} {id:?}")]
    NotFound {
        /// Container or exec.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The id is taken.
    #[error("a {what} named {id:?} exists already")]
    Exists {
        /// Container or exec.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The operation does not fit the container's state.
    #[error("{0}")]
    State(String),
    /// Layers or the root file system.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The cgroup.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The image's user database.
    #[error(transparent)]
    User(#[from] user::UserError),
    /// Starting the process.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// A system call.
    #[error("{0}")]
    Sys(String),
    /// The process's terminal.
    #[error(transparent)]
    Tty(#[from] tty::TtyError),
}

impl From<RuntimeError> for ErrorReply {
    fn from(error: RuntimeError) -> Self {
        let kind = match &error {
            RuntimeError::Spec(_) | RuntimeError::User(_) => ErrorKind::InvalidArgument,
            RuntimeError::NotFound { .. } => ErrorKind::NotFound,
            RuntimeError::Exists { .. } => ErrorKind::AlreadyExists,
            RuntimeError::State(_) => ErrorKind::InvalidState,
            RuntimeError::Launch(LaunchError::Failed(_)) => ErrorKind::InvalidArgument,
            _ => ErrorKind::Internal,
        };
        ErrorReply {
            kind,
            message: error.to_string(),
        }
    }
}

/// One process of a container: the main one or an exec.
#[derive(Debug)]
struct Process {
    /// The process's pid, for reports.
    pid: i32,
    /// The process itself, for signals and for joining its namespaces: the pid alone may name
    /// another process once this one has been reaped (see [`pidfd`]).
    pidfd: PidFd,
    /// Write end of its standard input, when the agent asked for one.
    stdin: Option<File>,
    /// The master of its terminal, when it runs on one (for resizes).
    terminal: Option<OwnedFd>,
    window: Arc<OutputWindow>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Process {
    fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }
}

impl Drop for Process {
    /// Out of the table (its container deleted, its exec failed): no agent will ask for its
    /// output again, so a subscription must not resend it, and a pump waiting for window that
    /// nobody will give must end.
    fn drop(&mut self) {
        self.window.discard();
    }
}

#[derive(Debug)]
struct Container {
    layers: Vec<LayerRef>,
    layer_digests: Vec<String>,
    rootfs: Rootfs,
    cgroup: Arc<Cgroup>,
    hostname: String,
    /// Until started: the start pipe and the init's status pipe.
    pending_start: Option<(File, StatusReader)>,
    main: Process,
    execs: HashMap<ExecId, Process>,
}

impl Container {
    fn state(&self) -> ContainerState {
        match (self.pending_start.is_some(), self.main.exited()) {
            (_, Some(_)) => ContainerState::Stopped,
            (true, None) => ContainerState::Created,
            (false, None) => ContainerState::Running,
        }
    }

    fn process(&self, container_id: &str, exec_id: Option<&str>) -> Result<&Process, RuntimeError> {
        match exec_id {
            None => Ok(&self.main),
            Some(exec_id) => self
                .execs
                .get(exec_id)
                .ok_or_else(|| RuntimeError::NotFound {
                    what: "exec",
                    id: format!("{container_id}/{exec_id}"),
                }),
        }
    }

    fn process_mut(
        &mut self,
        container_id: &str,
        exec_id: Option<&str>,
    ) -> Result<&mut Process, RuntimeError> {
        match exec_id {
            None => Ok(&mut self.main),
            Some(exec_id) => self
                .execs
                .get_mut(exec_id)
                .ok_or_else(|| RuntimeError::NotFound {
                    what: "exec",
                    id: format!("{container_id}/{exec_id}"),
                }),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    containers: HashMap<ContainerId, Container>,
    layers: LayerMounts,
}

/// All containers of this guest.
#[derive(Debug)]
pub struct Runtime {
    inner: Mutex<Inner>,
    /// Serialises creations and deletions (mounts and cgroups), not the other operations.
    lifecycle: Mutex<()>,
    sink: Arc<EventSink>,
    reaper: Arc<Reaper>,
    cgroups: CgroupTree,
}

fn not_found(id: &str) -> RuntimeError {
    RuntimeError::NotFound {
        what: "container",
        id: id.to_owned(),
    }
}

fn sys(what: &str) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |err| RuntimeError::Sys(format!("{what}: {err}"))
}

impl Runtime {
    /// A runtime whose processes are reaped by `reaper` and whose containers' cgroups go in
    /// `cgroups`.
    pub fn new(reaper: Arc<Reaper>, cgroups: CgroupTree) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            lifecycle: Mutex::new(()),
            sink: Arc::new(EventSink::default()),
            reaper,
            cgroups,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where events go, and the processes' output windows a subscription resends from.
    pub fn sink(&self) -> &Arc<EventSink> {
        &self.sink
    }

    /// Executes a container operation; `None` if `op` is not one.
    pub async fn handle(self: &Arc<Self>, op: Op) -> Option<Result<Reply, ErrorReply>> {
        let result = match op {
            Op::CreateContainer(spec) => self.blocking(move |rt| rt.create(spec, None)).await,
            Op::CreateContainerTty { spec, size } => {
                self.blocking(move |rt| rt.create(spec, Some(size))).await
            }
            Op::StartContainer { container_id } => {
                self.blocking(move |rt| rt.start(&container_id)).await
            }
            Op::Exec {
                container_id,
                exec_id,
                process,
            } => {
                self.blocking(move |rt| rt.exec(&container_id, exec_id, process, None))
                    .await
            }
            Op::ExecTty {
                container_id,
                exec_id,
                process,
                size,
            } => {
                self.blocking(move |rt| rt.exec(&container_id, exec_id, process, Some(size)))
                    .await
            }
            Op::ResizeTty {
                container_id,
                exec_id,
                size,
            } => self.resize(&container_id, exec_id.as_deref(), size),
            Op::Signal {
                container_id,
                exec_id,
                signal,
            } => self.signal(&container_id, exec_id.as_deref(), signal),
            Op::Wait {
                container_id,
                exec_id,
            } => self.wait(&container_id, exec_id.as_deref()).await,
            Op::DeleteContainer { container_id } => {
                self.blocking(move |rt| rt.delete(&container_id)).await
            }
            Op::ListContainers => Ok(self.list()),
            Op::Stats { container_id } => self.stats(&container_id),
            Op::WriteStdin {
                container_id,
                exec_id,
                data,
            } => {
                self.blocking(move |rt| rt.write_stdin(&container_id, exec_id.as_deref(), &data))
                    .await
            }
            Op::CloseStdin {
                container_id,
                exec_id,
            } => self.close_stdin(&container_id, exec_id.as_deref()),
            Op::OutputCredit {
                container_id,
                exec_id,
                bytes,
            } => self.credit(&container_id, exec_id.as_deref(), bytes),
            Op::OutputReceived {
                container_id,
                exec_id,
                position,
            } => self.received(&container_id, exec_id.as_deref(), position),
            Op::GuestResources => Ok(self.resources()),
            Op::SpawnBaseline { args } => self.spawn_baseline(args).await,
            // Connection-level operations, answered by the server.
            Op::GuestInfo
            | Op::Ping { .. }
            | Op::SubscribeEvents
            | Op::SubscribeEventsFrom { .. } => return None,
        };
        Some(result.map_err(ErrorReply::from))
    }

    /// Runs blocking work (mounts, pipes, waiting on helpers) off the async workers.
    async fn blocking<F>(self: &Arc<Self>, work: F) -> Result<Reply, RuntimeError>
    where
        F: FnOnce(&Arc<Self>) -> Result<Reply, RuntimeError> + Send + 'static,
    {
        let runtime = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&runtime))
            .await
            .map_err(|err| RuntimeError::Sys(format!("container task failed: {err}")))?
    }

    fn create(
        self: &Arc<Self>,
        spec: ContainerSpec,
        tty: Option<TtySize>,
    ) -> Result<Reply, RuntimeError> {
        spec::validate(&spec)?;
        let _lifecycle = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        let id = spec.container_id.clone();
        if self.lock().containers.contains_key(&id) {
            return Err(RuntimeError::Exists {
                what: "container",
                id,
            });
        }
        let mut undo = Undo::new(self);

        let mut lower_dirs = Vec::new();
        for extent in &spec.layers {
            let (reference, mount_point) = self.lock().layers.acquire(extent)?;
            undo.layers.push(reference);
            lower_dirs.push(mount_point);
        }
        let rootfs = Rootfs::mount(
            &Path::new(CONTAINERS_DIR).join(&id),
            &lower_dirs,
            spec.writable_layer_bytes,
        )?;
        let rootfs_path = rootfs.path();
        undo.rootfs = Some(rootfs);
        let cgroup = Arc::new(Cgroup::create(&self.cgroups, &id, &spec.resources)?);
        undo.cgroup = Some(Arc::clone(&cgroup));

        let process = plan_process(&rootfs_path, &spec.process, &spec.hostname, tty.is_some())?;
        let (stdio, pipes) = process_stdio(spec.process.stdin, tty)?;
        let plan = InitPlan {
            rootfs: rootfs_path,
            cgroup: cgroup.path().to_owned(),
            hostname: spec.hostname.clone(),
            process,
        };
        let plan = serde_json::to_vec(&plan).map_err(|err| RuntimeError::Sys(err.to_string()))?;
        let Helper {
            mut status, start, ..
        } = launch::spawn_helper(INIT_ARG, &plan, stdio, true, None)?;
        let (pid, pidfd) = status.expect_pid(HELPER_TIMEOUT)?;
        undo.pidfd = Some(pidfd);
        status.expect_ready(HELPER_TIMEOUT)?;
        let start =
            start.ok_or_else(|| RuntimeError::Sys("the helper has no start pipe".into()))?;
        let pidfd = undo
            .pidfd
            .take()
            .ok_or_else(|| RuntimeError::Sys("internal: the init's pidfd vanished".into()))?;

        let key = ProcessKey {
            container_id: id.clone(),
            exec_id: None,
        };
        let main = self.supervise(pid, pidfd, pid, key, pipes, Some(Arc::clone(&cgroup)));
        let rootfs = undo
            .rootfs
            .take()
            .ok_or_else(|| RuntimeError::Sys("internal: the root file system vanished".into()))?;
        let layers = undo.disarm();
        tracing::info!(container = %id, pid, "container created");
        self.lock().containers.insert(
            id,
            Container {
                layers,
                layer_digests: spec.layers.iter().map(|l| l.digest.clone()).collect(),
                rootfs,
                cgroup,
                hostname: spec.hostname.clone(),
                pending_start: Some((start, status)),
                main,
                execs: HashMap::new(),
            },
        );
        Ok(Reply::Done)
    }

    fn start(self: &Arc<Self>, id: &str) -> Result<Reply, RuntimeError> {
        let (mut start, mut status) = {
            let mut inner = self.lock();
            let container = inner.containers.get_mut(id).ok_or_else(|| not_found(id))?;
            container.pending_start.take().ok_or_else(|| {
                RuntimeError::State(format!("container {id:?} was started already"))
            })?
        };
        start
            .write_all(&[1])
            .map_err(sys("starting the container"))?;
        drop(start);
        status.expect_exec(HELPER_TIMEOUT)?;
        tracing::info!(container = %id, "container started");
        Ok(Reply::Done)
    }

    fn exec(
        self: &Arc<Self>,
        id: &str,
        exec_id: ExecId,
        process: ProcessSpec,
        tty: Option<TtySize>,
    ) -> Result<Reply, RuntimeError> {
        spec::validate_id("exec id", &exec_id)?;
        spec::validate_process(&process)?;
        let (target_pid, target, cgroup, rootfs, hostname) = {
            let inner = self.lock();
            let container = inner.containers.get(id).ok_or_else(|| not_found(id))?;
            if container.state() != ContainerState::Running {
                return Err(RuntimeError::State(format!(
                    "container {id:?} is not running"
                )));
            }
            if container.execs.contains_key(&exec_id) {
                return Err(RuntimeError::Exists {
                    what: "exec",
                    id: exec_id,
                });
            }
            (
                container.main.pid,
                // A duplicate, so the table is not locked while the helper starts.
                container
                    .main
                    .pidfd
                    .try_clone()
                    .map_err(sys("duplicating the init's pidfd"))?,
                container.cgroup.path().to_owned(),
                container.rootfs.path(),
                container.hostname.clone(),
            )
        };
        let plan = ExecPlan {
            target_pid,
            cgroup,
            process: plan_process(&rootfs, &process, &hostname, tty.is_some())?,
        };
        let plan = serde_json::to_vec(&plan).map_err(|err| RuntimeError::Sys(err.to_string()))?;
        let (stdio, pipes) = process_stdio(process.stdin, tty)?;
        let Helper {
            helper_pid,
            mut status,
            ..
        } = launch::spawn_helper(EXEC_ARG, &plan, stdio, false, Some(target.as_fd()))?;
        drop(target);
        let (pid, pidfd) = status.expect_pid(HELPER_TIMEOUT)?;
        let key = ProcessKey {
            container_id: id.to_owned(),
            exec_id: Some(exec_id.clone()),
        };
        // The relay mirrors the process's exit; signals go to the process itself.
        let exec = self.supervise(pid, pidfd, helper_pid, key, pipes, None);
        // A failed exec leaves no entry, so the id can be used again.
        status.expect_exec(HELPER_TIMEOUT)?;
        let mut inner = self.lock();
        let container = inner.containers.get_mut(id).ok_or_else(|| not_found(id))?;
        container.execs.insert(exec_id.clone(), exec);
        tracing::info!(container = %id, exec = %exec_id, pid, "exec started");
        Ok(Reply::Done)
    }

    fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32) -> Result<Reply, RuntimeError> {
        let signal = Signal::try_from(signal)
            .map_err(|_| SpecError::Invalid(format!("no signal number {signal}")))?;
        let inner = self.lock();
        let container = inner.containers.get(id).ok_or_else(|| not_found(id))?;
        if exec_id.is_none() && container.state() == ContainerState::Created {
            return Err(RuntimeError::State(format!(
                "container {id:?} is not started"
            )));
        }
        let process = container.process(id, exec_id)?;
        if process.exited().is_some() {
            return Err(RuntimeError::State(format!(
                "the process of {id:?} has exited already"
            )));
        }
        // Through the pidfd: between the reaper collecting the process and `exited()` turning
        // true (the output drain window) its pid may already belong to someone else.
        process
            .pidfd
            .send_signal(signal)
            .map_err(|errno| match errno {
                nix::errno::Errno::ESRCH => {
                    RuntimeError::State(format!("the process of {id:?} has exited already"))
                }
                errno => RuntimeError::Sys(format!("sending {signal}: {errno}")),
            })?;
        Ok(Reply::Done)
    }

    async fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<Reply, RuntimeError> {
        let mut exit = {
            let inner = self.lock();
            let container = inner.containers.get(id).ok_or_else(|| not_found(id))?;
            container.process(id, exec_id)?.exit.clone()
        };
        let status = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RuntimeError::Sys("the process supervisor ended".into()))?;
        Ok(Reply::Exited(status.unwrap_or(ExitStatus::Code(-1))))
    }

    fn delete(self: &Arc<Self>, id: &str) -> Result<Reply, RuntimeError> {
        let _lifecycle = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        let container = {
            let mut inner = self.lock();
            let container = inner.containers.get(id).ok_or_else(|| not_found(id))?;
            if container.state() == ContainerState::Running {
                return Err(RuntimeError::State(format!(
                    "container {id:?} is running: signal it (kill) and wait before deleting"
                )));
            }
            inner.containers.remove(id).ok_or_else(|| not_found(id))?
        };
        if container.pending_start.is_some() {
            // Never started: its init waits for the start byte; closing the pipe ends it, the
            // kill makes sure.
            let _ = container.main.pidfd.send_signal(Signal::SIGKILL);
        }
        let Container {
            layers,
            rootfs,
            cgroup,
            pending_start,
            ..
        } = container;
        drop(pending_start);
        cgroup.destroy()?;
        rootfs.unmount()?;
        let mut inner = self.lock();
        for layer in &layers {
            inner.layers.release(layer)?;
        }
        tracing::info!(container = %id, "container deleted");
        Ok(Reply::Done)
    }

    fn list(&self) -> Reply {
        let inner = self.lock();
        let mut containers: Vec<ContainerSummary> = inner
            .containers
            .iter()
            .map(|(id, container)| ContainerSummary {
                container_id: id.clone(),
                state: container.state(),
                pid: (container.state() == ContainerState::Running)
                    .then_some(container.main.pid as u32),
                exit: container.main.exited(),
                layers: container.layer_digests.clone(),
            })
            .collect();
        containers.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        Reply::Containers(containers)
    }

    /// Runs `args` as a plain child of the shim (the benchmark's floor).
    async fn spawn_baseline(&self, args: Vec<String>) -> Result<Reply, RuntimeError> {
        /// Output kept of a baseline run.
        const MAX_OUTPUT: u64 = 64 * 1024;
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| SpecError::Invalid("no command to run".into()))?;
        let mut child = std::process::Command::new(program)
            .args(rest)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|err| {
                RuntimeError::Launch(LaunchError::Failed(format!("{program}: {err}")))
            })?;
        let pid = child.id() as i32;
        let stdout = child.stdout.take();
        // The reaper collects the child; the handle is not waited on.
        drop(child);
        let output = tokio::task::spawn_blocking(move || {
            let mut output = Vec::new();
            if let Some(stdout) = stdout {
                let _ = std::io::Read::read_to_end(
                    &mut std::io::Read::take(stdout, MAX_OUTPUT),
                    &mut output,
                );
            }
            output
        })
        .await
        .map_err(|err| RuntimeError::Sys(err.to_string()))?;
        let exit = self.reaper.wait(pid).await;
        Ok(Reply::Baseline { output, exit })
    }

    fn resources(&self) -> Reply {
        let layer_mounts = self.lock().layers.report();
        Reply::GuestResources(gantry_proto::GuestResources {
            layer_mounts,
            loop_devices: crate::storage::loop_devices_in_use(Path::new("/sys/block")),
            overlay_mounts: crate::storage::overlay_mount_count(),
            container_cgroups: self.cgroups.existing(),
        })
    }

    fn stats(&self, id: &str) -> Result<Reply, RuntimeError> {
        let cgroup = {
            let inner = self.lock();
            Arc::clone(
                &inner
                    .containers
                    .get(id)
                    .ok_or_else(|| not_found(id))?
                    .cgroup,
            )
        };
        Ok(Reply::Stats(cgroup.stats()?))
    }

    fn write_stdin(
        &self,
        id: &str,
        exec_id: Option<&str>,
        data: &[u8],
    ) -> Result<Reply, RuntimeError> {
        // Clone the descriptor so a slow reader blocks this request only, not the table.
        let stdin = {
            let mut inner = self.lock();
            let container = inner.containers.get_mut(id).ok_or_else(|| not_found(id))?;
            let process = container.process_mut(id, exec_id)?;
            process
                .stdin
                .as_ref()
                .ok_or_else(|| {
                    RuntimeError::State("the process has no open standard input".into())
                })?
                .try_clone()
                .map_err(sys("duplicating stdin"))?
        };
        tty::write_all_waiting(&stdin, data).map_err(sys("writing to stdin"))?;
        Ok(Reply::Done)
    }

    fn resize(
        &self,
        id: &str,
        exec_id: Option<&str>,
        size: TtySize,
    ) -> Result<Reply, RuntimeError> {
        let inner = self.lock();
        let container = inner.containers.get(id).ok_or_else(|| not_found(id))?;
        let terminal = container
            .process(id, exec_id)?
            .terminal
            .as_ref()
            .ok_or_else(|| RuntimeError::State("the process has no terminal".into()))?;
        tty::set_size(terminal.as_fd(), size)?;
        Ok(Reply::Done)
    }

    fn close_stdin(&self, id: &str, exec_id: Option<&str>) -> Result<Reply, RuntimeError> {
        let mut inner = self.lock();
        let container = inner.containers.get_mut(id).ok_or_else(|| not_found(id))?;
        container.process_mut(id, exec_id)?.stdin = None;
        Ok(Reply::Done)
    }

    fn credit(&self, id: &str, exec_id: Option<&str>, bytes: u32) -> Result<Reply, RuntimeError> {
        let inner = self.lock();
        let container = inner.containers.get(id).ok_or_else(|| not_found(id))?;
        container
            .process(id, exec_id)?
            .window
            .credit(u64::from(bytes));
        Ok(Reply::Done)
    }

    fn received(
        &self,
        id: &str,
        exec_id: Option<&str>,
        position: u64,
    ) -> Result<Reply, RuntimeError> {
        let inner = self.lock();
        let container = inner.containers.get(id).ok_or_else(|| not_found(id))?;
        container.process(id, exec_id)?.window.received(position);
        Ok(Reply::Done)
    }

    /// Starts forwarding a process's output and watching for its exit (and, for a container's
    /// main process, OOM kills).
    fn supervise(
        self: &Arc<Self>,
        pid: i32,
        pidfd: PidFd,
        wait_pid: i32,
        key: ProcessKey,
        pipes: OutputPipes,
        oom_cgroup: Option<Arc<Cgroup>>,
    ) -> Process {
        let window = self.sink.window(key.clone());
        let (exit_tx, exit) = watch::channel(None);
        let sink = Arc::clone(&self.sink);
        let reaper = Arc::clone(&self.reaper);
        let OutputPipes { stdin, output } = pipes;
        let (pumps, terminal) = match output {
            ProcessOutput::Pipes { stdout, stderr } => {
                let stdout = tokio::spawn(io::pump(
                    stdout,
                    OutputStream::Stdout,
                    Arc::clone(&window),
                    Arc::clone(&sink),
                ));
                let stderr = tokio::spawn(io::pump(
                    stderr,
                    OutputStream::Stderr,
                    Arc::clone(&window),
                    Arc::clone(&sink),
                ));
                (vec![stdout, stderr], None)
            }
            ProcessOutput::Tty { master, control } => {
                let pump =
                    tokio::spawn(io::pump_tty(master, Arc::clone(&window), Arc::clone(&sink)));
                (vec![pump], Some(control))
            }
        };
        if let Some(cgroup) = oom_cgroup.clone() {
            tokio::spawn(watch_oom(
                cgroup,
                Arc::clone(&sink),
                key.container_id.clone(),
                exit.clone(),
            ));
        }
        let exit_window = Arc::clone(&window);
        tokio::spawn(async move {
            let status = reaper.wait(wait_pid).await;
            let drained = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
                for pump in pumps {
                    let _ = pump.await;
                }
            })
            .await;
            if drained.is_err() {
                tracing::debug!(container = %key.container_id, "output still open after exit; not waiting for it");
            }
            tracing::info!(container = %key.container_id, exec = ?key.exec_id, ?status, "process exited");
            // The poller may not have seen an OOM kill that ended the process: the agent must
            // hear of it before the exit, so look once more (a repeated Oom is harmless).
            if let Some(cgroup) = &oom_cgroup
                && cgroup.oom_kills() > 0
            {
                sink.send_waiting(Event::Oom {
                    container_id: key.container_id.clone(),
                })
                .await;
            }
            let _ = exit_tx.send(Some(status));
            // After the output (the pumps are done, or given up on); without a connection the
            // next subscription sends it.
            sink.hand_over_exit(&exit_window, status).await;
        });
        Process {
            pid,
            pidfd,
            stdin,
            terminal,
            window,
            exit,
        }
    }
}

async fn watch_oom(
    cgroup: Arc<Cgroup>,
    sink: Arc<EventSink>,
    container_id: ContainerId,
    mut exit: watch::Receiver<Option<ExitStatus>>,
) {
    let mut seen = cgroup.oom_kills();
    loop {
        let exited = tokio::select! {
            _ = tokio::time::sleep(OOM_POLL) => false,
            _ = exit.wait_for(Option::is_some) => true,
        };
        let now = cgroup.oom_kills();
        if now > seen {
            tracing::warn!(container = %container_id, kills = now - seen, "OOM kill");
            seen = now;
            sink.send_waiting(Event::Oom {
                container_id: container_id.clone(),
            })
            .await;
        }
        if exited {
            return;
        }
    }
}

/// The shim's ends of a process's pipes.
struct OutputPipes {
    stdin: Option<File>,
    output: ProcessOutput,
}

/// Where a process's output comes from.
enum ProcessOutput {
    /// A pipe for each stream.
    Pipes { stdout: OwnedFd, stderr: OwnedFd },
    /// A terminal: the master twice, one for the output pump, one for resizes.
    Tty { master: OwnedFd, control: OwnedFd },
}

/// The process's stdio and the shim's ends: pipes, or a terminal of `tty`'s size.
fn process_stdio(
    with_stdin: bool,
    tty: Option<TtySize>,
) -> Result<(ProcessStdio, OutputPipes), RuntimeError> {
    if let Some(size) = tty {
        let pair = tty::open(size)?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(sys("duplicating the terminal"));
        let stdin = match with_stdin {
            true => Some(File::from(dup(&pair.master)?)),
            false => None,
        };
        return Ok((
            ProcessStdio {
                stdin: dup(&pair.slave)?,
                stdout: dup(&pair.slave)?,
                stderr: pair.slave,
            },
            OutputPipes {
                stdin,
                output: ProcessOutput::Tty {
                    control: dup(&pair.master)?,
                    master: pair.master,
                },
            },
        ));
    }
    let (stdout_read, stdout_write) = launch::pipe()?;
    let (stderr_read, stderr_write) = launch::pipe()?;
    let (stdin, stdin_write) = if with_stdin {
        let (read, write) = launch::pipe()?;
        (read, Some(File::from(write)))
    } else {
        (
            OwnedFd::from(File::open("/dev/null").map_err(sys("opening /dev/null"))?),
            None,
        )
    };
    Ok((
        ProcessStdio {
            stdin,
            stdout: stdout_write,
            stderr: stderr_write,
        },
        OutputPipes {
            stdin: stdin_write,
            output: ProcessOutput::Pipes {
                stdout: stdout_read,
                stderr: stderr_read,
            },
        },
    ))
}

/// Resolves the user and fills in the environment Docker gives every process (and, on a
/// terminal, `TERM=xterm` as Docker gives).
fn plan_process(
    rootfs: &Path,
    process: &ProcessSpec,
    hostname: &str,
    tty: bool,
) -> Result<ProcessPlan, RuntimeError> {
    let user = user::resolve(rootfs, &process.user)?;
    let mut env = process.env.clone();
    let has = |env: &[String], key: &str| {
        env.iter()
            .any(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
    };
    if !has(&env, "PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&env, "HOSTNAME") && !hostname.is_empty() {
        env.push(format!("HOSTNAME={hostname}"));
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={}", user.home));
    }
    if tty && !has(&env, "TERM") {
        env.push("TERM=xterm".to_owned());
    }
    Ok(ProcessPlan {
        args: process.args.clone(),
        env,
        cwd: process.cwd.clone(),
        user,
        tty,
    })
}

/// Undoes a half-made container when creation fails.
struct Undo<'a> {
    runtime: &'a Runtime,
    layers: Vec<LayerRef>,
    rootfs: Option<Rootfs>,
    cgroup: Option<Arc<Cgroup>>,
    pidfd: Option<PidFd>,
    armed: bool,
}

impl<'a> Undo<'a> {
    fn new(runtime: &'a Runtime) -> Self {
        Self {
            runtime,
            layers: Vec::new(),
            rootfs: None,
            cgroup: None,
            pidfd: None,
            armed: true,
        }
    }

    /// Creation succeeded: hand over the layers (take the root file system before).
    fn disarm(mut self) -> Vec<LayerRef> {
        self.armed = false;
        std::mem::take(&mut self.layers)
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(pidfd) = &self.pidfd {
            let _ = pidfd.send_signal(Signal::SIGKILL);
        }
        if let Some(cgroup) = &self.cgroup
            && let Err(error) = cgroup.destroy()
        {
            tracing::warn!(%error, "cleaning up a failed create");
        }
        if let Some(rootfs) = &self.rootfs
            && let Err(error) = rootfs.unmount()
        {
            tracing::warn!(%error, "cleaning up a failed create");
        }
        let mut inner = self.runtime.lock();
        for layer in &self.layers {
            if let Err(error) = inner.layers.release(layer) {
                tracing::warn!(%error, "cleaning up a failed create");
            }
        }
    }
}
