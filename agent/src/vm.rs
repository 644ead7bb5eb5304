//! One VM attached to the agent: its layer store, its keeper (the vsock device and, for a VM the
//! agent launches, QEMU's parent; see [`crate::keeper`]), and a task that holds a session with
//! the guest's shim open, reconnecting whenever it drops.
//!
//! A VM outlives the agent: a restarted agent adopts the running keeper (and so the guest),
//! puts the layers back where the guest has them mounted (`layers.json`), and resumes the
//! block requests that were in flight (`blk-inflight`). Only [`Vm::stop`] stops the VM.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::path::Path;

use gantry_api::VmStatus;
use gantry_proto::{
    ContainerId, Event, ExecId, GuestInfo, LayerExtent, Op, ProtocolVersion, Reply, SHIM_VSOCK_PORT,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::blk::{
    BlockSource, LayerStoreConfig, LayerStoreDevice, LayerStoreDeviceError, LayerStoreError,
};
use crate::cache::{LayerRecord, PinGuard};
use crate::config::VmConfig;
use crate::containers::ContainerTable;
use crate::containers::logs::LogLimits;
use crate::images::ImageService;
use crate::keeper::client::Start;
use crate::keeper::{KeeperClient, KeeperConfig, KeeperError, QemuCommand};
use crate::mapped::{MappedEntry, MappedRecord};
use crate::metrics::{VmMetrics, VsockMetrics};
use crate::qemu::{QemuConfig, QemuError};
use crate::session::{SessionError, ShimSession};
use crate::sync::lock;

/// The agent's software version, sent in its `Hello`.
pub const AGENT_SOFTWARE_VERSION: &str = concat!("gantry-agent ", env!("CARGO_PKG_VERSION"));
/// How long a request to the shim may take by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// Events queued from the shim before the session stops reading (each at most one frame).
const EVENT_BACKLOG: usize = 256;

/// Errors about a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The QEMU the agent launched for it has exited.
    #[error(
        "VM {vm}: its QEMU has exited ({status}); `gantry-agent vm restart {vm}` boots it again"
    )]
    QemuExited {
        /// The VM.
        vm: String,
        /// How QEMU ended.
        status: String,
    },
    /// Its event thread could not be started.
    #[error("VM {vm}: cannot start its event thread: {source}")]
    Thread {
        /// The VM.
        vm: String,
        /// Why.
        source: std::io::Error,
    },
    /// Its keeper (vsock device, QEMU's parent) failed.
    #[error("VM {vm}: {source}")]
    Keeper {
        /// The VM.
        vm: String,
        /// Why.
        source: KeeperError,
    },
    /// Its state directory could not be prepared.
    #[error("VM {vm}: state directory: {source}")]
    State {
        /// The VM.
        vm: String,
        /// Why.
        source: std::io::Error,
    },
    /// Its layer-store device failed to start.
    #[error("VM {vm}: layer-store device: {source}")]
    LayerDevice {
        /// The VM.
        vm: String,
        /// Why.
        source: LayerStoreDeviceError,
    },
    /// A layer could not be mapped into its layer store.
    #[error("VM {vm}: cannot map layer {digest}: {reason}")]
    MapLayer {
        /// The VM.
        vm: String,
        /// The layer.
        digest: String,
        /// Why.
        reason: String,
    },
    /// The garbage probe did not get the answer a healthy shim gives.
    #[error("VM {vm}: probe: {reason}")]
    Probe {
        /// The VM.
        vm: String,
        /// What happened instead.
        reason: String,
    },
    /// Its QEMU failed.
    #[error("VM {vm}: QEMU: {source}")]
    Qemu {
        /// The VM.
        vm: String,
        /// Why.
        source: QemuError,
    },
    /// No shim session is up (the guest is booting, or gone).
    #[error("VM {0}: the shim is not connected (the guest may still be booting)")]
    NotConnected(String),
    /// The request to the shim failed.
    #[error("VM {vm}: {source}")]
    Session {
        /// The VM.
        vm: String,
        /// Why.
        source: SessionError,
    },
    /// The shim answered something that does not fit the request.
    #[error("VM {0}: the shim answered with the wrong kind of reply")]
    UnexpectedReply(String),
    /// The agent did not launch this VM's QEMU, so it cannot restart it.
    #[error("VM {0}: the agent did not launch this VM, so it cannot restart it")]
    NotLaunched(String),
    /// The guest's shim speaks a protocol older than the operation needs.
    #[error(
        "VM {vm}: the guest's shim speaks protocol {shim}, and {operation} needs {needed}: \
         rebuild the guest (qemu/build-guest.sh) with this agent's shim"
    )]
    ShimTooOld {
        /// The VM.
        vm: String,
        /// What was asked.
        operation: &'static str,
        /// The version it needs.
        needed: ProtocolVersion,
        /// The shim's.
        shim: ProtocolVersion,
    },
}

