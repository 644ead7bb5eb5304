//! Unit tests of the layer-store device on in-memory virtqueues: the backend is driven exactly
//! as its worker threads drive it (`handle_event`), with a hand-written driver side so hostile
//! chains can be built descriptor by descriptor.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use proptest::prelude::*;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};
use vmm_sys_util::epoll::EventSet;

use super::fuzzing::{DriverRing, pattern};
use super::inflight::InflightFile;
use super::layer_store::{
    DEFAULT_CAPACITY, HEADER_OFFSET, HEADER_REGION_SIZE, LAYER_ALIGNMENT, LayerStore,
    LayerStoreError, TAIL_ZERO_SIZE,
};
use super::source::{BlockSource, FileSource};
use super::vhu_blk::{BlkBackend, wake_event};
use super::virtio_blk::{
    BlkConfig, MAX_CHAIN_DESCRIPTORS, ParseError, RawSegment, Request, RequestType, STATUS_IOERR,
    STATUS_OK, STATUS_UNSUPP,
};

const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x3000;
const USED_RING: u64 = 0x4000;
const INDIRECT_TABLE: u64 = 0x8000;
const BUFFERS: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x100_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

/// An in-memory source; optionally holds back one range until released.
#[derive(Debug)]
struct TestSource {
    bytes: Vec<u8>,
    gate: Mutex<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    held: Option<(u64, u64)>,
    waiters: Vec<Waker>,
    polls: usize,
}

impl TestSource {
    fn new(bytes: Vec<u8>) -> Arc<TestSource> {
        Arc::new(TestSource {
            bytes,
            gate: Mutex::new(Gate::default()),
        })
    }

    fn hold(&self, start: u64, end: u64) {
        self.gate.lock().unwrap().held = Some((start, end));
    }

    fn release(&self) {
        let waiters = {
            let mut gate = self.gate.lock().unwrap();
            gate.held = None;
            std::mem::take(&mut gate.waiters)
        };
        for waker in waiters {
            waker.wake();
        }
    }
}

impl BlockSource for TestSource {
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
            let mut gate = self.gate.lock().unwrap();
            gate.polls += 1;
            if let Some((start, end)) = gate.held
                && offset < end
                && offset + total > start
            {
                gate.waiters.push(waker.clone());
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

/// The driver side of one queue plus the backend under test.
struct Driver {
    mem: GuestMemoryMmap,
    vring: VringRwLock,
    backend: BlkBackend,
    store: LayerStore,
    next_desc: u16,
    avail_idx: u16,
    next_buffer: u64,
}

impl Driver {
    fn new(store: LayerStore) -> Driver {
        Driver::with_features(store, false)
    }

    fn with_features(store: LayerStore, event_idx: bool) -> Driver {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Driver::on_memory(mem, store, event_idx, None)
    }

    /// A driver on `mem` whose backend records requests in flight in `record`.
    fn on_memory(
        mem: GuestMemoryMmap,
        store: LayerStore,
        event_idx: bool,
        record: Option<Arc<InflightFile>>,
    ) -> Driver {
        let (vring, backend) = attach(&mem, &store, event_idx, record);
        Driver {
            mem,
            vring,
            backend,
            store,
            next_desc: 0,
            avail_idx: 0,
            next_buffer: BUFFERS,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer = (addr + len).next_multiple_of(64);
        assert!(
            self.next_buffer < MEM_SIZE as u64,
            "test ran out of buffer space"
        );
        addr
    }

    /// The driver's view of the ring (shared with the fuzz harness).
    fn ring(&self) -> DriverRing<'_> {
        DriverRing {
            mem: &self.mem,
            desc_table: DESC_TABLE,
            avail: AVAIL_RING,
            used: USED_RING,
            size: QUEUE_SIZE,
        }
    }

    fn write_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.ring().write_desc(table, index, addr, len, flags, next);
    }

    fn publish(&mut self, head: u16) {
        self.ring().publish(self.avail_idx, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Adds a chain of `(addr, len, writable)` descriptors, linked in order; returns its head.
    fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, writable)) in descs.iter().enumerate() {
            let index = self.next_desc;
            let last = i + 1 == descs.len();
            let flags = if *writable { W } else { 0 } | if last { 0 } else { N };
            let next = (index + 1) % QUEUE_SIZE;
            self.write_desc(DESC_TABLE, index, *addr, *len, flags, next);
            self.next_desc = next;
        }
        self.publish(head);
        head
    }

    fn header(&mut self, request_type: u32, sector: u64) -> u64 {
        let addr = self.alloc(16);
        self.mem
            .write_obj(request_type.to_le(), GuestAddress(addr))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(addr + 8))
            .unwrap();
        addr
    }

    /// Queues a read of `len` bytes at `sector`; returns (head, data address, status address).
    fn queue_read(&mut self, sector: u64, len: u32) -> (u16, u64, u64) {
        let header = self.header(VIRTIO_BLK_T_IN, sector);
        let data = self.alloc(u64::from(len));
        let status = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let head = self.add_chain(&[(header, 16, false), (data, len, true), (status, 1, true)]);
        (head, data, status)
    }

    fn kick(&self) {
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    fn wake(&self) {
        self.backend
            .handle_event(
                wake_event(1),
                EventSet::IN,
                std::slice::from_ref(&self.vring),
                0,
            )
            .unwrap();
    }

    /// Waits for `head` on the used ring: large reads complete on a helper thread, which wakes
    /// the queue (here, the test plays the queue thread's wake handling).
    fn settle(&self, head: u16) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.used().iter().any(|(id, _)| *id == head) {
            assert!(
                std::time::Instant::now() < deadline,
                "request {head} not completed"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
            self.wake();
        }
    }

    /// The used ring's entries so far: (descriptor head, used length).
    fn used(&self) -> Vec<(u16, u32)> {
        let ring = self.ring();
        (0..ring.used_idx())
            .map(|i| {
                let (id, len) = ring.used_elem(i);
                (id as u16, len)
            })
            .collect()
    }

    fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    /// Reads `len` bytes at device byte `offset`; returns (status, data).
    fn read(&mut self, offset: u64, len: u32) -> (u8, Vec<u8>) {
        let (head, data, status) = self.queue_read(offset / 512, len);
        self.kick();
        self.settle(head);
        (self.status(status), self.bytes(data, len as usize))
    }
}

