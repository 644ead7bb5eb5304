//! The agent's operator API as the task service uses it: one typed call per operation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_api::records::ExitRecord;
use gantry_api::stream::{BodyStream, StreamError};
use gantry_api::{
    API_SOCKET_ENV, AgentInfo, ApiClient, ApiClientError, AttachVm, ContainerView,
    DEFAULT_API_SOCKET, ErrorCode, ExecRequest, RunOptions, RunUpdate, VmStatus,
};
use gantry_proto::ContainerStats;
use hyper::Method;

/// Errors of agent calls.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The API answered with an error, or could not be reached.
    #[error(transparent)]
    Api(#[from] ApiClientError),
    /// A streamed answer broke off.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A streamed answer held something else than the API sends.
    #[error("unexpected answer from the agent: {0}")]
    Decode(#[from] serde_json::Error),
    /// The run failed; the agent says why.
    #[error("{0}")]
    RunFailed(String),
    /// The run stream ended without a result.
    #[error("the agent ended the run of {0} without a result")]
    RunCut(String),
}

impl AgentError {
    /// The API's kind of error, if the agent answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Api(ApiClientError::Status { code, .. }) => Some(*code),
            _ => None,
        }
    }
}

/// The socket from the environment (containerd passes its own on), else the default, as for
/// the CLI.
pub fn socket_from_env() -> PathBuf {
    std::env::var_os(API_SOCKET_ENV)
        .filter(|value| !value.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_API_SOCKET), PathBuf::from)
}

