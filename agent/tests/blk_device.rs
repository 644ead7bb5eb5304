//! The layer-store device over its real vhost-user socket, driven by the benchmark's frontend
//! harness: shared memfd memory, split virtqueues, eventfd kicks and calls, one worker thread
//! per queue.

#[path = "../benches/support/blk_frontend.rs"]
mod blk_frontend;

use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use blk_frontend::{BlkFrontend, T_GET_ID, T_IN, T_OUT, Used};
use gantry_agent::blk::{BlockSource, FileSource, LayerStoreConfig, LayerStoreDevice};
use vm_memory::VolatileSlice;

const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(131).wrapping_add(u64::from(seed)) as u8 ^ (i >> 9) as u8)
        .collect()
}

/// An in-memory layer that can hold back one range until released (what the lazy fetcher will
/// do for a chunk that is not downloaded yet).
/// The held byte range (start, end), if any, and the requests waiting for it.
type HeldRange = (Option<(u64, u64)>, Vec<Waker>);

#[derive(Debug)]
struct DelayedSource {
    bytes: Vec<u8>,
    held: Mutex<HeldRange>,
}

impl DelayedSource {
    fn new(bytes: Vec<u8>, held: Option<(u64, u64)>) -> Arc<DelayedSource> {
        Arc::new(DelayedSource {
            bytes,
            held: Mutex::new((held, Vec::new())),
        })
    }

    fn release(&self) {
        let wakers = {
            let mut held = self.held.lock().unwrap();
            held.0 = None;
            std::mem::take(&mut held.1)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl BlockSource for DelayedSource {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        waker: &Waker,
    ) -> Poll<io::Result<()>> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        {
            let mut held = self.held.lock().unwrap();
            if let Some((start, end)) = held.0
                && offset < end
                && offset + total > start
            {
                held.1.push(waker.clone());
                return Poll::Pending;
            }
        }
        let mut at = offset as usize;
        for buf in bufs {
            buf.copy_from(&self.bytes[at..at + buf.len()]);
            at += buf.len();
        }
        Poll::Ready(Ok(()))
    }
}

fn start(
    dir: &tempfile::TempDir,
    name: &str,
    queues: u16,
) -> (LayerStoreDevice, std::path::PathBuf) {
    let socket = dir.path().join(name);
    let mut config = LayerStoreConfig::new(&socket);
    config.num_queues = queues;
    (
        LayerStoreDevice::start(config).expect("start device"),
        socket,
    )
}

#[test]
fn serves_config_id_reads_and_refuses_writes_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (device, socket) = start(&dir, "blk.sock", 2);
    let layer = pattern(3 << 20, 1);
    let path = dir.path().join("layer.img");
    std::fs::write(&path, &layer).unwrap();
    let extent = device
        .extents()
        .map_layer("sha256:one", Arc::new(FileSource::open(&path).unwrap()))
        .unwrap();

    let mut frontend = BlkFrontend::connect(&socket, 2, 128, 4, 1 << 20).expect("connect");
    assert_eq!(frontend.config.capacity_sectors, (1u64 << 50) / 512);
    assert_eq!(frontend.config.blk_size, 4096);
    assert_eq!(frontend.config.num_queues, 2);
    assert_eq!(frontend.config.seg_max, 126);
    assert_ne!(
        frontend.features & (1 << 5),
        0,
        "VIRTIO_BLK_F_RO negotiated"
    );

    let queue = frontend.queue(1);
    let (status, used) = queue.run_one(T_GET_ID, 0, 20).unwrap();
    assert_eq!((status, used), (STATUS_OK, 21));
    assert_eq!(&queue.data(0, 20).unwrap()[..14], b"gantry-layers\0");

    let (status, used) = queue
        .run_one(T_IN, extent.offset / 512 + 8, 1 << 20)
        .unwrap();
    assert_eq!((status, used), (STATUS_OK, (1 << 20) + 1));
    assert_eq!(
        queue.data(0, 1 << 20).unwrap(),
        &layer[4096..4096 + (1 << 20)]
    );

    let (status, _) = queue
        .run_one(T_IN, (extent.offset + (3 << 20)) / 512, 4096)
        .unwrap();
    assert_eq!(status, STATUS_IOERR, "unmapped range");