/// What a frontend does when it (re)attaches: a backend over `store`, and the queue set up on
/// the driver's rings in `mem`.
fn attach(
    mem: &GuestMemoryMmap,
    store: &LayerStore,
    event_idx: bool,
    record: Option<Arc<InflightFile>>,
) -> (VringRwLock, BlkBackend) {
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let vring = VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap();
    vring.set_queue_size(QUEUE_SIZE);
    vring
        .set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING)
        .unwrap();
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let backend = BlkBackend::with_record(store.clone(), 1, 4096, 2, record).unwrap();
    backend.update_memory(atomic).unwrap();
    backend.set_event_idx(event_idx);
    (vring, backend)
}

fn store() -> LayerStore {
    LayerStore::new(DEFAULT_CAPACITY).unwrap()
}

#[test]
fn config_space_layout() {
    let config = BlkConfig {
        capacity_sectors: DEFAULT_CAPACITY / 512,
        seg_max: 126,
        blk_size: 4096,
        num_queues: 2,
    };
    let bytes = config.to_bytes();
    assert_eq!(&bytes[0..8], &(1u64 << 41).to_le_bytes());
    assert_eq!(&bytes[12..16], &126u32.to_le_bytes());
    assert_eq!(&bytes[20..24], &4096u32.to_le_bytes());
    assert_eq!(&bytes[34..36], &2u16.to_le_bytes());
    assert_eq!(config.read(20, 4), 4096u32.to_le_bytes());
    assert_eq!(config.read(0, 60).len(), 60);
    assert!(config.read(250, 10).is_empty(), "past the config space");
    assert!(config.read(u32::MAX, 2).is_empty(), "offset overflow");
}

#[test]
fn backend_offers_the_device_features() {
    let backend = BlkBackend::new(store(), 2, 4096, 0).unwrap();
    let features = backend.features();
    for bit in [32, 5, 6, 2, 12, 29, 28] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit} missing");
    }
    for bit in [9, 13, 14, 1, 11] {
        assert_eq!(
            features & (1 << bit),
            0,
            "feature bit {bit} must not be offered"
        );
    }
    assert_eq!(backend.num_queues(), 2);
    assert_eq!(backend.queues_per_thread(), vec![0b01, 0b10]);
    assert_eq!(backend.get_config(34, 2), 2u16.to_le_bytes());
}

#[test]
fn reads_a_mapped_layer_and_its_unaligned_tail() {
    let layer = pattern(3 * 4096 + 100, 7);
    let mut driver = Driver::new(store());
    let extent = driver
        .store
        .map_layer("sha256:aa", TestSource::new(layer.clone()))
        .unwrap();
    assert_eq!(extent.offset, HEADER_REGION_SIZE);

    let (status, data) = driver.read(extent.offset + 4096, 8192);
    assert_eq!(status, STATUS_OK);
    assert_eq!(data, &layer[4096..12288]);

    // The last block: 100 layer bytes, then zeros to the 4 KiB boundary.
    let (status, data) = driver.read(extent.offset + 3 * 4096, 4096);
    assert_eq!(status, STATUS_OK);
    assert_eq!(&data[..100], &layer[3 * 4096..]);
    assert!(data[100..].iter().all(|b| *b == 0));
    let used = driver.used();
    assert_eq!(used[0].1, 8192 + 1);

    // Past the last block: unmapped.
    let (status, _) = driver.read(extent.offset + 4 * 4096, 4096);
    assert_eq!(status, STATUS_IOERR);
}

