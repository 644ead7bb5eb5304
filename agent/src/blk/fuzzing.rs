//! The property the `blk_queue` fuzz target checks (`agent/fuzz/`), shared with the corpus
//! regression test (`agent/tests/fuzz_corpus.rs`): hostile descriptor chains on a virtqueue are
//! parsed and executed by the real backend ([`BlkBackend::handle_event`], as a queue thread runs
//! it) against a small [`LayerStore`], and every completion is compared with a model written
//! independently from the virtio spec and `shared/DESIGN.md` §3.
//!
//! The fuzz input is a program for a hostile driver (see [`check_blk_input`]): it writes
//! descriptors (any address, length, flags and `next`, in the descriptor table or in indirect
//! tables), request headers and available-ring entries, kicks the queue, releases a layer whose
//! data was "not yet fetched", maps and unmaps layers, and stops the queue. Checked on every
//! completion:
//! - nothing panics and every used element names a head the driver made available;
//! - the used length never exceeds the writable bytes of the chain;
//! - a chain is completed exactly as the model says: returned unused when it has no place for a
//!   status byte, `IOERR` for malformed chains, unmapped ranges and writes, `UNSUPP` for
//!   unknown types, `OK` with the right bytes for reads of mapped ranges (unmapped reads are
//!   `IOERR`, always), the device id for `GET_ID`;
//! - a request parked on a missing chunk completes (`OK` or `IOERR`) once released or when the
//!   queue stops.
//!
//! Where a chain's device-writable buffers overlap what the device reads (descriptor tables,
//! rings, headers), the model cannot predict the outcome and only "no panic" is checked for that
//! kick (and nothing more once the used ring itself was overwritten).

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Poll, Waker};

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};
use vmm_sys_util::epoll::EventSet;

use super::layer_store::{
    EXTENT_BLOCK, Extent, HEADER_OFFSET, HEADER_REGION_SIZE, LayerStore, TAIL_ZERO_SIZE,
};
use super::source::{BlockSource, FileSource};
use super::vhu_blk::{BlkBackend, wake_event};
use super::virtio_blk::{
    HEADER_SIZE, MAX_CHAIN_DESCRIPTORS, SECTOR_SIZE, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
    device_id_bytes,
};
use crate::fuzz_input::Input;

/// `VRING_DESC_F_NEXT`.
pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// `VRING_DESC_F_WRITE`.
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// `VRING_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Largest queue the harness sets up (the descriptor table has room for it).
pub const MAX_QUEUE: u16 = 256;
/// The descriptor table.
pub const DESC_TABLE: u64 = 0x0;
/// The available ring.
pub const AVAIL_RING: u64 = 0x1000;
/// The used ring.
pub const USED_RING: u64 = 0x2000;
/// Two indirect tables of up to 128 descriptors each.
pub const INDIRECT_TABLES: [u64; 2] = [0x3000, 0x3800];
/// End of the queue structures; buffers come after.
pub const QUEUE_AREA_END: u64 = 0x4000;
/// Where request buffers are allocated.
pub const BUFFERS: u64 = QUEUE_AREA_END;
/// End of the buffer area (two adjacent regions, so buffers may straddle them).
pub const BUFFERS_END: u64 = 0x2_0000;
/// Guest memory: two adjacent 64 KiB regions, a hole, then a 32 KiB region.
pub const MEMORY: [(u64, usize); 3] = [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x3_0000, 0x8000)];
/// The third region's start.
pub const HIGH_REGION: u64 = 0x3_0000;
/// The device's capacity: header region, room for a few layers, the zero tail.
pub const CAPACITY: u64 = 16 << 20;
/// Length of layer A (a [`FileSource`]): not a multiple of 4 KiB.
pub const LAYER_A_LEN: usize = 3 * 4096 + 100;
/// Length of layer B (a source whose data is "not yet fetched" until released).
pub const LAYER_B_LEN: usize = 8192 + 3;

/// A layer of `len` bytes whose byte at offset `i` is a function of `i` and `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(u64::from(seed)) as u8 ^ (i >> 12) as u8)
        .collect()
}

/// The driver's side of one split virtqueue in guest memory: descriptors, the available ring,
/// and what the device put on the used ring. Writes outside guest memory are ignored (a hostile
/// driver may aim anywhere).
#[derive(Debug, Clone, Copy)]
pub struct DriverRing<'m> {
    /// Guest memory.
    pub mem: &'m GuestMemoryMmap,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Queue size (slots of both rings).
    pub size: u16,
}

impl DriverRing<'_> {
    /// Writes descriptor `index` of the table at `table`.
    pub fn write_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self
            .mem
            .write_slice(&raw, GuestAddress(table + u64::from(index) * 16));
    }

    /// Puts `head` in available slot `position % size`, then sets the available index to
    /// `position + 1`.
    pub fn publish(&self, position: u16, head: u16) {
        let slot = u64::from(position % self.size.max(1));
        let _ = self
            .mem
            .write_obj(head.to_le(), GuestAddress(self.avail + 4 + slot * 2));
        self.set_avail_idx(position.wrapping_add(1));
    }

    /// Sets the available index.
    pub fn set_avail_idx(&self, idx: u16) {
        let _ = self
            .mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2));
    }

    /// The available index as it is in memory.
    pub fn avail_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(self.avail + 2))
            .map_or(0, u16::from_le)
    }

    /// The head in available slot `position % size`.
    pub fn avail_entry(&self, position: u16) -> u16 {
        let slot = u64::from(position % self.size.max(1));
        self.mem
            .read_obj::<u16>(GuestAddress(self.avail + 4 + slot * 2))
            .map_or(0, u16::from_le)
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(self.used + 2))
            .map_or(0, u16::from_le)
    }

    /// Used element `n` (modulo the size): (descriptor head, used length).
    pub fn used_elem(&self, n: u16) -> (u32, u32) {
        let at = self.used + 4 + u64::from(n % self.size.max(1)) * 8;
        let id = self.mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(0);
        let len = self.mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap_or(0);
        (u32::from_le(id), u32::from_le(len))
    }
}

/// A layer source whose bytes are "not yet fetched" while held: reads answer
/// [`Poll::Pending`] and keep the waker until [`GatedSource::release`].
#[derive(Debug)]
pub struct GatedSource {
    bytes: Vec<u8>,
    gate: Mutex<(bool, Vec<Waker>)>,
}

impl GatedSource {
    /// A source over `bytes`, held or not.
    pub fn new(bytes: Vec<u8>, held: bool) -> Arc<GatedSource> {
        Arc::new(GatedSource {
            bytes,
            gate: Mutex::new((held, Vec::new())),
        })
    }

