//! The VM table: the VMs of `agent.toml` and those attached at run time (`POST /v1/vms`),
//! which stay attached across the agent's restarts until `DELETE /v1/vms/{name}` detaches them.
//!
//! A VM attached at run time is recorded in its state directory (`attached.json`: the
//! [`VmConfig`] it resolved to, template included) before it starts, so a restarted agent
//! attaches it again and adopts its keeper and QEMU instead of orphaning them. Detaching stops
//! its keeper (and the QEMU the agent launched), unmaps its layers (unpinning them), stops its
//! layer store, drops its metrics and removes its state directory: nothing of it is left.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gantry_api::{AttachVm, VmStatus};
use tracing::{info, warn};

use crate::config::{LaunchConfig, VmConfig};
use crate::containers::logs::LogLimits;
use crate::images::ImageService;
use crate::keeper::KeeperClient;
use crate::metrics::Metrics;
use crate::qemu::{LayerStoreDisk, QemuConfig};
use crate::sync::lock;
use crate::vm::{Vm, VmError, vm_dir};

/// The record of a VM attached at run time, in its state directory.
const ATTACHED_RECORD: &str = "attached.json";
/// Longest path a unix socket can be bound at (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors attaching or detaching a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmTableError {
    /// The request is not a VM the agent could serve.
    #[error("{0}")]
    Invalid(String),
    /// It collides with a VM the agent serves (name, CID or socket).
    #[error("{0}")]
    Conflict(String),
    /// No VM of that name.
    #[error("no VM named {0:?}")]
    NotFound(String),
    /// The VM is named in `agent.toml`: the next start would attach it again.
    #[error("VM {0:?} is configured in agent.toml; remove it there (and restart the agent)")]
    Configured(String),
    /// Its record or state directory could not be written or removed.
    #[error("VM {vm}: {what}: {source}")]
    State {
        /// The VM.
        vm: String,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Starting or stopping it failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The QEMU recipe for a VM the agent launches itself.
fn qemu_config(vm: &VmConfig, launch: &LaunchConfig) -> QemuConfig {
    let console_log = launch.console_log.clone().unwrap_or_else(|| {
        vm.vsock_socket
            .with_file_name(format!("{}.console.log", vm.name))
    });
    let mut config = QemuConfig::new(
        &launch.kernel,
        &launch.initrd,
        &vm.vsock_socket,
        console_log,
    );
    config.qemu_binary = launch.qemu.clone();
    let mut layer_store = LayerStoreDisk::new(&vm.layer_socket);
    layer_store.num_queues = vm.layer_queues;
    config.layer_store = Some(layer_store);
    config.memory_mib = launch.memory_mib;
    config.cpus = launch.cpus;
    config.accel = launch.accel;
    config.console_socket = launch.console_socket.clone();
    config.root_disk = launch.root_disk.clone();
    config.extra_cmdline = launch.cmdline.clone();
    config
}

/// Resolves an attach request into the VM's config, checked on its own (names, CID range,
/// socket paths, template); its sockets go in its state directory under `state_dir` by default.
pub fn resolve(
    request: AttachVm,
    template: Option<&LaunchConfig>,
    state_dir: &Path,
) -> Result<VmConfig, VmTableError> {
    let invalid = VmTableError::Invalid;
    gantry_proto::validate_id("VM name", &request.name).map_err(|err| invalid(err.to_string()))?;
    let dir = vm_dir(state_dir, &request.name);
    if request.guest_cid < 3 || request.guest_cid >= u64::from(u32::MAX) {
        return Err(invalid(format!(
            "guest_cid {} is reserved; use 3 or more",
            request.guest_cid
        )));
    }
    let socket = |given: Option<String>, default: &str| -> Result<PathBuf, VmTableError> {
        let path = given.map_or_else(|| dir.join(default), PathBuf::from);
        check_socket_path(&path).map_err(invalid)?;
        Ok(path)
    };
    let vsock_socket = socket(request.vsock_socket, "vsock.sock")?;
    let layer_socket = socket(request.layer_socket, "layers.sock")?;
    if vsock_socket == layer_socket {
        return Err(invalid(
            "vsock_socket and layer_socket are the same path".to_string(),
        ));
    }
    let layer_queues = request
        .layer_queues
        .unwrap_or(crate::blk::DEFAULT_NUM_QUEUES);
    if layer_queues == 0 {
        return Err(invalid("layer_queues must be 1 or more".to_string()));
    }
    let launch = if request.launch {
        let mut launch = template.cloned().ok_or_else(|| {
            invalid(
                "\"launch\": true needs a [vm_template] in agent.toml (kernel, initrd, …)"
                    .to_string(),
            )
        })?;
        launch.memory_mib = request.memory_mib.unwrap_or(launch.memory_mib);
        launch.cpus = request.cpus.unwrap_or(launch.cpus);
        if launch.memory_mib < 64 || launch.cpus == 0 {
            return Err(invalid(format!(
                "{} MiB and {} CPUs: a guest needs 64 MiB and one CPU at least",
                launch.memory_mib, launch.cpus
            )));
        }
        Some(launch)
    } else {
        if request.memory_mib.is_some() || request.cpus.is_some() {
            return Err(invalid(
                "memory_mib and cpus size a guest the agent launches (\"launch\": true)"
                    .to_string(),
            ));
        }
        None
    };
    Ok(VmConfig {
        name: request.name,
        guest_cid: request.guest_cid,
        vsock_socket,
        layer_socket,
        layer_queues,
        launch,
    })
}

/// Where a device may listen: an absolute path short enough to bind, in an existing directory,
/// and not a file that is anything but a (stale) socket.
fn check_socket_path(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    if !path.is_absolute() {
        return Err(format!("socket {}: give an absolute path", path.display()));
    }
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "socket {}: longer than the {MAX_SOCKET_PATH} bytes a unix socket path may have",
            path.display()
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(format!(
            "socket {}: a file that is not a socket is there",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// What else may not collide with a new VM: the VMs served now.
fn collision(new: &VmConfig, served: &BTreeMap<String, Arc<Vm>>) -> Option<String> {
    if served.contains_key(&new.name) {
        return Some(format!("a VM named {:?} is attached already", new.name));
    }
    served.values().map(|vm| vm.config()).find_map(|other| {
        if other.guest_cid == new.guest_cid {
            return Some(format!(
                "guest_cid {} is VM {:?}'s",
                new.guest_cid, other.name
            ));
        }
        let theirs = [&other.vsock_socket, &other.layer_socket];
        [&new.vsock_socket, &new.layer_socket]
            .into_iter()
            .find(|socket| theirs.contains(socket))
            .map(|socket| format!("socket {} is VM {:?}'s", socket.display(), other.name))
    })
}

/// The lowest guest CID (3 or more) no served VM has.
fn free_cid(served: &BTreeMap<String, Arc<Vm>>) -> u64 {
    let taken: BTreeSet<u64> = served.values().map(|vm| vm.config().guest_cid).collect();
    (3..).find(|cid| !taken.contains(cid)).unwrap_or(3)
}

/// The VMs the agent serves, by name.
#[derive(Debug)]
pub struct VmTable {
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    /// The names `agent.toml` gives: not detachable.
    configured: BTreeSet<String>,
    /// Attaches and detaches run one at a time (each checks, then changes the table and the
    /// state directory).
    changes: tokio::sync::Mutex<()>,
    state_dir: PathBuf,
    log_limits: LogLimits,
    template: Option<LaunchConfig>,
}

impl VmTable {
    /// An empty table; `configured` names the VMs of `agent.toml` (attached with
    /// [`Self::insert_configured`]).
    pub fn new(
        configured: BTreeSet<String>,
        state_dir: PathBuf,
        log_limits: LogLimits,
        template: Option<LaunchConfig>,
    ) -> Self {
        Self {
            vms: Mutex::new(BTreeMap::new()),
            configured,
            changes: tokio::sync::Mutex::new(()),
            state_dir,
            log_limits,
            template,
        }
    }

    /// Starts a VM of `agent.toml` and serves it.
    pub async fn attach_configured(
        &self,
        config: VmConfig,
        images: &ImageService,
        metrics: &Metrics,
    ) -> Result<(), VmError> {
        let name = config.name.clone();
        let vm = self.start(config, images, metrics).await?;
        lock(&self.vms).insert(name, vm);
        Ok(())
    }

    /// The VM `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Vm>> {
        lock(&self.vms).get(name).cloned()
    }

    /// Every VM, by name.
    pub fn all(&self) -> Vec<Arc<Vm>> {
        lock(&self.vms).values().cloned().collect()
    }

    /// The names served, in order.
    pub fn names(&self) -> Vec<String> {
        lock(&self.vms).keys().cloned().collect()
    }

    /// How many VMs are served.
    pub fn len(&self) -> usize {
        lock(&self.vms).len()
    }

    /// Whether no VM is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether VMs can be launched at run time (`agent.toml` has a `[vm_template]`).
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// The operator's view of `vm`.
    pub fn status(&self, vm: &Vm) -> VmStatus {
        let mut status = vm.status();
        status.attached_at_run_time = !self.configured.contains(vm.name());
        status
    }

    /// Attaches a VM at run time: resolves and checks the request, records it, starts it (a
    /// launched VM's QEMU boots in the background), and serves it from now on and after the
    /// agent's restarts.
    pub async fn attach(
        &self,
        request: AttachVm,
        images: &ImageService,
        metrics: &Metrics,
    ) -> Result<Arc<Vm>, VmTableError> {
        let _one_at_a_time = self.changes.lock().await;
        let mut request = request;
        if request.guest_cid == 0 {
            request.guest_cid = free_cid(&lock(&self.vms));
        }
        let config = resolve(request, self.template.as_ref(), &self.state_dir)?;
        let name = config.name.clone();
        let dir = vm_dir(&self.state_dir, &name);
        // The configured VMs are all served (one that fails to start stops the agent), so the
        // table is every name and CID taken.
        if let Some(reason) = collision(&config, &lock(&self.vms)) {
            return Err(VmTableError::Conflict(reason));
        }
        if dir.join(ATTACHED_RECORD).exists() {
            return Err(VmTableError::Conflict(format!(
                "VM {name:?} was attached before and could not be attached again at the \
                 agent's start (its log says why); DELETE /v1/vms/{name} removes what is left"
            )));
        }
        let state = |what| {
            let vm = name.clone();
            move |source| VmTableError::State { vm, what, source }
        };
        std::fs::create_dir_all(&dir).map_err(state("creating its state directory"))?;
        // Recorded before anything starts: an agent that dies during the start finds the record
        // and adopts (or starts) what this one began, never orphans it.
        let record = serde_json::to_vec_pretty(&config)
            .map_err(|err| VmTableError::Invalid(format!("VM {name:?}: {err}")))?;
        gantry_oci::fsutil::write_atomic(&dir.join(ATTACHED_RECORD), &record)
            .map_err(state("recording it"))?;
        match self.start(config, images, metrics).await {
            Ok(vm) => {
                info!(vm = %name, "VM attached at run time");
                lock(&self.vms).insert(name, Arc::clone(&vm));
                Ok(vm)
            }
            Err(err) => {
                let _ = remove_state(&dir, &name);
                metrics.forget_vm(&name);
                Err(err.into())
            }
        }
    }

    /// Starts a resolved VM (its QEMU from its own launch settings, if any).
    async fn start(
        &self,
        config: VmConfig,
        images: &ImageService,
        metrics: &Metrics,
    ) -> Result<Arc<Vm>, VmError> {
        let qemu = config
            .launch
            .as_ref()
            .map(|launch| qemu_config(&config, launch));
        let vm_metrics = metrics.vm(&config.name);
        let vm = Vm::start(
            config,
            qemu,
            &self.state_dir,
            self.log_limits,
            images,
            vm_metrics,
        )
        .await?;
        Ok(Arc::new(vm))
    }

    /// Attaches again the VMs an earlier agent attached at run time (from their records),
    /// adopting their keepers. One that cannot be attached is logged and left for `DELETE`;
    /// the others are served.
    pub async fn restore(&self, images: &ImageService, metrics: &Metrics) {
        let _one_at_a_time = self.changes.lock().await;
        let Ok(entries) = std::fs::read_dir(self.state_dir.join("vms")) else {
            return;
        };
        let mut records: Vec<PathBuf> = entries
            .flatten()
            .map(|entry| entry.path().join(ATTACHED_RECORD))
            .filter(|record| record.is_file())
            .collect();
        records.sort();
        for record in records {
            let config = match read_record(&record) {
                Ok(config) => config,
                Err(reason) => {
                    warn!(record = %record.display(), %reason, "a VM attached at run time is not attached again");
                    continue;
                }
            };
            let name = config.name.clone();
            let collides = collision(&config, &lock(&self.vms));
            if let Some(reason) = collides.or_else(|| {
                self.configured
                    .contains(&name)
                    .then(|| "agent.toml configures a VM of that name".to_string())
            }) {
                warn!(vm = %name, %reason, "a VM attached at run time is not attached again");
                continue;
            }
            match self.start(config, images, metrics).await {
                Ok(vm) => {
                    info!(vm = %name, "VM attached at run time, attached again");
                    lock(&self.vms).insert(name, vm);
                }
                Err(err) => {
                    metrics.forget_vm(&name);
                    warn!(vm = %name, %err, "a VM attached at run time could not be attached again");
                }
            }
        }
    }

    /// Detaches a VM attached at run time: its keeper (and the QEMU the agent launched)
    /// stopped, its layers unmapped and unpinned, its layer store stopped, its metrics dropped
    /// and its state directory removed. A VM whose attachment failed at the agent's start is
    /// cleaned up the same way.
    pub async fn detach(&self, name: &str, metrics: &Metrics) -> Result<(), VmTableError> {
        let _one_at_a_time = self.changes.lock().await;
        if self.configured.contains(name) {
            return Err(VmTableError::Configured(name.to_owned()));
        }
        gantry_proto::validate_id("VM name", name)
            .map_err(|_| VmTableError::NotFound(name.to_owned()))?;
        let dir = vm_dir(&self.state_dir, name);
        let removed = lock(&self.vms).remove(name);
        match removed {
            Some(vm) => {
                if let Err(err) = vm.detach().await {
                    // Served no more either way: a keeper that did not stop was killed.
                    warn!(vm = %name, %err, "detaching: the keeper did not stop cleanly");
                }
            }
            None if dir.join(ATTACHED_RECORD).is_file() => {
                // Left from a start that failed: stop its keeper if one runs.
                if let Err(err) = KeeperClient::new(&dir).stop().await {
                    warn!(vm = %name, %err, "detaching: the keeper did not stop cleanly");
                }
                if let Ok(config) = read_record(&dir.join(ATTACHED_RECORD)) {
                    for socket in [&config.vsock_socket, &config.layer_socket] {
                        let _ = crate::vhost_user::remove_socket(socket);
                    }
                }
            }
            None => return Err(VmTableError::NotFound(name.to_owned())),
        }
        metrics.forget_vm(name);
        remove_state(&dir, name)?;
        info!(vm = %name, "VM detached; its state is removed");
        Ok(())
    }
}

fn read_record(record: &Path) -> Result<VmConfig, String> {
    let bytes = std::fs::read(record).map_err(|err| err.to_string())?;
    serde_json::from_slice(&bytes).map_err(|err| err.to_string())
}

/// Removes a VM's state directory (records, logs, keeper files).
fn remove_state(dir: &Path, name: &str) -> Result<(), VmTableError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmTableError::State {
            vm: name.to_owned(),
            what: "removing its state directory",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> LaunchConfig {
        toml::from_str("kernel = \"/k\"\ninitrd = \"/i\"\nmemory_mib = 256").unwrap()
    }

    fn request(name: &str, cid: u64) -> AttachVm {
        AttachVm {
            name: name.into(),
            guest_cid: cid,
            ..Default::default()
        }
    }

    fn invalid(result: Result<VmConfig, VmTableError>) -> String {
        match result {
            Err(VmTableError::Invalid(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_request_resolves_with_its_sockets_in_its_directory_and_the_template_sized() {
        let state_dir = Path::new("/var/lib/gantry");
        let dir = state_dir.join("vms/pod-1");
        let mut launched = request("pod-1", 7);
        launched.launch = true;
        launched.cpus = Some(2);
        let config = resolve(launched, Some(&template()), state_dir).unwrap();
        assert_eq!(config.vsock_socket, dir.join("vsock.sock"));
        assert_eq!(config.layer_socket, dir.join("layers.sock"));
        let launch = config.launch.expect("launched");
        assert_eq!((launch.memory_mib, launch.cpus), (256, 2));
        assert_eq!(launch.kernel, Path::new("/k"));

        let mut attached = request("pod-2", 8);
        attached.vsock_socket = Some("/run/vmm/pod-2.vsock".into());
        let config = resolve(attached, None, state_dir).unwrap();
        assert_eq!(config.vsock_socket, Path::new("/run/vmm/pod-2.vsock"));
        assert!(config.launch.is_none());
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let dir = Path::new("/var/lib/gantry");
        for (name, bad, why) in [
            ("../etc", request("../etc", 5), "VM name"),
            ("reserved cid", request("a", 2), "reserved"),
            ("huge cid", request("a", u64::from(u32::MAX)), "reserved"),
            (
                "relative socket",
                AttachVm {
                    layer_socket: Some("layers.sock".into()),
                    ..request("a", 5)
                },
                "absolute",
            ),
            (
                "one socket for both",
                AttachVm {
                    vsock_socket: Some("/run/a.sock".into()),
                    layer_socket: Some("/run/a.sock".into()),
                    ..request("a", 5)
                },
                "same path",
            ),
            (
                "long socket",
                AttachVm {
                    vsock_socket: Some(format!("/{}", "s".repeat(200))),
                    ..request("a", 5)
                },
                "longer",
            ),
            (
                "not a socket",
                AttachVm {
                    vsock_socket: Some("/etc/passwd".into()),
                    ..request("a", 5)
                },
                "not a socket",
            ),
            (
                "launch without a template",
                AttachVm {
                    launch: true,
                    ..request("a", 5)
                },
                "[vm_template]",
            ),
            (
                "size without launch",
                AttachVm {
                    memory_mib: Some(128),
                    ..request("a", 5)
                },
                "launch",
            ),
            (
                "no queues",
                AttachVm {
                    layer_queues: Some(0),
                    ..request("a", 5)
                },
                "layer_queues",
            ),
        ] {
            let reason = invalid(resolve(bad, None, dir));
            assert!(reason.contains(why), "{name}: {reason}");
        }
        let tiny = AttachVm {
            launch: true,
            memory_mib: Some(1),
            ..request("a", 5)
        };
        assert!(invalid(resolve(tiny, Some(&template()), dir)).contains("64 MiB"));
    }

    #[test]
    fn a_record_round_trips_with_its_launch_settings() {
        let dir = tempfile::tempdir().unwrap();
        let launched = AttachVm {
            launch: true,
            ..request("pod", 9)
        };
        let config = resolve(launched, Some(&template()), dir.path()).unwrap();
        let record = dir.path().join(ATTACHED_RECORD);
        std::fs::write(&record, serde_json::to_vec(&config).unwrap()).unwrap();
        let read = read_record(&record).unwrap();
        assert_eq!(read.name, "pod");
        assert_eq!(read.guest_cid, 9);
        assert_eq!(read.layer_socket, config.layer_socket);
        assert_eq!(read.launch.unwrap().memory_mib, 256);
        std::fs::write(&record, b"{\"name\": 3}").unwrap();
        assert!(read_record(&record).is_err());
    }
}