#[test]
fn file_source_reads_into_guest_memory() {
    let layer = pattern(64 * 1024, 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.erofs");
    std::fs::write(&path, &layer).unwrap();
    let mut driver = Driver::new(store());
    let extent = driver
        .store
        .map_layer("sha256:bb", Arc::new(FileSource::open(&path).unwrap()))
        .unwrap();
    assert_eq!(extent.length, layer.len() as u64);

    // Several data descriptors: preadv into each.
    let header = driver.header(VIRTIO_BLK_T_IN, extent.offset / 512 + 1);
    let parts = [512u32, 4096, 1024, 2560];
    let addrs: Vec<u64> = parts
        .iter()
        .map(|len| driver.alloc(u64::from(*len)))
        .collect();
    let status = driver.alloc(1);
    let mut chain = vec![(header, 16, false)];
    chain.extend(
        addrs
            .iter()
            .zip(parts)
            .map(|(addr, len)| (*addr, len, true)),
    );
    chain.push((status, 1, true));
    driver.add_chain(&chain);
    driver.kick();
    assert_eq!(driver.status(status), STATUS_OK);
    let mut got = Vec::new();
    for (addr, len) in addrs.iter().zip(parts) {
        got.extend(driver.bytes(*addr, len as usize));
    }
    assert_eq!(got, &layer[512..512 + 8192]);
}

#[test]
fn header_region_lists_the_mapped_layers() {
    let mut driver = Driver::new(store());
    let a = driver
        .store
        .map_layer("sha256:aaaa", TestSource::new(vec![1; 5000]))
        .unwrap();
    let b = driver
        .store
        .map_layer("sha256:bbbb", TestSource::new(vec![2; 3 << 20]))
        .unwrap();
    assert_eq!(a.offset, 1 << 20);
    assert_eq!(b.offset, 2 << 20);

    let (status, data) = driver.read(0, 8192);
    assert_eq!(status, STATUS_OK);
    assert!(
        data[..4096].iter().all(|b| *b == 0),
        "first 4 KiB must be zeros"
    );
    let header = &data[4096..];
    assert_eq!(&header[0..8], b"GANTRYLS");
    assert_eq!(u32::from_le_bytes(header[8..12].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(header[12..16].try_into().unwrap()), 2);
    assert_eq!(
        u64::from_le_bytes(header[24..32].try_into().unwrap()),
        DEFAULT_CAPACITY
    );
    let entry = &header[32 + 128..32 + 256];
    assert_eq!(
        u64::from_le_bytes(entry[0..8].try_into().unwrap()),
        b.offset
    );
    assert_eq!(
        u64::from_le_bytes(entry[8..16].try_into().unwrap()),
        3 << 20
    );
    assert_eq!(u16::from_le_bytes(entry[16..18].try_into().unwrap()), 11);
    assert_eq!(&entry[18..29], b"sha256:bbbb");
    assert_eq!(driver.store.header(), &header[..32 + 256]);

    // The rest of the header region and the device's last MiB read as zeros.
    let (status, data) = driver.read(HEADER_REGION_SIZE - 4096, 4096);
    assert_eq!((status, data.iter().all(|b| *b == 0)), (STATUS_OK, true));
    let (status, data) = driver.read(DEFAULT_CAPACITY - 8192, 8192);
    assert_eq!((status, data.iter().all(|b| *b == 0)), (STATUS_OK, true));
    let (status, _) = driver.read(DEFAULT_CAPACITY - TAIL_ZERO_SIZE - 4096, 4096);
    assert_eq!(status, STATUS_IOERR);
}

#[test]
fn a_read_spanning_header_and_layer_is_served() {
    let layer = pattern(8192, 9);
    let mut driver = Driver::new(store());
    let extent = driver
        .store
        .map_layer("sha256:cc", TestSource::new(layer.clone()))
        .unwrap();
    let (status, data) = driver.read(extent.offset - 4096, 8192);
    assert_eq!(status, STATUS_OK);
    assert!(data[..4096].iter().all(|b| *b == 0));
    assert_eq!(&data[4096..], &layer[..4096]);
}

#[test]
fn unmapped_ranges_fail_and_offsets_are_never_reused() {
    let layer = pattern(1 << 20, 1);
    let mut driver = Driver::new(store());
    let first = driver
        .store
        .map_layer("sha256:dd", TestSource::new(layer.clone()))
        .unwrap();
    assert_eq!(driver.read(first.offset, 4096).0, STATUS_OK);

    let removed = driver.store.unmap_layer(first.offset).unwrap();
    assert_eq!(removed.extent, first);
    assert_eq!(driver.read(first.offset, 4096).0, STATUS_IOERR);
    assert_eq!(
        driver.store.unmap_layer(first.offset),
        Err(LayerStoreError::NotMapped(first.offset))
    );

    let second = driver
        .store
        .map_layer("sha256:dd", TestSource::new(layer))
        .unwrap();
    assert!(
        second.offset > first.offset,
        "offset {} reused",
        first.offset
    );
    assert_eq!(second.offset % LAYER_ALIGNMENT, 0);
    assert_eq!(driver.read(first.offset, 4096).0, STATUS_IOERR);
    assert_eq!(driver.read(second.offset, 4096).0, STATUS_OK);
}

#[test]
fn a_vm_cannot_read_a_layer_mapped_for_another() {
    let secret = pattern(1 << 20, 0x5e);
    let mut vm_a = Driver::new(store());
    let mut vm_b = Driver::new(store());
    let extent = vm_a
        .store
        .map_layer("sha256:secret", TestSource::new(secret.clone()))
        .unwrap();
    let (status, data) = vm_a.read(extent.offset, 4096);
    assert_eq!((status, &data[..]), (STATUS_OK, &secret[..4096]));

    // Same offset on B: nothing mapped there for B.
    let (status, data) = vm_b.read(extent.offset, 4096);
    assert_eq!(status, STATUS_IOERR);
    assert_ne!(&data[..], &secret[..4096]);

    // B's own layer lands at the same offset and serves B's bytes only.
    let own = pattern(4096, 0x01);
    let b_extent = vm_b
        .store
        .map_layer("sha256:own", TestSource::new(own.clone()))
        .unwrap();
    assert_eq!(b_extent.offset, extent.offset);
    let (status, data) = vm_b.read(b_extent.offset, 4096);
    assert_eq!((status, &data[..]), (STATUS_OK, &own[..]));
}

#[test]
fn refused_and_trivial_request_types() {
    let mut driver = Driver::new(store());
    let cases = [
        (VIRTIO_BLK_T_OUT, STATUS_IOERR),
        (VIRTIO_BLK_T_DISCARD, STATUS_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, STATUS_UNSUPP),
        (0x7777, STATUS_UNSUPP),
        (VIRTIO_BLK_T_FLUSH, STATUS_OK),
    ];
    for (request_type, expected) in cases {
        let header = driver.header(request_type, 2048);
        let data = driver.alloc(512);
        driver
            .mem
            .write_slice(&[0xab; 512], GuestAddress(data))
            .unwrap();
        let status = driver.alloc(1);
        let chain: Vec<(u64, u32, bool)> = if request_type == VIRTIO_BLK_T_FLUSH {
            vec![(header, 16, false), (status, 1, true)]
        } else {
            vec![(header, 16, false), (data, 512, false), (status, 1, true)]
        };
        driver.add_chain(&chain);
        driver.kick();
        assert_eq!(
            driver.status(status),
            expected,
            "request type {request_type}"
        );
    }
    // Nothing was written: the device's first sector still reads as zeros.
    let (status, data) = driver.read(0, 512);
    assert_eq!(status, STATUS_OK);
    assert!(data.iter().all(|b| *b == 0));
}

#[test]
fn get_id_returns_the_serial() {
    let mut driver = Driver::new(store());
    let header = driver.header(VIRTIO_BLK_T_GET_ID, 0);
    let data = driver.alloc(20);
    driver
        .mem
        .write_slice(&[0xee; 20], GuestAddress(data))
        .unwrap();
    let status = driver.alloc(1);
    let head = driver.add_chain(&[(header, 16, false), (data, 20, true), (status, 1, true)]);
    driver.kick();
    assert_eq!(driver.status(status), STATUS_OK);
    let mut expected = b"gantry-layers".to_vec();
    expected.resize(20, 0);
    assert_eq!(driver.bytes(data, 20), expected);
    assert_eq!(driver.used(), vec![(head, 21)]);
}

/// Hostile chains: each gets IOERR or is returned unused, and the queue goes on serving.
#[test]
fn hostile_chains_never_stop_the_queue() {
    let layer = pattern(1 << 20, 4);
    let mut driver = Driver::new(store());
    let extent = driver
        .store
        .map_layer("sha256:ee", TestSource::new(layer.clone()))
        .unwrap();
    let sector = extent.offset / 512;

    let mut expectations: Vec<(u16, Option<u64>, &str)> = Vec::new();

    // A loop: 0 -> 1 -> 0 -> ...
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let data = driver.alloc(4096);
    let base = driver.next_desc;
    driver.write_desc(DESC_TABLE, base, header, 16, N, base + 1);
    driver.write_desc(DESC_TABLE, base + 1, data, 4096, N | W, base);
    driver.next_desc = base + 2;
    driver.publish(base);
    expectations.push((base, None, "loop"));

    // `next` outside the table.
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let base = driver.next_desc;
    driver.write_desc(DESC_TABLE, base, header, 16, N, QUEUE_SIZE + 7);
    driver.next_desc = base + 1;
    driver.publish(base);
    expectations.push((base, None, "next out of range"));

    // Status byte in a device-readable descriptor.
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let status = driver.alloc(1);
    let head = driver.add_chain(&[(header, 16, false), (status, 1, false)]);
    expectations.push((head, None, "readable status"));

    // Readable data after writable data.
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let data = driver.alloc(4096);
    let other = driver.alloc(512);
    let status = driver.alloc(1);
    let head = driver.add_chain(&[
        (header, 16, false),
        (data, 4096, true),
        (other, 512, false),
        (status, 1, true),
    ]);
    expectations.push((head, Some(status), "readable after writable"));

    // Data buffer outside guest memory.
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let status = driver.alloc(1);
    let head = driver.add_chain(&[
        (header, 16, false),
        (MEM_SIZE as u64 - 2048, 4096, true),
        (status, 1, true),
    ]);
    expectations.push((head, Some(status), "data outside memory"));

    // A huge length.
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let status = driver.alloc(1);
    let head = driver.add_chain(&[
        (header, 16, false),
        (BUFFERS, u32::MAX - 511, true),
        (status, 1, true),
    ]);
    expectations.push((head, Some(status), "huge length"));

    // Sector arithmetic overflow, and a range past the end of the device.
    for sector in [u64::MAX / 256, DEFAULT_CAPACITY / 512 - 1] {
        let header = driver.header(VIRTIO_BLK_T_IN, sector);
        let data = driver.alloc(4096);
        let status = driver.alloc(1);
        let head = driver.add_chain(&[(header, 16, false), (data, 4096, true), (status, 1, true)]);
        expectations.push((head, Some(status), "sector out of range"));
    }

    // Length not a multiple of 512.
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let data = driver.alloc(1000);
    let status = driver.alloc(1);
    let head = driver.add_chain(&[(header, 16, false), (data, 1000, true), (status, 1, true)]);
    expectations.push((head, Some(status), "unaligned length"));

    // Short header.
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let data = driver.alloc(512);
    let status = driver.alloc(1);
    let head = driver.add_chain(&[(header, 8, false), (data, 512, true), (status, 1, true)]);
    expectations.push((head, Some(status), "short header"));

    // Header address outside guest memory.
    let data = driver.alloc(512);
    let status = driver.alloc(1);
    let head = driver.add_chain(&[
        (u64::MAX - 8, 16, false),
        (data, 512, true),
        (status, 1, true),
    ]);
    expectations.push((head, Some(status), "header outside memory"));

    // Status byte outside guest memory: nowhere to report.
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let head = driver.add_chain(&[(header, 16, false), (MEM_SIZE as u64 + 100, 1, true)]);
    expectations.push((head, None, "status outside memory"));

    // Too many descriptors (all valid otherwise).
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    let data = driver.alloc(512 * 200);
    let status = driver.alloc(1);
    let mut chain = vec![(header, 16, false)];
    chain.extend((0..200).map(|i| (data + i * 512, 512, true)));
    chain.push((status, 1, true));
    let head = driver.add_chain(&chain);
    expectations.push((head, None, "too many descriptors"));

    // An indirect table with a bad length (not a multiple of 16).
    let base = driver.next_desc;
    driver.write_desc(
        DESC_TABLE,
        base,
        INDIRECT_TABLE,
        40,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    driver.next_desc = base + 1;
    driver.publish(base);
    expectations.push((base, None, "bad indirect table"));

    // An indirect table that loops on itself.
    let header = driver.header(VIRTIO_BLK_T_IN, sector);
    driver.write_desc(INDIRECT_TABLE, 0, header, 16, N, 1);
    driver.write_desc(INDIRECT_TABLE, 1, BUFFERS, 512, N | W, 0);
    let base = driver.next_desc;
    driver.write_desc(
        DESC_TABLE,
        base,
        INDIRECT_TABLE,
        32,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    driver.next_desc = base + 1;
    driver.publish(base);
    expectations.push((base, None, "indirect loop"));

    // After all that, a good request.
    let (good_head, good_data, good_status) = driver.queue_read(sector, 4096);

    driver.kick();
    let used = driver.used();
    assert_eq!(
        used.len(),
        expectations.len() + 1,
        "every chain is returned: {used:?}"
    );
    for (head, status, what) in &expectations {
        let (_, len) = used
            .iter()
            .find(|(id, _)| id == head)
            .unwrap_or_else(|| panic!("{what}: chain {head} not returned"));
        match status {
            Some(status) => {
                assert_eq!(driver.status(*status), STATUS_IOERR, "{what}");
                assert_eq!(*len, 1, "{what}");
            }
            None => assert_eq!(*len, 0, "{what}: dropped chains report nothing"),
        }
    }
    assert_eq!(used.last(), Some(&(good_head, 4097)));
    assert_eq!(driver.status(good_status), STATUS_OK);
    assert_eq!(driver.bytes(good_data, 4096), &layer[..4096]);
}

#[test]
fn indirect_chains_are_served() {
    let layer = pattern(1 << 20, 6);
    let mut driver = Driver::new(store());
    let extent = driver
        .store
        .map_layer("sha256:ff", TestSource::new(layer.clone()))
        .unwrap();
    let header = driver.header(VIRTIO_BLK_T_IN, extent.offset / 512 + 8);
    let data = driver.alloc(8192);
    let status = driver.alloc(1);
    driver.write_desc(INDIRECT_TABLE, 0, header, 16, N, 1);
    driver.write_desc(INDIRECT_TABLE, 1, data, 8192, N | W, 2);
    driver.write_desc(INDIRECT_TABLE, 2, status, 1, W, 0);
    let base = driver.next_desc;
    driver.write_desc(
        DESC_TABLE,
        base,
        INDIRECT_TABLE,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    driver.next_desc = base + 1;
    driver.publish(base);
    driver.kick();
    assert_eq!(driver.status(status), STATUS_OK);
    assert_eq!(driver.bytes(data, 8192), &layer[4096..12288]);
    assert_eq!(driver.used(), vec![(base, 8193)]);
}

#[test]
fn any_layout_status_at_the_end_of_the_data_descriptor() {
    let layer = pattern(1 << 20, 8);
    let mut driver = Driver::new(store());
    let extent = driver
        .store
        .map_layer("sha256:ab", TestSource::new(layer.clone()))
        .unwrap();
    // Header split in two descriptors; data and status in one writable descriptor.
    let header = driver.header(VIRTIO_BLK_T_IN, extent.offset / 512);
    let buffer = driver.alloc(4097);
    driver.add_chain(&[
        (header, 10, false),
        (header + 10, 6, false),
        (buffer, 4097, true),
    ]);
    driver.kick();
    assert_eq!(driver.status(buffer + 4096), STATUS_OK);
    assert_eq!(driver.bytes(buffer, 4096), &layer[..4096]);
}

#[test]
fn a_request_for_a_missing_chunk_parks_while_others_complete() {
    let layer = pattern(4 << 20, 2);
    let source = TestSource::new(layer.clone());
    source.hold(1 << 20, 2 << 20); // the second MiB is "not yet fetched"
    let mut driver = Driver::with_features(store(), true);
    let extent = driver
        .store
        .map_layer("sha256:lazy", source.clone())
        .unwrap();

    // Touches the missing chunk: parks.
    let (slow, slow_data, slow_status) = driver.queue_read(extent.offset / 512 + 2040, 8192);
    let (fast, fast_data, fast_status) = driver.queue_read(extent.offset / 512, 4096);
    driver.kick();
    assert_eq!(
        driver.used(),
        vec![(fast, 4097)],
        "only the present chunk's request completes"
    );
    assert_eq!(driver.status(fast_status), STATUS_OK);
    assert_eq!(driver.bytes(fast_data, 4096), &layer[..4096]);
    assert_eq!(driver.status(slow_status), 0xff, "parked request untouched");
    assert_eq!(driver.backend.parked_requests(0), 1);

    // A spurious wake changes nothing.
    driver.wake();
    assert_eq!(driver.used().len(), 1);

    // More requests flow meanwhile.
    let (other, _, other_status) = driver.queue_read(extent.offset / 512 + 16, 4096);
    driver.kick();
    assert_eq!(driver.used().last(), Some(&(other, 4097)));
    assert_eq!(driver.status(other_status), STATUS_OK);

    // The chunk arrives: the source wakes the queue, the parked request completes.
    source.release();
    driver.wake();
    assert_eq!(driver.used().last(), Some(&(slow, 8193)));
    assert_eq!(driver.status(slow_status), STATUS_OK);
    let start = 2040 * 512;
    assert_eq!(driver.bytes(slow_data, 8192), &layer[start..start + 8192]);
    assert_eq!(driver.backend.parked_requests(0), 0);
}

#[test]
fn a_parked_head_published_again_is_dropped_not_parked_twice() {
    let layer = pattern(2 << 20, 3);
    let source = TestSource::new(layer.clone());
    source.hold(0, 2 << 20);
    let mut driver = Driver::with_features(store(), true);
    let extent = driver
        .store
        .map_layer("sha256:dup", source.clone())
        .unwrap();
    let (slow, slow_data, slow_status) = driver.queue_read(extent.offset / 512, 4096);
    driver.kick();
    assert_eq!(driver.backend.parked_requests(0), 1);
    // A hostile guest publishes the parked head again, many times.
    for _ in 0..100 {
        driver.publish(slow);
    }
    driver.kick();
    assert_eq!(
        driver.backend.parked_requests(0),
        1,
        "no second copy parked"
    );
    assert!(
        driver.used().is_empty(),
        "nothing answered for the duplicates"
    );
    source.release();
    driver.wake();
    assert_eq!(driver.used(), vec![(slow, 4097)], "the head completes once");
    assert_eq!(driver.status(slow_status), STATUS_OK);
    assert_eq!(driver.bytes(slow_data, 4096), &layer[..4096]);
}

#[test]
fn large_reads_are_copied_by_helpers_and_can_park_there() {
    let layer = pattern(4 << 20, 12);
    let source = TestSource::new(layer.clone());
    source.hold(3 << 20, 4 << 20);
    let mut driver = Driver::new(store());
    let extent = driver
        .store
        .map_layer("sha256:big", source.clone())
        .unwrap();

    // A 1 MiB read of present data, through a helper.
    let (status, data) = driver.read(extent.offset, 1 << 20);
    assert_eq!(status, STATUS_OK);
    assert_eq!(data, &layer[..1 << 20]);

    // A 1 MiB read of the missing MiB: the helper parks it on the queue.
    let (slow, slow_data, slow_status) =
        driver.queue_read((extent.offset + (3 << 20)) / 512, 1 << 20);
    driver.kick();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while driver.backend.parked_requests(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "never parked");
        std::thread::sleep(std::time::Duration::from_millis(1));
        driver.wake();
    }
    assert!(!driver.used().iter().any(|(id, _)| *id == slow));
    source.release();
    driver.settle(slow);
    assert_eq!(driver.used().last(), Some(&(slow, (1 << 20) + 1)));
    assert_eq!(driver.status(slow_status), STATUS_OK);
    assert_eq!(driver.bytes(slow_data, 1 << 20), &layer[3 << 20..]);
}

#[test]
fn a_parked_request_fails_if_its_layer_is_unmapped_or_the_queue_stops() {
    let layer = pattern(2 << 20, 2);
    let source = TestSource::new(layer);
    source.hold(0, 2 << 20);
    let mut driver = Driver::new(store());
    let extent = driver
        .store
        .map_layer("sha256:gone", source.clone())
        .unwrap();

    let (first, _, first_status) = driver.queue_read(extent.offset / 512, 4096);
    driver.kick();
    assert!(driver.used().is_empty());
    driver.store.unmap_layer(extent.offset).unwrap();
    source.release();
    driver.wake();
    assert_eq!(driver.used(), vec![(first, 1)]);
    assert_eq!(driver.status(first_status), STATUS_IOERR);

    // Stopping the queue fails what is parked.
    let extent = driver
        .store
        .map_layer("sha256:gone2", source.clone())
        .unwrap();
    source.hold(0, 2 << 20);
    let (second, _, second_status) = driver.queue_read(extent.offset / 512, 4096);
    driver.kick();
    assert_eq!(driver.backend.parked_requests(0), 1);
    driver.backend.stop_vring(0).unwrap();
    assert_eq!(driver.backend.parked_requests(0), 0);
    assert_eq!(driver.used().last(), Some(&(second, 1)));
    assert_eq!(driver.status(second_status), STATUS_IOERR);
}

#[test]
fn mapping_while_queues_run_from_other_threads() {
    // Map and unmap on one thread while another reads: every read of the stable layer succeeds,
    // and the churned range is either served correctly or refused.
    let stable = pattern(1 << 20, 11);
    let store = store();
    let extent = store
        .map_layer("sha256:stable", TestSource::new(stable.clone()))
        .unwrap();
    let churn_store = store.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn_stop = stop.clone();
    let churn = std::thread::spawn(move || {
        let mut offsets = BTreeSet::new();
        while !churn_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let e = churn_store
                .map_layer("sha256:churn", TestSource::new(vec![9; 8192]))
                .unwrap();
            assert!(offsets.insert(e.offset), "offset reused");
            churn_store.unmap_layer(e.offset).unwrap();
        }
        offsets.len()
    });
    let mut driver = Driver::new(store);
    for i in 0..200u64 {
        let offset = extent.offset + (i % 256) * 4096;
        let (status, data) = driver.read(offset, 4096);
        assert_eq!(status, STATUS_OK);
        let start = ((i % 256) * 4096) as usize;
        assert_eq!(data, &stable[start..start + 4096]);
        if driver.next_buffer > (MEM_SIZE as u64) - (1 << 20) {
            driver.next_buffer = BUFFERS;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(churn.join().unwrap() > 0);
}

#[test]
fn layer_store_rejects_bad_layers_and_capacities() {
    assert!(LayerStore::new(3 << 20).is_ok());
    assert_eq!(
        LayerStore::new((3 << 20) - 1).err(),
        Some(LayerStoreError::InvalidCapacity((3 << 20) - 1))
    );
    assert!(LayerStore::new(2 << 20).is_err());
    let small = LayerStore::new(4 << 20).unwrap();
    assert!(matches!(
        small.map_layer("sha256:x", TestSource::new(Vec::new())),
        Err(LayerStoreError::EmptyLayer { .. })
    ));
    assert_eq!(
        small.map_layer("", TestSource::new(vec![1])),
        Err(LayerStoreError::InvalidDigest)
    );
    assert_eq!(
        small.map_layer(&"x".repeat(200), TestSource::new(vec![1])),
        Err(LayerStoreError::InvalidDigest)
    );
    // 4 MiB device: header (1), two 1 MiB layers, tail (1).
    let a = small
        .map_layer("sha256:a", TestSource::new(vec![1; 1 << 20]))
        .unwrap();
    let b = small
        .map_layer("sha256:b", TestSource::new(vec![1; 1]))
        .unwrap();
    assert_eq!((a.offset, b.offset), (1 << 20, 2 << 20));
    assert_eq!(
        small.map_layer("sha256:c", TestSource::new(vec![1; 1])),
        Err(LayerStoreError::AddressSpaceExhausted)
    );
    small.unmap_layer(b.offset).unwrap();
    assert_eq!(
        small.map_layer("sha256:c", TestSource::new(vec![1; 1])),
        Err(LayerStoreError::AddressSpaceExhausted),
        "unmapping does not give the range back"
    );
    assert_eq!(small.layers().len(), 1);
}

#[test]
fn header_fits_the_header_region() {
    use super::layer_store::{HEADER_ENTRY_SIZE, HEADER_FIXED_SIZE, MAX_MAPPED_LAYERS};
    let end = HEADER_OFFSET as usize + HEADER_FIXED_SIZE + MAX_MAPPED_LAYERS * HEADER_ENTRY_SIZE;
    assert!(end <= HEADER_REGION_SIZE as usize);
}

// --- parsing properties -------------------------------------------------------------------

fn parse_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x20000), 0x10000),
    ])
    .unwrap()
}

