//! A minimal vhost-user-blk **frontend** (the driver side of a virtio-blk device) for benchmarks
//! and tests: it speaks vhost-user to a backend's socket with the `vhost` crate's `Frontend`,
//! shares a memfd as guest memory, lays out split virtqueues in it, and submits requests
//! through them, kicking with an eventfd and waiting on the call eventfd.
//!
//! It drives any vhost-user-blk backend the same way: Gantry's layer store and
//! `qemu-storage-daemon --export type=vhost-user-blk` alike.
//!
//! Each queue has `depth` request slots; slot `i` owns descriptors `3i` (header), `3i + 1`
//! (data) and `3i + 2` (status) and its own buffers, so requests need no allocation.

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::Ordering;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_BLK_T_IN`.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = 8;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const PAGE: u64 = 4096;

fn other(message: impl Into<String>) -> io::Error {
    io::Error::other(message.into())
}

fn vhost_error(what: &str, error: impl std::fmt::Display) -> io::Error {
    other(format!("vhost-user {what}: {error}"))
}

/// What the device's config space says.
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// `seg_max`.
    pub seg_max: u32,
    /// `blk_size`.
    pub blk_size: u32,
    /// `num_queues`.
    pub num_queues: u16,
}

/// One request slot's buffers.
#[derive(Clone, Copy, Debug)]
struct Slot {
    header: u64,
    data: u64,
    status: u64,
}

/// The driver side of one split virtqueue.
pub struct DriverQueue {
    mem: GuestMemoryMmap,
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    last_used: u16,
    slots: Vec<Slot>,
    max_request: u32,
}

/// A completed request: its slot and the used length the device reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Slot index.
    pub slot: usize,
    /// Bytes the device wrote.
    pub len: u32,
}

impl DriverQueue {
    /// Number of request slots.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    fn slot(&self, slot: usize) -> io::Result<Slot> {
        self.slots
            .get(slot)
            .copied()
            .ok_or_else(|| other(format!("no slot {slot}")))
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) -> io::Result<()> {
        let at = self.desc_table + u64::from(index) * 16;
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(at))
            .map_err(|e| other(format!("write descriptor: {e}")))
    }

    /// Puts a request in slot `slot` on the avail ring (does not kick): `request_type` at
    /// `sector`, with `len` bytes of data (device-writable for reads, readable for writes).
    pub fn submit(
        &mut self,
        slot: usize,
        request_type: u32,
        sector: u64,
        len: u32,
    ) -> io::Result<()> {
        if len > self.max_request {
            return Err(other("request larger than the slot buffer"));
        }
        let buffers = self.slot(slot)?;
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&header, GuestAddress(buffers.header))
            .map_err(|e| other(format!("write header: {e}")))?;
        self.mem
            .write_obj(0xffu8, GuestAddress(buffers.status))
            .map_err(|e| other(format!("write status: {e}")))?;
        let head = u16::try_from(slot * 3).map_err(|_| other("slot out of range"))?;
        let data_flags = if request_type == T_OUT {
            0
        } else {
            DESC_F_WRITE
        };
        if len > 0 {
            self.write_desc(head, buffers.header, 16, DESC_F_NEXT, head + 1)?;
            self.write_desc(
                head + 1,
                buffers.data,
                len,
                data_flags | DESC_F_NEXT,
                head + 2,
            )?;
        } else {
            self.write_desc(head, buffers.header, 16, DESC_F_NEXT, head + 2)?;
        }
        self.write_desc(head + 2, buffers.status, 1, DESC_F_WRITE, 0)?;
        let entry = self.avail_ring + 4 + u64::from(self.next_avail % self.size) * 2;
        self.mem
            .write_obj(head.to_le(), GuestAddress(entry))
            .map_err(|e| other(format!("write avail entry: {e}")))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before the new index.
        self.mem
            .store(
                self.next_avail.to_le(),
                GuestAddress(self.avail_ring + 2),
                Ordering::Release,
            )
            .map_err(|e| other(format!("publish avail index: {e}")))
    }

    /// Notifies the device.
    pub fn kick(&self) -> io::Result<()> {
        self.kick.write(1)
    }

    /// Waits for the device's notification (blocking). The backend may have made the shared
    /// call eventfd non-blocking, so this polls before reading.
    pub fn wait(&self) -> io::Result<()> {
        while !self.wait_timeout(std::time::Duration::from_secs(60))? {}
        Ok(())
    }

    /// Waits for a notification for at most `timeout`; `false` if none came.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> io::Result<bool> {
        let mut pollfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, living for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        if ready == 0 {
            return Ok(false);
        }
        match self.call.read() {
            Ok(_) => Ok(true),
            // Another reader (or a spurious wake-up) drained it: nothing to wait for now.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// The requests completed since the last call.
    pub fn take_used(&mut self, out: &mut Vec<Used>) -> io::Result<()> {
        let used_idx: u16 = self
            .mem
            .load(GuestAddress(self.used_ring + 2), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| other(format!("read used index: {e}")))?;
        while self.last_used != used_idx {
            let at = self.used_ring + 4 + u64::from(self.last_used % self.size) * 8;
            let mut raw = [0u8; 8];
            self.mem
                .read_slice(&mut raw, GuestAddress(at))
                .map_err(|e| other(format!("read used entry: {e}")))?;
            let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
            let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            out.push(Used {
                slot: id as usize / 3,
                len,
            });
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(())
    }

    /// The status byte of slot `slot`.
    pub fn status(&self, slot: usize) -> io::Result<u8> {
        let buffers = self.slot(slot)?;
        self.mem
            .read_obj(GuestAddress(buffers.status))
            .map_err(|e| other(format!("read status: {e}")))
    }

    /// The first `len` bytes of slot `slot`'s data buffer.
    pub fn data(&self, slot: usize, len: usize) -> io::Result<Vec<u8>> {
        let buffers = self.slot(slot)?;
        let mut bytes = vec![0u8; len];
        self.mem
            .read_slice(&mut bytes, GuestAddress(buffers.data))
            .map_err(|e| other(format!("read data: {e}")))?;
        Ok(bytes)
    }

    /// Fills slot `slot`'s data buffer with `byte` (to see what the device overwrote).
    pub fn poison(&self, slot: usize, byte: u8) -> io::Result<()> {
        let buffers = self.slot(slot)?;
        let bytes = vec![byte; self.max_request as usize];
        self.mem
            .write_slice(&bytes, GuestAddress(buffers.data))
            .map_err(|e| other(format!("poison data: {e}")))
    }

    /// Submits one request in slot 0, kicks, and waits for it (at most 10 s). Returns the
    /// status and the used length.
    pub fn run_one(&mut self, request_type: u32, sector: u64, len: u32) -> io::Result<(u8, u32)> {
        self.submit(0, request_type, sector, len)?;
        self.kick()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut used = Vec::new();
        loop {
            self.take_used(&mut used)?;
            if let Some(done) = used.iter().find(|u| u.slot == 0) {
                return Ok((self.status(0)?, done.len));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(other("request timed out"));
            }
            self.wait_timeout(left)?;
        }
    }
}

/// A connected frontend with its shared memory and queues.
pub struct BlkFrontend {
    frontend: Frontend,
    /// The negotiated virtio features.
    pub features: u64,
    /// The device's config space.
    pub config: DeviceConfig,
    queues: Vec<DriverQueue>,
}

impl BlkFrontend {
    /// Connects to the backend at `socket` and starts `num_queues` queues of `queue_size`
    /// entries, each with `depth` request slots of `max_request` bytes of data.
    pub fn connect(
        socket: &Path,
        num_queues: u16,
        queue_size: u16,
        depth: usize,
        max_request: u32,
    ) -> io::Result<BlkFrontend> {
        if depth == 0 || depth * 3 > usize::from(queue_size) {
            return Err(other("depth must be in 1..=queue_size/3"));
        }
        // Guest memory layout: per queue its rings, then its slots' headers, status bytes and
        // data buffers.
        let ring_bytes = (16 * u64::from(queue_size)).next_multiple_of(PAGE)
            + (6 + 2 * u64::from(queue_size)).next_multiple_of(PAGE)
            + (6 + 8 * u64::from(queue_size)).next_multiple_of(PAGE);
        let small_bytes = (depth as u64 * 32).next_multiple_of(PAGE);
        let data_bytes = depth as u64 * u64::from(max_request).next_multiple_of(PAGE);
        let per_queue = ring_bytes + small_bytes + data_bytes;
        let mem_size = (per_queue * u64::from(num_queues)).next_multiple_of(1 << 21);
        let mem_size_usize = usize::try_from(mem_size).map_err(|_| other("memory too large"))?;

        let memfd = memfd(mem_size)?;
        let region = MmapRegion::<()>::from_file(FileOffset::new(memfd, 0), mem_size_usize)
            .map_err(|e| other(format!("mmap guest memory: {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| other("guest memory region"))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(&region)
            .map_err(|e| vhost_error("memory region", e))?;
        let host_base = info.userspace_addr;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| other(format!("guest memory: {e}")))?;

        let mut frontend = Frontend::connect(socket, u64::from(num_queues))
            .map_err(|e| vhost_error("connect", e))?;
        frontend
            .set_owner()
            .map_err(|e| vhost_error("SET_OWNER", e))?;
        let offered = frontend
            .get_features()
            .map_err(|e| vhost_error("GET_FEATURES", e))?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let wanted = VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_RO
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_MQ
            | protocol;
        let features = offered & wanted;
        if features & VIRTIO_F_VERSION_1 == 0 || features & protocol == 0 {
            return Err(other(format!(
                "backend lacks VERSION_1 or PROTOCOL_FEATURES: {offered:#x}"
            )));
        }
        frontend
            .set_features(features)
            .map_err(|e| vhost_error("SET_FEATURES", e))?;
        let offered_protocol = frontend
            .get_protocol_features()
            .map_err(|e| vhost_error("GET_PROTOCOL_FEATURES", e))?;
        let protocol_features =
            offered_protocol & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
        frontend
            .set_protocol_features(protocol_features)
            .map_err(|e| vhost_error("SET_PROTOCOL_FEATURES", e))?;
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let available = frontend
                .get_queue_num()
                .map_err(|e| vhost_error("GET_QUEUE_NUM", e))?;
            if available < u64::from(num_queues) {
                return Err(other(format!(
                    "backend has {available} queues, {num_queues} wanted"
                )));
            }
        }
        let config = read_config(&mut frontend)?;
        frontend
            .set_mem_table(&[info])
            .map_err(|e| vhost_error("SET_MEM_TABLE", e))?;

        let mut queues = Vec::with_capacity(usize::from(num_queues));
        for index in 0..usize::from(num_queues) {
            let base = per_queue * index as u64;
            let desc_table = base;
            let avail_ring = desc_table + (16 * u64::from(queue_size)).next_multiple_of(PAGE);
            let used_ring = avail_ring + (6 + 2 * u64::from(queue_size)).next_multiple_of(PAGE);
            let small = base + ring_bytes;
            let data = small + small_bytes;
            let slots = (0..depth as u64)
                .map(|i| Slot {
                    header: small + i * 32,
                    status: small + i * 32 + 16,
                    data: data + i * u64::from(max_request).next_multiple_of(PAGE),
                })
                .collect();
            let kick = EventFd::new(0)?;
            let call = EventFd::new(0)?;
            frontend
                .set_vring_num(index, queue_size)
                .map_err(|e| vhost_error("SET_VRING_NUM", e))?;
            frontend
                .set_vring_addr(
                    index,
                    &VringConfigData {
                        queue_max_size: queue_size,
                        queue_size,
                        flags: 0,
                        desc_table_addr: host_base + desc_table,
                        used_ring_addr: host_base + used_ring,
                        avail_ring_addr: host_base + avail_ring,
                        log_addr: None,
                    },
                )
                .map_err(|e| vhost_error("SET_VRING_ADDR", e))?;
            frontend
                .set_vring_base(index, 0)
                .map_err(|e| vhost_error("SET_VRING_BASE", e))?;
            frontend
                .set_vring_call(index, &call)
                .map_err(|e| vhost_error("SET_VRING_CALL", e))?;
            frontend
                .set_vring_kick(index, &kick)
                .map_err(|e| vhost_error("SET_VRING_KICK", e))?;
            frontend
                .set_vring_enable(index, true)
                .map_err(|e| vhost_error("SET_VRING_ENABLE", e))?;
            queues.push(DriverQueue {
                mem: mem.clone(),
                size: queue_size,
                desc_table,
                avail_ring,
                used_ring,
                kick,
                call,
                next_avail: 0,
                last_used: 0,
                slots,
                max_request,
            });
        }
        Ok(BlkFrontend {
            frontend,
            features,
            config,
            queues,
        })
    }

    /// Queue `index`.
    pub fn queue(&mut self, index: usize) -> &mut DriverQueue {
        &mut self.queues[index]
    }

    /// Takes the queues out (to drive them from several threads); the frontend stays connected
    /// while `self` lives.
    pub fn take_queues(&mut self) -> Vec<DriverQueue> {
        std::mem::take(&mut self.queues)
    }

    /// Gives back queues taken with [`BlkFrontend::take_queues`].
    pub fn restore_queues(&mut self, queues: Vec<DriverQueue>) {
        self.queues = queues;
    }

    /// Stops the queues as a frontend does on guest reset (`GET_VRING_BASE`).
    pub fn stop_queue(&mut self, index: usize) -> io::Result<u32> {
        self.frontend
            .get_vring_base(index)
            .map_err(|e| vhost_error("GET_VRING_BASE", e))
    }
}

fn read_config(frontend: &mut Frontend) -> io::Result<DeviceConfig> {
    const LEN: usize = 36;
    let (_, bytes) = frontend
        .get_config(0, LEN as u32, VhostUserConfigFlags::empty(), &[0u8; LEN])
        .map_err(|e| vhost_error("GET_CONFIG", e))?;
    let field = |range: std::ops::Range<usize>| -> io::Result<Vec<u8>> {
        bytes
            .get(range)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| other("short config space"))
    };
    let u32_at = |offset: usize| -> io::Result<u32> {
        let raw = field(offset..offset + 4)?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    };
    let capacity = field(0..8)?;
    let mut capacity_bytes = [0u8; 8];
    capacity_bytes.copy_from_slice(&capacity);
    let queues = field(34..36)?;
    Ok(DeviceConfig {
        capacity_sectors: u64::from_le_bytes(capacity_bytes),
        seg_max: u32_at(12)?,
        blk_size: u32_at(20)?,
        num_queues: u16::from_le_bytes([queues[0], queues[1]]),
    })
}

fn memfd(size: u64) -> io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"gantry-bench-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}
