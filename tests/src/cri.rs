//! A blocking client of the Kubernetes CRI (v1) over a Unix socket: containerd's, which serves
//! CRI on its gRPC socket ([`crate::containerd::TestContainerd::socket`]). Only what the shim's
//! tests drive, the kubelet's path for a pod: `RunPodSandbox`, `CreateContainer`,
//! `StartContainer`, `ContainerStatus`, stop and remove. The tests are plain `#[test]`
//! functions, so the client owns a small tokio runtime and every call blocks, bounded by the
//! client's timeout.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, ImageStatusRequest, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, VersionRequest,
    VersionResponse,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// How long one CRI call may take unless [`CriClient::with_timeout`] says otherwise
/// (`RunPodSandbox` starts a shim and the sandbox container).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A CRI client on one Unix socket, with the runtime its calls block on.
#[derive(Debug)]
pub struct CriClient {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    timeout: Duration,
}

/// What a container is to run, for [`CriClient::create_container`].
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// The container's name (its metadata).
    pub name: String,
    /// The image, as imported (`HOST/PATH:TAG`).
    pub image: String,
    /// Replaces the image's entrypoint (empty: the image's).
    pub command: Vec<String>,
    /// Replaces the image's command (empty: the image's).
    pub args: Vec<String>,
    /// The log file, relative to the sandbox's `log_directory` (CRI's format:
    /// `TIMESTAMP STREAM P|F LINE` per line).
    pub log_path: String,
    /// Annotations, which reach the runtime's OCI spec.
    pub annotations: HashMap<String, String>,
}