fn segment_strategy() -> impl Strategy<Value = RawSegment> {
    let addr = prop_oneof![
        0u64..0x40000,
        Just(0x10000 - 8),
        Just(u64::MAX - 4),
        any::<u64>(),
    ];
    let len = prop_oneof![
        0u32..9000,
        Just(16),
        Just(512),
        Just(4096),
        Just(1),
        any::<u32>()
    ];
    (addr, len, any::<bool>(), prop::bool::weighted(0.05)).prop_map(
        |(addr, len, writable, has_next)| RawSegment {
            addr,
            len,
            writable,
            has_next,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any sequence of descriptors and any header bytes: parse never panics, and what it
    /// accepts is well-formed.
    #[test]
    fn parse_accepts_only_well_formed_requests(
        segments in prop::collection::vec(segment_strategy(), 0..140),
        header_type in prop_oneof![0u32..16, any::<u32>()],
        sector in prop_oneof![0u64..100_000, any::<u64>()],
        capacity in prop_oneof![Just(1u64 << 50), 0u64..(1 << 30)],
    ) {
        let mem = parse_memory();
        for segment in segments.iter().filter(|s| !s.writable).take(1) {
            let _ = mem.write_obj(header_type.to_le(), GuestAddress(segment.addr));
            let _ = mem.write_obj(sector.to_le(), GuestAddress(segment.addr.wrapping_add(8)));
        }
        match Request::parse(segments.iter().copied(), &mem, capacity) {
            Ok(request) => {
                prop_assert!(segments.len() <= MAX_CHAIN_DESCRIPTORS);
                prop_assert!(mem.check_range(request.status, 1));
                if request.request_type == RequestType::In {
                    prop_assert_eq!(request.data_len % 512, 0);
                    let (start, end) = request.byte_range();
                    prop_assert!(start <= end && end <= capacity);
                    prop_assert_eq!(start.checked_add(request.data_len), Some(end));
                }
                let total: u64 = request.data.iter().map(|s| u64::from(s.len)).sum();
                prop_assert_eq!(total, request.data_len);
                for segment in &request.data {
                    prop_assert!(mem.check_range(segment.addr, segment.len as usize));
                }
            }
            Err(rejected) => {
                if let Some(status) = rejected.status {
                    prop_assert!(mem.check_range(status, 1));
                }
            }
        }
    }
}

#[test]
fn parse_rejects_each_malformation_precisely() {
    let mem = parse_memory();
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x100)).unwrap();
    mem.write_obj(8u64, GuestAddress(0x108)).unwrap();
    let seg = |addr, len, writable| RawSegment {
        addr,
        len,
        writable,
        has_next: false,
    };
    let good = [
        seg(0x100, 16, false),
        seg(0x1000, 4096, true),
        seg(0x3000, 1, true),
    ];
    let request = Request::parse(good, &mem, 1 << 20).unwrap();
    assert_eq!(request.request_type, RequestType::In);
    assert_eq!(request.byte_range(), (4096, 8192));
    assert_eq!(request.status, GuestAddress(0x3000));

    let error = |segments: &[RawSegment], capacity| {
        Request::parse(segments.iter().copied(), &mem, capacity).unwrap_err()
    };
    assert_eq!(error(&[], 1 << 20).error, ParseError::Empty);
    assert_eq!(error(&good, 4096).error, ParseError::OutOfRange);
    let mut truncated = good;
    truncated[2].has_next = true;
    assert_eq!(error(&truncated, 1 << 20).error, ParseError::Truncated);
    let short = [
        seg(0x100, 15, false),
        seg(0x1000, 512, true),
        seg(0x3000, 1, true),
    ];
    assert_eq!(error(&short, 1 << 20).error, ParseError::ShortHeader);
    let extra = [
        seg(0x100, 32, false),
        seg(0x1000, 512, true),
        seg(0x3000, 1, true),
    ];
    assert_eq!(error(&extra, 1 << 20).error, ParseError::UnexpectedReadable);
    let unaligned = [
        seg(0x100, 16, false),
        seg(0x1000, 513, true),
        seg(0x3000, 1, true),
    ];
    assert_eq!(
        error(&unaligned, 1 << 20).error,
        ParseError::UnalignedLength(513)
    );
    let gap = [
        seg(0x100, 16, false),
        seg(0x10000, 512, true),
        seg(0x3000, 1, true),
    ];
    assert_eq!(error(&gap, 1 << 20).error, ParseError::OutsideMemory);
    assert_eq!(error(&gap, 1 << 20).status, Some(GuestAddress(0x3000)));
    let no_status = [seg(0x100, 16, false), seg(0x1000, 512, false)];
    assert_eq!(
        error(&no_status, 1 << 20),
        super::virtio_blk::Rejected {
            error: ParseError::NoStatus,
            status: None,
        }
    );
}

