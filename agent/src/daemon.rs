//! `gantry-agent serve`: brings up every configured VM and the operator API, until a signal.

use std::sync::Arc;

use gantry_oci::registry::{RegistryClient, RegistryError};
use tracing::info;

use crate::api::access::ApiAccess;
use crate::api::server::{self, ApiServerError};
use crate::cache::{Cache, CacheConfig, CacheError};
use crate::config::AgentConfig;
use crate::images::ImageService;
use crate::manifest::{ClusterManifest, ManifestScheduler};
use crate::metrics::Metrics;
use crate::metrics::endpoint::{self, EndpointError};
use crate::peer::client::PeerClient;
use crate::peer::routes::PeerSet;
use crate::peer::server::PeerEndpoint;
use crate::peer::{PeerError, PeerSettings};
use crate::state::Agent;
use crate::vm::VmError;
use crate::vms::VmTable;

/// Errors running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A VM failed to start.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The API failed.
    #[error(transparent)]
    Api(#[from] ApiServerError),
    /// Signal handling could not be set up.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The image cache could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The registry configuration is unusable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The cluster manifest given at start cannot be put in force.
    #[error("cluster manifest: {0}")]
    Manifest(String),
    /// The peer settings are unusable, or the peer endpoint cannot listen.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// `serve --check` found a part of the config the agent could not start with.
    #[error("{0}")]
    Check(String),
    /// The metrics endpoint cannot listen.
    #[error(transparent)]
    Metrics(#[from] EndpointError),
}

/// A task stopped when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `agent.toml`'s peer settings, checked (the token file read).
fn peer_settings(config: &AgentConfig) -> Result<PeerSettings, PeerError> {
    let peer_urls: Vec<String> = config.peers.iter().map(|peer| peer.url.clone()).collect();
    PeerSettings::new(
        config.peer_listen,
        config.peer_url.as_deref(),
        config.peer_token_file.as_deref(),
        &peer_urls,
    )
}

/// What `serve --check` found: a config the agent would start with.
#[derive(Debug)]
pub struct CheckReport {
    /// One line per part checked, for the operator.
    pub lines: Vec<String>,
    /// Things that do not stop a start but will fail something later.
    pub warnings: Vec<String>,
}

/// Checks `config` (parsed and validated already) and `manifest` as `run` would use them,
/// without binding, creating or starting anything: the peer token, the API group, the
/// registries' CA and credentials files (the manifest's added), and for each VM the agent
/// launches, its kernel, initrd and QEMU binary.
pub fn check(
    config: &AgentConfig,
    manifest: Option<&ClusterManifest>,
) -> Result<CheckReport, DaemonError> {
    let mut report = CheckReport {
        lines: Vec::new(),
        warnings: Vec::new(),
    };
    ApiAccess::new(config.api_group.as_deref()).map_err(ApiServerError::from)?;
    report.lines.push(format!(
        "api socket {} ({})",
        config.api_socket.display(),
        match &config.api_group {
            Some(group) => format!("root and group {group}"),
            None => "root only".to_string(),
        }
    ));
    let peering = peer_settings(config)?;
    report
        .lines
        .push(match (&peering.listen, &peering.own_url) {
            (Some(listen), Some(url)) => format!(
                "peer endpoint {listen} (as {url}), {} peer(s) in agent.toml",
                peering.peers.len()
            ),
            _ => format!(
                "no peer endpoint, {} peer(s) in agent.toml",
                peering.peers.len()
            ),
        });
    match config.metrics_listen {
        Some(addr) => {
            report.lines.push(format!(
                "metrics on http://{addr}/metrics and the API socket"
            ));
            if !addr.ip().is_loopback() {
                report.warnings.push(format!(
                    "metrics_listen {addr} is reachable from other hosts: the metrics name \
                     this card's VMs, registries and peers, and need no credentials"
                ));
            }
        }
        None => report
            .lines
            .push("metrics on the API socket only (GET /metrics)".to_string()),
    }
    crate::images::service::registry_client_for(&config.registry, &[])
        .map_err(|reason| DaemonError::Check(format!("[registry]: {reason}")))?;
    if let Some(manifest) = manifest {
        crate::images::service::registry_client_for(&config.registry, &manifest.registries)
            .map_err(|reason| DaemonError::Check(format!("cluster manifest: {reason}")))?;
        report.lines.push(format!(
            "cluster manifest: {} image(s), {} registr(y/ies), {} peer(s)",
            manifest.images.len(),
            manifest.registries.len(),
            manifest.peers.len()
        ));
    }
    for vm in &config.vms {
        let Some(launch) = &vm.launch else {
            report.lines.push(format!(
                "VM {} (cid {}): attached by its VMM at {} and {}",
                vm.name,
                vm.guest_cid,
                vm.vsock_socket.display(),
                vm.layer_socket.display()
            ));
            continue;
        };
        let qemu = check_launch(&format!("VM {}", vm.name), launch)?;
        report.lines.push(format!(
            "VM {} (cid {}): launched with {} ({} MiB, {:?})",
            vm.name,
            vm.guest_cid,
            qemu.display(),
            launch.memory_mib,
            launch.accel
        ));
    }
    if let Some(template) = &config.vm_template {
        let qemu = check_launch("[vm_template]", template)?;
        report.lines.push(format!(
            "VMs attached at run time with --launch: {} ({} MiB, {:?} unless asked otherwise)",
            qemu.display(),
            template.memory_mib,
            template.accel
        ));
    }
    if !config.busybox.is_file() {
        report.warnings.push(format!(
            "busybox {} is missing: the default image cannot be built",
            config.busybox.display()
        ));
    }
    Ok(report)
}

/// Checks that `launch` (of `whose`) can start QEMU: its kernel and initrd open, its QEMU binary
/// is found; the binary's path.
fn check_launch(
    whose: &str,
    launch: &crate::config::LaunchConfig,
) -> Result<std::path::PathBuf, DaemonError> {
    let root_disk = launch
        .root_disk
        .as_ref()
        .map(|disk| ("root disk", &disk.path));
    for (what, path) in [("kernel", &launch.kernel), ("initrd", &launch.initrd)]
        .into_iter()
        .chain(root_disk)
    {
        std::fs::File::open(path).map_err(|error| {
            DaemonError::Check(format!("{whose}: {what} {}: {error}", path.display()))
        })?;
    }
    find_program(&launch.qemu).ok_or_else(|| {
        DaemonError::Check(format!(
            "{whose}: QEMU binary {} not found",
            launch.qemu.display()
        ))
    })
}

/// `program` as the OS would run it: a path, or a name looked up in `PATH`.
fn find_program(program: &std::path::Path) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |path: &std::path::Path| {
        path.metadata()
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return runnable(program).then(|| program.to_owned());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| runnable(path))
}