    /// Whether reads are held back.
    pub fn is_held(&self) -> bool {
        crate::sync::lock(&self.gate).0
    }

    /// Lets reads through and wakes every parked reader.
    pub fn release(&self) {
        let waiters = {
            let mut gate = crate::sync::lock(&self.gate);
            gate.0 = false;
            std::mem::take(&mut gate.1)
        };
        for waker in waiters {
            waker.wake();
        }
    }
}

impl BlockSource for GatedSource {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        waker: &Waker,
    ) -> Poll<io::Result<()>> {
        {
            let mut gate = crate::sync::lock(&self.gate);
            if gate.0 {
                gate.1.push(waker.clone());
                return Poll::Pending;
            }
        }
        let mut at = usize::try_from(offset).unwrap_or(usize::MAX);
        for buf in bufs {
            let Some(bytes) = at
                .checked_add(buf.len())
                .and_then(|end| self.bytes.get(at..end))
            else {
                return Poll::Ready(Err(io::Error::other("read past the gated source")));
            };
            buf.copy_from(bytes);
            at += buf.len();
        }
        Poll::Ready(Ok(()))
    }
}

/// Layer A's file: created once per process on tmpfs (when there is one), then unlinked.
/// Layer A's bytes ([`pattern`] of [`LAYER_A_LEN`]), built once.
fn layer_a_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| pattern(LAYER_A_LEN, 0xa5))
}

/// Layer B's bytes ([`pattern`] of [`LAYER_B_LEN`]), built once.
fn layer_b_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| pattern(LAYER_B_LEN, 0x5b))
}

fn layer_a() -> Arc<FileSource> {
    static SOURCE: OnceLock<Arc<FileSource>> = OnceLock::new();
    SOURCE
        .get_or_init(|| {
            let base = std::env::var_os("GANTRY_FUZZ_DIR")
                .map(PathBuf::from)
                .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
                .unwrap_or_else(std::env::temp_dir);
            let path = base.join(format!("gantry-blk-fuzz-{}.layer", std::process::id()));
            let mut file = File::create(&path).expect("creating the layer file");
            file.write_all(layer_a_bytes())
                .expect("writing the layer file");
            let source = FileSource::open(&path).expect("opening the layer file");
            let _ = std::fs::remove_file(&path);
            Arc::new(source)
        })
        .clone()
}

/// Operations of the input program (the first byte of each, modulo the count).
pub mod op {
    /// `table u8, index u8, addr, len, flags u16, next u16`: writes one descriptor. `table` 0
    /// is the descriptor table, 1 and 2 the indirect tables.
    pub const DESC: u8 = 0;
    /// `addr, type, sector`: writes a 16-byte request header.
    pub const HEADER: u8 = 1;
    /// `head u16`: makes a chain available.
    pub const AVAIL: u8 = 2;
    /// `delta u16`: moves the available index (a driver lying about it).
    pub const AVAIL_IDX: u8 = 3;
    /// Kicks the queue: the backend serves what is available.
    pub const KICK: u8 = 4;
    /// Layer B's data arrives: the source is released and the queue woken.
    pub const RELEASE: u8 = 5;
    /// `which u8`: unmaps layer A or B (even `which`: A), or maps it again if unmapped.
    pub const REMAP: u8 = 6;
    /// The frontend stops the queue: parked requests fail.
    pub const STOP: u8 = 7;
    /// `type, sector, flags u8, segments u8, lengths u16...`: a well-formed request, laid out
    /// by the harness (flags bit 0: in an indirect table; bit 1: status byte at the end of the
    /// last data buffer; bit 2: kick after it).
    pub const REQUEST: u8 = 8;
    /// Number of operations.
    pub const COUNT: u8 = 9;
}

/// Encodings of the operands (for seeds: see [`seeds`]).
pub mod enc {
    /// Address selectors (then a `u16` operand; `RAW` reads a `u64` instead).
    pub const ADDR_BUFFER: u8 = 0;
    /// In the high region (past its end for operands of 0x8000 and more).
    pub const ADDR_HIGH: u8 = 1;
    /// Inside the queue structures.
    pub const ADDR_QUEUE: u8 = 2;
    /// Any address.
    pub const ADDR_RAW: u8 = 3;
    /// Length selectors (then a `u16` operand): the operand itself.
    pub const LEN_RAW16: u8 = 0;
    /// `(operand % 64) * 512`, plus one if bit 2 of the selector is set.
    pub const LEN_SECTORS: u8 = 1;
    /// 16 (a header).
    pub const LEN_HEADER: u8 = 2;
    /// A raw `u32` (read instead of the `u16`).
    pub const LEN_RAW32: u8 = 3;
    /// Request types (selector byte, modulo 8; 7 reads a raw `u32`).
    pub const TYPES: [u32; 7] = [
        super::VIRTIO_BLK_T_IN,
        super::VIRTIO_BLK_T_IN,
        super::VIRTIO_BLK_T_IN,
        super::VIRTIO_BLK_T_OUT,
        super::VIRTIO_BLK_T_FLUSH,
        super::VIRTIO_BLK_T_GET_ID,
        super::VIRTIO_BLK_T_DISCARD,
    ];
    /// Sector selectors (then a `u16` operand): in layer A (operand % 64 sectors in).
    pub const SECTOR_A: u8 = 0;
    /// In layer B.
    pub const SECTOR_B: u8 = 1;
    /// In the header region.
    pub const SECTOR_HEADER: u8 = 2;
    /// Back from the device's end.
    pub const SECTOR_END: u8 = 3;
    /// A raw `u64` (read instead of the `u16`).
    pub const SECTOR_RAW: u8 = 4;
    /// Just before the 1 MiB boundary after layer A (unmapped).
    pub const SECTOR_AFTER_A: u8 = 5;
}

/// Data buffers `(address, length)` and the bytes they must hold after a completion.
type Content = (Vec<(u64, u32)>, Vec<u8>);

/// What the model expects of one popped chain.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// Head outside the queue: no used element at all.
    Dropped,
    /// Returned with used length 0 (no reachable status byte).
    Unused,
    /// Completed now.
    Done {
        status: u8,
        used_len: u32,
        /// The bytes the data buffers must hold afterwards.
        content: Option<Content>,
        status_addr: u64,
    },
    /// Parked on layer B; completes later with `OK` or `IOERR`.
    Parked { data_len: u64 },
}

#[derive(Debug, Clone)]
struct Prediction {
    head: u16,
    expect: Expect,
    /// Whether the kick it was made for was predictable (see the module docs).
    checked: bool,
    /// Writable bytes of the chain as walked.
    writable: u64,
}