/// Regression (found by the `blk_queue` fuzz target): with `EVENT_IDX`, an available index more
/// than a queue size ahead of the device made `enable_notification` report work forever while
/// nothing could be popped, and the queue thread spun at 100% CPU.
#[test]
fn an_available_index_out_of_range_does_not_spin_the_queue() {
    let driver = Driver::with_features(store(), true);
    driver.ring().set_avail_idx(QUEUE_SIZE + 2);
    let (done, finished) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        driver.kick();
        let _ = done.send(());
        driver
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the queue thread returns from a kick with a bad available index");
    let mut driver = worker.join().unwrap();
    assert!(driver.used().is_empty());
    // The driver repairs its index: the queue serves again.
    driver.ring().set_avail_idx(0);
    driver.avail_idx = 0;
    let (status, data) = driver.read(0, 512);
    assert_eq!((status, data), (STATUS_OK, vec![0; 512]));
}

/// Guest memory backed by a file, as QEMU's memfd backs it (the inflight record knows a guest by
/// that file).
fn file_backed_memory() -> (GuestMemoryMmap, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(MEM_SIZE as u64).unwrap();
    let backing = vm_memory::FileOffset::new(file.reopen().unwrap(), 0);
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE,
        Some(backing),
    )])
    .unwrap();
    (mem, file)
}

