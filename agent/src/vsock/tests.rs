//! Backend tests: a mock guest driver exchanges packets with the backend through split virtqueues
//! laid out in real guest memory.
//!
//! The driver side writes the rings itself: virtio-queue's `MockSplitQueue` re-zeroes the ring
//! indices each time it is constructed and places the used ring over the tail of a 256-entry
//! available ring, which breaks a driver that posts buffers across many calls.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::VsockError;
use super::backend::{BACKEND_EVENT, RX_QUEUE, TX_QUEUE, VsockBackend};
use super::muxer::MAX_PENDING_RSTS;
use super::packet::{HEADER_SIZE, HOST_CID, Header, MAX_PAYLOAD, SHUTDOWN_BOTH, TYPE_STREAM, op};
use super::requests::ConnectRequest;

const GUEST_CID: u64 = 3;
const SHIM_PORT: u32 = 10240;
const QUEUE_SIZE: u16 = 256;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
/// Offsets inside a ring area: descriptor table, available ring, used ring.
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;
const BUFFERS: u64 = 0x10_0000;
/// Room for one descriptor's buffer (a full 64 KiB payload plus slack).
const SLOT: u64 = 0x1_1000;
/// rx buffers as Linux 6.1 posts them: header and 4 KiB of data in separate descriptors.
const RX_DATA_LEN: u32 = 4096;
/// Descriptors reserved per tx chain.
const TX_DESCS_PER_CHAIN: u16 = 4;

type Reply = oneshot::Receiver<Result<UnixStream, VsockError>>;

/// One part of a tx descriptor chain, as a (possibly hostile) driver lays it out.
struct Part {
    bytes: Vec<u8>,
    /// Descriptor length (may lie about `bytes`).
    len: u32,
    write_only: bool,
    /// Overrides the buffer address (e.g. outside guest memory).
    addr: Option<u64>,
}

impl Part {
    fn new(bytes: Vec<u8>) -> Part {
        let len = bytes.len() as u32;
        Part {
            bytes,
            len,
            write_only: false,
            addr: None,
        }
    }
}

/// The mock guest driver.
struct Guest {
    mem: GuestMemoryMmap,
    vrings: Vec<VringRwLock>,
    backend: Arc<VsockBackend>,
    rx_posted: u16,
    rx_seen: u16,
    tx_sent: u16,
}

fn guest_header(local_port: u32, peer_port: u32, op: u16, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: peer_port,
        dst_port: local_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

/// Driver-side view of one split virtqueue at `ring` in guest memory.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    base: u64,
}

impl Ring<'_> {
    fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.mem
            .write_obj(desc, GuestAddress(self.base + 16 * u64::from(index)))
            .unwrap();
    }

    /// Publishes chain `head` as the `count`-th available buffer (0-based).
    fn make_available(&self, count: u16, head: u16) {
        let avail = self.base + AVAIL_OFFSET;
        let slot = u64::from(count % QUEUE_SIZE);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.mem
            .write_obj(count.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.base + USED_OFFSET + 2))
            .unwrap()
    }

    /// (descriptor head, length) of used element `n`.
    fn used_elem(&self, n: u16) -> (u16, u32) {
        let at = self.base + USED_OFFSET + 4 + 8 * u64::from(n % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id as u16, len)
    }

    /// `avail_event`, where an EVENT_IDX device asks to be kicked next.
    fn avail_event(&self) -> u16 {
        let at = self.base + USED_OFFSET + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

fn mock_queue(mem: &GuestMemoryMmap, ring: u64) -> Ring<'_> {
    Ring { mem, base: ring }
}

impl Guest {
    fn new(buf_alloc: u32, max_connections: usize) -> Guest {
        let size = BUFFERS + 2 * u64::from(QUEUE_SIZE) * SLOT;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let backend = Arc::new(VsockBackend::new(GUEST_CID, buf_alloc, max_connections).unwrap());
        backend.update_memory(atomic.clone()).unwrap();
        let mut vrings = Vec::new();
        for ring in [RX_RING, TX_RING] {
            let vring = VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap();
            vring.set_queue_size(QUEUE_SIZE);
            vring
                .set_queue_info(ring, ring + AVAIL_OFFSET, ring + USED_OFFSET)
                .unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vrings.push(vring);
        }
        Guest {
            mem,
            vrings,
            backend,
            rx_posted: 0,
            rx_seen: 0,
            tx_sent: 0,
        }
    }