/// One descriptor as the device's chain iterator yields it.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn writable(&self) -> bool {
        self.flags & F_WRITE != 0
    }

    fn has_next(&self) -> bool {
        self.flags & F_NEXT != 0
    }
}

/// What a chain's walk touched.
#[derive(Debug, Default)]
struct Walk {
    descs: Vec<Desc>,
    /// Memory the walk read: descriptors and indirect tables.
    read: Vec<(u64, u64)>,
}

/// Counts of what happened, for the corpus test.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkOutcome {
    /// Used elements seen.
    pub completed: usize,
    /// Of those checked against the model: status `OK`.
    pub ok: usize,
    /// Status `IOERR`.
    pub ioerr: usize,
    /// Status `UNSUPP`.
    pub unsupp: usize,
    /// Returned unused.
    pub unused: usize,
    /// Reads whose data was compared with the layer's bytes.
    pub verified_reads: usize,
    /// Requests that were parked at some point.
    pub parked: usize,
    /// Kicks the model could not predict (buffers over the device's own reads).
    pub unpredictable_kicks: usize,
}

struct Harness {
    mem: GuestMemoryMmap,
    vring: VringRwLock,
    backend: BlkBackend,
    store: LayerStore,
    gated: Arc<GatedSource>,
    layer_a: Option<Extent>,
    layer_b: Option<Extent>,
    size: u16,
    avail_position: u16,
    seen_used: u16,
    parked: Vec<Prediction>,
    next_buffer: u64,
    next_desc: u16,
    next_indirect: usize,
    /// The used ring was overwritten by the device on the guest's request: stop checking.
    blind: bool,
    /// A kick was unpredictable: which heads are parked is no longer known for sure.
    uncertain: bool,
    outcome: BlkOutcome,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn range(addr: u64, len: u64) -> (u64, u64) {
    (addr, addr.saturating_add(len))
}

impl Harness {
    fn new(config: u8) -> Harness {
        let regions: Vec<(GuestAddress, usize)> = MEMORY
            .iter()
            .map(|(start, len)| (GuestAddress(*start), *len))
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&regions).expect("guest memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let size = 1u16 << (config & 7).min(8);
        let size = size.min(MAX_QUEUE);
        let event_idx = config & 0x08 != 0;
        let vring = VringRwLock::new(atomic.clone(), MAX_QUEUE).expect("vring");
        vring.set_queue_size(size);
        vring
            .set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING)
            .expect("queue addresses");
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let store = LayerStore::new(CAPACITY).expect("layer store");
        let backend = BlkBackend::new(store.clone(), 1, 4096, 0).expect("backend");
        backend.update_memory(atomic).expect("memory");
        backend.set_event_idx(event_idx);
        let gated = GatedSource::new(layer_b_bytes().to_vec(), config & 0x10 != 0);
        let mut harness = Harness {
            mem,
            vring,
            backend,
            store,
            gated,
            layer_a: None,
            layer_b: None,
            size,
            avail_position: 0,
            seen_used: 0,
            parked: Vec::new(),
            next_buffer: BUFFERS,
            next_desc: 0,
            next_indirect: 0,
            blind: false,
            uncertain: false,
            outcome: BlkOutcome::default(),
        };
        harness.remap(0);
        harness.remap(1);
        if config & 0x20 != 0 {
            harness.remap(0);
        }
        harness
    }