#[test]
fn a_restarted_backend_resumes_what_was_in_flight_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let record_path = dir.path().join("inflight");
    let layer = pattern(4 << 20, 7);
    let source = TestSource::new(layer.clone());
    source.hold(1 << 20, 2 << 20);
    let (mem, _backing) = file_backed_memory();
    let store = store();
    let extent = store.map_layer("sha256:lazy", source.clone()).unwrap();
    let sector = |offset: u64| (extent.offset + offset) / 512;
    let record = Arc::new(InflightFile::open(&record_path, 1).unwrap());
    let mut driver = Driver::on_memory(mem.clone(), store.clone(), true, Some(record));

    // Parks (its chunk is missing), completes, then a large read (a helper copies it) parks too.
    let (slow, slow_data, slow_status) = driver.queue_read(sector(1 << 20), 8192);
    let (fast, fast_data, _) = driver.queue_read(sector(0), 4096);
    let (large, large_data, large_status) = driver.queue_read(sector((1 << 20) + 65536), 256 << 10);
    driver.kick();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while driver.backend.parked_requests(0) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the large read never parked"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
        driver.wake();
    }
    assert_eq!(driver.used(), vec![(fast, 4097)]);
    // Published after the last kick: never popped by this backend.
    let (late, late_data, late_status) = driver.queue_read(sector(8192), 4096);

    // The agent dies: no stop, nothing failed, the record keeps what it has.
    let used_at_crash = driver.ring().used_idx();
    driver.backend = BlkBackend::new(store.clone(), 1, 4096, 0).unwrap();

    // A new agent opens the record; the frontend re-attaches and, having lost the backend's
    // position, restarts the queue at the used index (QEMU 7.2's restore); the chunk arrived.
    source.release();
    let record = Arc::new(InflightFile::open(&record_path, 1).unwrap());
    let (vring, backend) = attach(&mem, &store, true, Some(record.clone()));
    vring.set_queue_next_avail(used_at_crash);
    vring.set_queue_next_used(used_at_crash);
    driver.vring = vring;
    driver.backend = backend;
    driver.kick();
    driver.settle(slow);
    driver.settle(large);
    driver.settle(late);

    let used = driver.used();
    for head in [slow, fast, large, late] {
        assert_eq!(
            used.iter().filter(|(id, _)| *id == head).count(),
            1,
            "head {head} used exactly once: {used:?}"
        );
    }
    assert_eq!(used.len(), 4);
    for (status, data, offset, len) in [
        (slow_status, slow_data, 1 << 20, 8192),
        (large_status, large_data, (1 << 20) + 65536, 256 << 10),
        (late_status, late_data, 8192, 4096),
    ] {
        assert_eq!(driver.status(status), STATUS_OK);
        assert_eq!(driver.bytes(data, len), &layer[offset..offset + len]);
    }
    assert_eq!(driver.bytes(fast_data, 4096), &layer[..4096]);
    assert!(record.queue(0).unwrap().in_flight().is_empty());
}