    fn queue(&self, ring: u64) -> Ring<'_> {
        mock_queue(&self.mem, ring)
    }

    fn event(&self, event: u16) {
        self.backend
            .handle_event(event, EventSet::IN, &self.vrings, 0)
            .unwrap();
    }

    /// The driver posts `count` receive buffers and kicks.
    fn post_rx(&mut self, count: u16) {
        for _ in 0..count {
            let head = self.rx_posted.wrapping_mul(2) % QUEUE_SIZE;
            let queue = mock_queue(&self.mem, RX_RING);
            let header_addr = BUFFERS + u64::from(head) * SLOT;
            let data_addr = BUFFERS + u64::from(head + 1) * SLOT;
            let write = VRING_DESC_F_WRITE as u16;
            let next = VRING_DESC_F_NEXT as u16;
            queue.store_desc(
                head,
                header_addr,
                HEADER_SIZE as u32,
                write | next,
                head + 1,
            );
            queue.store_desc(head + 1, data_addr, RX_DATA_LEN, write, 0);
            queue.make_available(self.rx_posted, head);
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }
        self.event(RX_QUEUE);
    }

    /// Packets the device put in the receive queue since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let queue = mock_queue(&self.mem, RX_RING);
        let used = queue.used_idx();
        let mut packets = Vec::new();
        while self.rx_seen != used {
            let (head, used_len) = queue.used_elem(self.rx_seen);
            let head = u64::from(head);
            let mut bytes = [0u8; HEADER_SIZE];
            self.mem
                .read_slice(&mut bytes, GuestAddress(BUFFERS + head * SLOT))
                .unwrap();
            let header = Header::from_bytes(&bytes);
            assert_eq!(used_len, HEADER_SIZE as u32 + header.len, "used length");
            let mut payload = vec![0u8; header.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(BUFFERS + (head + 1) * SLOT))
                .unwrap();
            packets.push((header, payload));
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        packets
    }

    /// The driver queues one tx chain made of `parts` and kicks.
    fn send_chain(&mut self, parts: &[Part]) {
        assert!(!parts.is_empty() && parts.len() <= usize::from(TX_DESCS_PER_CHAIN));
        let head = self.tx_sent.wrapping_mul(TX_DESCS_PER_CHAIN) % QUEUE_SIZE;
        let queue = mock_queue(&self.mem, TX_RING);
        for (i, part) in parts.iter().enumerate() {
            let index = head + i as u16;
            let addr = part
                .addr
                .unwrap_or(BUFFERS + (u64::from(QUEUE_SIZE) + u64::from(index)) * SLOT);
            if part.addr.is_none() {
                self.mem
                    .write_slice(&part.bytes, GuestAddress(addr))
                    .unwrap();
            }
            let mut flags = 0u16;
            if part.write_only {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if i + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            queue.store_desc(index, addr, part.len, flags, index + 1);
        }
        queue.make_available(self.tx_sent, head);
        self.tx_sent = self.tx_sent.wrapping_add(1);
        self.event(TX_QUEUE);
        // Every tx buffer is consumed at once, whatever it held.
        assert_eq!(
            self.queue(TX_RING).used_idx(),
            self.tx_sent,
            "tx buffer not returned"
        );
    }

    fn send(&mut self, header: Header, payload: &[u8]) {
        let mut parts = vec![Part::new(header.to_bytes().to_vec())];
        if !payload.is_empty() {
            parts.push(Part::new(payload.to_vec()));
        }
        self.send_chain(&parts);
    }

    /// The agent asks for a connection to `port`.
    fn connect(&mut self, port: u32) -> Reply {
        let (reply, receiver) = oneshot::channel();
        self.backend
            .requests()
            .submit(ConnectRequest { port, reply })
            .unwrap();
        self.event(BACKEND_EVENT);
        receiver
    }

    /// Full handshake; returns the agent's stream (blocking, with a timeout) and the host port.
    fn establish(&mut self, guest_buf_alloc: u32) -> (UnixStream, u32) {
        self.establish_with_rx_buffers(guest_buf_alloc, 8)
    }

    /// Like `establish`, posting `rx_buffers` receive buffers first (one carries the request).
    fn establish_with_rx_buffers(
        &mut self,
        guest_buf_alloc: u32,
        rx_buffers: u16,
    ) -> (UnixStream, u32) {
        self.post_rx(rx_buffers);
        let mut reply = self.connect(SHIM_PORT);
        let packets = self.received();
        assert_eq!(packets.len(), 1);
        let request = packets[0].0;
        assert_eq!(request.op, op::REQUEST);
        let mut response = guest_header(request.src_port, SHIM_PORT, op::RESPONSE, 0);
        response.buf_alloc = guest_buf_alloc;
        self.send(response, &[]);
        let stream = reply.try_recv().unwrap().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (stream, request.src_port)
    }

    fn connections(&self) -> usize {
        self.backend.with_muxer(|m| m.connection_count())
    }
}