    fn ring(&self) -> DriverRing<'_> {
        DriverRing {
            mem: &self.mem,
            desc_table: DESC_TABLE,
            avail: AVAIL_RING,
            used: USED_RING,
            size: self.size,
        }
    }

    fn remap(&mut self, which: u8) {
        let (slot, digest) = if which.is_multiple_of(2) {
            (&mut self.layer_a, "sha256:aaaa")
        } else {
            (&mut self.layer_b, "sha256:bbbb")
        };
        match slot.take() {
            Some(extent) => {
                self.store
                    .unmap_layer(extent.offset)
                    .expect("unmapping a mapped layer");
            }
            None => {
                let source: Arc<dyn BlockSource> = if which.is_multiple_of(2) {
                    layer_a()
                } else {
                    self.gated.clone()
                };
                // Offsets are never reused: the address space may run out.
                *slot = self.store.map_layer(digest, source).ok();
            }
        }
    }

    fn addr(&self, input: &mut Input<'_>) -> u64 {
        let selector = input.u8();
        if selector % 4 == enc::ADDR_RAW {
            return input.u64();
        }
        let operand = u64::from(input.u16());
        match selector % 4 {
            enc::ADDR_BUFFER => BUFFERS + operand,
            enc::ADDR_HIGH => HIGH_REGION + operand,
            _ => operand % QUEUE_AREA_END,
        }
    }

    fn len(input: &mut Input<'_>) -> u32 {
        let selector = input.u8();
        if selector % 4 == enc::LEN_RAW32 {
            return input.u32();
        }
        let operand = u32::from(input.u16());
        match selector % 4 {
            enc::LEN_RAW16 => operand,
            enc::LEN_SECTORS => (operand % 64) * 512 + u32::from(selector >> 2 & 1),
            _ => HEADER_SIZE as u32,
        }
    }

    fn request_type(input: &mut Input<'_>) -> u32 {
        let selector = input.u8() % 8;
        match enc::TYPES.get(usize::from(selector)) {
            Some(t) => *t,
            None => {
                let raw = input.u32();
                if raw == 0 {
                    VIRTIO_BLK_T_WRITE_ZEROES
                } else {
                    raw
                }
            }
        }
    }

    fn sector(&self, input: &mut Input<'_>) -> u64 {
        let selector = input.u8() % 6;
        if selector == enc::SECTOR_RAW {
            return input.u64();
        }
        let operand = u64::from(input.u16());
        let a = self.layer_a.map_or(HEADER_REGION_SIZE, |e| e.offset);
        let b = self.layer_b.map_or(2 * HEADER_REGION_SIZE, |e| e.offset);
        match selector {
            enc::SECTOR_A => a / SECTOR_SIZE + operand % 64,
            enc::SECTOR_B => b / SECTOR_SIZE + operand % 64,
            enc::SECTOR_HEADER => operand % (HEADER_REGION_SIZE / SECTOR_SIZE),
            enc::SECTOR_END => (CAPACITY / SECTOR_SIZE).saturating_sub(operand % 4096),
            _ => (a + HEADER_REGION_SIZE) / SECTOR_SIZE - operand % 16 - 1,
        }
    }

    fn write_header(&self, addr: u64, request_type: u32, sector: u64) {
        let mut header = [0u8; HEADER_SIZE];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let _ = self.mem.write_slice(&header, GuestAddress(addr));
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buffer + len > BUFFERS_END {
            self.next_buffer = BUFFERS;
        }
        let addr = self.next_buffer;
        self.next_buffer = (addr + len).next_multiple_of(16);
        addr
    }

    /// A well-formed request laid out by the harness.
    fn request(&mut self, input: &mut Input<'_>) {
        let request_type = Self::request_type(input);
        let sector = self.sector(input);
        let flags = input.u8();
        let segments = input.u8() % 5;
        let lengths: Vec<u32> = (0..segments)
            .map(|_| {
                let operand = u32::from(input.u16());
                if operand & 0x8000 != 0 {
                    operand & 0x7fff
                } else {
                    (operand % 16 + 1) * 512
                }
            })
            .collect();
        let header = self.alloc(16);
        self.write_header(header, request_type, sector);
        let mut chain = vec![(header, HEADER_SIZE as u32, 0u16)];
        let status_in_data = flags & 2 != 0 && !lengths.is_empty();
        for (i, len) in lengths.iter().enumerate() {
            let len = if status_in_data && i + 1 == lengths.len() {
                len + 1
            } else {
                *len
            };
            chain.push((self.alloc(u64::from(len)), len, F_WRITE));
        }
        if !status_in_data {
            chain.push((self.alloc(1), 1, F_WRITE));
        }
        let mem = self.mem.clone();
        let ring = DriverRing {
            mem: &mem,
            ..self.ring()
        };
        let last = chain.len() - 1;
        if flags & 1 != 0 {
            let table = INDIRECT_TABLES[self.next_indirect % 2];
            self.next_indirect += 1;
            for (i, (addr, len, write)) in chain.iter().enumerate() {
                let next = if i == last { 0 } else { F_NEXT };
                ring.write_desc(table, i as u16, *addr, *len, write | next, i as u16 + 1);
            }
            let head = self.next_desc % self.size;
            ring.write_desc(
                DESC_TABLE,
                head,
                table,
                (chain.len() * 16) as u32,
                F_INDIRECT,
                0,
            );
            self.next_desc = self.next_desc.wrapping_add(1);
            ring.publish(self.avail_position, head);
        } else {
            let head = self.next_desc % self.size;
            for (i, (addr, len, write)) in chain.iter().enumerate() {
                let index = self.next_desc % self.size;
                let next_index = self.next_desc.wrapping_add(1) % self.size;
                let next = if i == last { 0 } else { F_NEXT };
                ring.write_desc(DESC_TABLE, index, *addr, *len, write | next, next_index);
                self.next_desc = self.next_desc.wrapping_add(1);
            }
            ring.publish(self.avail_position, head);
        }
        self.avail_position = self.avail_position.wrapping_add(1);
        if flags & 4 != 0 {
            self.kick();
        }
    }

    fn read_desc(&self, table: u64, index: u16) -> Option<Desc> {
        let mut raw = [0u8; 16];
        self.mem
            .read_slice(
                &mut raw,
                GuestAddress(table.checked_add(u64::from(index) * 16)?),
            )
            .ok()?;
        Some(Desc {
            addr: u64::from_le_bytes(raw[..8].try_into().ok()?),
            len: u32::from_le_bytes(raw[8..12].try_into().ok()?),
            flags: u16::from_le_bytes(raw[12..14].try_into().ok()?),
            next: u16::from_le_bytes(raw[14..16].try_into().ok()?),
        })
    }

    /// Walks a chain as the virtio spec (and virtio-queue) define it: `next` links within the
    /// table, at most `size` links, one level of indirection, 4 GiB at most.
    fn walk(&self, head: u16) -> Walk {
        let mut walk = Walk::default();
        let mut table = DESC_TABLE;
        let mut table_size = self.size;
        let mut index = head;
        let mut ttl = self.size;
        let mut indirect = false;
        let mut yielded = 0u32;
        loop {
            if ttl == 0 || index >= table_size {
                break;
            }
            walk.read.push(range(table + u64::from(index) * 16, 16));
            let Some(desc) = self.read_desc(table, index) else {
                break;
            };
            if desc.flags & F_INDIRECT != 0 {
                if indirect || desc.len % 16 != 0 || desc.len / 16 > u32::from(u16::MAX) {
                    break;
                }
                walk.read.push(range(desc.addr, u64::from(desc.len)));
                table = desc.addr;
                table_size = (desc.len / 16) as u16;
                index = 0;
                ttl = table_size;
                indirect = true;
                continue;
            }
            let Some(total) = yielded.checked_add(desc.len) else {
                break;
            };
            yielded = total;
            walk.descs.push(desc);
            if desc.has_next() {
                index = desc.next;
                ttl -= 1;
            } else {
                break;
            }
            if walk.descs.len() > MAX_CHAIN_DESCRIPTORS + 1 {
                break;
            }
        }
        walk
    }

    fn in_memory(&self, addr: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|len| self.mem.check_range(GuestAddress(addr), len))
    }

    /// The regions of the device's address space right now: (start, end, what).
    fn regions(&self) -> Vec<(u64, u64, u8)> {
        let mut regions = vec![(0, HEADER_REGION_SIZE, b'h')];
        if let Some(a) = self.layer_a {
            let end = a.offset + a.length.next_multiple_of(EXTENT_BLOCK);
            regions.push((a.offset, end, b'a'));
        }
        if let Some(b) = self.layer_b {
            let end = b.offset + b.length.next_multiple_of(EXTENT_BLOCK);
            regions.push((b.offset, end, b'b'));
        }
        regions.push((CAPACITY - TAIL_ZERO_SIZE, CAPACITY, b'z'));
        regions.sort();
        regions
    }

    /// How a read of device bytes `[start, end)` goes: `None` if it reaches an unmapped byte
    /// before any held one, `Some(true)` if it parks on layer B, `Some(false)` if it completes.
    fn read_path(&self, start: u64, end: u64) -> Option<bool> {
        let regions = self.regions();
        let mut at = start;
        while at < end {
            let (_, region_end, what) = regions
                .iter()
                .find(|(s, e, _)| *s <= at && at < *e)
                .copied()?;
            if what == b'b' && self.gated.is_held() {
                let within = at - self.layer_b.map_or(0, |b| b.offset);
                if within < LAYER_B_LEN as u64 {
                    return Some(true);
                }
            }
            at = region_end;
        }
        Some(false)
    }

    /// The device's bytes `[start, start + len)` as the model sees them: the header, the
    /// layers' patterns, zeros elsewhere. Copied region by region (a read is up to 32 KiB and
    /// this runs for every predicted read: byte by byte, it was most of the fuzzer's time).
    fn device_bytes(&self, start: u64, len: u64) -> Vec<u8> {
        let header = self.store.header();
        let end = start.saturating_add(len);
        let mut bytes = vec![0u8; len as usize];
        // The first region holding a byte decides it: later ones are written first.
        for (region_start, region_end, what) in self.regions().into_iter().rev() {
            let (from, to) = (start.max(region_start), end.min(region_end));
            if from >= to {
                continue;
            }
            let out = &mut bytes[(from - start) as usize..(to - start) as usize];
            out.fill(0);
            let (content, content_offset): (&[u8], u64) = match what {
                b'h' => (&header, HEADER_OFFSET),
                b'a' => (layer_a_bytes(), 0),
                b'b' => (layer_b_bytes(), 0),
                _ => continue,
            };
            // Device offset `o` holds content[o - region_start - content_offset], if any.
            let first = region_start + content_offset;
            let content_end = first + content.len() as u64;
            let (copy_from, copy_to) = (from.max(first), to.min(content_end));
            if copy_from < copy_to {
                out[(copy_from - from) as usize..(copy_to - from) as usize].copy_from_slice(
                    &content[(copy_from - first) as usize..(copy_to - first) as usize],
                );
            }
        }
        bytes
    }

    /// The model of `Request::parse` + `execute` + `finish` for one walked chain.
    fn expect(&self, walk: &Walk) -> Expect {
        let descs = &walk.descs;
        if descs.len() > MAX_CHAIN_DESCRIPTORS || descs.is_empty() {
            return Expect::Unused;
        }
        let last = descs[descs.len() - 1];
        if last.has_next() || !last.writable() || last.len == 0 {
            return Expect::Unused;
        }
        let Some(status) = last.addr.checked_add(u64::from(last.len) - 1) else {
            return Expect::Unused;
        };
        if !self.in_memory(status, 1) {
            return Expect::Unused;
        }
        let done = |status_byte: u8, used_len: u32| Expect::Done {
            status: status_byte,
            used_len,
            content: None,
            status_addr: status,
        };
        let ioerr = done(STATUS_IOERR, 1);
        let first_writable = descs.iter().position(Desc::writable).unwrap_or(descs.len());
        if descs[first_writable..].iter().any(|d| !d.writable()) {
            return ioerr;
        }
        let readable = &descs[..first_writable];
        let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
        if readable_len < HEADER_SIZE as u64 {
            return ioerr;
        }
        let mut header = Vec::with_capacity(HEADER_SIZE);
        for d in readable {
            if header.len() == HEADER_SIZE {
                break;
            }
            // Empty descriptors are read too (as the parser does), zero bytes of them.
            let take = (HEADER_SIZE - header.len()).min(d.len as usize);
            let mut part = vec![0u8; take];
            if self
                .mem
                .read_slice(&mut part, GuestAddress(d.addr))
                .is_err()
            {
                return ioerr;
            }
            header.extend_from_slice(&part);
        }
        let request_type = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let data = |this: &Self| -> Option<Vec<(u64, u32)>> {
            let writable = &descs[first_writable..];
            let mut data = Vec::new();
            for (i, d) in writable.iter().enumerate() {
                let len = if i + 1 == writable.len() {
                    d.len - 1
                } else {
                    d.len
                };
                if len == 0 {
                    continue;
                }
                if !this.in_memory(d.addr, u64::from(len)) {
                    return None;
                }
                data.push((d.addr, len));
            }
            Some(data)
        };
        match request_type {
            VIRTIO_BLK_T_IN => {
                if readable_len != HEADER_SIZE as u64 {
                    return ioerr;
                }
                let Some(segments) = data(self) else {
                    return ioerr;
                };
                let data_len: u64 = segments.iter().map(|(_, len)| u64::from(*len)).sum();
                if !data_len.is_multiple_of(SECTOR_SIZE) {
                    return ioerr;
                }
                let Some(start) = sector.checked_mul(SECTOR_SIZE) else {
                    return ioerr;
                };
                match start.checked_add(data_len) {
                    Some(end) if end <= CAPACITY => match self.read_path(start, end) {
                        None => ioerr,
                        Some(true) => Expect::Parked { data_len },
                        Some(false) => Expect::Done {
                            status: STATUS_OK,
                            used_len: data_len as u32 + 1,
                            content: Some((segments, self.device_bytes(start, data_len))),
                            status_addr: status,
                        },
                    },
                    _ => ioerr,
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let Some(segments) = data(self) else {
                    return ioerr;
                };
                let id = device_id_bytes();
                let mut written = 0usize;
                let mut filled = Vec::new();
                for (addr, len) in segments {
                    if written >= id.len() {
                        break;
                    }
                    let take = (id.len() - written).min(len as usize);
                    filled.push((addr, take as u32));
                    written += take;
                }
                Expect::Done {
                    status: STATUS_OK,
                    used_len: written as u32 + 1,
                    content: Some((filled, id[..written].to_vec())),
                    status_addr: status,
                }
            }
            VIRTIO_BLK_T_FLUSH => done(STATUS_OK, 1),
            VIRTIO_BLK_T_OUT => ioerr,
            _ => done(STATUS_UNSUPP, 1),
        }
    }

    fn kick(&mut self) {
        let ring = self.ring();
        let next_avail = self.vring.get_ref().get_queue().next_avail();
        let avail_idx = ring.avail_idx();
        let pending = avail_idx.wrapping_sub(next_avail);
        let mut predictions = Vec::new();
        let mut writes: Vec<(u64, u64)> = Vec::new();
        let mut reads: Vec<(u64, u64)> = vec![range(AVAIL_RING, 4 + 2 * u64::from(self.size))];
        if pending <= self.size {
            for i in 0..pending {
                let head = ring.avail_entry(next_avail.wrapping_add(i));
                if head >= self.size {
                    predictions.push(Prediction {
                        head,
                        expect: Expect::Dropped,
                        checked: true,
                        writable: 0,
                    });
                    continue;
                }
                let walk = self.walk(head);
                let mut writable = 0u64;
                for d in &walk.descs {
                    let r = range(d.addr, u64::from(d.len));
                    if d.writable() {
                        writes.push(r);
                        writable += u64::from(d.len);
                    } else {
                        reads.push(r);
                    }
                }
                reads.extend_from_slice(&walk.read);
                predictions.push(Prediction {
                    head,
                    expect: self.expect(&walk),
                    checked: true,
                    writable,
                });
            }
        }
        let used_area = range(USED_RING, 6 + 8 * u64::from(self.size));
        if writes.iter().any(|w| overlaps(*w, used_area)) {
            self.blind = true;
        }
        let predictable = !writes
            .iter()
            .any(|w| reads.iter().any(|r| overlaps(*w, *r)));
        let disjoint_writes = writes
            .iter()
            .enumerate()
            .all(|(i, w)| writes.iter().skip(i + 1).all(|other| !overlaps(*w, *other)));
        if !predictable {
            self.uncertain = true;
            self.outcome.unpredictable_kicks += 1;
            for p in &mut predictions {
                p.checked = false;
            }
        }

        let _ = self
            .backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0);

        let completions = self.take_used();
        let mut remaining = predictions;
        for (id, len) in completions {
            let Some(index) = remaining.iter().position(|p| u32::from(p.head) == id) else {
                assert!(
                    self.blind || !predictable,
                    "used element for head {id} that was not popped"
                );
                continue;
            };
            let prediction = remaining.remove(index);
            self.check_completion(&prediction, len, disjoint_writes);
        }
        for prediction in remaining {
            // A chain whose head is parked already (the guest published it again) is dropped by
            // the device: completing that head twice would corrupt the used ring.
            let already_parked = self.parked.iter().any(|p| p.head == prediction.head);
            match prediction.expect {
                Expect::Dropped => {}
                _ if already_parked => {}
                Expect::Parked { .. } => {
                    self.outcome.parked += 1;
                    self.parked.push(prediction);
                }
                // Unpredictable: it may have parked.
                _ if !prediction.checked || self.blind => self.parked.push(prediction),
                _ => panic!(
                    "chain {} was not completed: {:?}",
                    prediction.head, prediction.expect
                ),
            }
        }
    }

    /// The used elements added since the last look.
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let ring = self.ring();
        let used_idx = ring.used_idx();
        let count = used_idx.wrapping_sub(self.seen_used);
        if self.blind {
            self.seen_used = used_idx;
            return Vec::new();
        }
        if count > self.size {
            // Only possible when guest-controlled writes moved the ring indices (the driver's
            // own, or the device's into buffers the driver placed over the rings): the model
            // cannot follow from here on.
            self.blind = true;
            self.seen_used = used_idx;
            return Vec::new();
        }
        let elements = (0..count)
            .map(|i| ring.used_elem(self.seen_used.wrapping_add(i)))
            .collect();
        self.seen_used = used_idx;
        self.outcome.completed += usize::from(count);
        elements
    }

    fn check_completion(&mut self, prediction: &Prediction, len: u32, disjoint_writes: bool) {
        assert!(
            u64::from(len) <= prediction.writable,
            "used length {len} beyond the chain's {} writable bytes",
            prediction.writable
        );
        if !prediction.checked || self.blind {
            return;
        }
        match &prediction.expect {
            Expect::Dropped => panic!("a chain with head {} was used", prediction.head),
            Expect::Unused => {
                assert_eq!(
                    len, 0,
                    "chain {} should be returned unused",
                    prediction.head
                );
                self.outcome.unused += 1;
            }
            Expect::Parked { data_len } => {
                assert!(
                    len == 1 || u64::from(len) == data_len + 1,
                    "parked read completed with used length {len}"
                );
            }
            Expect::Done {
                status,
                used_len,
                content,
                status_addr,
            } => {
                assert_eq!(
                    len, *used_len,
                    "used length of chain {} (expected {:?})",
                    prediction.head, prediction.expect
                );
                match *status {
                    STATUS_OK => self.outcome.ok += 1,
                    STATUS_IOERR => self.outcome.ioerr += 1,
                    _ => self.outcome.unsupp += 1,
                }
                if disjoint_writes {
                    let written: u8 = self
                        .mem
                        .read_obj(GuestAddress(*status_addr))
                        .expect("status in memory");
                    assert_eq!(written, *status, "status byte of chain {}", prediction.head);
                    if let Some((segments, expected)) = content {
                        let mut got = Vec::with_capacity(expected.len());
                        for (addr, len) in segments {
                            let mut part = vec![0u8; *len as usize];
                            self.mem
                                .read_slice(&mut part, GuestAddress(*addr))
                                .expect("data in memory");
                            got.extend_from_slice(&part);
                        }
                        assert!(got == *expected, "data of chain {}", prediction.head);
                        self.outcome.verified_reads += 1;
                    }
                }
            }
        }
    }

    /// Completions of parked requests (after a wake or a stop).
    fn settle_parked(&mut self) {
        for (id, len) in self.take_used() {
            let Some(index) = self.parked.iter().position(|p| u32::from(p.head) == id) else {
                assert!(
                    self.blind || self.uncertain,
                    "used element for head {id} that was not parked"
                );
                continue;
            };
            let prediction = self.parked.remove(index);
            if self.uncertain {
                // The head may belong to a request the model did not predict.
                continue;
            }
            self.check_completion(&prediction, len, false);
            if prediction.checked && !self.blind {
                if len == 1 {
                    self.outcome.ioerr += 1;
                } else {
                    self.outcome.ok += 1;
                }
            }
        }
    }

    fn release(&mut self) {
        self.gated.release();
        let _ = self.backend.handle_event(
            wake_event(1),
            EventSet::IN,
            std::slice::from_ref(&self.vring),
            0,
        );
        self.settle_parked();
        if !self.blind && !self.uncertain {
            // Every parked read is on layer B, which is now released.
            assert!(
                self.parked.is_empty(),
                "parked requests left after release: {:?}",
                self.parked
            );
        }
    }

    fn stop(&mut self) {
        let _ = self.backend.stop_vring(0);
        self.settle_parked();
        assert_eq!(self.backend.parked_requests(0), 0, "parked after stop");
        if !self.blind && !self.uncertain {
            assert!(self.parked.is_empty(), "parked requests left after stop");
        }
        self.parked.clear();
    }
}