/// A deletion's outcome, where what is gone already counts as deleted.
fn gone_is_fine(result: Result<serde_json::Value, ApiClientError>) -> Result<(), AgentError> {
    match result {
        Ok(_)
        | Err(ApiClientError::Status {
            code: ErrorCode::NotFound,
            ..
        }) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// A client of one agent.
#[derive(Debug, Clone)]
pub struct Agent {
    client: ApiClient,
    socket: PathBuf,
}

fn container_path(vm: &str, id: &str) -> String {
    format!("/v1/vms/{vm}/containers/{id}")
}

fn exec_query(exec_id: Option<&str>) -> String {
    exec_id.map_or_else(String::new, |exec| format!("&exec={exec}"))
}

impl Agent {
    /// A client of the agent on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            client: ApiClient::new(socket),
            socket: socket.to_owned(),
        }
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/agent`.
    pub async fn info(&self) -> Result<AgentInfo, AgentError> {
        Ok(self.client.get("/v1/agent").await?)
    }

    /// Launches VM `name` from the agent's template (the agent picks its CID).
    pub async fn launch_vm(&self, name: &str) -> Result<VmStatus, AgentError> {
        let request = AttachVm {
            name: name.to_owned(),
            launch: true,
            ..AttachVm::default()
        };
        Ok(self.client.post_json("/v1/vms", &request).await?)
    }

    /// Waits up to `timeout` for VM `name`'s shim to answer.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<(), AgentError> {
        let path = format!("/v1/vms/{name}/guest-info?wait_ms={}", timeout.as_millis());
        let _: serde_json::Value = self.client.get(&path).await?;
        Ok(())
    }

    /// Removes VM `name` (attached at run time); one that is gone already is no error.
    pub async fn remove_vm(&self, name: &str) -> Result<(), AgentError> {
        gone_is_fine(self.client.delete(&format!("/v1/vms/{name}")).await)
    }

    /// Pulls, maps and creates a container (`create_only`), without starting it.
    pub async fn create(&self, vm: &str, options: &RunOptions) -> Result<(), AgentError> {
        let name = options.name.clone().unwrap_or_default();
        let body = self
            .client
            .open(
                Method::POST,
                &format!("/v1/vms/{vm}/containers"),
                serde_json::to_vec(options)?,
            )
            .await?;
        let mut updates = BodyStream::new(body);
        while let Some(line) = updates.line().await? {
            match serde_json::from_slice::<RunUpdate>(&line)? {
                RunUpdate::Created(_) | RunUpdate::Started(_) => return Ok(()),
                RunUpdate::Failed(error) => return Err(AgentError::RunFailed(error)),
                RunUpdate::Progress(step) => tracing::debug!(container = %name, %step, "create"),
                RunUpdate::Layer(_) => {}
            }
        }
        Err(AgentError::RunCut(name))
    }

    /// Starts a created container.
    pub async fn start(&self, vm: &str, id: &str) -> Result<(), AgentError> {
        let _: serde_json::Value = self
            .client
            .post(&format!("{}/start", container_path(vm, id)))
            .await?;
        Ok(())
    }

    /// Starts an exec.
    pub async fn exec(&self, vm: &str, id: &str, request: &ExecRequest) -> Result<(), AgentError> {
        let _: serde_json::Value = self
            .client
            .post_json(&format!("{}/exec", container_path(vm, id)), request)
            .await?;
        Ok(())
    }

    /// Signals the main process or an exec.
    pub async fn kill(
        &self,
        vm: &str,
        id: &str,
        exec_id: Option<&str>,
        signal: u32,
    ) -> Result<(), AgentError> {
        let path = format!(
            "{}/kill?signal={signal}{}",
            container_path(vm, id),
            exec_query(exec_id)
        );
        let _: serde_json::Value = self.client.post(&path).await?;
        Ok(())
    }

    /// Writes `bytes` to a process's standard input, closing it after them with `close`.
    pub async fn stdin(
        &self,
        vm: &str,
        id: &str,
        exec_id: Option<&str>,
        bytes: Vec<u8>,
        close: bool,
    ) -> Result<(), AgentError> {
        let path = format!(
            "{}/stdin?close={close}{}",
            container_path(vm, id),
            exec_query(exec_id)
        );
        let _ = self.client.open(Method::POST, &path, bytes).await?;
        Ok(())
    }

    /// Resizes a process's terminal.
    pub async fn resize(
        &self,
        vm: &str,
        id: &str,
        exec_id: Option<&str>,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let path = format!(
            "{}/resize?rows={rows}&cols={cols}{}",
            container_path(vm, id),
            exec_query(exec_id)
        );
        let _: serde_json::Value = self.client.post(&path).await?;
        Ok(())
    }

    /// A process's output from its start, following it until it ends.
    pub async fn follow_logs(
        &self,
        vm: &str,
        id: &str,
        exec_id: Option<&str>,
    ) -> Result<BodyStream, AgentError> {
        let path = format!(
            "{}/logs?follow=true{}",
            container_path(vm, id),
            exec_query(exec_id)
        );
        let body = self.client.open(Method::GET, &path, Vec::new()).await?;
        Ok(BodyStream::new(body))
    }

    /// Waits for the main process or an exec to end.
    pub async fn wait(
        &self,
        vm: &str,
        id: &str,
        exec_id: Option<&str>,
    ) -> Result<ExitRecord, AgentError> {
        let exec = exec_id.map_or_else(String::new, |exec| format!("?exec={exec}"));
        Ok(self
            .client
            .get(&format!("{}/wait{exec}", container_path(vm, id)))
            .await?)
    }

    /// Removes a container (killing it first with `force`); one that is gone is no error.
    pub async fn remove(&self, vm: &str, id: &str, force: bool) -> Result<(), AgentError> {
        let path = format!("{}?force={force}", container_path(vm, id));
        gone_is_fine(self.client.delete(&path).await)
    }

    /// The container's cgroup figures.
    pub async fn stats(&self, vm: &str, id: &str) -> Result<ContainerStats, AgentError> {
        Ok(self
            .client
            .get(&format!("{}/stats", container_path(vm, id)))
            .await?)
    }

    /// The VM's containers.
    pub async fn containers(&self, vm: &str) -> Result<Vec<ContainerView>, AgentError> {
        Ok(self.client.get(&format!("/v1/vms/{vm}/containers")).await?)
    }
}
