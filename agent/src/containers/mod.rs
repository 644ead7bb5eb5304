//! The containers of one VM, as the agent knows them: their output logs, exits and OOM kills,
//! fed by the shim's events. The shim is the authority on what runs; this table is what the
//! agent keeps for the operator (logs, image names) and the credit it owes the shim.
//!
//! The table is on disk, so that a restarted agent knows what the one before it created: each
//! container's directory holds `record.json` (written whole under a temporary name, so a crash
//! leaves the old record or the new one) and its processes' logs, and
//! [`ContainerTable::open`] reads them back.
//!
//! - [`run`]: `run` end to end (image → cache → layer store → create → start).
//! - [`spec`]: an image config and a run request turned into the shim's specs.
//! - [`logs`]: each process's log file, its writer and its readers.

pub mod logs;
pub mod run;
pub mod spec;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use gantry_proto::{ContainerId, Event, ExecId, Op, OutputPosition, ProcessSpec};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::metrics::ContainerMetrics;
use crate::sync::lock;
use gantry_api::records::ExitRecord;
use logs::{Appended, LogLimits, ProcessLog};

/// The file in a container's directory that records it.
const RECORD_FILE: &str = "record.json";

/// Errors of the table.
#[derive(Debug, thiserror::Error)]
pub enum ContainerTableError {
    /// The name is taken.
    #[error("a container named {0:?} exists already in this VM")]
    Exists(String),
    /// No such container or exec.
    #[error("no container {0:?} in this VM")]
    NotFound(String),
    /// An id that cannot name a container or exec.
    #[error("{0}")]
    BadId(String),
    /// A log file could not be created.
    #[error("cannot create the log of {id}: {source}")]
    Log {
        /// The container.
        id: String,
        /// Why.
        source: std::io::Error,
    },
    /// The container's record could not be written.
    #[error("cannot record container {id}: {source}")]
    Record {
        /// The container.
        id: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A container as its `record.json` keeps it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerRecord {
    image: String,
    created_unix: u64,
    process: ProcessSpec,
    created: bool,
    oom_killed: bool,
    /// Its execs, in the order they were started.
    execs: Vec<ExecId>,
}

/// One container the agent created.
#[derive(Debug)]
pub struct ContainerEntry {
    /// Its name.
    pub id: ContainerId,
    /// The image it runs, as the operator named it.
    pub image: String,
    /// When it was created (Unix seconds).
    pub created_unix: u64,
    /// Its main process: `exec` takes its environment, working directory and user from it.
    pub process: ProcessSpec,
    dir: PathBuf,
    limits: LogLimits,
    main: Arc<ProcessLog>,
    /// Its execs' logs, in the order they were started.
    execs: Mutex<Vec<(ExecId, Arc<ProcessLog>)>>,
    oom_killed: AtomicBool,
    /// The guest created it: from then on, a guest that does not know it has lost it.
    created: AtomicBool,
    /// Until its main process's first output: when its run began, and the run's span.
    awaiting_output: Mutex<Option<AwaitingOutput>>,
}

/// A run waiting for its container's first output.
#[derive(Debug)]
struct AwaitingOutput {
    since: Instant,
    /// The run's span.
    run: tracing::Span,
    /// The `first_output` span inside it, closed at the first output.
    phase: tracing::Span,
}

impl ContainerEntry {
    /// The log of the main process or of an exec.
    pub fn log(&self, exec_id: Option<&str>) -> Option<Arc<ProcessLog>> {
        match exec_id {
            None => Some(Arc::clone(&self.main)),
            Some(exec_id) => lock(&self.execs)
                .iter()
                .find(|(id, _)| id == exec_id)
                .map(|(_, log)| Arc::clone(log)),
        }
    }

    /// Starts the log of a new exec.
    pub fn add_exec(&self, exec_id: &str) -> Result<Arc<ProcessLog>, ContainerTableError> {
        let mut execs = lock(&self.execs);
        if execs.iter().any(|(id, _)| id == exec_id) {
            return Err(ContainerTableError::Exists(format!(
                "{}/{exec_id}",
                self.id
            )));
        }
        gantry_proto::validate_id("exec id", exec_id)
            .map_err(|err| ContainerTableError::BadId(err.to_string()))?;
        let log = ProcessLog::create(&self.dir, &exec_stem(exec_id), self.limits)
            .map(Arc::new)
            .map_err(|source| ContainerTableError::Log {
                id: self.id.clone(),
                source,
            })?;
        execs.push((exec_id.to_owned(), Arc::clone(&log)));
        let exec_ids = execs.iter().map(|(id, _)| id.clone()).collect();
        drop(execs);
        self.save_with(exec_ids)?;
        Ok(log)
    }

    /// Writes the record as it is now.
    fn save(&self) -> Result<(), ContainerTableError> {
        let exec_ids = lock(&self.execs).iter().map(|(id, _)| id.clone()).collect();
        self.save_with(exec_ids)
    }

    fn save_with(&self, execs: Vec<ExecId>) -> Result<(), ContainerTableError> {
        let record = ContainerRecord {
            image: self.image.clone(),
            created_unix: self.created_unix,
            process: self.process.clone(),
            created: self.created(),
            oom_killed: self.oom_killed(),
            execs,
        };
        let json =
            serde_json::to_vec_pretty(&record).map_err(|err| ContainerTableError::Record {
                id: self.id.clone(),
                source: std::io::Error::other(err),
            })?;
        gantry_oci::fsutil::write_atomic(&self.dir.join(RECORD_FILE), &json).map_err(|source| {
            ContainerTableError::Record {
                id: self.id.clone(),
                source,
            }
        })
    }

    /// How far the logs hold each of its processes' output.
    fn positions(&self) -> Vec<OutputPosition> {
        let main = OutputPosition {
            container_id: self.id.clone(),
            exec_id: None,
            position: self.main.position(),
        };
        let execs = lock(&self.execs)
            .iter()
            .map(|(exec_id, log)| OutputPosition {
                container_id: self.id.clone(),
                exec_id: Some(exec_id.clone()),
                position: log.position(),
            })
            .collect::<Vec<_>>();
        std::iter::once(main).chain(execs).collect()
    }

    /// Whether the kernel OOM-killed a process of this container.
    pub fn oom_killed(&self) -> bool {
        self.oom_killed.load(Ordering::Relaxed)
    }

    /// Records that the guest created the container.
    pub fn mark_created(&self) {
        self.created.store(true, Ordering::Relaxed);
        if let Err(error) = self.save() {
            warn!(%error, "the container's record stays without its creation");
        }
    }

    /// Whether the guest created the container (so that a guest without it lost it).
    pub fn created(&self) -> bool {
        self.created.load(Ordering::Relaxed)
    }

    /// Waits for the main process's first output in a `first_output` span inside `run` (the
    /// run's span), timed from `since` (the run's start): the table closes the span and
    /// records the time when the output arrives.
    pub fn await_first_output(&self, since: Instant, run: tracing::Span) {
        let phase = tracing::info_span!(parent: &run, "first_output");
        *lock(&self.awaiting_output) = Some(AwaitingOutput { since, run, phase });
    }
}

/// All containers the agent created in one VM.
#[derive(Debug)]
pub struct ContainerTable {
    dir: PathBuf,
    limits: LogLimits,
    entries: Mutex<HashMap<ContainerId, Arc<ContainerEntry>>>,
    /// Containers whose unexpected output was reported once already (bounded).
    unknown_reported: Mutex<HashSet<ContainerId>>,
    metrics: ContainerMetrics,
}

/// How many distinct unknown containers are reported before further ones are only counted.
const MAX_UNKNOWN_REPORTED: usize = 256;

/// The log stem of an exec.
fn exec_stem(exec_id: &str) -> String {
    format!("exec-{exec_id}")
}

impl ContainerTable {
    /// A table keeping logs under `dir`, each capped by `limits`.
    pub fn new(dir: &Path, limits: LogLimits) -> Self {
        Self {
            dir: dir.to_owned(),
            limits,
            entries: Mutex::default(),
            unknown_reported: Mutex::default(),
            metrics: ContainerMetrics::default(),
        }
    }

    /// The table an earlier agent left under `dir`: every container recorded there, with its
    /// logs opened to go on. A directory without a record (an agent died creating it) is
    /// removed; a record that cannot be read is reported and left as it is, its name taken.
    pub fn open(dir: &Path, limits: LogLimits) -> Self {
        let table = Self::new(dir, limits);
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return table,
            Err(error) => {
                warn!(dir = %dir.display(), %error, "cannot read the containers recorded");
                return table;
            }
        };
        let mut restored = lock(&table.entries);
        for entry in entries.filter_map(Result::ok) {
            let Ok(id) = entry.file_name().into_string() else {
                continue;
            };
            if gantry_proto::validate_id("container id", &id).is_err() {
                continue;
            }
            let container_dir = entry.path();
            match table.restore(&id, &container_dir) {
                Ok(Some(restored_entry)) => {
                    restored.insert(id, restored_entry);
                }
                Ok(None) => {
                    debug!(container = %id, "removing a container directory without a record");
                    let _ = std::fs::remove_dir_all(&container_dir);
                }
                Err(error) => {
                    warn!(container = %id, %error, "cannot restore the container's record; it stays on disk");
                }
            }
        }
        drop(restored);
        table
    }

    /// One container from its directory; `None` without a record.
    fn restore(&self, id: &str, dir: &Path) -> Result<Option<Arc<ContainerEntry>>, std::io::Error> {
        let bytes = match std::fs::read(dir.join(RECORD_FILE)) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let record: ContainerRecord = serde_json::from_slice(&bytes)
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))?;
        let main = Arc::new(ProcessLog::open(dir, "main", self.limits)?);
        let mut execs = Vec::with_capacity(record.execs.len());
        for exec_id in record.execs {
            gantry_proto::validate_id("exec id", &exec_id)
                .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))?;
            let log = ProcessLog::open(dir, &exec_stem(&exec_id), self.limits)?;
            execs.push((exec_id, Arc::new(log)));
        }
        Ok(Some(Arc::new(ContainerEntry {
            id: id.to_owned(),
            image: record.image,
            created_unix: record.created_unix,
            process: record.process,
            dir: dir.to_owned(),
            limits: self.limits,
            main,
            execs: Mutex::new(execs),
            oom_killed: AtomicBool::new(record.oom_killed),
            created: AtomicBool::new(record.created),
            awaiting_output: Mutex::default(),
        })))
    }

    /// How far the logs hold each known process's output, for the shim to resend from.
    pub fn positions(&self) -> Vec<OutputPosition> {
        let entries: Vec<_> = lock(&self.entries).values().cloned().collect();
        entries.iter().flat_map(|entry| entry.positions()).collect()
    }

    /// The same table, counting starts, exits and OOM kills into `metrics`.
    pub fn with_metrics(self, metrics: ContainerMetrics) -> Self {
        Self { metrics, ..self }
    }

    /// Where this VM's containers are counted.
    pub fn metrics(&self) -> &ContainerMetrics {
        &self.metrics
    }

    /// Records a new container (before it is created in the guest, so no output is missed).
    pub fn insert(
        &self,
        id: &str,
        image: &str,
        process: &ProcessSpec,
    ) -> Result<Arc<ContainerEntry>, ContainerTableError> {
        // The API checked it already; the table never trusts that, since the id names a directory.
        gantry_proto::validate_id("container id", id)
            .map_err(|err| ContainerTableError::BadId(err.to_string()))?;
        let mut entries = lock(&self.entries);
        if entries.contains_key(id) {
            return Err(ContainerTableError::Exists(id.to_owned()));
        }
        let dir = self.dir.join(id);
        let _ = std::fs::remove_dir_all(&dir);
        let main = ProcessLog::create(&dir, "main", self.limits)
            .map(Arc::new)
            .map_err(|source| ContainerTableError::Log {
                id: id.to_owned(),
                source,
            })?;
        let entry = Arc::new(ContainerEntry {
            id: id.to_owned(),
            image: image.to_owned(),
            process: process.clone(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            dir,
            limits: self.limits,
            main,
            execs: Mutex::default(),
            oom_killed: AtomicBool::new(false),
            created: AtomicBool::new(false),
            awaiting_output: Mutex::default(),
        });
        if let Err(error) = entry.save() {
            let _ = std::fs::remove_dir_all(&entry.dir);
            return Err(error);
        }
        entries.insert(id.to_owned(), Arc::clone(&entry));
        Ok(entry)
    }

    /// A container.
    pub fn get(&self, id: &str) -> Result<Arc<ContainerEntry>, ContainerTableError> {
        lock(&self.entries)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerTableError::NotFound(id.to_owned()))
    }

    /// Forgets a container and its logs.
    pub fn remove(&self, id: &str) {
        if let Some(entry) = lock(&self.entries).remove(id) {
            let _ = std::fs::remove_dir_all(&entry.dir);
        }
    }

    /// Every container, by name.
    pub fn all(&self) -> Vec<Arc<ContainerEntry>> {
        let mut all: Vec<_> = lock(&self.entries).values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Says once per container that its output is dropped: a guest flooding output of unknown
    /// processes must not flood the card's log too.
    fn report_unknown(&self, container_id: &str, exec_id: Option<&str>) {
        let mut reported = lock(&self.unknown_reported);
        if reported.contains(container_id) {
            return;
        }
        if reported.len() < MAX_UNKNOWN_REPORTED {
            reported.insert(container_id.to_owned());
            warn!(container = %container_id, ?exec_id, "output of an unknown process dropped (said once per container)");
        } else {
            debug!(container = %container_id, ?exec_id, "output of an unknown process dropped");
        }
    }

    /// A container's main process wrote: the first time since its run, the run's wait for
    /// output ends (its time recorded, its span closed).
    fn first_output(&self, entry: &ContainerEntry) {
        let Some(AwaitingOutput { since, run, phase }) = lock(&entry.awaiting_output).take() else {
            return;
        };
        let waited = since.elapsed();
        self.metrics.first_output(waited);
        // This thread is in no span: the run's is entered so that the phase's end (its close
        // event) is logged inside the run, with the run's fields, like the other phases'.
        run.in_scope(|| {
            phase.in_scope(|| {
                info!(
                    first_output_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    "first output"
                );
            });
            drop(phase);
        });
    }

    /// The container that output is for; its main process's output may be its first.
    fn output_entry(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
    ) -> Option<Arc<ContainerEntry>> {
        let entry = lock(&self.entries).get(container_id).cloned();
        if exec_id.is_none()
            && let Some(entry) = &entry
        {
            self.first_output(entry);
        }
        entry
    }

    /// Takes in an event from the shim; returns the credit to give back for output.
    ///
    /// Output of a container the agent does not know (created by an earlier agent) is credited
    /// and dropped, so that the process does not block forever.
    pub fn on_event(&self, event: Event) -> Option<Op> {
        match event {
            Event::Output {
                container_id,
                exec_id,
                stream,
                data,
            } => {
                let entry = self.output_entry(&container_id, exec_id.as_deref());
                let log = entry.and_then(|entry| entry.log(exec_id.as_deref()));
                match log {
                    Some(log) => {
                        if let Err(error) = log.output(stream, &data) {
                            warn!(container = %container_id, %error, "cannot write the container's log");
                        }
                    }
                    None => self.report_unknown(&container_id, exec_id.as_deref()),
                }
                let bytes = u32::try_from(data.len()).unwrap_or(u32::MAX);
                Some(Op::OutputCredit {
                    container_id,
                    exec_id,
                    bytes,
                })
            }
            Event::OutputAt {
                container_id,
                exec_id,
                stream,
                offset,
                data,
            } => {
                let entry = self.output_entry(&container_id, exec_id.as_deref());
                let end = offset.saturating_add(data.len() as u64);
                let position = match entry.and_then(|entry| entry.log(exec_id.as_deref())) {
                    Some(log) => match log.output_at(stream, offset, &data) {
                        Ok(appended) => {
                            if let Appended::AfterGap { missing } = appended {
                                warn!(container = %container_id, ?exec_id, missing, "output before this chunk never arrived");
                            }
                            log.position()
                        }
                        Err(error) => {
                            // Acknowledged all the same: a log the card cannot write must not
                            // stop the container.
                            warn!(container = %container_id, %error, "cannot write the container's log");
                            end
                        }
                    },
                    None => {
                        self.report_unknown(&container_id, exec_id.as_deref());
                        end
                    }
                };
                Some(Op::OutputReceived {
                    container_id,
                    exec_id,
                    position,
                })
            }
            Event::Exit {
                container_id,
                exec_id,
                status,
            } => {
                let entry = lock(&self.entries).get(&container_id).cloned();
                if let Some(entry) = entry {
                    let oom_killed = exec_id.is_none() && entry.oom_killed();
                    // An exit the shim says again after a reconnection is counted once.
                    let first = match entry.log(exec_id.as_deref()) {
                        Some(log) => log
                            .finish(ExitRecord { status, oom_killed })
                            .unwrap_or_else(|error| {
                                warn!(container = %container_id, %error, "cannot write the container's log");
                                true
                            }),
                        None => true,
                    };
                    if first && exec_id.is_none() {
                        self.metrics.exited();
                    }
                }
                None
            }
            Event::Oom { container_id } => {
                self.metrics.oom_killed();
                let entry = lock(&self.entries).get(&container_id).cloned();
                if let Some(entry) = entry
                    && !entry.oom_killed.swap(true, Ordering::Relaxed)
                    && let Err(error) = entry.save()
                {
                    warn!(container = %container_id, %error, "the container's record stays without its OOM kill");
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_api::records::LogItem;
    use gantry_proto::{ExitStatus, OutputStream};

    /// A main process spec for the table (the table never runs it).
    fn shell() -> ProcessSpec {
        ProcessSpec {
            args: vec!["sh".into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            stdin: false,
        }
    }

    #[tokio::test]
    async fn events_land_in_the_right_logs_and_output_is_credited() {
        let dir = tempfile::tempdir().unwrap();
        let table = ContainerTable::new(dir.path(), LogLimits::default());
        let process = shell();
        let entry = table.insert("c1", "default", &process).unwrap();
        assert!(matches!(
            table.insert("c1", "default", &process),
            Err(ContainerTableError::Exists(_))
        ));
        entry.add_exec("e1").unwrap();

        let credit = table.on_event(Event::Output {
            container_id: "c1".into(),
            exec_id: None,
            stream: OutputStream::Stdout,
            data: b"hello".to_vec(),
        });
        assert_eq!(
            credit,
            Some(Op::OutputCredit {
                container_id: "c1".into(),
                exec_id: None,
                bytes: 5
            })
        );
        table.on_event(Event::Output {
            container_id: "c1".into(),
            exec_id: Some("e1".into()),
            stream: OutputStream::Stderr,
            data: b"exec".to_vec(),
        });
        table.on_event(Event::Oom {
            container_id: "c1".into(),
        });
        table.on_event(Event::Exit {
            container_id: "c1".into(),
            exec_id: None,
            status: ExitStatus::Signal(9),
        });

        let mut main = entry.log(None).unwrap().reader(true).await.unwrap();
        assert_eq!(
            main.next().await.unwrap(),
            Some(LogItem::Output(OutputStream::Stdout, b"hello".to_vec()))
        );
        assert_eq!(
            main.next().await.unwrap(),
            Some(LogItem::Exit(ExitRecord {
                status: ExitStatus::Signal(9),
                oom_killed: true
            }))
        );
        let mut exec = entry.log(Some("e1")).unwrap().reader(false).await.unwrap();
        assert_eq!(
            exec.next().await.unwrap(),
            Some(LogItem::Output(OutputStream::Stderr, b"exec".to_vec()))
        );

        // Output for nobody is still credited, so the guest process never blocks on it.
        let credit = table.on_event(Event::Output {
            container_id: "ghost".into(),
            exec_id: None,
            stream: OutputStream::Stdout,
            data: vec![0; 10],
        });
        assert!(matches!(credit, Some(Op::OutputCredit { bytes: 10, .. })));
        table.remove("c1");
        assert!(table.get("c1").is_err());
        assert!(!dir.path().join("c1").exists());
    }

    #[tokio::test]
    async fn a_table_opened_again_has_its_containers_execs_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let process = shell();
        {
            let table = ContainerTable::new(dir.path(), LogLimits::default());
            let entry = table
                .insert("c1", "docker.io/library/alpine", &process)
                .unwrap();
            entry.mark_created();
            entry.add_exec("e1").unwrap();
            table.insert("c2", "default", &process).unwrap();
            let received = table.on_event(Event::OutputAt {
                container_id: "c1".into(),
                exec_id: None,
                stream: OutputStream::Stdout,
                offset: 0,
                data: b"hello".to_vec(),
            });
            assert_eq!(
                received,
                Some(Op::OutputReceived {
                    container_id: "c1".into(),
                    exec_id: None,
                    position: 5
                })
            );
            table.on_event(Event::OutputAt {
                container_id: "c1".into(),
                exec_id: Some("e1".into()),
                stream: OutputStream::Stderr,
                offset: 0,
                data: b"exec".to_vec(),
            });
            table.on_event(Event::Oom {
                container_id: "c1".into(),
            });
        }
        // An agent that died creating a container left a directory without a record; a
        // record that cannot be read stays as it is.
        std::fs::create_dir_all(dir.path().join("half")).unwrap();
        std::fs::create_dir_all(dir.path().join("bad")).unwrap();
        std::fs::write(dir.path().join("bad").join(RECORD_FILE), b"{not json").unwrap();

        let table = ContainerTable::open(dir.path(), LogLimits::default());
        let ids: Vec<_> = table.all().iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids, ["c1", "c2"]);
        assert!(!dir.path().join("half").exists());
        assert!(dir.path().join("bad").join(RECORD_FILE).exists());
        let entry = table.get("c1").unwrap();
        assert_eq!(entry.image, "docker.io/library/alpine");
        assert_eq!(entry.process, process);
        assert!(entry.created() && entry.oom_killed());
        assert!(!table.get("c2").unwrap().created());
        let mut positions = table.positions();
        positions.sort_by(|a, b| (&a.container_id, &a.exec_id).cmp(&(&b.container_id, &b.exec_id)));
        let summary: Vec<_> = positions
            .iter()
            .map(|p| (p.container_id.as_str(), p.exec_id.as_deref(), p.position))
            .collect();
        assert_eq!(
            summary,
            [("c1", None, 5), ("c1", Some("e1"), 4), ("c2", None, 0)]
        );

        // Output resent after the restart is kept once, and the logs go on.
        table.on_event(Event::OutputAt {
            container_id: "c1".into(),
            exec_id: None,
            stream: OutputStream::Stdout,
            offset: 3,
            data: b"lo world".to_vec(),
        });
        for _ in 0..2 {
            table.on_event(Event::Exit {
                container_id: "c1".into(),
                exec_id: None,
                status: ExitStatus::Code(0),
            });
        }
        let mut main = entry.log(None).unwrap().reader(false).await.unwrap();
        let mut items = Vec::new();
        while let Some(item) = main.next().await.unwrap() {
            items.push(item);
        }
        assert_eq!(
            items,
            [
                LogItem::Output(OutputStream::Stdout, b"hello".to_vec()),
                LogItem::Output(OutputStream::Stdout, b" world".to_vec()),
                LogItem::Exit(ExitRecord {
                    status: ExitStatus::Code(0),
                    oom_killed: true
                }),
            ]
        );
        let mut exec = entry.log(Some("e1")).unwrap().reader(false).await.unwrap();
        assert_eq!(
            exec.next().await.unwrap(),
            Some(LogItem::Output(OutputStream::Stderr, b"exec".to_vec()))
        );
        assert!(matches!(
            entry.add_exec("e1"),
            Err(ContainerTableError::Exists(_))
        ));
    }

    #[test]
    fn exits_ooms_and_the_first_output_are_counted() {
        use crate::metrics::tests::sample;
        let metrics = crate::metrics::Metrics::new();
        let dir = tempfile::tempdir().unwrap();
        let table = ContainerTable::new(dir.path(), LogLimits::default())
            .with_metrics(metrics.vm("vm0").containers);
        let process = shell();
        let entry = table.insert("c1", "default", &process).unwrap();
        entry.add_exec("e1").unwrap();
        entry.await_first_output(Instant::now(), tracing::Span::none());
        let output = |exec_id: Option<&str>| Event::Output {
            container_id: "c1".into(),
            exec_id: exec_id.map(str::to_owned),
            stream: OutputStream::Stdout,
            data: b"x".to_vec(),
        };
        let vm = [("vm", "vm0")];
        let count = |name| sample(&metrics, name, &vm);
        let first_output = "gantry_container_first_output_duration_seconds_count";

        table.on_event(output(Some("e1")));
        assert_eq!(
            count(first_output),
            Some(0.0),
            "an exec's output is not the container's"
        );
        table.on_event(output(None));
        table.on_event(output(None));
        assert_eq!(
            count(first_output),
            Some(1.0),
            "only the first output counts"
        );

        table.on_event(Event::Oom {
            container_id: "c1".into(),
        });
        table.on_event(Event::Exit {
            container_id: "c1".into(),
            exec_id: Some("e1".into()),
            status: ExitStatus::Code(0),
        });
        assert_eq!(
            count("gantry_container_exits_total"),
            Some(0.0),
            "an exec is no container"
        );
        table.on_event(Event::Exit {
            container_id: "c1".into(),
            exec_id: None,
            status: ExitStatus::Signal(9),
        });
        // Said again after a reconnection: one exit.
        table.on_event(Event::Exit {
            container_id: "c1".into(),
            exec_id: None,
            status: ExitStatus::Signal(9),
        });
        table.on_event(Event::Exit {
            container_id: "ghost".into(),
            exec_id: None,
            status: ExitStatus::Code(1),
        });
        assert_eq!(count("gantry_container_exits_total"), Some(1.0));
        assert_eq!(count("gantry_container_ooms_total"), Some(1.0));
    }
}