/// Runs one input: the first byte configures the queue (bits 0-2: size `1 << n`, at most 256;
/// bit 3: `EVENT_IDX`; bit 4: layer B's data is missing until a `RELEASE`; bit 5: layer A is
/// unmapped), the rest is a program of [`op`]s. Panics if the backend breaks a property (see
/// the module docs); returns what happened.
pub fn check_blk_input(data: &[u8]) -> BlkOutcome {
    let mut input = Input::new(data);
    let mut harness = Harness::new(input.u8());
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % op::COUNT {
            op::DESC => {
                let table = match input.u8() % 3 {
                    0 => DESC_TABLE,
                    n => INDIRECT_TABLES[usize::from(n - 1)],
                };
                let index = u16::from(input.u8());
                let addr = harness.addr(&mut input);
                let len = Harness::len(&mut input);
                let flags = input.u16();
                let next = input.u16();
                let index = if table == DESC_TABLE {
                    index % harness.size
                } else {
                    index % 128
                };
                harness
                    .ring()
                    .write_desc(table, index, addr, len, flags, next);
            }
            op::HEADER => {
                let addr = harness.addr(&mut input);
                let request_type = Harness::request_type(&mut input);
                let sector = harness.sector(&mut input);
                let used_area = range(USED_RING, 6 + 8 * u64::from(harness.size));
                if overlaps(range(addr, HEADER_SIZE as u64), used_area) {
                    // The driver scribbles over the device's used ring: nothing to check.
                    harness.blind = true;
                }
                harness.write_header(addr, request_type, sector);
            }
            op::AVAIL => {
                let head = input.u16();
                harness.ring().publish(harness.avail_position, head);
                harness.avail_position = harness.avail_position.wrapping_add(1);
            }
            op::AVAIL_IDX => {
                harness.avail_position = harness.avail_position.wrapping_add(input.u16());
                harness.ring().set_avail_idx(harness.avail_position);
            }
            op::KICK => harness.kick(),
            op::RELEASE => harness.release(),
            op::REMAP => {
                let which = input.u8();
                harness.remap(which);
            }
            op::STOP => harness.stop(),
            _ => harness.request(&mut input),
        }
    }
    // The driver goes away: whatever is parked fails, nothing is lost.
    harness.stop();
    harness.outcome
}