    let (status, _) = queue.run_one(T_OUT, extent.offset / 512, 4096).unwrap();
    assert_eq!(status, STATUS_IOERR, "writes are refused");
    let (status, _) = queue.run_one(T_IN, extent.offset / 512, 4096).unwrap();
    assert_eq!(status, STATUS_OK);
    assert_eq!(
        queue.data(0, 4096).unwrap(),
        &layer[..4096],
        "the write changed nothing"
    );
    assert_eq!(std::fs::read(&path).unwrap(), layer);
    drop(frontend);
    device.shutdown();
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[test]
fn a_vm_cannot_read_a_layer_mapped_only_for_another_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (vm_a, socket_a) = start(&dir, "a.sock", 1);
    let (vm_b, socket_b) = start(&dir, "b.sock", 1);
    let secret = pattern(1 << 20, 0x5e);
    let extent = vm_a
        .extents()
        .map_layer("sha256:secret", DelayedSource::new(secret.clone(), None))
        .unwrap();

    let mut a = BlkFrontend::connect(&socket_a, 1, 64, 2, 1 << 20).unwrap();
    let mut b = BlkFrontend::connect(&socket_b, 1, 64, 2, 1 << 20).unwrap();
    let (status, _) = a
        .queue(0)
        .run_one(T_IN, extent.offset / 512, 1 << 20)
        .unwrap();
    assert_eq!(status, STATUS_OK);
    assert_eq!(a.queue(0).data(0, 1 << 20).unwrap(), secret);

    // B probes A's offset, and the whole first GiB of its device, for A's bytes.
    b.queue(0).poison(0, 0).unwrap();
    for mib in 1..1024u64 {
        let (status, _) = b
            .queue(0)
            .run_one(T_IN, (mib << 20) / 512, 1 << 20)
            .unwrap();
        assert_eq!(status, STATUS_IOERR, "B read something at {mib} MiB");
    }
    assert!(b.queue(0).data(0, 1 << 20).unwrap().iter().all(|x| *x == 0));
    // B's header lists nothing.
    let (status, _) = b.queue(0).run_one(T_IN, 0, 8192).unwrap();
    assert_eq!(status, STATUS_OK);
    let header = b.queue(0).data(0, 8192).unwrap();
    assert_eq!(&header[4096..4104], b"GANTRYLS");
    assert_eq!(
        &header[4108..4112],
        &0u32.to_le_bytes(),
        "no layer mapped for B"
    );
    drop((a, b));
    vm_a.shutdown();
    vm_b.shutdown();
}

#[test]
fn a_parked_request_completes_out_of_order_while_other_queues_and_requests_flow() {
    let dir = tempfile::tempdir().unwrap();
    let (device, socket) = start(&dir, "blk.sock", 2);
    let layer = pattern(4 << 20, 3);
    // The third MiB "is not fetched yet".
    let source = DelayedSource::new(layer.clone(), Some((2 << 20, 3 << 20)));
    let extent = device
        .extents()
        .map_layer("sha256:lazy", source.clone())
        .unwrap();
    let sector = |offset: u64| (extent.offset + offset) / 512;

    let mut frontend = BlkFrontend::connect(&socket, 2, 128, 8, 1 << 20).unwrap();
    let mut queues = frontend.take_queues();
    let (q0, rest) = queues.split_first_mut().unwrap();
    let q1 = &mut rest[0];

    // Queue 0: the slow request first, then fast ones behind it.
    q0.submit(0, T_IN, sector(2 << 20), 4096).unwrap();
    for slot in 1..4 {
        q0.submit(slot, T_IN, sector(slot as u64 * 4096), 4096)
            .unwrap();
    }
    q0.kick().unwrap();
    let mut used: Vec<Used> = Vec::new();
    while used.len() < 3 {
        assert!(
            q0.wait_timeout(Duration::from_secs(10)).unwrap(),
            "fast requests stalled"
        );
        q0.take_used(&mut used).unwrap();
    }
    assert_eq!(
        used.iter().map(|u| u.slot).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for slot in 1..4 {
        assert_eq!(q0.status(slot).unwrap(), STATUS_OK);
        let at = slot * 4096;
        assert_eq!(q0.data(slot, 4096).unwrap(), &layer[at..at + 4096]);
    }
    assert_eq!(
        q0.status(0).unwrap(),
        0xff,
        "the slow request is still parked"
    );

    // Queue 1 is not held up by queue 0's parked request.
    let (status, _) = q1.run_one(T_IN, sector(0), 1 << 20).unwrap();
    assert_eq!(status, STATUS_OK);
    assert_eq!(q1.data(0, 1 << 20).unwrap(), &layer[..1 << 20]);

    // Map another layer while the queues run; it is readable at once.
    let other = pattern(8192, 9);
    let second = device
        .extents()
        .map_layer("sha256:second", DelayedSource::new(other.clone(), None))
        .unwrap();
    let (status, _) = q1.run_one(T_IN, second.offset / 512, 8192).unwrap();
    assert_eq!(status, STATUS_OK);
    assert_eq!(q1.data(0, 8192).unwrap(), other);

    // The chunk arrives: the parked request completes with the right bytes.
    source.release();
    used.clear();
    while used.is_empty() {
        assert!(
            q0.wait_timeout(Duration::from_secs(10)).unwrap(),
            "parked request never completed"
        );
        q0.take_used(&mut used).unwrap();
    }
    assert_eq!(used, vec![Used { slot: 0, len: 4097 }]);
    assert_eq!(q0.status(0).unwrap(), STATUS_OK);
    assert_eq!(q0.data(0, 4096).unwrap(), &layer[2 << 20..(2 << 20) + 4096]);

    frontend.restore_queues(queues);
    drop(frontend);
    device.shutdown();
}

#[test]
fn the_device_serves_the_same_table_after_the_frontend_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let (device, socket) = start(&dir, "blk.sock", 1);
    let layer = pattern(1 << 20, 5);
    let extent = device
        .extents()
        .map_layer("sha256:x", DelayedSource::new(layer.clone(), None))
        .unwrap();
    for round in 0..3 {
        let mut frontend = BlkFrontend::connect(&socket, 1, 64, 2, 1 << 20)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let (status, _) = frontend
            .queue(0)
            .run_one(T_IN, extent.offset / 512, 4096)
            .unwrap();
        assert_eq!(status, STATUS_OK, "round {round}");
        assert_eq!(frontend.queue(0).data(0, 4096).unwrap(), &layer[..4096]);
        drop(frontend);
        // The serving thread notices the disconnect and listens again.
        std::thread::sleep(Duration::from_millis(100));
    }
    device.shutdown();
}

