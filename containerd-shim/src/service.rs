//! The shim's commands as containerd runs them: `start` (spawn the serving shim of a task's
//! group, or find it), serving the Task service, and `delete` (clean up after a shim that died).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::util::{read_spec, write_str_to_file};
use containerd_shim::asynchronous::{ExitSignal, Shim, spawn};
use containerd_shim::{Config, DeleteResponse, Error, Flags, StartOpts};
use containerd_shim_protos::protobuf::MessageField;
use tracing::{info, warn};

use crate::agent::{Agent, socket_from_env};
use crate::process::Exited;
use crate::record::TaskRecord;
use crate::spec;
use crate::task::TaskService;

/// The shim process: its flags, and the signal that ends its serving.
pub struct GantryShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    /// containerd's socket (shim socket addresses derive from it).
    address: String,
    id: String,
    bundle: PathBuf,
}

impl std::fmt::Debug for GantryShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GantryShim")
            .field("namespace", &self.namespace)
            .field("bundle", &self.bundle)
            .finish_non_exhaustive()
    }
}

impl GantryShim {
    /// The serving socket of the task's group, left by a shim that died: removed when nothing
    /// answers on it (a live shim of the group keeps it).
    async fn remove_dead_socket(&self) {
        let grouping = match read_spec(&self.bundle).await {
            Ok(oci) => spec::grouping(&oci, &self.id),
            Err(_) => self.id.clone(),
        };
        let address = containerd_shim::socket_address(&self.address, &self.namespace, &grouping);
        let Some(path) = address.strip_prefix("unix://") else {
            return;
        };
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[async_trait]
impl Shim for GantryShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, flags: &Flags, _config: &mut Config) -> Self {
        // containerd runs `start` and `delete` in the bundle; `-bundle` says so too when given.
        let bundle = if flags.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&flags.bundle)
        };
        Self {
            exit: Arc::new(ExitSignal::default()),
            namespace: flags.namespace.clone(),
            address: flags.address.clone(),
            id: flags.id.clone(),
            bundle,
        }
    }

    /// One serving shim per pod (the CRI sandbox id groups its tasks), else per task: the
    /// address is derived from the group, and a second `start` for the same group finds the
    /// first shim serving there.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = match read_spec(&self.bundle).await {
            Ok(oci) => spec::grouping(&oci, &opts.id),
            Err(_) => opts.id.clone(),
        };
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// After a shim died (or its start failed): removes the task's container and the VM the
    /// shim launched, as the task's record says. The pod's other tasks find them gone.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let killed = Exited::now(128 + libc::SIGKILL as u32);
        match TaskRecord::load(&self.bundle) {
            Ok(Some(record)) => {
                let agent = Agent::new(&record.api_socket);
                if let Some(container) = &record.container
                    && let Err(error) = agent.remove(&record.vm, container, true).await
                {
                    warn!(%container, %error, "removing the container of a dead shim");
                }
                if record.launched {
                    info!(vm = %record.vm, "removing the VM of a dead shim");
                    if let Err(error) = agent.remove_vm(&record.vm).await {
                        warn!(vm = %record.vm, %error, "removing the VM of a dead shim");
                    }
                }
                let _ = std::fs::remove_file(self.bundle.join(crate::record::RECORD_FILE));
            }
            Ok(None) => {}
            Err(error) => warn!(%error, "the task's record"),
        }
        self.remove_dead_socket().await;
        Ok(DeleteResponse {
            exit_status: killed.status,
            exited_at: MessageField::some(killed.timestamp()),
            ..DeleteResponse::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let agent = Agent::new(&socket_from_env());
        TaskService::new(
            agent,
            self.namespace.clone(),
            publisher,
            Arc::clone(&self.exit),
        )
    }
}