/// Named seed inputs for `blk_queue`, written into `agent/fuzz/corpus/blk_queue` by the corpus
/// test's `write_seeds` (run with `--ignored`). Names starting with `valid-` complete every
/// request with `OK`; `ioerr-` ones fail at least one with `IOERR`; the corpus test checks it.
pub mod seeds {
    use super::{enc, op};

    /// Builds an input program.
    #[derive(Debug, Default)]
    pub struct Program(Vec<u8>);

    impl Program {
        /// A program for a queue configured by `config` (see [`super::check_blk_input`]).
        pub fn new(config: u8) -> Program {
            Program(vec![config])
        }

        /// A well-formed request (see [`op::REQUEST`]); `type_selector` indexes
        /// [`enc::TYPES`].
        pub fn request(
            mut self,
            type_selector: u8,
            sector: (u8, u16),
            flags: u8,
            lengths: &[u16],
        ) -> Program {
            self.0
                .extend_from_slice(&[op::REQUEST, type_selector, sector.0]);
            self.0.extend_from_slice(&sector.1.to_le_bytes());
            self.0.push(flags);
            self.0.push(lengths.len() as u8);
            for len in lengths {
                self.0.extend_from_slice(&len.to_le_bytes());
            }
            self
        }

        /// A raw descriptor: `addr` as (selector, operand), `len` as (selector, operand).
        pub fn desc(
            mut self,
            table: u8,
            index: u8,
            addr: (u8, u16),
            len: (u8, u16),
            flags: u16,
            next: u16,
        ) -> Program {
            self.0.extend_from_slice(&[op::DESC, table, index, addr.0]);
            self.0.extend_from_slice(&addr.1.to_le_bytes());
            self.0.push(len.0);
            self.0.extend_from_slice(&len.1.to_le_bytes());
            self.0.extend_from_slice(&flags.to_le_bytes());
            self.0.extend_from_slice(&next.to_le_bytes());
            self
        }

