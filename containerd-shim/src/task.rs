//! containerd's runtime v2 Task service, carried out by the agent's operator API.
//!
//! One shim serves one VM's worth of tasks: a pod's (CRI groups them by sandbox id) or a lone
//! task's. The first task places the VM ([`crate::placement`]); a launched VM is removed with
//! the last task. The pod's sandbox task runs nothing in the guest: the VM is the pod.
//!
//! Every process reports the shim's own PID to containerd: a host PID that stands for the VM
//! (guest PIDs mean nothing on the host, and containerd and its clients treat task PIDs as host
//! processes). `Pids` lists the guest's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::util::convert_to_any;
use containerd_shim::{Context, TtrpcResult};
use containerd_shim_protos::api;
use containerd_shim_protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use gantry_api::ErrorCode;
use tracing::{info, warn};

use crate::agent::{Agent, AgentError};
use crate::io::{Outputs, StdinTarget, copy_stdin, release_stdin};
use crate::placement::{Placement, place};
use crate::process::{Exited, Process, ProcessState, Stdio};
use crate::record::TaskRecord;
use crate::spec::{self, TaskKind};

/// How long a launched VM may take to boot before its first task fails.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// What this shim tells containerd its version is.
const VERSION: &str = concat!("gantry ", env!("CARGO_PKG_VERSION"));

fn rpc(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

fn not_found(message: impl ToString) -> ttrpc::Error {
    rpc(Code::NOT_FOUND, message)
}

/// containerd's error for an agent's: the kinds map onto gRPC codes, which containerd maps
/// onto its own (`NotFound` lets CRI treat a gone process as stopped).
fn agent_error(error: AgentError) -> ttrpc::Error {
    let code = match error.code() {
        Some(ErrorCode::NotFound) => Code::NOT_FOUND,
        Some(ErrorCode::Conflict) => Code::FAILED_PRECONDITION,
        Some(ErrorCode::InvalidArgument | ErrorCode::PayloadTooLarge) => Code::INVALID_ARGUMENT,
        Some(ErrorCode::Forbidden) => Code::PERMISSION_DENIED,
        Some(ErrorCode::Unavailable) => Code::UNAVAILABLE,
        _ => match error {
            AgentError::RunFailed(_) => Code::FAILED_PRECONDITION,
            AgentError::Api(gantry_api::ApiClientError::Connect { .. }) => Code::UNAVAILABLE,
            _ => Code::INTERNAL,
        },
    };
    rpc(code, error)
}

/// A task: its VM, its main process and its execs.
#[derive(Debug)]
struct ShimTask {
    id: String,
    bundle: String,
    kind: TaskKind,
    vm: String,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ShimTask {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found(format!("task {}: no exec {exec_id}", self.id)))
    }
}

/// The Task service of one shim.
#[derive(Clone, Debug)]
pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    agent: Agent,
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    tasks: Mutex<HashMap<String, Arc<ShimTask>>>,
    /// The VM this shim's tasks run in, once the first task placed it.
    placement: tokio::sync::Mutex<Option<Placement>>,
    pid: u32,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("agent", &self.agent)
            .field("namespace", &self.namespace)
            .field("tasks", &lock(&self.tasks).len())
            .finish_non_exhaustive()
    }
}