#[derive(Debug, Default)]
struct Progress {
    sessions: u64,
    boot_started: Option<Instant>,
    boot_to_ready: Option<Duration>,
    session_setup: Option<Duration>,
    last_error: Option<String>,
}

/// A VM and everything the agent runs for it.
#[derive(Debug)]
pub struct Vm {
    config: VmConfig,
    keeper: KeeperClient,
    keeper_config: KeeperConfig,
    agent_binary: std::path::PathBuf,
    layer_device: LayerStoreDevice,
    /// Layers mapped into this VM's layer store, by EROFS digest; each keeps its cache pin.
    /// Recorded in `record_path` whenever it changes.
    mapped_layers: Mutex<HashMap<String, (MappedEntry, PinGuard)>>,
    mapped_record: std::path::PathBuf,
    containers: Arc<ContainerTable>,
    qemu_config: Option<QemuConfig>,
    session: watch::Receiver<Option<Arc<ShimSession>>>,
    progress: Arc<Mutex<Progress>>,
    /// Keeps the shim session up.
    keeper_task: tokio::task::JoinHandle<()>,
    /// Sends the output credit the event thread records.
    credit_task: tokio::task::JoinHandle<()>,
    /// Copies the keeper's vsock counters into this agent's metrics.
    vsock_mirror: tokio::task::JoinHandle<()>,
}