#[test]
fn config_space_holds_the_guest_cid() {
    let guest = Guest::new(4096, 4);
    assert_eq!(guest.backend.get_config(0, 8), GUEST_CID.to_le_bytes());
    assert_eq!(guest.backend.get_config(4, 4), 0u32.to_le_bytes());
    assert!(guest.backend.get_config(4, 8).is_empty());
    assert!(guest.backend.get_config(u32::MAX, 2).is_empty());
}

#[test]
fn connect_handshake_then_data_flows_both_ways() {
    let mut guest = Guest::new(256 * 1024, 4);
    guest.post_rx(8);
    let mut reply = guest.connect(SHIM_PORT);
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    let request = packets[0].0;
    assert_eq!(request.op, op::REQUEST);
    assert_eq!((request.src_cid, request.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(request.dst_port, SHIM_PORT);
    assert_eq!(request.type_, TYPE_STREAM);
    assert_eq!(request.buf_alloc, 256 * 1024);
    assert!(matches!(
        reply.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    ));

    guest.send(
        guest_header(request.src_port, SHIM_PORT, op::RESPONSE, 0),
        &[],
    );
    let mut agent = reply.try_recv().unwrap().unwrap();
    agent.set_nonblocking(false).unwrap();

    // Host to guest.
    agent.write_all(b"hello from the agent").unwrap();
    guest.event(BACKEND_EVENT);
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RW);
    assert_eq!(packets[0].0.dst_port, SHIM_PORT);
    assert_eq!(packets[0].1, b"hello from the agent");

    // Guest to host.
    guest.send(
        guest_header(request.src_port, SHIM_PORT, op::RW, 5),
        b"howdy",
    );
    let mut buf = [0u8; 5];
    agent.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"howdy");
}

#[test]
fn large_transfer_is_split_into_guest_buffers() {
    let mut guest = Guest::new(256 * 1024, 4);
    let (mut agent, _port) = guest.establish(1 << 20);
    let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
    agent.write_all(&data).unwrap();
    guest.post_rx(8);
    guest.event(BACKEND_EVENT);
    let packets = guest.received();
    assert!(
        packets
            .iter()
            .all(|(h, p)| h.op == op::RW && p.len() <= RX_DATA_LEN as usize)
    );
    let received: Vec<u8> = packets.into_iter().flat_map(|(_, p)| p).collect();
    assert_eq!(received, data);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut guest = Guest::new(4096, 4);
    let (mut agent, port) = guest.establish(1000);
    agent.write_all(&[9u8; 3000]).unwrap();
    guest.post_rx(8);
    guest.event(BACKEND_EVENT);
    let sent: usize = guest.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(
        sent, 1000,
        "never more than the guest's buf_alloc in flight"
    );

    // The guest consumed 600 bytes and says so.
    let mut update = guest_header(port, SHIM_PORT, op::CREDIT_UPDATE, 0);
    update.buf_alloc = 1000;
    update.fwd_cnt = 600;
    guest.send(update, &[]);
    let sent: usize = guest.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(sent, 600);
}

#[test]
fn guest_credit_request_gets_credit_update() {
    let mut guest = Guest::new(4096, 4);
    let (_agent, port) = guest.establish(4096);
    guest.send(guest_header(port, SHIM_PORT, op::CREDIT_REQUEST, 0), &[]);
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::CREDIT_UPDATE);
    assert_eq!((packets[0].0.buf_alloc, packets[0].0.fwd_cnt), (4096, 0));
}