impl TaskService {
    /// The service of a shim in containerd namespace `namespace`.
    pub fn new(
        agent: Agent,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                agent,
                namespace,
                publisher,
                exit,
                tasks: Mutex::new(HashMap::new()),
                placement: tokio::sync::Mutex::new(None),
                pid: std::process::id(),
            }),
        }
    }

    fn task(&self, id: &str) -> TtrpcResult<Arc<ShimTask>> {
        lock(&self.inner.tasks)
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("no task {id} in this shim")))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(error) = self
            .inner
            .publisher
            .publish(Context::default(), topic, &self.inner.namespace, event)
            .await
        {
            warn!(%error, topic, "publishing an event to containerd");
        }
    }

    /// The VM for a task: the one placed already, or placed (and launched) now.
    async fn place(&self, requested: Option<&str>, grouping: &str) -> TtrpcResult<Placement> {
        let mut placement = self.inner.placement.lock().await;
        if let Some(placed) = placement.as_ref() {
            if requested.is_some_and(|vm| vm != placed.vm()) {
                return Err(rpc(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "this pod's tasks run in VM {:?}; a task cannot ask for another",
                        placed.vm()
                    ),
                ));
            }
            return Ok(placed.clone());
        }
        let agent = &self.inner.agent;
        let info = agent.info().await.map_err(agent_error)?;
        let placed = place(&info, requested, &self.inner.namespace, grouping)
            .map_err(|err| rpc(Code::FAILED_PRECONDITION, err))?;
        if let Placement::Launch { vm } = &placed {
            info!(%vm, "launching the VM for this shim's tasks");
            let launched = match agent.launch_vm(vm).await {
                Ok(_) => agent.wait_ready(vm, BOOT_TIMEOUT).await,
                Err(err) => Err(err),
            };
            if let Err(error) = launched {
                if let Err(cleanup) = agent.remove_vm(vm).await {
                    warn!(%vm, error = %cleanup, "removing the VM that did not boot");
                }
                return Err(agent_error(error));
            }
        }
        *placement = Some(placed.clone());
        Ok(placed)
    }

    /// Removes the VM if this shim launched it and no task is left.
    async fn release_vm_if_idle(&self) {
        let mut placement = self.inner.placement.lock().await;
        if !lock(&self.inner.tasks).is_empty() {
            return;
        }
        if let Some(Placement::Launch { vm }) = placement.take() {
            info!(%vm, "removing the VM: its last task is gone");
            if let Err(error) = self.inner.agent.remove_vm(&vm).await {
                warn!(%vm, %error, "removing the VM");
            }
        }
    }

    /// Follows a process's output into its FIFOs and reports its end to containerd.
    fn watch(&self, task: Arc<ShimTask>, process: Arc<Process>) {
        let service = self.clone();
        tokio::spawn(async move {
            let agent = &service.inner.agent;
            let exec_id = process.exec_id.clone();
            let stdio = &process.stdio;
            let exit = match Outputs::open(&stdio.stdout, &stdio.stderr).await {
                Ok(outputs) => match agent
                    .follow_logs(&task.vm, &task.id, exec_id.as_deref())
                    .await
                {
                    Ok(records) => outputs.copy_from(records).await,
                    Err(error) => {
                        warn!(task = %task.id, %error, "following the process's output");
                        None
                    }
                },
                Err(error) => {
                    warn!(task = %task.id, %error, "the process's output has nowhere to go");
                    None
                }
            };
            let exit = match exit {
                Some(exit) => exit,
                None => service.wait_in_agent(&task, exec_id.as_deref()).await,
            };
            if exit.oom_killed && exec_id.is_none() {
                service
                    .publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(TaskOOM {
                            container_id: task.id.clone(),
                            ..TaskOOM::default()
                        }),
                    )
                    .await;
            }
            service
                .report_exit(&task, &process, Exited::now(exit.shell_code() as u32))
                .await;
        });
    }

    /// The end of a process whose output stream broke off: asked of the agent until it
    /// answers (the agent may be restarting).
    async fn wait_in_agent(
        &self,
        task: &ShimTask,
        exec_id: Option<&str>,
    ) -> gantry_api::records::ExitRecord {
        let lost = gantry_api::records::ExitRecord {
            status: gantry_proto::ExitStatus::Code(255),
            oom_killed: false,
        };
        loop {
            match self.inner.agent.wait(&task.vm, &task.id, exec_id).await {
                Ok(exit) => return exit,
                Err(error) if error.code() == Some(ErrorCode::NotFound) => return lost,
                Err(error) => {
                    warn!(task = %task.id, %error, "waiting for the process in the agent");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            if !lock(&self.inner.tasks).contains_key(&task.id) {
                return lost;
            }
        }
    }

    async fn report_exit(&self, task: &ShimTask, process: &Process, exited: Exited) {
        if !process.set_exited(exited) {
            return;
        }
        let id = process.exec_id.clone().unwrap_or_else(|| task.id.clone());
        info!(task = %task.id, process = %id, status = exited.status, "exited");
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: task.id.clone(),
                id,
                pid: self.inner.pid,
                exit_status: exited.status,
                exited_at: MessageField::some(exited.timestamp()),
                ..TaskExit::default()
            }),
        )
        .await;
    }

    fn stdin_target(&self, task: &ShimTask, exec_id: Option<String>) -> StdinTarget {
        StdinTarget {
            agent: self.inner.agent.clone(),
            vm: task.vm.clone(),
            id: task.id.clone(),
            exec_id,
        }
    }

    fn pipe_stdin(&self, task: &ShimTask, process: &Process) {
        if process.stdio.stdin.is_empty() {
            return;
        }
        let target = self.stdin_target(task, process.exec_id.clone());
        let name = process.stdio.stdin.clone();
        let close = Arc::clone(&process.close_stdin);
        tokio::spawn(async move {
            if let Err(error) = copy_stdin(&name, target, close).await {
                warn!(%error, "standard input");
            }
        });
    }

    fn state_response(&self, task: &ShimTask, process: &Process) -> api::StateResponse {
        let state = process.state();
        let exited = process.exited();
        api::StateResponse {
            id: task.id.clone(),
            bundle: task.bundle.clone(),
            pid: self.inner.pid,
            status: state.status().into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exited.map_or(0, |e| e.status),
            exited_at: exited.map(|e| e.timestamp()).into(),
            exec_id: process.exec_id.clone().unwrap_or_default(),
            ..api::StateResponse::default()
        }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if lock(&self.inner.tasks).contains_key(&req.id) {
            return Err(rpc(Code::ALREADY_EXISTS, format!("task {} exists", req.id)));
        }
        let bundle = PathBuf::from(&req.bundle);
        let oci = containerd_shim::asynchronous::util::read_spec(&bundle)
            .await
            .map_err(|err| rpc(Code::INVALID_ARGUMENT, format!("task {}: {err}", req.id)))?;
        let wanted = spec::parse(&oci, &req.id, req.terminal, !req.stdin.is_empty())
            .map_err(|err| rpc(Code::INVALID_ARGUMENT, err))?;
        let placed = self
            .place(wanted.vm.as_deref(), &spec::grouping(&oci, &req.id))
            .await?;
        let record = TaskRecord {
            api_socket: self.inner.agent.socket().to_owned(),
            vm: placed.vm().to_owned(),
            launched: placed.launched(),
            container: wanted.run.as_ref().map(|_| req.id.clone()),
        };
        record
            .save(&bundle)
            .map_err(|err| rpc(Code::INTERNAL, err))?;
        if let Some(run) = &wanted.run
            && let Err(error) = self.inner.agent.create(placed.vm(), run).await
        {
            // A VM launched for this task alone goes with it.
            self.release_vm_if_idle().await;
            return Err(agent_error(error));
        }
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let task = Arc::new(ShimTask {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            kind: wanted.kind,
            vm: placed.vm().to_owned(),
            init: Arc::new(Process::new(None, stdio, None)),
            execs: Mutex::new(HashMap::new()),
        });
        lock(&self.inner.tasks).insert(req.id.clone(), Arc::clone(&task));
        if task.kind == TaskKind::Container {
            self.watch(Arc::clone(&task), Arc::clone(&task.init));
            self.pipe_stdin(&task, &task.init);
        }
        info!(task = %req.id, vm = %task.vm, kind = ?task.kind, "created");
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..TaskIO::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid: self.inner.pid,
                ..TaskCreate::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid: self.inner.pid,
            ..api::CreateTaskResponse::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        if process.state() != ProcessState::Created {
            return Err(rpc(
                Code::FAILED_PRECONDITION,
                format!(
                    "task {} process {:?} was started already",
                    req.id, req.exec_id
                ),
            ));
        }
        let agent = &self.inner.agent;
        match (&process.exec, task.kind) {
            (Some(exec), _) => {
                agent
                    .exec(&task.vm, &task.id, exec)
                    .await
                    .map_err(agent_error)?;
                process.set_running();
                self.watch(Arc::clone(&task), Arc::clone(&process));
                self.pipe_stdin(&task, &process);
                self.publish(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(TaskExecStarted {
                        container_id: task.id.clone(),
                        exec_id: req.exec_id.clone(),
                        pid: self.inner.pid,
                        ..TaskExecStarted::default()
                    }),
                )
                .await;
            }
            (None, kind) => {
                if kind == TaskKind::Container {
                    agent.start(&task.vm, &task.id).await.map_err(agent_error)?;
                }
                process.set_running();
                self.publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: task.id.clone(),
                        pid: self.inner.pid,
                        ..TaskStart::default()
                    }),
                )
                .await;
            }
        }
        Ok(api::StartResponse {
            pid: self.inner.pid,
            ..api::StartResponse::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        Ok(self.state_response(&task, &process))
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        let exited = process.wait().await;
        Ok(api::WaitResponse {
            exit_status: exited.status,
            exited_at: MessageField::some(exited.timestamp()),
            ..api::WaitResponse::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        if process.exited().is_some() {
            return Err(not_found(format!(
                "task {} process {:?}: process already finished",
                req.id, req.exec_id
            )));
        }
        match task.kind {
            // The sandbox's "process" is the pod itself: a signal that would end a pause
            // process ends it.
            TaskKind::Sandbox => {
                if req.signal != 0 {
                    self.report_exit(&task, &process, Exited::now(128 + req.signal))
                        .await;
                }
            }
            TaskKind::Container if process.state() == ProcessState::Created => {
                // Never started: nothing runs in the guest to signal; it ends here.
                self.report_exit(&task, &process, Exited::now(128 + req.signal))
                    .await;
            }
            TaskKind::Container => self
                .inner
                .agent
                .kill(&task.vm, &task.id, process.exec_id.as_deref(), req.signal)
                .await
                .map_err(|error| match error.code() {
                    Some(ErrorCode::NotFound | ErrorCode::Conflict) => not_found(format!(
                        "task {} process {:?}: process already finished ({error})",
                        req.id, req.exec_id
                    )),
                    _ => agent_error(error),
                })?,
        }
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let task = self.task(&req.id)?;
        if task.kind == TaskKind::Sandbox {
            return Err(rpc(
                Code::FAILED_PRECONDITION,
                "a pod's sandbox runs nothing in the VM to exec into",
            ));
        }
        if req.exec_id.is_empty() {
            return Err(rpc(Code::INVALID_ARGUMENT, "an exec needs an id"));
        }
        let exec = spec::parse_exec(
            &req.spec.value,
            &req.id,
            &req.exec_id,
            req.terminal,
            !req.stdin.is_empty(),
        )
        .map_err(|err| rpc(Code::INVALID_ARGUMENT, err))?;
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut execs = lock(&task.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(rpc(
                    Code::ALREADY_EXISTS,
                    format!("task {}: exec {} exists", req.id, req.exec_id),
                ));
            }
            let process = Process::new(Some(req.exec_id.clone()), stdio, Some(exec));
            execs.insert(req.exec_id.clone(), Arc::new(process));
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..TaskExecAdded::default()
            }),
        )
        .await;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        if !process.stdio.terminal {
            return Err(rpc(
                Code::FAILED_PRECONDITION,
                format!("task {} process {:?} has no terminal", req.id, req.exec_id),
            ));
        }
        self.inner
            .agent
            .resize(
                &task.vm,
                &task.id,
                process.exec_id.as_deref(),
                req.height,
                req.width,
            )
            .await
            .map_err(agent_error)?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        if req.stdin {
            process.close_stdin.notify_one();
        }
        Ok(api::Empty::default())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        if process.state() == ProcessState::Running {
            return Err(rpc(
                Code::FAILED_PRECONDITION,
                format!(
                    "task {} process {:?} is running: kill it first",
                    req.id, req.exec_id
                ),
            ));
        }
        let exited = process.exited().unwrap_or_else(|| Exited::now(0));
        if req.exec_id.is_empty() {
            if task.kind == TaskKind::Container {
                self.inner
                    .agent
                    .remove(&task.vm, &task.id, true)
                    .await
                    .map_err(agent_error)?;
            }
            lock(&self.inner.tasks).remove(&req.id);
            release_stdin(&task.init.stdio.stdin);
            for exec in lock(&task.execs).values() {
                release_stdin(&exec.stdio.stdin);
            }
            let _ =
                std::fs::remove_file(PathBuf::from(&task.bundle).join(crate::record::RECORD_FILE));
            info!(task = %req.id, "deleted");
        } else {
            lock(&task.execs).remove(&req.exec_id);
            release_stdin(&process.stdio.stdin);
        }
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid: self.inner.pid,
                exit_status: exited.status,
                exited_at: MessageField::some(exited.timestamp()),
                id: req.exec_id.clone(),
                ..TaskDelete::default()
            }),
        )
        .await;
        if req.exec_id.is_empty() {
            self.release_vm_if_idle().await;
        }
        Ok(api::DeleteResponse {
            pid: self.inner.pid,
            exit_status: exited.status,
            exited_at: MessageField::some(exited.timestamp()),
            ..api::DeleteResponse::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let task = self.task(&req.id)?;
        let mut processes = Vec::new();
        if task.kind == TaskKind::Container {
            let views = self
                .inner
                .agent
                .containers(&task.vm)
                .await
                .map_err(agent_error)?;
            let pid = views
                .iter()
                .find(|view| view.id == task.id)
                .and_then(|view| view.pid);
            if let Some(pid) = pid {
                processes.push(api::ProcessInfo {
                    pid,
                    ..api::ProcessInfo::default()
                });
            }
        }
        Ok(api::PidsResponse {
            processes,
            ..api::PidsResponse::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let task = self.task(&req.id)?;
        if task.kind == TaskKind::Sandbox {
            return Err(rpc(
                Code::FAILED_PRECONDITION,
                "a pod's sandbox has no container of its own in the VM",
            ));
        }
        let stats = self
            .inner
            .agent
            .stats(&task.vm, &task.id)
            .await
            .map_err(agent_error)?;
        let any =
            convert_to_any(Box::new(metrics(&stats))).map_err(|err| rpc(Code::INTERNAL, err))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..api::StatsResponse::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: self.inner.pid,
            task_pid: self.inner.pid,
            version: VERSION.to_owned(),
            ..api::ConnectResponse::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if !req.now && !lock(&self.inner.tasks).is_empty() {
            return Ok(api::Empty::default());
        }
        // Told to go now with tasks left: their containers go too (a VM this shim launched goes
        // whole below; one it was given must not keep them).
        let left: Vec<Arc<ShimTask>> = lock(&self.inner.tasks).drain().map(|(_, t)| t).collect();
        for task in left.iter().filter(|t| t.kind == TaskKind::Container) {
            if let Err(error) = self.inner.agent.remove(&task.vm, &task.id, true).await {
                warn!(task = %task.id, %error, "removing a task's container at shutdown");
            }
        }
        self.release_vm_if_idle().await;
        self.inner.exit.signal();
        Ok(api::Empty::default())
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(rpc(
            Code::UNIMPLEMENTED,
            "pause is not supported by Gantry (a container's processes cannot be frozen yet)",
        ))
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(rpc(
            Code::UNIMPLEMENTED,
            "resume is not supported by Gantry (nothing can be paused)",
        ))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(rpc(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by Gantry",
        ))
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(rpc(
            Code::UNIMPLEMENTED,
            "update is not supported by Gantry: a container's limits are set when it is created",
        ))
    }
}

/// The agent's cgroup figures in the format `ctr task metrics` and CRI read (cgroup v1's
/// message: the one containerd-shim-protos carries; the figures are the guest's cgroup v2
/// ones under their v1 names).
fn metrics(stats: &gantry_proto::ContainerStats) -> Metrics {
    Metrics {
        pids: MessageField::some(PidsStat {
            current: stats.pids_current,
            ..PidsStat::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: stats.cpu_usage_us.saturating_mul(1000),
                ..CPUUsage::default()
            }),
            ..CPUStat::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: MessageField::some(MemoryEntry {
                usage: stats.memory_current_bytes,
                limit: stats.memory_max_bytes.unwrap_or(u64::MAX),
                max: stats.memory_peak_bytes.unwrap_or_default(),
                ..MemoryEntry::default()
            }),
            ..MemoryStat::default()
        }),
        ..Metrics::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_map_onto_the_codes_containerd_understands() {
        let status = |code| {
            AgentError::Api(gantry_api::ApiClientError::Status {
                status: hyper::StatusCode::NOT_FOUND,
                code,
                message: "m".into(),
            })
        };
        let code_of = |error: ttrpc::Error| match error {
            ttrpc::Error::RpcStatus(status) => status.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code_of(agent_error(status(ErrorCode::NotFound))),
            Code::NOT_FOUND
        );
        assert_eq!(
            code_of(agent_error(status(ErrorCode::Conflict))),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            code_of(agent_error(AgentError::RunFailed("no such image".into()))),
            Code::FAILED_PRECONDITION
        );
    }

    #[test]
    fn metrics_carry_the_guests_figures() {
        let stats = gantry_proto::ContainerStats {
            memory_current_bytes: 5 << 20,
            memory_max_bytes: Some(64 << 20),
            memory_peak_bytes: Some(6 << 20),
            cpu_usage_us: 1500,
            pids_current: 3,
            oom_kills: 0,
        };
        let metrics = metrics(&stats);
        assert_eq!(metrics.memory.usage.usage, 5 << 20);
        assert_eq!(metrics.memory.usage.limit, 64 << 20);
        assert_eq!(metrics.cpu.usage.total, 1_500_000);
        assert_eq!(metrics.pids.current, 3);
        let any = convert_to_any(Box::new(metrics)).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
    }
}