impl Vm {
    /// Attaches the VM: adopts its running keeper (putting back the layers the guest has
    /// mapped) or starts one (and with it QEMU, if configured), serves its layer store, and
    /// starts keeping a shim session. Container logs and the VM's records go under `state_dir`;
    /// its devices and containers count into `metrics`.
    pub async fn start(
        config: VmConfig,
        qemu_config: Option<QemuConfig>,
        state_dir: &Path,
        log_limits: LogLimits,
        images: &ImageService,
        metrics: VmMetrics,
    ) -> Result<Self, VmError> {
        let vm_dir = vm_dir(state_dir, &config.name);
        std::fs::create_dir_all(&vm_dir).map_err(|source| VmError::State {
            vm: config.name.clone(),
            source,
        })?;
        let keeper_config = KeeperConfig {
            vm: config.name.clone(),
            vsock_socket: config.vsock_socket.clone(),
            guest_cid: config.guest_cid,
            qemu: qemu_config.as_ref().map(|qemu| QemuCommand {
                binary: qemu.qemu_binary.clone(),
                args: qemu.args(),
            }),
        };
        let keeper = KeeperClient::new(&vm_dir);
        let adopting = keeper
            .status()
            .await
            .is_ok_and(|status| status.runs(&keeper_config));
        let mapped_record = vm_dir.join("layers.json");
        let inflight_record = vm_dir.join("blk-inflight");
        if !adopting {
            // A new guest has nothing mapped and nothing in flight.
            let _ = std::fs::remove_file(&mapped_record);
            let _ = std::fs::remove_file(&inflight_record);
        }
        let store = crate::blk::LayerStore::with_metrics(
            crate::blk::layer_store::DEFAULT_CAPACITY,
            metrics.blk.clone(),
        )
        .map_err(|err| VmError::LayerDevice {
            vm: config.name.clone(),
            source: err.into(),
        })?;
        // Before the device listens: the guest's first read after QEMU reconnects must find
        // its layers where it mounted them.
        let mapped = restore_layers(&config.name, &mapped_record, &store, images).await;
        let mut layer_config = LayerStoreConfig::new(config.layer_socket.clone());
        layer_config.num_queues = config.layer_queues;
        layer_config.inflight_record = Some(inflight_record);
        layer_config.metrics = metrics.blk;
        let layer_device = LayerStoreDevice::start_on(layer_config, store).map_err(|source| {
            VmError::LayerDevice {
                vm: config.name.clone(),
                source,
            }
        })?;
        let agent_binary = std::env::current_exe().map_err(|source| VmError::State {
            vm: config.name.clone(),
            source,
        })?;
        let (keeper, started) =
            KeeperClient::start_or_adopt(&vm_dir, &keeper_config, &agent_binary)
                .await
                .map_err(|source| VmError::Keeper {
                    vm: config.name.clone(),
                    source,
                })?;
        // What an earlier agent recorded: the containers of an adopted guest run on, and a
        // new guest's list shows the earlier ones as lost until they are removed.
        let containers = Arc::new(
            ContainerTable::open(&vm_dir.join("containers"), log_limits)
                .with_metrics(metrics.containers),
        );
        let vsock_mirror = tokio::spawn(mirror_vsock_counters(keeper.clone(), metrics.vsock));
        let progress = Arc::new(Mutex::new(Progress::default()));
        if started == Start::Started && qemu_config.is_some() {
            lock(&progress).boot_started = Some(Instant::now());
        }
        let (session_tx, session) = watch::channel(None);
        let (events_tx, events_rx) = mpsc::channel(EVENT_BACKLOG);
        let session_keeper = tokio::spawn(keep_session(
            config.name.clone(),
            keeper.clone(),
            session_tx,
            progress.clone(),
            events_tx,
            Arc::clone(&containers),
        ));
        let ledger = Arc::new(CreditLedger::default());
        // Log writes block on the disk: they run on this VM's own thread, never on the runtime
        // that serves every VM, so a flooding guest slows only itself.
        std::thread::Builder::new()
            .name(format!("events-{}", config.name))
            .spawn({
                let (containers, ledger) = (Arc::clone(&containers), Arc::clone(&ledger));
                move || take_events(events_rx, &containers, &ledger)
            })
            .map_err(|source| VmError::Thread {
                vm: config.name.clone(),
                source,
            })?;
        let credit_task = tokio::spawn(give_credit(ledger, session.clone()));
        let vm = Self {
            config,
            keeper,
            keeper_config,
            agent_binary,
            layer_device,
            mapped_layers: Mutex::new(mapped),
            mapped_record,
            containers,
            qemu_config,
            session,
            progress,
            keeper_task: session_keeper,
            credit_task,
            vsock_mirror,
        };
        vm.save_mapped();
        Ok(vm)
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Stops the VM's QEMU and boots it again (only for a VM the agent launched): a new keeper
    /// with a new QEMU; nothing of the old guest is mapped or in flight any more.
    pub async fn restart(&self) -> Result<(), VmError> {
        if self.qemu_config.is_none() {
            return Err(VmError::NotLaunched(self.config.name.clone()));
        }
        let keeper_error = |source| VmError::Keeper {
            vm: self.config.name.clone(),
            source,
        };
        self.keeper.stop().await.map_err(keeper_error)?;
        info!(vm = %self.config.name, "QEMU stopped for a restart");
        self.unmap_all();
        KeeperClient::start_or_adopt(&self.keeper.dir(), &self.keeper_config, &self.agent_binary)
            .await
            .map_err(keeper_error)?;
        lock(&self.progress).boot_started = Some(Instant::now());
        Ok(())
    }

    /// Unmaps every layer (their pins go with them) and forgets the record.
    fn unmap_all(&self) {
        let store = self.layer_device.extents();
        for (_, (entry, _pin)) in lock(&self.mapped_layers).drain() {
            let _ = store.unmap_layer(entry.offset);
        }
        self.save_mapped();
    }

    /// Writes `layers.json`: what the next agent maps back. A failure is logged: the VM runs on,
    /// only a restart of the agent would then lose the mappings.
    fn save_mapped(&self) {
        let mapped = lock(&self.mapped_layers);
        let (next_offset, generation) = self.layer_device.extents().position();
        let record = MappedRecord {
            next_offset,
            generation,
            layers: mapped.values().map(|(entry, _)| entry.clone()).collect(),
        };
        if let Err(err) = record.save(&self.mapped_record) {
            warn!(vm = %self.config.name, %err, "cannot record the mapped layers");
        }
    }

    /// The operator's view of the VM.
    pub fn status(&self) -> VmStatus {
        let session = self.session.borrow().clone();
        let progress = lock(&self.progress);
        VmStatus {
            name: self.config.name.clone(),
            guest_cid: self.config.guest_cid,
            connected: session.as_ref().is_some_and(|s| !s.is_closed()),
            sessions: progress.sessions,
            shim_version: session.map(|s| s.peer().software_version.clone()),
            launched: self.qemu_config.is_some(),
            boot_to_ready_ms: progress.boot_to_ready.map(|d| d.as_millis() as u64),
            session_setup_us: progress.session_setup.map(|d| d.as_micros() as u64),
            last_error: progress.last_error.clone(),
            mapped_layers: self
                .layer_device
                .extents()
                .layers()
                .into_iter()
                .map(|layer| layer.digest)
                .collect(),
            vsock_socket: self.config.vsock_socket.display().to_string(),
            layer_socket: self.config.layer_socket.display().to_string(),
            attached_at_run_time: false,
        }
    }

    /// What the VM was attached with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The current shim session, waiting up to `wait` for one to come up.
    pub async fn session(&self, wait: Duration) -> Result<Arc<ShimSession>, VmError> {
        let mut watch = self.session.clone();
        // The watch's borrow is not `Send`: it ends before anything else is awaited.
        let session = {
            let ready = tokio::time::timeout(
                wait,
                watch.wait_for(|s| s.as_ref().is_some_and(|s| !s.is_closed())),
            )
            .await;
            match ready {
                Ok(Ok(session)) => session.clone(),
                _ => None,
            }
        };
        match session {
            Some(session) => Ok(session),
            None => Err(self.not_connected().await),
        }
    }

    /// Why there is no session: a QEMU the agent launched that has exited is dead, not booting.
    async fn not_connected(&self) -> VmError {
        if self.qemu_config.is_some() {
            let exited = match self.keeper.status().await {
                Ok(status) => status.qemu_exit,
                Err(KeeperError::Gone { .. }) => Some(
                    self.keeper
                        .qemu_exit()
                        .unwrap_or_else(|| "its keeper is gone".to_owned()),
                ),
                Err(_) => None,
            };
            if let Some(status) = exited {
                return VmError::QemuExited {
                    vm: self.config.name.clone(),
                    status,
                };
            }
        }
        VmError::NotConnected(self.config.name.clone())
    }

    /// Asks the shim for `GuestInfo`; returns it with the request's round-trip time.
    pub async fn guest_info(&self, wait: Duration) -> Result<(GuestInfo, Duration), VmError> {
        let session = self.session(wait).await?;
        let started = Instant::now();
        let reply = session
            .request(Op::GuestInfo, DEFAULT_REQUEST_TIMEOUT)
            .await
            .map_err(|source| VmError::Session {
                vm: self.config.name.clone(),
                source,
            })?;
        let round_trip = started.elapsed();
        match reply {
            Reply::GuestInfo(info) => Ok((info, round_trip)),
            _ => Err(VmError::UnexpectedReply(self.config.name.clone())),
        }
    }

    /// Sends `count` pings of `payload_len` bytes one after another; returns each round trip.
    pub async fn ping(&self, count: u32, payload_len: usize) -> Result<Vec<Duration>, VmError> {
        let session = self.session(Duration::ZERO).await?;
        let mut round_trips = Vec::new();
        for _ in 0..count {
            let payload = vec![0x5a; payload_len];
            let started = Instant::now();
            let reply = session
                .request(
                    Op::Ping {
                        payload: payload.clone(),
                    },
                    DEFAULT_REQUEST_TIMEOUT,
                )
                .await
                .map_err(|source| VmError::Session {
                    vm: self.config.name.clone(),
                    source,
                })?;
            round_trips.push(started.elapsed());
            if reply != (Reply::Pong { payload }) {
                return Err(VmError::UnexpectedReply(self.config.name.clone()));
            }
        }
        Ok(round_trips)
    }

    /// The containers the agent created in this VM.
    pub fn containers(&self) -> &ContainerTable {
        &self.containers
    }

    /// Layer-store requests parked now (waiting for data), over every queue.
    pub fn parked_requests(&self) -> usize {
        self.layer_device.parked_requests()
    }

    /// Maps a cached layer into this VM's layer store (once per VM: later containers share it)
    /// and returns where the guest finds it. The pin keeps the layer in the cache while mapped.
    /// `image` is what the operator asked for, recorded so that a restarted agent finds the
    /// layer's source again.
    pub fn map_layer(
        &self,
        image: &str,
        layer: &LayerRecord,
        source: Arc<dyn BlockSource>,
        pin: PinGuard,
    ) -> Result<LayerExtent, VmError> {
        let digest = layer.erofs_digest.to_string();
        let mut mapped = lock(&self.mapped_layers);
        if let Some((entry, _)) = mapped.get(&digest) {
            return Ok(entry.extent());
        }
        let map_error = |reason: String| VmError::MapLayer {
            vm: self.config.name.clone(),
            digest: digest.clone(),
            reason,
        };
        let extent = self
            .layer_device
            .extents()
            .map_layer(&digest, source)
            .map_err(|err: LayerStoreError| map_error(err.to_string()))?;
        let extent = LayerExtent {
            digest: digest.clone(),
            offset: extent.offset,
            length: extent.length,
        };
        let entry = MappedEntry {
            digest: digest.clone(),
            offset: extent.offset,
            length: extent.length,
            image: image.to_owned(),
        };
        mapped.insert(digest, (entry, pin));
        drop(mapped);
        self.save_mapped();
        Ok(extent)
    }

    /// Sends `op` to the shim (waiting up to `wait` for a session) and returns its reply. An
    /// operation newer than the shim's protocol is refused here: the shim could not decode it.
    pub async fn request(&self, op: Op, wait: Duration) -> Result<Reply, VmError> {
        let session = self.session(wait).await?;
        let (needed, shim) = (op.required_version(), session.peer().protocol_version);
        if shim < needed {
            return Err(VmError::ShimTooOld {
                vm: self.config.name.clone(),
                operation: op_name(&op),
                needed,
                shim,
            });
        }
        session
            .request(op, DEFAULT_REQUEST_TIMEOUT)
            .await
            .map_err(|source| VmError::Session {
                vm: self.config.name.clone(),
                source,
            })
    }

    /// Checks that the shim survives garbage: opens a second connection, says hello, sends a frame
    /// that does not decode, and returns the reason the shim gave for closing that connection.
    /// The agent's own session and the guest's containers must be untouched by it.
    pub async fn probe_with_garbage(&self) -> Result<String, VmError> {
        use futures::{SinkExt, StreamExt};
        use gantry_proto::{FrameCodec, Hello, Message};
        use tokio::io::AsyncWriteExt;

        let probe_error = |reason: String| VmError::Probe {
            vm: self.config.name.clone(),
            reason,
        };
        let stream = self
            .keeper
            .connect(SHIM_VSOCK_PORT)
            .await
            .map_err(|err| probe_error(format!("connecting: {err}")))?;
        let mut framed = tokio_util::codec::Framed::new(stream, FrameCodec::default());
        framed
            .send(Message::Hello(Hello::new(AGENT_SOFTWARE_VERSION)))
            .await
            .map_err(|err| probe_error(err.to_string()))?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, framed.next()).await {
            Ok(Some(Ok(Message::Hello(_)))) => {}
            other => {
                return Err(probe_error(format!(
                    "expected the shim's Hello, got {other:?}"
                )));
            }
        }
        // A frame claiming 8 bytes that hold an impossible message variant.
        framed
            .get_mut()
            .write_all(&[8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])
            .await
            .map_err(|err| probe_error(err.to_string()))?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, framed.next()).await {
            Ok(Some(Ok(Message::Goodbye { reason }))) => Ok(reason),
            other => Err(probe_error(format!(
                "expected Goodbye after garbage, got {other:?}"
            ))),
        }
    }

    /// Stops the VM's QEMU (if the agent launched it) and its keeper; the layer store stays
    /// served (an externally launched QEMU may still be attached) until the agent exits.
    pub async fn stop(&self) -> Result<(), VmError> {
        if self.qemu_config.is_none() {
            return Err(VmError::NotLaunched(self.config.name.clone()));
        }
        self.keeper.stop().await.map_err(|source| VmError::Keeper {
            vm: self.config.name.clone(),
            source,
        })?;
        self.unmap_all();
        info!(vm = %self.config.name, "VM stopped");
        Ok(())
    }

    /// Lets go of the VM for good: stops its keeper (and so the vsock device and the QEMU the
    /// agent launched), unmaps every layer (their pins go), stops the layer store (its socket is
    /// removed) and the VM's tasks. The records on disk are the caller's to remove.
    pub async fn detach(&self) -> Result<(), VmError> {
        self.keeper_task.abort();
        self.credit_task.abort();
        self.vsock_mirror.abort();
        self.keeper.stop().await.map_err(|source| VmError::Keeper {
            vm: self.config.name.clone(),
            source,
        })?;
        self.unmap_all();
        self.layer_device.shutdown();
        // The keeper's device listened there; a keeper killed on its stop timeout leaves it.
        let _ = crate::vhost_user::remove_socket(&self.config.vsock_socket);
        info!(vm = %self.config.name, "VM detached");
        Ok(())
    }
}