#[test]
fn fwd_cnt_counts_only_bytes_written_to_the_host_stream() {
    let mut guest = Guest::new(1 << 20, 4);
    let (agent, port) = guest.establish(4096);
    // Fill the socketpair until the kernel refuses more, with the agent not reading.
    let mut sent = 0u32;
    let chunk = vec![5u8; MAX_PAYLOAD as usize];
    let mut last_fwd_cnt = 0;
    while sent + MAX_PAYLOAD <= 1 << 20 {
        guest.send(guest_header(port, SHIM_PORT, op::RW, MAX_PAYLOAD), &chunk);
        sent += MAX_PAYLOAD;
        guest.post_rx(1);
        for (header, _) in guest.received() {
            assert!(header.fwd_cnt <= sent);
            last_fwd_cnt = last_fwd_cnt.max(header.fwd_cnt);
        }
    }
    let buffered = guest.backend.with_muxer(|m| m.buffered_to_host()) as u32;
    assert!(buffered > 0, "the socketpair should have filled up");
    assert!(buffered <= 1 << 20);
    assert!(
        last_fwd_cnt <= sent - buffered,
        "fwd_cnt must exclude buffered bytes"
    );
    drop(agent);
}

#[test]
fn guest_request_to_any_host_port_gets_rst_without_state() {
    let mut guest = Guest::new(4096, 4);
    guest.post_rx(4);
    guest.send(guest_header(1234, 5555, op::REQUEST, 0), &[]);
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    let rst = packets[0].0;
    assert_eq!(rst.op, op::RST);
    assert_eq!((rst.src_cid, rst.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((rst.src_port, rst.dst_port), (1234, 5555));
    assert_eq!(guest.connections(), 0);
}

#[test]
fn guest_rst_refuses_the_connect() {
    let mut guest = Guest::new(4096, 4);
    guest.post_rx(4);
    let mut reply = guest.connect(SHIM_PORT);
    let request = guest.received()[0].0;
    guest.send(guest_header(request.src_port, SHIM_PORT, op::RST, 0), &[]);
    assert!(matches!(reply.try_recv(), Ok(Err(VsockError::Refused))));
    assert_eq!(guest.connections(), 0);
    assert!(guest.received().is_empty(), "no RST answers an RST");
}

#[test]
fn connect_before_driver_is_ready_fails_not_ready() {
    let mut guest = Guest::new(4096, 4);
    guest.vrings[0].set_enabled(false);
    let mut reply = guest.connect(SHIM_PORT);
    assert!(matches!(reply.try_recv(), Ok(Err(VsockError::NotReady))));
}

#[test]
fn host_close_sends_shutdown_then_rst() {
    let mut guest = Guest::new(4096, 4);
    let (agent, port) = guest.establish(4096);
    drop(agent);
    guest.event(BACKEND_EVENT);
    let packets = guest.received();
    let ops: Vec<(u16, u32)> = packets.iter().map(|(h, _)| (h.op, h.flags)).collect();
    assert_eq!(ops, vec![(op::SHUTDOWN, SHUTDOWN_BOTH), (op::RST, 0)]);
    assert!(packets.iter().all(|(h, _)| h.src_port == port));
    assert_eq!(guest.connections(), 0);
}

#[test]
fn guest_close_delivers_data_then_eof_to_the_agent() {
    let mut guest = Guest::new(4096, 4);
    let (mut agent, port) = guest.establish(4096);
    guest.send(guest_header(port, SHIM_PORT, op::RW, 3), b"bye");
    let mut shutdown = guest_header(port, SHIM_PORT, op::SHUTDOWN, 0);
    shutdown.flags = SHUTDOWN_BOTH;
    guest.send(shutdown, &[]);
    let packets = guest.received();
    assert_eq!(packets.last().map(|(h, _)| h.op), Some(op::RST));
    let mut received = Vec::new();
    agent.read_to_end(&mut received).unwrap();
    assert_eq!(received, b"bye");
    assert_eq!(guest.connections(), 0);
}

#[test]
fn device_reset_closes_every_host_stream() {
    let mut guest = Guest::new(4096, 4);
    let (mut first, _) = guest.establish(4096);
    let (mut second, _) = guest.establish(4096);
    let mut pending = guest.connect(SHIM_PORT);
    assert_eq!(guest.connections(), 3);
    guest.backend.stop_vring(0).unwrap();
    assert_eq!(guest.connections(), 0);
    let mut buf = [0u8; 1];
    assert_eq!(first.read(&mut buf).unwrap(), 0, "EOF after reset");
    assert_eq!(second.read(&mut buf).unwrap(), 0, "EOF after reset");
    assert!(matches!(
        pending.try_recv(),
        Err(oneshot::error::TryRecvError::Closed)
    ));
}

#[test]
fn overrunning_guest_is_reset_and_memory_stays_bounded() {
    const BUF_ALLOC: u32 = 8192;
    let mut guest = Guest::new(BUF_ALLOC, 4);
    // No spare rx buffers: the device cannot tell the guest about freed space, so the credit
    // the guest has is exactly BUF_ALLOC.
    let (mut agent, port) = guest.establish_with_rx_buffers(4096, 1);
    guest.send(guest_header(port, SHIM_PORT, op::RW, 4096), &[1u8; 4096]);
    guest.send(guest_header(port, SHIM_PORT, op::RW, 4096), &[2u8; 4096]);
    assert_eq!(guest.connections(), 1);
    // One byte more than the credit: reset.
    guest.send(guest_header(port, SHIM_PORT, op::RW, 1), &[3u8]);
    // The flood goes on; none of it is kept.
    for _ in 0..50 {
        guest.send(guest_header(port, SHIM_PORT, op::RW, 4096), &[4u8; 4096]);
        assert!(guest.backend.with_muxer(|m| m.buffered_to_host()) <= BUF_ALLOC as usize);
    }
    guest.post_rx(8);
    let packets = guest.received();
    let rsts = packets.iter().filter(|(h, _)| h.op == op::RST).count();
    assert!(
        rsts >= 1,
        "the overrun must be answered with RST: {packets:?}"
    );
    assert_eq!(packets.first().map(|(h, _)| h.op), Some(op::RST));
    let mut received = Vec::new();
    agent.read_to_end(&mut received).unwrap();
    assert_eq!(
        received.len(),
        2 * 4096,
        "only bytes within credit reach the agent"
    );
    assert!(received.iter().all(|b| *b != 3 && *b != 4));
}

#[test]
fn hostile_headers_are_dropped_or_reset_without_state() {
    let mut guest = Guest::new(4096, 4);
    let (mut agent, port) = guest.establish(4096);
    guest.post_rx(32);
    guest.received();

    // Spoofed source CID on the live flow: dropped silently, connection unharmed.
    let mut spoofed = guest_header(port, SHIM_PORT, op::RST, 0);
    spoofed.src_cid = 99;
    guest.send(spoofed, &[]);
    // Destination not the host: dropped silently.
    let mut elsewhere = guest_header(port, SHIM_PORT, op::RW, 1);
    elsewhere.dst_cid = 7;
    guest.send(elsewhere, b"x");
    assert!(guest.received().is_empty());
    assert_eq!(guest.connections(), 1);

    // Wrong socket type, unknown op, oversized length on unknown flows: stateless RSTs.
    let mut seqpacket = guest_header(7000, 1, op::REQUEST, 0);
    seqpacket.type_ = 2;
    guest.send(seqpacket, &[]);
    guest.send(guest_header(7001, 1, 42, 0), &[]);
    guest.send(guest_header(7002, 1, op::RW, u32::MAX), &[]);
    guest.send(guest_header(7003, 1, op::CREDIT_UPDATE, 100), &[]);
    let packets = guest.received();
    let answered: Vec<(u16, u32)> = packets.iter().map(|(h, _)| (h.op, h.src_port)).collect();
    assert_eq!(
        answered,
        vec![
            (op::RST, 7000),
            (op::RST, 7001),
            (op::RST, 7002),
            (op::RST, 7003)
        ]
    );
    assert_eq!(guest.connections(), 1);

    // The live connection still works.
    guest.send(guest_header(port, SHIM_PORT, op::RW, 2), b"ok");
    let mut buf = [0u8; 2];
    agent.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
}

#[test]
fn malformed_descriptor_chains_never_panic() {
    let mut guest = Guest::new(4096, 4);
    let (mut agent, port) = guest.establish(4096);
    guest.post_rx(32);
    guest.received();

    // Header descriptor shorter than a header.
    guest.send_chain(&[Part::new(vec![0u8; 10])]);
    // Header descriptor that is device-writable.
    let mut write_only = Part::new(guest_header(port, SHIM_PORT, op::RW, 1).to_bytes().to_vec());
    write_only.write_only = true;
    guest.send_chain(&[write_only, Part::new(vec![1])]);
    // Header descriptor outside guest memory.
    let mut outside = Part::new(vec![0u8; HEADER_SIZE]);
    outside.addr = Some(u64::MAX - 8);
    guest.send_chain(&[outside]);
    assert!(
        guest.received().is_empty(),
        "no flow can be named: nothing answered"
    );

    // Valid header, payload descriptor shorter than the header's len: the flow is reset.
    let header = guest_header(port, SHIM_PORT, op::RW, 100)
        .to_bytes()
        .to_vec();
    let mut short = Part::new(vec![0u8; 100]);
    short.len = 50;
    guest.send_chain(&[Part::new(header), short]);
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!((packets[0].0.op, packets[0].0.src_port), (op::RST, port));
    let mut buf = [0u8; 1];
    assert_eq!(
        agent.read(&mut buf).unwrap(),
        0,
        "agent sees the connection end"
    );
    assert_eq!(guest.connections(), 0);

    // Payload promised but no payload descriptor, and payload outside guest memory.
    guest.send_chain(&[Part::new(
        guest_header(9000, 1, op::RW, 8).to_bytes().to_vec(),
    )]);
    let mut far = Part::new(vec![0u8; 8]);
    far.addr = Some(1 << 40);
    guest.send_chain(&[
        Part::new(guest_header(9001, 1, op::RW, 8).to_bytes().to_vec()),
        far,
    ]);
    let ports: Vec<u32> = guest.received().iter().map(|(h, _)| h.src_port).collect();
    assert_eq!(ports, vec![9000, 9001]);
}

#[test]
fn malformed_rx_buffers_are_returned_empty() {
    let mut guest = Guest::new(4096, 4);
    // A read-only rx buffer: unusable, handed back with length 0, no panic.
    let mem = guest.mem.clone();
    let queue = mock_queue(&mem, RX_RING);
    queue.store_desc(0, BUFFERS, HEADER_SIZE as u32, 0, 0);
    queue.make_available(0, 0);
    guest.rx_posted = 1;
    guest.send(guest_header(1, 2, op::REQUEST, 0), &[]);
    assert_eq!(queue.used_idx(), 1);
    assert_eq!(queue.used_elem(0), (0, 0));
    // The RST is still pending and goes out once a good buffer arrives.
    guest.rx_seen = 1;
    guest.post_rx(1);
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RST);
}

#[test]
fn connection_storm_keeps_no_state_and_bounded_rsts() {
    let mut guest = Guest::new(4096, 4);
    // The guest connects to 2000 host ports without giving the device a single rx buffer.
    for i in 0..2000u32 {
        guest.send(guest_header(20_000 + i, 30_000 + i, op::REQUEST, 0), &[]);
    }
    assert_eq!(guest.connections(), 0);
    assert_eq!(
        guest.backend.with_muxer(|m| m.pending_rsts()),
        MAX_PENDING_RSTS
    );
    let mut rsts = 0;
    while rsts < MAX_PENDING_RSTS {
        guest.post_rx(64);
        let packets = guest.received();
        if packets.is_empty() {
            break;
        }
        assert!(packets.iter().all(|(h, _)| h.op == op::RST));
        rsts += packets.len();
    }
    assert_eq!(rsts, MAX_PENDING_RSTS);
    assert_eq!(guest.backend.with_muxer(|m| m.pending_rsts()), 0);
}

#[test]
fn connection_limit_applies_per_device() {
    let mut guest = Guest::new(4096, 2);
    let (_a, _) = guest.establish(4096);
    let (_b, _) = guest.establish(4096);
    let mut third = guest.connect(SHIM_PORT);
    assert!(matches!(
        third.try_recv(),
        Ok(Err(VsockError::TooManyConnections))
    ));
    // Another device is unaffected.
    let mut other = Guest::new(4096, 2);
    let (_c, _) = other.establish(4096);
}

#[test]
fn event_idx_mode_processes_and_rearms_queues() {
    let mut guest = Guest::new(4096, 4);
    guest.backend.set_event_idx(true);
    for vring in &guest.vrings {
        vring.set_queue_event_idx(true);
    }
    let (mut agent, port) = guest.establish(4096);
    for round in 0..3u8 {
        guest.send(guest_header(port, SHIM_PORT, op::RW, 1), &[round]);
        let mut buf = [0u8; 1];
        agent.read_exact(&mut buf).unwrap();
        assert_eq!(buf[0], round);
        agent.write_all(&[round]).unwrap();
        guest.post_rx(1);
        guest.event(BACKEND_EVENT);
        let packets = guest.received();
        assert!(packets.iter().any(|(h, p)| h.op == op::RW && p == &[round]));
    }
    // With EVENT_IDX the device publishes where it wants the next kick (avail_event).
    assert_eq!(guest.queue(TX_RING).avail_event(), guest.tx_sent);
}

#[test]
fn abandoned_connect_is_dropped_and_reset() {
    let mut guest = Guest::new(4096, 4);
    guest.post_rx(4);
    let reply = guest.connect(SHIM_PORT);
    let request = guest.received()[0].0;
    drop(reply);
    guest.backend.requests().wake();
    guest.event(BACKEND_EVENT);
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(
        (packets[0].0.op, packets[0].0.src_port),
        (op::RST, request.src_port)
    );
    assert_eq!(guest.connections(), 0);
    // A late RESPONSE is answered with RST (the flow is unknown now).
    guest.send(
        guest_header(request.src_port, SHIM_PORT, op::RESPONSE, 0),
        &[],
    );
    assert_eq!(guest.received()[0].0.op, op::RST);
}

#[test]
fn host_stream_is_nonblocking_for_the_agent() {
    let mut guest = Guest::new(4096, 4);
    guest.post_rx(4);
    let mut reply = guest.connect(SHIM_PORT);
    let request = guest.received()[0].0;
    guest.send(
        guest_header(request.src_port, SHIM_PORT, op::RESPONSE, 0),
        &[],
    );
    let mut stream = reply.try_recv().unwrap().unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        stream.read(&mut buf).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
}

/// A hand-rolled vhost-user frontend: just enough messages to exercise the device's socket.
mod frontend {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    pub const GET_FEATURES: u32 = 1;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_CONFIG: u32 = 24;
    const VERSION_1: u32 = 0x1;

    pub fn send(stream: &mut UnixStream, code: u32, payload: &[u8]) {
        let mut message = Vec::new();
        message.extend_from_slice(&code.to_le_bytes());
        message.extend_from_slice(&VERSION_1.to_le_bytes());
        message.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        message.extend_from_slice(payload);
        stream.write_all(&message).unwrap();
    }

    pub fn reply(stream: &mut UnixStream, code: u32) -> Vec<u8> {
        let mut header = [0u8; 12];
        stream.read_exact(&mut header).unwrap();
        assert_eq!(u32::from_le_bytes(header[0..4].try_into().unwrap()), code);
        let size = u32::from_le_bytes(header[8..12].try_into().unwrap());
        let mut payload = vec![0u8; size as usize];
        stream.read_exact(&mut payload).unwrap();
        payload
    }

    pub fn get_u64(stream: &mut UnixStream, code: u32) -> u64 {
        send(stream, code, &[]);
        u64::from_le_bytes(reply(stream, code).try_into().unwrap())
    }

    /// Negotiates CONFIG and reads the 8-byte virtio-vsock config space.
    pub fn guest_cid(stream: &mut UnixStream) -> u64 {
        let protocol = get_u64(stream, GET_PROTOCOL_FEATURES);
        let config_bit = 1u64 << 9;
        assert_ne!(protocol & config_bit, 0, "CONFIG protocol feature offered");
        send(stream, SET_PROTOCOL_FEATURES, &config_bit.to_le_bytes());
        let mut request = Vec::new();
        request.extend_from_slice(&0u32.to_le_bytes()); // offset
        request.extend_from_slice(&8u32.to_le_bytes()); // size
        request.extend_from_slice(&0u32.to_le_bytes()); // flags
        request.extend_from_slice(&[0u8; 8]);
        send(stream, GET_CONFIG, &request);
        let answer = reply(stream, GET_CONFIG);
        assert_eq!(answer.len(), 12 + 8);
        u64::from_le_bytes(answer[12..20].try_into().unwrap())
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

#[test]
fn device_serves_frontends_one_after_another_and_shuts_down() {
    use super::{VsockDevice, VsockDeviceConfig};
    use std::os::unix::fs::FileTypeExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock.sock");
    let device = VsockDevice::start(VsockDeviceConfig::new(&path, 7)).unwrap();
    // Bound synchronously: a frontend may connect right away.
    assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
    let connector = device.connector();
    assert!(matches!(
        block_on(connector.connect(SHIM_PORT)),
        Err(VsockError::NotReady)
    ));

    // A second device is independent of the first.
    let other_path = dir.path().join("other.sock");
    let other = VsockDevice::start(VsockDeviceConfig::new(&other_path, 8)).unwrap();
    let mut other_frontend = UnixStream::connect(&other_path).unwrap();
    assert_eq!(frontend::guest_cid(&mut other_frontend), 8);

    let mut first = UnixStream::connect(&path).unwrap();
    let features = frontend::get_u64(&mut first, frontend::GET_FEATURES);
    assert_ne!(features & (1 << 32), 0, "VERSION_1");
    assert_ne!(features & (1 << 29), 0, "EVENT_IDX");
    assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES");
    assert_eq!(frontend::guest_cid(&mut first), 7);
    // A frontend is attached but the driver has not started the queues.
    assert!(matches!(
        block_on(connector.connect(SHIM_PORT)),
        Err(VsockError::NotReady)
    ));

    // QEMU exits; a new one attaches to the same socket.
    drop(first);
    let mut second = UnixStream::connect(&path).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(frontend::guest_cid(&mut second), 7);

    device.shutdown();
    assert!(!path.exists(), "socket file removed");
    let mut buf = [0u8; 1];
    assert_eq!(
        second.read(&mut buf).unwrap_or(0),
        0,
        "frontend disconnected"
    );
    assert!(matches!(
        block_on(connector.connect(SHIM_PORT)),
        Err(VsockError::NotReady)
    ));

    // The other device still serves.
    assert_eq!(frontend::guest_cid(&mut other_frontend), 8);
    drop(other);
    assert!(!other_path.exists());
}

#[test]
fn device_refuses_bad_config_and_non_socket_paths() {
    use super::{VsockDevice, VsockDeviceConfig};

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        VsockDevice::start(VsockDeviceConfig::new(&file, 3)),
        Err(VsockError::Bind { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        assert!(matches!(
            VsockDevice::start(VsockDeviceConfig::new(dir.path().join("s"), cid)),
            Err(VsockError::InvalidConfig(_))
        ));
    }
}

/// Regression (the pattern the `blk_queue` fuzz target found in the layer store): with
/// `EVENT_IDX`, an available index more than a queue size ahead must not make the worker spin
/// on the tx or the rx queue.
#[test]
fn an_available_index_out_of_range_does_not_spin_the_worker() {
    let mut guest = Guest::new(4096, 4);
    guest.backend.set_event_idx(true);
    for vring in &guest.vrings {
        vring.set_queue_event_idx(true);
    }
    guest.queue(TX_RING).make_available(QUEUE_SIZE + 5, 0);
    guest.queue(RX_RING).make_available(QUEUE_SIZE + 5, 0);
    let (done, finished) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        guest.event(TX_QUEUE);
        // A connect leaves a request for the guest: rx has work but no usable buffer.
        let reply = guest.connect(SHIM_PORT);
        guest.event(RX_QUEUE);
        let _ = done.send(());
        (guest, reply)
    });
    finished
        .recv_timeout(Duration::from_secs(10))
        .expect("the worker returns with bad available indexes");
    let (guest, _reply) = worker.join().unwrap();
    assert_eq!(guest.queue(TX_RING).used_idx(), 0);
    assert_eq!(guest.queue(RX_RING).used_idx(), 0);
}

#[test]
fn connections_bytes_and_credit_stalls_are_counted() {
    use crate::metrics::tests::sample;
    let metrics = crate::metrics::Metrics::new();
    let mut guest = Guest::new(4096, 4);
    guest.backend.count_into(metrics.vm("vm0").vsock);
    let (mut agent, port) = guest.establish(1000);
    let vm = [("vm", "vm0")];
    let bytes = |direction| {
        sample(
            &metrics,
            "gantry_vsock_bytes_total",
            &[("vm", "vm0"), ("direction", direction)],
        )
    };
    assert_eq!(
        sample(&metrics, "gantry_vsock_connections_total", &vm),
        Some(1.0)
    );

    // 3000 bytes against 1000 of guest credit: 1000 go, and the stream waits.
    agent.write_all(&[7u8; 3000]).unwrap();
    guest.post_rx(8);
    guest.event(BACKEND_EVENT);
    let sent: usize = guest.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(sent, 1000);
    assert_eq!(bytes("to_guest"), Some(1000.0));
    assert_eq!(
        sample(&metrics, "gantry_vsock_credit_stalls_total", &vm),
        Some(1.0)
    );

    guest.send(guest_header(port, SHIM_PORT, op::RW, 5), b"howdy");
    let mut buf = [0u8; 5];
    agent.read_exact(&mut buf).unwrap();
    assert_eq!(bytes("from_guest"), Some(5.0));
}
