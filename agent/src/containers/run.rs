//! `run`: the image into the cache, its layers into the VM's layer store, the container into the
//! guest.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gantry_proto::{ContainerSpec, Op, Reply};
use sha2::{Digest as _, Sha256};
use tracing::{Instrument, info_span, warn};

use super::ContainerTableError;
use gantry_api::{LayerProgress, RunOptions, RunUpdate};

use super::spec::{self, DEFAULT_WRITABLE_LAYER_BYTES, ImageDefaults, RunSpecError};
use crate::cache::{CacheError, ImageRecord};
use crate::images::pull::{PullEvent, describe};
use crate::images::{ImageError, ImageService, PulledImage};
use crate::vm::{Vm, VmError};

/// How long `run` waits for a booting guest's shim.
const SHIM_WAIT: Duration = Duration::from_secs(120);

/// Errors of `run` and image lookups.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The image could not be found, built or pulled.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The request is unusable.
    #[error(transparent)]
    Spec(#[from] RunSpecError),
    /// The container table refused.
    #[error(transparent)]
    Table(#[from] ContainerTableError),
    /// The VM or its shim failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The shim answered something unexpected.
    #[error("the shim answered {0:?} to a container request")]
    UnexpectedReply(Box<Reply>),
    /// A blocking task failed.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A fresh container name: `gantry-` and 12 hex digits.
pub fn generate_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = format!(
        "{:?}-{}-{}",
        std::time::SystemTime::now(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let hash = Sha256::digest(seed.as_bytes());
    let hex: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("gantry-{hex}")
}

/// The image config's defaults, as `run` uses them.
pub fn image_defaults(record: &ImageRecord) -> ImageDefaults {
    let config = record.config.config.clone().unwrap_or_default();
    ImageDefaults {
        entrypoint: config.entrypoint.unwrap_or_default(),
        cmd: config.cmd.unwrap_or_default(),
        env: config.env.unwrap_or_default(),
        working_dir: config.working_dir.unwrap_or_default(),
        user: config.user.unwrap_or_default(),
    }
}

/// Receives `run`'s progress: lines, and layer byte counts.
pub type RunProgress = Arc<dyn Fn(RunUpdate) + Send + Sync>;

/// Creates and starts a container; returns its name. Output goes to the VM's container table.
///
/// The run is a `run` span (fields `vm`, `image`, `container`) with a span per phase: `pull`,
/// `map`, `create`, `start`, and `first_output`, which the container table closes when the
/// container's main process first writes. The VM's container metrics count the outcome.
pub async fn run_container(
    images: &ImageService,
    vm: &Vm,
    options: RunOptions,
    progress: RunProgress,
) -> Result<String, RunError> {
    let since = Instant::now();
    let id = options.name.clone().unwrap_or_else(generate_name);
    let image = if options.image.is_empty() {
        "default".to_owned()
    } else {
        options.image.clone()
    };
    let span = info_span!("run", vm = %vm.name(), image = %image, container = %id);
    let outcome = run_phases(images, vm, options, progress, &id, &image, since)
        .instrument(span.clone())
        .await;
    let metrics = vm.containers().metrics();
    match &outcome {
        Ok(_) => metrics.started(since.elapsed()),
        Err(error) => {
            metrics.start_failed();
            span.in_scope(|| warn!(%error, "run failed"));
        }
    }
    outcome.map(|()| id)
}

/// [`run_container`]'s phases, inside its span.
async fn run_phases(
    images: &ImageService,
    vm: &Vm,
    options: RunOptions,
    progress: RunProgress,
    id: &str,
    image: &str,
    since: Instant,
) -> Result<(), RunError> {
    progress(RunUpdate::Progress(format!("pulling {image}")));
    // Typed as a trait object up front: an inferred closure type here trips rustc's
    // higher-ranked `Send` check once the future is spawned.
    let pull_progress: Box<dyn Fn(&PullEvent) + Send + Sync> = {
        let progress = Arc::clone(&progress);
        Box::new(move |event| match event {
            PullEvent::LayerBytes {
                index,
                received,
                size,
            } => progress(RunUpdate::Layer(LayerProgress {
                index: *index,
                received: *received,
                size: *size,
            })),
            other => progress(RunUpdate::Progress(describe(other))),
        })
    };
    let pulled = images
        .pull(&options.image, options.pull_mode, pull_progress.as_ref())
        .instrument(info_span!("pull"))
        .await?;
    let record = &pulled.record;
    let process = spec::process_spec(&image_defaults(record), &options)?;
    let resources = spec::resources(&options)?;

    // The pull's own pins go to the mappings: no moment without one, whatever a GC does.
    let PulledImage {
        record,
        pins,
        sources,
        ..
    } = pulled;
    let layers = info_span!("map").in_scope(|| {
        let mut layers = Vec::with_capacity(record.layers.len());
        for ((layer, pin), source) in record.layers.iter().zip(pins).zip(sources) {
            let extent = vm.map_layer(&options.image, layer, source, pin)?;
            progress(RunUpdate::Progress(format!(
                "layer {} mapped at {:#x} ({} bytes)",
                layer.erofs_digest, extent.offset, extent.length
            )));
            layers.push(extent);
        }
        Ok::<_, RunError>(layers)
    })?;
    let hostname = options.hostname.clone().unwrap_or_else(|| {
        id.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(63)
            .collect()
    });
    let entry = vm.containers().insert(id, image, &process)?;
    let spec = ContainerSpec {
        container_id: id.to_owned(),
        layers,
        process,
        hostname,
        resources,
        writable_layer_bytes: options
            .writable_layer_bytes
            .unwrap_or(DEFAULT_WRITABLE_LAYER_BYTES),
    };
    let create = match options.tty {
        false => Op::CreateContainer(spec),
        true => Op::CreateContainerTty {
            spec,
            size: options.tty_size.unwrap_or_default(),
        },
    };
    let created = vm
        .request(create, SHIM_WAIT)
        .instrument(info_span!("create"))
        .await;
    if let Err(err) = expect_done(created) {
        vm.containers().remove(id);
        return Err(err);
    }
    entry.mark_created();
    progress(RunUpdate::Progress(format!("created {id}")));
    if options.create_only {
        return Ok(());
    }
    // Watched before the start is asked for: the first output may come before its answer.
    entry.await_first_output(since, tracing::Span::current());
    if let Err(err) = start_created(vm, id).await {
        // Leave nothing half-made behind: the container never ran.
        let _ = vm
            .request(
                Op::DeleteContainer {
                    container_id: id.to_owned(),
                },
                Duration::ZERO,
            )
            .await;
        vm.containers().remove(id);
        return Err(err);
    }
    Ok(())
}

/// Starts the main process of a created container, in a `start` span.
pub async fn start_created(vm: &Vm, id: &str) -> Result<(), RunError> {
    let started = vm
        .request(
            Op::StartContainer {
                container_id: id.to_owned(),
            },
            SHIM_WAIT,
        )
        .instrument(info_span!("start"))
        .await;
    expect_done(started)
}

/// Accepts only `Reply::Done`.
pub fn expect_done(reply: Result<Reply, VmError>) -> Result<(), RunError> {
    match reply? {
        Reply::Done => Ok(()),
        other => Err(RunError::UnexpectedReply(Box::new(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_unique_and_valid() {
        let a = generate_name();
        let b = generate_name();
        assert_ne!(a, b);
        assert!(a.starts_with("gantry-") && a.len() == 19, "{a}");
    }
}