impl Drop for Vm {
    /// The agent lets go of the VM (it exits, or detaches it): its tasks end; the guest, its
    /// keeper and its records stay for the next agent.
    fn drop(&mut self) {
        self.keeper_task.abort();
        self.credit_task.abort();
        self.vsock_mirror.abort();
    }
}

/// The state directory of the VM `name` (a checked id: one path component).
pub fn vm_dir(state_dir: &Path, name: &str) -> std::path::PathBuf {
    state_dir.join("vms").join(name)
}

/// The name of an operation that needs a newer protocol, for the refusal's message.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::CreateContainerTty { .. } => "a container with a terminal",
        Op::ExecTty { .. } => "an exec with a terminal",
        Op::ResizeTty { .. } => "resizing a terminal",
        Op::SubscribeEvents | Op::SubscribeEventsFrom { .. } => "subscribing to events",
        Op::OutputReceived { .. } => "acknowledging output",
        _ => "this operation",
    }
}

/// Output credit owed to the shim, gathered per process until [`give_credit`] sends it: one
/// entry per process however many output events arrive, so the memory it takes is bounded.
#[derive(Debug, Default)]
struct CreditLedger {
    owed: Mutex<HashMap<(ContainerId, Option<ExecId>), Owed>>,
    added: tokio::sync::Notify,
}