        /// A request header at a buffer address.
        pub fn header(mut self, addr: u16, type_selector: u8, sector: (u8, u16)) -> Program {
            self.0.extend_from_slice(&[op::HEADER, enc::ADDR_BUFFER]);
            self.0.extend_from_slice(&addr.to_le_bytes());
            self.0.extend_from_slice(&[type_selector, sector.0]);
            self.0.extend_from_slice(&sector.1.to_le_bytes());
            self
        }

        /// Makes `head` available.
        pub fn avail(mut self, head: u16) -> Program {
            self.0.push(op::AVAIL);
            self.0.extend_from_slice(&head.to_le_bytes());
            self
        }

        /// Moves the available index by `delta`.
        pub fn avail_idx(mut self, delta: u16) -> Program {
            self.0.push(op::AVAIL_IDX);
            self.0.extend_from_slice(&delta.to_le_bytes());
            self
        }

        /// A bare operation (`KICK`, `RELEASE`, `STOP`) or `REMAP` with its operand.
        pub fn op(mut self, operation: u8) -> Program {
            self.0.push(operation);
            if operation == op::REMAP {
                self.0.push(0);
            }
            self
        }

        /// The input bytes.
        pub fn bytes(self) -> Vec<u8> {
            self.0
        }
    }

    const IN: u8 = 0;
    const OUT: u8 = 3;
    const FLUSH: u8 = 4;
    const GET_ID: u8 = 5;
    const DISCARD: u8 = 6;
    const KICK_AFTER: u8 = 4;
    const INDIRECT: u8 = 1;
    const STATUS_IN_DATA: u8 = 2;
    const Q128_EVENT_IDX: u8 = 7 | 0x08;
    const HELD: u8 = 0x10;
    const W: u16 = super::F_WRITE;
    const N: u16 = super::F_NEXT;
    const I: u16 = super::F_INDIRECT;