/// Runs the agent until SIGINT or SIGTERM, with `manifest` (checked already) in force.
pub async fn run(
    config: AgentConfig,
    manifest: Option<ClusterManifest>,
) -> Result<(), DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;

    let peering = peer_settings(&config)?;
    let peer_listener = match peering.listen {
        Some(addr) => Some(crate::peer::server::bind(addr).await?),
        None => None,
    };
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(endpoint::bind(addr).await?),
        None => None,
    };
    let access = ApiAccess::new(config.api_group.as_deref()).map_err(ApiServerError::from)?;
    let listener = server::bind(&config.api_socket, access)?;
    let metrics = Metrics::new();
    let cache = Cache::open(
        &config.state_dir.join("cache"),
        CacheConfig {
            budget_bytes: config.cache_budget_bytes,
            ..CacheConfig::default()
        },
    )?
    .with_metrics(metrics.cache());
    let registry = RegistryClient::new(config.registry.clone())?;
    let images = ImageService::new(
        cache,
        registry,
        config.lazy.clone(),
        &config.state_dir,
        &config.busybox,
        metrics.clone(),
    );
    // The manifest's registries are checked before any VM starts: a refused manifest starts
    // nothing.
    let manifest = match manifest {
        Some(manifest) => {
            let client = images
                .registry_for(&manifest.registries)
                .map_err(DaemonError::Manifest)?;
            Some((manifest, client))
        }
        None => None,
    };
    let configured = config.vms.iter().map(|vm| vm.name.clone()).collect();
    let vms = VmTable::new(
        configured,
        config.state_dir.clone(),
        config.logs,
        config.vm_template.clone(),
    );
    for vm_config in config.vms {
        let name = vm_config.name.clone();
        // A VM that fails to start stops the agent; VMs already attached keep running (their
        // guests are the workload), and the next start adopts them.
        vms.attach_configured(vm_config, &images, &metrics).await?;
        info!(vm = %name, "VM attached");
    }
    // Then those attached at run time before: one that fails is logged, not fatal (the
    // operator detaches it).
    vms.restore(&images, &metrics).await;
    let peers = Arc::new(PeerSet::new(
        peering.own_url.clone(),
        peering.peers.clone(),
        PeerClient::new(peering.token.clone())?,
    ));
    images.lazy.fetcher().set_peers(peers.clone());
    let agent = Arc::new(Agent {
        vms,
        images: Arc::new(images),
        enable_baseline: config.enable_baseline,
        manifest: ManifestScheduler::default(),
        peers,
        metrics: metrics.clone(),
    });
    // The probe holds the agent weakly: the metrics, which the agent holds, must not keep it.
    let observed = Arc::downgrade(&agent);
    metrics.observe_state(move || observed.upgrade().map(|agent| agent.state_gauges()));
    let metrics_endpoint = metrics_listener
        .map(|listener| AbortOnDrop(tokio::spawn(endpoint::serve(listener, metrics.clone()))));
    // Dropped (and so stopped) when the daemon returns.
    let _peer_endpoint = match (peer_listener, peering.token) {
        (Some(listener), Some(token)) => {
            let endpoint = Arc::new(PeerEndpoint::new(
                agent.images.clone(),
                agent.peers.clone(),
                token,
            ));
            Some(AbortOnDrop(tokio::spawn(crate::peer::server::serve(
                listener, endpoint,
            ))))
        }
        _ => None,
    };
    agent.manifest.start(Arc::downgrade(&agent.images));
    if let Some((manifest, client)) = manifest {
        let peers = crate::state::manifest_peer_urls(&manifest);
        let generation =
            crate::manifest::put_in_force_with(&agent.images, &agent.manifest, manifest, client);
        agent.peers.set_manifest_peers(&peers);
        info!(generation, "cluster manifest in force");
    }
    info!(socket = %config.api_socket.display(), "operator API listening");

    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => info!("SIGINT: shutting down"),
            _ = terminate.recv() => info!("SIGTERM: shutting down"),
        }
    };
    let served = server::serve(listener, agent.clone(), shutdown).await;
    // No scrape holds the agent past this point.
    drop(metrics_endpoint);
    let _ = std::fs::remove_file(&config.api_socket);
    // The VMs are left running: their keepers hold the vsock devices and QEMU, the layer
    // stores' frontends reconnect to the next agent, which adopts them. `vm stop` stops one.
    info!(vms = agent.vms.len(), "exiting; the VMs keep running");
    Ok(served?)
}