/// What one process's output earned since the last credit.
#[derive(Debug, Default, Clone, Copy)]
struct Owed {
    /// Bytes consumed (a 1.2 shim's `OutputCredit`).
    bytes: u64,
    /// How far the log holds the output (a 1.3 shim's `OutputReceived`): only the furthest
    /// matters.
    received: Option<u64>,
}

impl Owed {
    /// The log holds the output up to `position`: only the furthest position is kept.
    fn received_up_to(&mut self, position: u64) {
        self.received = Some(self.received.map_or(position, |had| had.max(position)));
    }
}

impl CreditLedger {
    /// Records the credit `op` (from [`ContainerTable::on_event`]) until it is sent.
    fn owe(&self, op: Op) {
        let mut owed = lock(&self.owed);
        match op {
            Op::OutputCredit {
                container_id,
                exec_id,
                bytes,
            } => owed.entry((container_id, exec_id)).or_default().bytes += u64::from(bytes),
            Op::OutputReceived {
                container_id,
                exec_id,
                position,
            } => owed
                .entry((container_id, exec_id))
                .or_default()
                .received_up_to(position),
            _ => return,
        }
        drop(owed);
        self.added.notify_one();
    }

    /// Puts back a position no session took, without waking [`give_credit`]: a new session
    /// does (a position is not lost, and no loop spins on a dead session).
    fn keep_received(&self, process: (ContainerId, Option<ExecId>), position: u64) {
        lock(&self.owed)
            .entry(process)
            .or_default()
            .received_up_to(position);
    }
}