/// A sandbox config for `RunPodSandbox` and `CreateContainer` (which needs it again): pod
/// `name` with `uid` in Kubernetes namespace `namespace`, logs under `log_directory`; with
/// `host_network`, the host's network namespace (the tests have no CNI).
pub fn pod_sandbox_config(
    name: &str,
    uid: &str,
    namespace: &str,
    host_network: bool,
    log_directory: &Path,
) -> PodSandboxConfig {
    let network = if host_network {
        NamespaceMode::Node
    } else {
        NamespaceMode::Pod
    };
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: uid.to_owned(),
            namespace: namespace.to_owned(),
            attempt: 0,
        }),
        // As the kubelet does: a host-network pod shares the host's UTS namespace, where
        // runc refuses to set a hostname.
        hostname: if host_network {
            String::new()
        } else {
            name.to_owned()
        },
        log_directory: log_directory.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: network as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl CriClient {
    /// Connects to the CRI server on `socket`.
    pub fn connect(socket: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the CRI client's runtime")?;
        let socket: PathBuf = socket.to_owned();
        let channel = runtime
            .block_on(async {
                // The URI is required and ignored: the connector dials the socket.
                let endpoint = Endpoint::try_from("http://[::1]:50051")?
                    .connect_timeout(Duration::from_secs(10));
                endpoint
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(socket).await?,
                            ))
                        }
                    }))
                    .await
            })
            .context("connecting to the CRI socket")?;
        Ok(Self {
            runtime,
            channel,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same client, each call bounded by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn runtime_service(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    fn image_service(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Runs `call` on the client's runtime, failing after the timeout with `what`.
    fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        let timeout = self.timeout;
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, call).await })
            .with_context(|| format!("CRI {what}: no answer within {timeout:?}"))?
            .map(tonic::Response::into_inner)
            .with_context(|| format!("CRI {what}"))
    }

    /// `Version`: the runtime's name and version, and the CRI version.
    pub fn version(&self) -> Result<VersionResponse> {
        let mut client = self.runtime_service();
        self.call(
            "Version",
            client.version(VersionRequest {
                version: "v1".to_owned(),
            }),
        )
    }

    /// `ImageStatus`: whether CRI knows `image` (e.g. one `ctr images import` brought in).
    pub fn image_present(&self, image: &str) -> Result<bool> {
        let mut client = self.image_service();
        let response = self.call(
            "ImageStatus",
            client.image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            }),
        )?;
        Ok(response.image.is_some())
    }

    /// `RunPodSandbox` of `config` ([`pod_sandbox_config`]) with `runtime_handler` (`runc`,
    /// `gantry`); returns the sandbox id.
    pub fn run_pod_sandbox(
        &self,
        config: &PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String> {
        let mut client = self.runtime_service();
        let response = self.call(
            "RunPodSandbox",
            client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: runtime_handler.to_owned(),
            }),
        )?;
        Ok(response.pod_sandbox_id)
    }

    /// [`pod_sandbox_config`] then [`Self::run_pod_sandbox`]; returns the sandbox id and the
    /// config (which `CreateContainer` needs again).
    pub fn run_pod(
        &self,
        name: &str,
        uid: &str,
        namespace: &str,
        runtime_handler: &str,
        host_network: bool,
        log_directory: &Path,
    ) -> Result<(String, PodSandboxConfig)> {
        let config = pod_sandbox_config(name, uid, namespace, host_network, log_directory);
        let id = self.run_pod_sandbox(&config, runtime_handler)?;
        Ok((id, config))
    }

    /// `CreateContainer` of `spec` in sandbox `pod_id` (run with `sandbox_config`); returns the
    /// container id.
    pub fn create_container(
        &self,
        pod_id: &str,
        sandbox_config: &PodSandboxConfig,
        spec: &ContainerSpec,
    ) -> Result<String> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: spec.name.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: spec.image.clone(),
                ..Default::default()
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            log_path: spec.log_path.clone(),
            annotations: spec.annotations.clone(),
            ..Default::default()
        };
        let mut client = self.runtime_service();
        let response = self.call(
            "CreateContainer",
            client.create_container(CreateContainerRequest {
                pod_sandbox_id: pod_id.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            }),
        )?;
        Ok(response.container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&self, container_id: &str) -> Result<()> {
        let mut client = self.runtime_service();
        self.call(
            "StartContainer",
            client.start_container(StartContainerRequest {
                container_id: container_id.to_owned(),
            }),
        )?;
        Ok(())
    }

    /// `ContainerStatus`: the container's state, exit code, reason and so on.
    pub fn container_status(&self, container_id: &str) -> Result<ContainerStatus> {
        let mut client = self.runtime_service();
        let response = self.call(
            "ContainerStatus",
            client.container_status(ContainerStatusRequest {
                container_id: container_id.to_owned(),
                verbose: false,
            }),
        )?;
        response
            .status
            .with_context(|| format!("ContainerStatus of {container_id}: no status"))
    }

    /// Polls `ContainerStatus` until the container has exited; returns its status. Fails with
    /// the last status seen after `timeout`.
    pub fn wait_container_exited(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<ContainerStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let status = self.container_status(container_id)?;
            if status.state == ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "container {container_id} has not exited after {timeout:?}: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `StopContainer`, giving it `timeout_seconds` after SIGTERM before SIGKILL.
    pub fn stop_container(&self, container_id: &str, timeout_seconds: i64) -> Result<()> {
        let mut client = self.runtime_service();
        self.call(
            "StopContainer",
            client.stop_container(StopContainerRequest {
                container_id: container_id.to_owned(),
                timeout: timeout_seconds,
            }),
        )?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, container_id: &str) -> Result<()> {
        let mut client = self.runtime_service();
        self.call(
            "RemoveContainer",
            client.remove_container(RemoveContainerRequest {
                container_id: container_id.to_owned(),
            }),
        )?;
        Ok(())
    }

    /// `StopPodSandbox`: stops its containers and the sandbox container.
    pub fn stop_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let mut client = self.runtime_service();
        self.call(
            "StopPodSandbox",
            client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod_id.to_owned(),
            }),
        )?;
        Ok(())
    }

    /// `RemovePodSandbox`: removes it and its containers.
    pub fn remove_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let mut client = self.runtime_service();
        self.call(
            "RemovePodSandbox",
            client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.to_owned(),
            }),
        )?;
        Ok(())
    }
}

/// The lines of a CRI container log (`TIMESTAMP STREAM TAG LINE`, tag `F` for a full line,
/// `P` for a part) as (stream, line); lines not in that format are skipped.
pub fn parse_cri_log(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(4, ' ');
            let (_timestamp, stream, _tag) = (fields.next()?, fields.next()?, fields.next()?);
            Some((
                stream.to_owned(),
                fields.next().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}
