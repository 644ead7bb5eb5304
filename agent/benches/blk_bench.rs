//! Layer-store throughput against the C reference, in one run.
//!
//! Drives Gantry's vhost-user-blk backend and `qemu-storage-daemon --export
//! type=vhost-user-blk` serving the same file, with the same frontend harness (shared memfd
//! memory, real split virtqueues, eventfd kicks and calls), on data already in the page cache:
//! - 4 KiB random reads at queue depth 1 and 32 (IOPS),
//! - 1 MiB sequential reads (MB/s, at `--seq-depth`, default 4).
//!
//! Run: `cargo bench -p gantry-agent --bench blk_bench -- [--size-mib 256] [--seconds 3]
//! [--queues 1] [--seq-depth 4] [--file PATH] [--only gantry|qsd]`
//!
//! Each workload runs on every queue at once, one driver thread per queue.

#[path = "support/blk_frontend.rs"]
mod blk_frontend;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blk_frontend::{BlkFrontend, DriverQueue, T_IN, Used};
use gantry_agent::blk::{FileSource, LayerStoreConfig, LayerStoreDevice};

const SMALL: u32 = 4096;
const LARGE: u32 = 1 << 20;
const QUEUE_SIZE: u16 = 256;
/// Slots per queue: enough for the deepest workload.
const MAX_DEPTH: usize = 64;

struct Options {
    size_mib: u64,
    seconds: f64,
    queues: u16,
    seq_depth: usize,
    file: Option<PathBuf>,
    only: Option<String>,
}

fn parse_options() -> Options {
    let mut options = Options {
        size_mib: 256,
        seconds: 3.0,
        queues: 1,
        seq_depth: 4,
        file: None,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--size-mib" => options.size_mib = value().parse().expect("--size-mib: a number"),
            "--seconds" => options.seconds = value().parse().expect("--seconds: a number"),
            "--queues" => options.queues = value().parse().expect("--queues: a number"),
            "--seq-depth" => options.seq_depth = value().parse().expect("--seq-depth: a number"),
            "--file" => options.file = Some(PathBuf::from(value())),
            "--only" => options.only = Some(value()),
            // cargo bench passes --bench; ignore anything else cargo adds.
            _ => {}
        }
    }
    assert!(options.seq_depth >= 1 && options.seq_depth <= MAX_DEPTH);
    options
}

#[derive(Clone, Copy, Debug)]
enum Pattern {
    Random,
    Sequential,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    pattern: Pattern,
    block: u32,
    depth: usize,
    /// Report MB/s instead of IOPS.
    bandwidth: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Outcome {
    fn figure(&self, workload: &Workload) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if workload.bandwidth {
            self.bytes as f64 / seconds / 1e6
        } else {
            self.ops as f64 / seconds
        }
    }
}