/// Takes the shim's events into the container table (writing logs) and records the credit owed
/// for output. Runs on the VM's own thread until the session's event channel closes.
fn take_events(
    mut events: mpsc::Receiver<Event>,
    containers: &ContainerTable,
    ledger: &CreditLedger,
) {
    while let Some(event) = events.blocking_recv() {
        if let Some(credit) = containers.on_event(event) {
            ledger.owe(credit);
        }
    }
}

/// Gives the shim the credit its output earned, one request at a time: while one is in flight,
/// further credit for the same process adds up into the next, so a flood of output events
/// costs a bounded number of tasks and requests.
///
/// Credit in bytes (1.2) is void without a session: a new session starts with fresh windows.
/// A position (1.3) is kept until a session takes it: the output a new subscription resends
/// arrives, and is logged, before the session is published, and a shim whose window that
/// resend filled waits for exactly those positions.
async fn give_credit(
    ledger: Arc<CreditLedger>,
    mut session: watch::Receiver<Option<Arc<ShimSession>>>,
) {
    loop {
        tokio::select! {
            () = ledger.added.notified() => {}
            changed = session.changed() => if changed.is_err() { return },
        }
        let current = session.borrow_and_update().clone();
        let owed = std::mem::take(&mut *lock(&ledger.owed));
        let Some(session) = current else {
            for (process, owed) in owed {
                if let Some(position) = owed.received {
                    ledger.keep_received(process, position);
                }
            }
            continue;
        };
        for ((container_id, exec_id), owed) in owed {
            if let Some(position) = owed.received {
                let received = Op::OutputReceived {
                    container_id: container_id.clone(),
                    exec_id: exec_id.clone(),
                    position,
                };
                match session.request(received, DEFAULT_REQUEST_TIMEOUT).await {
                    Ok(_) => {}
                    // The connection failed, not the shim: the next session takes it.
                    Err(SessionError::Closed | SessionError::RequestTimeout(_)) => {
                        ledger.keep_received((container_id.clone(), exec_id.clone()), position);
                    }
                    Err(error) => debug!(%error, "output position refused"),
                }
            }
            let mut bytes = owed.bytes;
            while bytes > 0 {
                let piece = u32::try_from(bytes).unwrap_or(u32::MAX);
                bytes -= u64::from(piece);
                let credit = Op::OutputCredit {
                    container_id: container_id.clone(),
                    exec_id: exec_id.clone(),
                    bytes: piece,
                };
                if let Err(error) = session.request(credit, DEFAULT_REQUEST_TIMEOUT).await {
                    debug!(%error, "output credit not delivered");
                }
            }
        }
    }
}