#[test]
fn a_clean_stop_or_another_guest_resumes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let record_path = dir.path().join("inflight");
    let layer = pattern(2 << 20, 9);
    let source = TestSource::new(layer);
    source.hold(0, 2 << 20);
    let (mem, _backing) = file_backed_memory();
    let store = store();
    let extent = store.map_layer("sha256:lazy", source.clone()).unwrap();
    let record = Arc::new(InflightFile::open(&record_path, 1).unwrap());
    let mut driver = Driver::on_memory(mem.clone(), store.clone(), false, Some(record.clone()));
    let (slow, _, slow_status) = driver.queue_read(extent.offset / 512, 4096);
    driver.kick();
    assert_eq!(record.queue(0).unwrap().in_flight(), vec![slow]);

    // The frontend stops the queue (a guest reset): the parked read fails, the record empties.
    driver.backend.stop_vring(0).unwrap();
    assert_eq!(driver.status(slow_status), STATUS_IOERR);
    assert!(record.queue(0).unwrap().in_flight().is_empty());

    // Another guest (another memory file) on the same record starts afresh.
    let (slow, _, _) = driver.queue_read(extent.offset / 512, 4096);
    driver.kick();
    assert_eq!(record.queue(0).unwrap().in_flight(), vec![slow]);
    let (other_mem, _other_backing) = file_backed_memory();
    let (vring, backend) = attach(&other_mem, &store, false, Some(record.clone()));
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    assert!(
        record.queue(0).unwrap().in_flight().is_empty(),
        "nothing of the first guest is resubmitted into the second"
    );
}