/// Maps a layer whose data is held back, connects a one-queue frontend and reads from it: the
/// read parks (slot 0 of queue 0).
fn park_one_read(device: &LayerStoreDevice, socket: &std::path::Path) -> BlkFrontend {
    let source = DelayedSource::new(pattern(1 << 20, 6), Some((0, 1 << 20)));
    let extent = device.extents().map_layer("sha256:held", source).unwrap();
    let mut frontend = BlkFrontend::connect(socket, 1, 64, 2, 1 << 20).unwrap();
    let queue = frontend.queue(0);
    queue.submit(0, T_IN, extent.offset / 512, 4096).unwrap();
    queue.kick().unwrap();
    assert!(
        !queue.wait_timeout(Duration::from_millis(300)).unwrap(),
        "must park"
    );
    frontend
}

#[test]
fn stopping_a_queue_fails_its_parked_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (device, socket) = start(&dir, "blk.sock", 1);
    let mut frontend = park_one_read(&device, &socket);
    frontend.stop_queue(0).unwrap();
    let queue = frontend.queue(0);
    let mut used = Vec::new();
    queue.take_used(&mut used).unwrap();
    assert_eq!(used, vec![Used { slot: 0, len: 1 }]);
    assert_eq!(queue.status(0).unwrap(), STATUS_IOERR);
    drop(frontend);
    device.shutdown();
}

#[test]
fn an_agent_leaving_keeps_its_requests_in_flight_and_a_shutdown_clears_them() {
    use gantry_agent::blk::inflight::InflightFile;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("blk-inflight");
    let in_flight_after = |shutdown: bool| {
        let socket = dir.path().join("blk.sock");
        let mut config = LayerStoreConfig::new(&socket);
        config.num_queues = 1;
        config.inflight_record = Some(record.clone());
        let device = LayerStoreDevice::start(config).expect("start device");
        let frontend = park_one_read(&device, &socket);
        if shutdown {
            device.shutdown();
        } else {
            drop(device); // the agent exits (an upgrade) with its VM running
        }
        drop(frontend);
        InflightFile::open(&record, 1)
            .unwrap()
            .queue(0)
            .unwrap()
            .in_flight()
            .len()
    };
    assert_eq!(
        in_flight_after(false),
        1,
        "the parked read waits for the next agent"
    );
    assert_eq!(
        in_flight_after(true),
        0,
        "a device shut down for good leaves nothing"
    );
}