/// Opens the VM's main session: the handshake, then the subscription that makes this
/// connection the one the shim's events go to. A 1.3 shim resends the output the logs do not
/// hold yet (output written while no agent ran, or lost with the last connection); a 1.1 or
/// 1.2 shim starts afresh.
async fn establish(
    stream: tokio::net::UnixStream,
    events: mpsc::Sender<Event>,
    containers: &ContainerTable,
) -> Result<Arc<ShimSession>, String> {
    let session = ShimSession::establish(
        stream,
        AGENT_SOFTWARE_VERSION,
        HANDSHAKE_TIMEOUT,
        gantry_proto::DEFAULT_MAX_FRAME_LEN,
        events,
    )
    .await
    .map_err(|err| err.to_string())?;
    let protocol = session.peer().protocol_version;
    let subscribe = if protocol >= gantry_proto::RESUMABLE_OUTPUT {
        Some(Op::SubscribeEventsFrom {
            positions: containers.positions(),
        })
    } else if protocol >= gantry_proto::EVENTS_BY_SUBSCRIPTION {
        Some(Op::SubscribeEvents)
    } else {
        None
    };
    if let Some(subscribe) = subscribe {
        session
            .request(subscribe, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|err| format!("subscribing to the shim's events: {err}"))?;
    }
    Ok(session)
}