#[test]
fn restored_layers_keep_their_offsets_and_fresh_ones_go_past_them() {
    let first = store();
    let a = TestSource::new(pattern(3 << 20, 1));
    let b = TestSource::new(pattern(1 << 20, 2));
    let at_a = first.map_layer("sha256:a", a.clone()).unwrap();
    let at_b = first.map_layer("sha256:b", b.clone()).unwrap();
    let (next, generation) = first.position();

    // A new agent puts both back where they were, and continues after them.
    let second = store();
    second.restore_position(next, generation);
    assert_eq!(
        second
            .restore_layer("sha256:b", at_b.offset, b.clone())
            .unwrap(),
        at_b
    );
    assert_eq!(
        second
            .restore_layer("sha256:a", at_a.offset, a.clone())
            .unwrap(),
        at_a
    );
    assert_eq!(
        second.header(),
        first.header(),
        "the guest reads the same header"
    );
    let c = second
        .map_layer("sha256:c", TestSource::new(pattern(4096, 3)))
        .unwrap();
    assert!(c.offset >= next, "a fresh layer never reuses an offset");

    for bad in [
        at_a.offset,
        at_a.offset + (1 << 20),
        at_a.offset + 4096,
        0,
        DEFAULT_CAPACITY,
    ] {
        assert!(
            matches!(
                second.restore_layer("sha256:x", bad, b.clone()),
                Err(LayerStoreError::NotRestorable(_))
            ),
            "offset {bad:#x} must be refused"
        );
    }
}

#[test]
fn requests_are_counted_by_op_with_bytes_errors_and_parking() {
    use crate::metrics::tests::sample;
    let metrics = crate::metrics::Metrics::new();
    let store = LayerStore::with_metrics(DEFAULT_CAPACITY, metrics.vm("vm0").blk).unwrap();
    let layer = pattern(2 << 20, 9);
    let source = TestSource::new(layer);
    source.hold(1 << 20, 2 << 20);
    let mut driver = Driver::new(store);
    let extent = driver
        .store
        .map_layer("sha256:counted", source.clone())
        .unwrap();
    let vm = [("vm", "vm0")];
    let requests = |op: &str| {
        sample(
            &metrics,
            "gantry_blk_requests_total",
            &[("vm", "vm0"), ("op", op)],
        )
    };

    // A present read, then one that parks until its chunk arrives.
    assert_eq!(driver.read(extent.offset, 4096).0, STATUS_OK);
    let (slow, _, slow_status) = driver.queue_read((extent.offset + (1 << 20)) / 512, 8192);
    driver.kick();
    assert_eq!(
        requests("read"),
        Some(1.0),
        "a parked read is not complete yet"
    );
    assert_eq!(sample(&metrics, "gantry_blk_parked_total", &vm), Some(1.0));
    driver.wake();
    assert_eq!(
        sample(&metrics, "gantry_blk_parked_total", &vm),
        Some(1.0),
        "a request parks once, however often it is retried"
    );
    source.release();
    driver.wake();
    driver.settle(slow);
    assert_eq!(driver.status(slow_status), STATUS_OK);
    assert_eq!(requests("read"), Some(2.0));
    assert_eq!(
        sample(&metrics, "gantry_blk_read_bytes_total", &vm),
        Some(4096.0 + 8192.0)
    );

    // A refused write and a chain that does not parse are errors.
    let header = driver.header(VIRTIO_BLK_T_OUT, 2048);
    let data = driver.alloc(512);
    let status = driver.alloc(1);
    let write = driver.add_chain(&[(header, 16, false), (data, 512, false), (status, 1, true)]);
    let header = driver.header(VIRTIO_BLK_T_IN, 2048);
    let readable_status = driver.alloc(1);
    let malformed = driver.add_chain(&[(header, 16, false), (readable_status, 1, false)]);
    driver.kick();
    driver.settle(write);
    driver.settle(malformed);
    assert_eq!(driver.status(status), STATUS_IOERR);
    assert_eq!(requests("write"), Some(1.0));
    assert_eq!(requests("malformed"), Some(1.0));
    assert_eq!(sample(&metrics, "gantry_blk_errors_total", &vm), Some(2.0));
    assert_eq!(
        sample(&metrics, "gantry_blk_request_duration_seconds_count", &vm),
        Some(3.0)
    );
}
