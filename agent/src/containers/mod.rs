//! The containers of one VM, as the agent knows them: their output logs, exits and OOM kills,
//! fed by the shim's events. The shim is the authority on what runs; this table is what the
//! agent keeps for the operator (logs, image names) and the credit it owes the shim.
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

use gantry_proto::{ContainerId, Event, ExecId, Op, ProcessSpec};
use tracing::{debug, info, warn};

use crate::metrics::ContainerMetrics;
use crate::sync::lock;
use gantry_api::records::ExitRecord;
use logs::{LogLimits, ProcessLog};

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
    execs: Mutex<HashMap<ExecId, Arc<ProcessLog>>>,
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
            Some(exec_id) => lock(&self.execs).get(exec_id).cloned(),
        }
    }

    /// Starts the log of a new exec.
    pub fn add_exec(&self, exec_id: &str) -> Result<Arc<ProcessLog>, ContainerTableError> {
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(ContainerTableError::Exists(format!(
                "{}/{exec_id}",
                self.id
            )));
        }
        gantry_proto::validate_id("exec id", exec_id)
            .map_err(|err| ContainerTableError::BadId(err.to_string()))?;
        let log = ProcessLog::create(&self.dir, &format!("exec-{exec_id}"), self.limits)
            .map(Arc::new)
            .map_err(|source| ContainerTableError::Log {
                id: self.id.clone(),
                source,
            })?;
        execs.insert(exec_id.to_owned(), Arc::clone(&log));
        Ok(log)
    }

    /// Whether the kernel OOM-killed a process of this container.
    pub fn oom_killed(&self) -> bool {
        self.oom_killed.load(Ordering::Relaxed)
    }

    /// Records that the guest created the container.
    pub fn mark_created(&self) {
        self.created.store(true, Ordering::Relaxed);
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
                let entry = lock(&self.entries).get(&container_id).cloned();
                if exec_id.is_none()
                    && let Some(entry) = &entry
                {
                    self.first_output(entry);
                }
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
            Event::Exit {
                container_id,
                exec_id,
                status,
            } => {
                let entry = lock(&self.entries).get(&container_id).cloned();
                if let Some(entry) = entry {
                    if exec_id.is_none() {
                        self.metrics.exited();
                    }
                    let oom_killed = exec_id.is_none() && entry.oom_killed();
                    if let Some(log) = entry.log(exec_id.as_deref())
                        && let Err(error) = log.finish(ExitRecord { status, oom_killed })
                    {
                        warn!(container = %container_id, %error, "cannot write the container's log");
                    }
                }
                None
            }
            Event::Oom { container_id } => {
                self.metrics.oom_killed();
                if let Some(entry) = lock(&self.entries).get(&container_id) {
                    entry.oom_killed.store(true, Ordering::Relaxed);
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
        table.on_event(Event::Exit {
            container_id: "ghost".into(),
            exec_id: None,
            status: ExitStatus::Code(1),
        });
        assert_eq!(count("gantry_container_exits_total"), Some(1.0));
        assert_eq!(count("gantry_container_ooms_total"), Some(1.0));
    }
}