/// xorshift64*: cheap, deterministic offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs `workload` on one queue for `duration`; checks every status and, for the first
/// request of each slot, the bytes against the file.
fn drive(
    queue: &mut DriverQueue,
    workload: Workload,
    base: u64,
    file: &[u8],
    seed: u64,
    duration: Duration,
) -> Outcome {
    let blocks = file.len() as u64 / u64::from(workload.block);
    let mut rng = Rng(seed | 1);
    let mut sequential = (seed % blocks.max(1)) * u64::from(workload.block);
    let mut next_offset = |rng: &mut Rng| -> u64 {
        match workload.pattern {
            Pattern::Random => (rng.next() % blocks) * u64::from(workload.block),
            Pattern::Sequential => {
                let offset = sequential;
                sequential += u64::from(workload.block);
                if sequential + u64::from(workload.block) > file.len() as u64 {
                    sequential = 0;
                }
                offset
            }
        }
    };
    let mut in_flight = vec![0u64; workload.depth];
    let mut checked = vec![false; workload.depth];
    for (slot, offset) in in_flight.iter_mut().enumerate() {
        *offset = next_offset(&mut rng);
        queue
            .submit(slot, T_IN, (base + *offset) / 512, workload.block)
            .expect("submit");
    }
    queue.kick().expect("kick");
    let start = Instant::now();
    let deadline = start + duration;
    let mut outcome = Outcome::default();
    let mut used: Vec<Used> = Vec::with_capacity(workload.depth);
    let mut outstanding = workload.depth;
    while outstanding > 0 {
        queue.wait().expect("wait for the device");
        used.clear();
        queue.take_used(&mut used).expect("used ring");
        let stopping = Instant::now() >= deadline;
        for done in &used {
            outstanding -= 1;
            let status = queue.status(done.slot).expect("status");
            assert_eq!(status, 0, "request failed with status {status}");
            assert_eq!(done.len, workload.block + 1, "used length");
            if !checked[done.slot] {
                let offset = in_flight[done.slot] as usize;
                let data = queue
                    .data(done.slot, workload.block as usize)
                    .expect("data");
                assert!(
                    data == file[offset..offset + workload.block as usize],
                    "wrong bytes at offset {offset}"
                );
                checked[done.slot] = true;
            }
            outcome.ops += 1;
            outcome.bytes += u64::from(workload.block);
            if !stopping {
                let offset = next_offset(&mut rng);
                in_flight[done.slot] = offset;
                queue
                    .submit(done.slot, T_IN, (base + offset) / 512, workload.block)
                    .expect("submit");
                outstanding += 1;
            }
        }
        if !stopping && !used.is_empty() {
            queue.kick().expect("kick");
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// Runs `workload` on every queue at once (one thread each); sums the outcomes.
fn run_workload(
    frontend: &mut BlkFrontend,
    workload: Workload,
    base: u64,
    file: &Arc<Vec<u8>>,
    duration: Duration,
) -> Outcome {
    let queues = frontend.take_queues();
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(index, mut queue)| {
            let file = file.clone();
            std::thread::spawn(move || {
                // Warm-up, then the measured run.
                drive(
                    &mut queue,
                    workload,
                    base,
                    &file,
                    7 + index as u64,
                    duration / 5,
                );
                let outcome = drive(
                    &mut queue,
                    workload,
                    base,
                    &file,
                    1000 + index as u64,
                    duration,
                );
                (queue, outcome)
            })
        })
        .collect();
    let mut total = Outcome::default();
    let mut queues = Vec::new();
    for handle in handles {
        let (queue, outcome) = handle.join().expect("driver thread");
        total.ops += outcome.ops;
        total.bytes += outcome.bytes;
        total.elapsed = total.elapsed.max(outcome.elapsed);
        queues.push(queue);
    }
    frontend.restore_queues(queues);
    total
}

fn run_all(
    socket: &Path,
    options: &Options,
    workloads: &[Workload],
    base: u64,
    file: &Arc<Vec<u8>>,
) -> Vec<f64> {
    let mut frontend = BlkFrontend::connect(socket, options.queues, QUEUE_SIZE, MAX_DEPTH, LARGE)
        .expect("connect");
    let duration = Duration::from_secs_f64(options.seconds);
    workloads
        .iter()
        .map(|workload| {
            let outcome = run_workload(&mut frontend, *workload, base, file, duration);
            outcome.figure(workload)
        })
        .collect()
}

fn wait_for_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("qemu-storage-daemon exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let options = parse_options();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = match &options.file {
        Some(path) => path.clone(),
        None => {
            let path = dir.path().join("layer.img");
            let mut file = std::fs::File::create(&path).expect("create test file");
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut chunk = vec![0u8; 1 << 20];
            for _ in 0..options.size_mib {
                for word in chunk.chunks_exact_mut(8) {
                    word.copy_from_slice(&rng.next().to_le_bytes());
                }
                file.write_all(&chunk).expect("write test file");
            }
            path
        }
    };
    // Read the whole file: it is then in the page cache for both backends, and is the oracle.
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .expect("read test file");
    let len = bytes.len() as u64 - bytes.len() as u64 % u64::from(LARGE);
    bytes.truncate(len as usize);
    assert!(
        len >= u64::from(LARGE) * 4,
        "test file must be at least 4 MiB"
    );
    let file = Arc::new(bytes);

    let workloads = [
        Workload {
            name: "4 KiB random read, QD 1 (IOPS)",
            pattern: Pattern::Random,
            block: SMALL,
            depth: 1,
            bandwidth: false,
        },
        Workload {
            name: "4 KiB random read, QD 32 (IOPS)",
            pattern: Pattern::Random,
            block: SMALL,
            depth: 32,
            bandwidth: false,
        },
        Workload {
            name: "1 MiB sequential read (MB/s)",
            pattern: Pattern::Sequential,
            block: LARGE,
            depth: options.seq_depth,
            bandwidth: true,
        },
    ];

    println!(
        "blk_bench: {} MiB file, {} queue(s), {} s per figure, sequential QD {}",
        len >> 20,
        options.queues,
        options.seconds,
        options.seq_depth
    );

    let run_gantry = options.only.as_deref() != Some("qsd");
    let run_qsd = options.only.as_deref() != Some("gantry");

    let gantry = run_gantry.then(|| {
        let socket = dir.path().join("gantry.sock");
        let mut config = LayerStoreConfig::new(&socket);
        config.num_queues = options.queues;
        let device = LayerStoreDevice::start(config).expect("start the layer store");
        let source = FileSource::open(&path).expect("open test file");
        let extent = device
            .extents()
            .map_layer("sha256:bench", Arc::new(source))
            .expect("map the test file");
        let figures = run_all(&socket, &options, &workloads, extent.offset, &file);
        device.shutdown();
        figures
    });

    let qsd = run_qsd
        .then(|| {
            let socket = dir.path().join("qsd.sock");
            let spawned = Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f,filename={},cache.direct=off,read-only=on",
                    path.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},num-queues={},writable=off",
                    socket.display(),
                    options.queues
                ))
                .stdin(Stdio::null())
                .spawn();
            match spawned {
                Ok(child) => {
                    let mut child = KillOnDrop(child);
                    wait_for_socket(&socket, &mut child.0);
                    Some(run_all(&socket, &options, &workloads, 0, &file))
                }
                Err(e) => {
                    println!("qemu-storage-daemon not run ({e}): install qemu-system-common");
                    None
                }
            }
        })
        .flatten();

    println!();
    println!("| workload | gantry | qemu-storage-daemon | ratio |");
    println!("|---|---:|---:|---:|");
    for (index, workload) in workloads.iter().enumerate() {
        let ours = gantry.as_ref().map(|figures| figures[index]);
        let theirs = qsd.as_ref().map(|figures| figures[index]);
        let show = |value: Option<f64>| value.map_or("-".to_owned(), |v| format!("{v:.0}"));
        let ratio = match (ours, theirs) {
            (Some(ours), Some(theirs)) if theirs > 0.0 => format!("{:.2}x", ours / theirs),
            _ => "-".to_owned(),
        };
        println!(
            "| {} | {} | {} | {} |",
            workload.name,
            show(ours),
            show(theirs),
            ratio
        );
    }
}