    /// Every seed: (name, input).
    pub fn all() -> Vec<(String, Vec<u8>)> {
        let a = |sectors: u16| (enc::SECTOR_A, sectors);
        let seeds = vec![
            (
                "valid-read-layer",
                Program::new(7)
                    .request(IN, a(0), KICK_AFTER, &[4096 / 512 - 1])
                    .request(IN, a(8), KICK_AFTER, &[0, 1, 2])
                    .bytes(),
            ),
            (
                "valid-read-tail-of-layer",
                Program::new(7).request(IN, a(24), KICK_AFTER, &[7]).bytes(),
            ),
            (
                "valid-read-header-region",
                Program::new(4)
                    .request(IN, (enc::SECTOR_HEADER, 0), 0, &[7, 7])
                    .request(IN, (enc::SECTOR_END, 16), 0, &[15])
                    .op(op::KICK)
                    .bytes(),
            ),
            (
                "valid-indirect-and-any-layout",
                Program::new(Q128_EVENT_IDX)
                    .request(IN, a(2), INDIRECT | KICK_AFTER, &[1, 3])
                    .request(IN, a(4), STATUS_IN_DATA | KICK_AFTER, &[0])
                    .request(IN, a(6), INDIRECT | STATUS_IN_DATA | KICK_AFTER, &[0, 0])
                    .bytes(),
            ),
            (
                "valid-get-id-and-flush",
                Program::new(3)
                    .request(GET_ID, (enc::SECTOR_HEADER, 0), KICK_AFTER, &[0x8000 | 20])
                    .request(
                        GET_ID,
                        (enc::SECTOR_HEADER, 0),
                        KICK_AFTER,
                        &[0x8000 | 7, 0x8000 | 40],
                    )
                    .request(FLUSH, (enc::SECTOR_HEADER, 0), KICK_AFTER, &[])
                    .bytes(),
            ),
            (
                "valid-parked-then-released",
                Program::new(7 | HELD)
                    .request(IN, (enc::SECTOR_B, 0), KICK_AFTER, &[7])
                    .request(IN, a(0), KICK_AFTER, &[0])
                    .op(op::RELEASE)
                    .request(IN, (enc::SECTOR_B, 8), KICK_AFTER, &[7])
                    .bytes(),
            ),
            (
                "ioerr-unmapped-and-refused",
                Program::new(7)
                    .request(IN, (enc::SECTOR_AFTER_A, 0), KICK_AFTER, &[0])
                    .request(IN, (enc::SECTOR_END, 2049 * 2 + 8), KICK_AFTER, &[7])
                    .request(OUT, a(0), KICK_AFTER, &[0])
                    .request(DISCARD, a(0), KICK_AFTER, &[0])
                    .request(IN, (enc::SECTOR_END, 1), KICK_AFTER, &[1])
                    .bytes(),
            ),
            (
                "ioerr-unmapped-after-unmap",
                Program::new(7)
                    .op(op::REMAP)
                    .request(IN, a(0), KICK_AFTER, &[7])
                    .bytes(),
            ),
            (
                "ioerr-parked-then-stopped",
                Program::new(7 | HELD)
                    .request(IN, (enc::SECTOR_B, 0), KICK_AFTER, &[7])
                    .op(op::STOP)
                    .bytes(),
            ),
            (
                "ioerr-malformed-chains",
                Program::new(4)
                    // Unaligned data length.
                    .request(IN, a(0), KICK_AFTER, &[0x8000 | 100])
                    // A readable descriptor after a writable one.
                    .header(0x8000, IN, a(0))
                    .desc(
                        0,
                        0,
                        (enc::ADDR_BUFFER, 0x8000),
                        (enc::LEN_HEADER, 0),
                        W | N,
                        1,
                    )
                    .desc(
                        0,
                        1,
                        (enc::ADDR_BUFFER, 0x9000),
                        (enc::LEN_SECTORS, 1),
                        N,
                        2,
                    )
                    .desc(0, 2, (enc::ADDR_BUFFER, 0xa000), (enc::LEN_RAW16, 1), W, 0)
                    .avail(0)
                    .op(op::KICK)
                    .bytes(),
            ),
            (
                "hostile-loop-and-bad-next",
                Program::new(2)
                    .header(0x100, IN, a(0))
                    .desc(0, 0, (enc::ADDR_BUFFER, 0x100), (enc::LEN_HEADER, 0), N, 1)
                    .desc(
                        0,
                        1,
                        (enc::ADDR_BUFFER, 0x200),
                        (enc::LEN_SECTORS, 8),
                        W | N,
                        0,
                    )
                    .avail(0)
                    .desc(
                        0,
                        2,
                        (enc::ADDR_BUFFER, 0x100),
                        (enc::LEN_HEADER, 0),
                        N,
                        900,
                    )
                    .avail(2)
                    .avail(7)
                    .op(op::KICK)
                    .bytes(),
            ),
            (
                "hostile-indirect",
                Program::new(3)
                    // Nested indirect, then a table of a length that is not 16-aligned.
                    .desc(1, 0, (enc::ADDR_QUEUE, 0x3800), (enc::LEN_RAW16, 32), I, 0)
                    .desc(0, 0, (enc::ADDR_QUEUE, 0x3000), (enc::LEN_RAW16, 16), I, 0)
                    .avail(0)
                    .desc(0, 1, (enc::ADDR_QUEUE, 0x3000), (enc::LEN_RAW16, 17), I, 0)
                    .avail(1)
                    .desc(0, 2, (enc::ADDR_HIGH, 0x7ff0), (enc::LEN_RAW16, 64), I, 0)
                    .avail(2)
                    .op(op::KICK)
                    .bytes(),
            ),
            (
                "hostile-buffers-outside-memory",
                Program::new(3)
                    .header(0x40, IN, a(0))
                    .desc(0, 0, (enc::ADDR_BUFFER, 0x40), (enc::LEN_HEADER, 0), N, 1)
                    .desc(
                        0,
                        1,
                        (enc::ADDR_HIGH, 0x7e00),
                        (enc::LEN_SECTORS, 2),
                        W | N,
                        2,
                    )
                    .desc(0, 2, (enc::ADDR_BUFFER, 0x800), (enc::LEN_RAW16, 1), W, 0)
                    .avail(0)
                    .desc(0, 3, (enc::ADDR_HIGH, 0xffff), (enc::LEN_RAW16, 1), W, 0)
                    .avail(3)
                    .op(op::KICK)
                    .bytes(),
            ),
            (
                "hostile-avail-index-jump",
                Program::new(3)
                    .request(IN, a(0), 0, &[0])
                    .avail_idx(40000)
                    .op(op::KICK)
                    .avail_idx(25536)
                    .op(op::KICK)
                    .bytes(),
            ),
            (
                // Regression: with EVENT_IDX the queue thread spun forever.
                "hostile-event-idx-avail-index-out-of-range",
                Program::new(0x08)
                    .request(IN, a(0), 0, &[0])
                    .avail_idx(5)
                    .op(op::KICK)
                    .avail_idx(300)
                    .op(op::KICK)
                    .bytes(),
            ),
            (
                "hostile-straddles-regions",
                Program::new(3)
                    .header(0x40, IN, a(0))
                    .desc(0, 0, (enc::ADDR_BUFFER, 0x40), (enc::LEN_HEADER, 0), N, 1)
                    .desc(
                        0,
                        1,
                        (enc::ADDR_BUFFER, 0xbe00),
                        (enc::LEN_SECTORS, 8),
                        W | N,
                        2,
                    )
                    .desc(0, 2, (enc::ADDR_BUFFER, 0xe000), (enc::LEN_RAW16, 1), W, 0)
                    .avail(0)
                    .op(op::KICK)
                    .bytes(),
            ),
        ];
        seeds
            .into_iter()
            .map(|(name, bytes)| (name.to_string(), bytes))
            .collect()
    }
}