/// Keeps a session with the shim open for as long as the agent runs.
async fn keep_session(
    vm: String,
    connector: KeeperClient,
    session_tx: watch::Sender<Option<Arc<ShimSession>>>,
    progress: Arc<Mutex<Progress>>,
    events: mpsc::Sender<Event>,
    containers: Arc<ContainerTable>,
) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let attempt = Instant::now();
        let outcome = match connector.connect(SHIM_VSOCK_PORT).await {
            Ok(stream) => establish(stream, events.clone(), &containers).await,
            Err(err) => Err(err.to_string()),
        };
        match outcome {
            Ok(session) => {
                let setup = attempt.elapsed();
                {
                    let mut progress = lock(&progress);
                    progress.sessions += 1;
                    progress.session_setup = Some(setup);
                    progress.last_error = None;
                    if let Some(boot) = progress.boot_started.take() {
                        progress.boot_to_ready = Some(boot.elapsed());
                    }
                    info!(
                        %vm,
                        shim = %session.peer().software_version,
                        setup_us = setup.as_micros() as u64,
                        boot_to_ready_ms = progress.boot_to_ready.map(|d| d.as_millis() as u64),
                        "shim connected"
                    );
                }
                let _ = session_tx.send(Some(session.clone()));
                let reason = session.closed().await;
                let _ = session_tx.send(None);
                warn!(%vm, %reason, "shim session lost; reconnecting");
                lock(&progress).last_error = Some(reason);
                backoff = RECONNECT_MIN;
            }
            Err(err) => {
                // Expected while the guest boots: the driver is not up or the shim not listening.
                debug!(%vm, %err, "shim not reachable yet");
                lock(&progress).last_error = Some(err);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// Puts back the layers a previous agent recorded in `record` (for an adopted guest): each at
/// its offset, from its image's source, pinned. A layer that cannot be found again stays
/// unmapped (the guest's reads of it fail) and is logged; the others are served.
async fn restore_layers(
    vm: &str,
    record: &Path,
    store: &crate::blk::LayerStore,
    images: &ImageService,
) -> HashMap<String, (MappedEntry, PinGuard)> {
    let mut restored = HashMap::new();
    let record = match MappedRecord::load(record) {
        Ok(Some(record)) => record,
        Ok(None) => return restored,
        Err(err) => {
            warn!(%vm, %err, "the mapped-layer record is unreadable; nothing restored");
            return restored;
        }
    };
    store.restore_position(record.next_offset, record.generation);
    let mut by_image: HashMap<String, Vec<MappedEntry>> = HashMap::new();
    for entry in record.layers {
        by_image.entry(entry.image.clone()).or_default().push(entry);
    }
    for (image, entries) in by_image {
        let pulled = match images
            .pull(&image, Some(gantry_api::PullMode::Lazy), &|_| {})
            .await
        {
            Ok(pulled) => pulled,
            Err(err) => {
                warn!(%vm, %image, %err, "cannot open a mapped image again; its layers stay unmapped");
                continue;
            }
        };
        let mut layers: Vec<_> = pulled
            .record
            .layers
            .iter()
            .map(|layer| layer.erofs_digest.to_string())
            .zip(pulled.sources)
            .zip(pulled.pins.into_iter().map(Some))
            .collect();
        for entry in entries {
            let found = layers
                .iter_mut()
                .find(|((digest, _), pin)| *digest == entry.digest && pin.is_some());
            let Some(((_, source), pin)) = found else {
                warn!(%vm, %image, digest = %entry.digest, "the image no longer has a mapped layer");
                continue;
            };
            match store.restore_layer(&entry.digest, entry.offset, Arc::clone(source)) {
                Ok(_) => {
                    if let Some(pin) = pin.take() {
                        info!(%vm, digest = %entry.digest, offset = entry.offset, "layer mapped again");
                        restored.insert(entry.digest.clone(), (entry, pin));
                    }
                }
                Err(err) => warn!(%vm, digest = %entry.digest, %err, "cannot map a layer again"),
            }
        }
    }
    restored
}

/// How often the keeper's vsock counters are copied into the agent's metrics: a scrape sees them
/// at most this late.
const VSOCK_MIRROR_INTERVAL: Duration = Duration::from_secs(1);

/// Copies the vsock device's counters from the keeper (the device lives there) into `metrics`,
/// as the increase since the last copy; a new keeper (a new boot) starts again from zero.
async fn mirror_vsock_counters(keeper: KeeperClient, metrics: VsockMetrics) {
    let mut last = crate::metrics::VsockTotals::default();
    loop {
        tokio::time::sleep(VSOCK_MIRROR_INTERVAL).await;
        if let Ok(status) = keeper.status().await
            && let Some(now) = status.vsock
        {
            metrics.absorb(&last, &now);
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use gantry_proto::{FrameCodec, Hello, Message, Request, Response};
    use tokio_util::codec::Framed;

    const SECOND: Duration = Duration::from_secs(1);

    /// A session with a scripted shim on the other end of an in-memory stream.
    async fn session_with_fake_shim() -> (
        Arc<ShimSession>,
        Framed<tokio::io::DuplexStream, FrameCodec>,
    ) {
        let (agent_end, shim_end) = tokio::io::duplex(1 << 16);
        let mut shim = Framed::new(shim_end, FrameCodec::default());
        shim.send(Message::Hello(Hello::new("fake-shim")))
            .await
            .unwrap();
        let events = mpsc::channel(16).0;
        let session = ShimSession::establish(agent_end, "test", SECOND, 1 << 20, events)
            .await
            .unwrap();
        assert!(matches!(shim.next().await, Some(Ok(Message::Hello(_)))));
        (session, shim)
    }

    fn received(container_id: &str, position: u64) -> Op {
        Op::OutputReceived {
            container_id: container_id.into(),
            exec_id: None,
            position,
        }
    }

    #[tokio::test]
    async fn a_position_owed_without_a_session_goes_to_the_next_one_and_credit_does_not() {
        let ledger = Arc::new(CreditLedger::default());
        let (session_tx, session) = watch::channel(None);
        let task = tokio::spawn(give_credit(Arc::clone(&ledger), session));
        // Logged while the new session subscribes, before it is published.
        ledger.owe(received("c", 100));
        ledger.owe(received("c", 70));
        ledger.owe(Op::OutputCredit {
            container_id: "d".into(),
            exec_id: None,
            bytes: 5,
        });
        tokio::time::sleep(Duration::from_millis(50)).await;

        let (session, mut shim) = session_with_fake_shim().await;
        session_tx.send(Some(session)).unwrap();
        let Ok(Some(Ok(Message::Request(Request { id, op })))) =
            tokio::time::timeout(5 * SECOND, shim.next()).await
        else {
            panic!("no request");
        };
        assert_eq!(op, received("c", 100), "the furthest position, kept");
        shim.send(Message::Response(Response {
            id,
            result: Ok(Reply::Done),
        }))
        .await
        .unwrap();
        // The credit for "d" was void: nothing else comes.
        let more = tokio::time::timeout(Duration::from_millis(200), shim.next()).await;
        assert!(more.is_err(), "{more:?}");
        task.abort();
    }

    #[tokio::test]
    async fn a_position_the_connection_lost_goes_to_the_next_session() {
        let ledger = Arc::new(CreditLedger::default());
        let (first, shim) = session_with_fake_shim().await;
        let (session_tx, session) = watch::channel(Some(first));
        let task = tokio::spawn(give_credit(Arc::clone(&ledger), session));
        drop(shim);
        ledger.owe(received("c", 42));
        tokio::time::sleep(Duration::from_millis(50)).await;

        let (second, mut shim) = session_with_fake_shim().await;
        session_tx.send(Some(second)).unwrap();
        let Ok(Some(Ok(Message::Request(Request { op, .. })))) =
            tokio::time::timeout(5 * SECOND, shim.next()).await
        else {
            panic!("no request");
        };
        assert_eq!(op, received("c", 42));
        task.abort();
    }
}
