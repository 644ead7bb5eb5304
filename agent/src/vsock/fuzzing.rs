//! The property the `vsock_packets` fuzz target checks (`agent/fuzz/`), shared with the corpus
//! regression test (`agent/tests/fuzz_corpus.rs`): sequences of hostile guest packets (any op,
//! length, credit, ports, CIDs) and host actions (connect, write, read, close, give up) are fed
//! to the connection table exactly as the device's worker does (wire header → `Header` →
//! `parse_guest_header` → `Muxer::handle_guest_packet` / `handle_invalid_packet`; receive
//! buffers of any size through `Muxer::next_rx_packet`). Checked after every step:
//! - nothing panics; the wire header round-trips;
//! - the state stays bounded: at most `max_connections` connections, at most
//!   [`MAX_PENDING_RSTS`] queued resets, at most `buf_alloc` buffered guest bytes per connection;
//! - every packet to the guest is well formed (host CID → guest CID, stream type, a known op, no
//!   payload on control packets, a payload no larger than the receive buffer);
//! - credit: we advertise our `buf_alloc`; our `fwd_cnt` never decreases, never exceeds what the
//!   guest sent, never lags what the agent read; data to the guest never exceeds the free space
//!   the guest last advertised on that flow;
//! - bytes arrive intact and in order in both directions (the agent reads a prefix of what the
//!   guest sent; the guest receives a prefix of what the agent wrote).

use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use tokio::sync::oneshot;

use super::VsockError;
use super::muxer::{MAX_PENDING_RSTS, Muxer};
use super::packet::{
    HEADER_SIZE, HOST_CID, Header, MAX_PAYLOAD, SHUTDOWN_BOTH, TYPE_STREAM, flow_of, op,
    parse_guest_header,
};
use crate::fuzz_input::Input;

/// The guest's CID in the harness.
pub const GUEST_CID: u64 = 3;
/// Most connections the harness's table keeps.
pub const MAX_CONNECTIONS: usize = 4;
/// The `buf_alloc` values the first input byte selects from.
pub const BUF_ALLOCS: [u32; 4] = [4096, 64, 65536, 1];
/// The receive-buffer sizes a `DRAIN` selects from.
pub const RX_BUFFERS: [usize; 6] = [4096, 0, 1, 64, 65536, 700];

/// Operations of the input program (the first byte of each, modulo the count).
pub mod ops {
    /// `port u8`: the agent connects to a guest port.
    pub const CONNECT: u8 = 0;
    /// A guest packet (see [`super::check_vsock_input`]).
    pub const PACKET: u8 = 1;
    /// `conn u8, len u16`: the agent writes to its stream.
    pub const HOST_WRITE: u8 = 2;
    /// `conn u8`: the agent closes its stream.
    pub const HOST_CLOSE: u8 = 3;
    /// The worker polls the host streams.
    pub const HOST_EVENTS: u8 = 4;
    /// `buffer u8`: the guest posts receive buffers of one size until nothing comes.
    pub const DRAIN: u8 = 5;
    /// `conn u8`: the agent reads what its stream has.
    pub const AGENT_READ: u8 = 6;
    /// `conn u8`: the connector gives up waiting; the worker sweeps.
    pub const ABANDON: u8 = 7;
    /// The guest driver resets: every connection goes.
    pub const RESET_ALL: u8 = 8;
    /// Number of operations.
    pub const COUNT: u8 = 9;
}

/// Byte `offset` of the stream the guest sends on connection `seed`.
fn guest_byte(seed: u32, offset: u64) -> u8 {
    (offset.wrapping_mul(7).wrapping_add(u64::from(seed)) ^ (offset >> 9)) as u8
}

/// Byte `offset` of the stream the agent writes on connection `seed`.
fn agent_byte(seed: u32, offset: u64) -> u8 {
    (offset.wrapping_mul(13).wrapping_add(u64::from(seed) * 3) ^ (offset >> 11)) as u8
}

/// The harness's view of one connection the agent asked for.
#[derive(Debug)]
struct Conn {
    peer_port: u32,
    /// Learned from our `OP_REQUEST`.
    local_port: Option<u32>,
    reply: Option<oneshot::Receiver<Result<UnixStream, VsockError>>>,
    agent: Option<UnixStream>,
    /// Payload bytes the guest sent on the flow (accepted or not).
    guest_sent: u64,
    /// Bytes the agent read from its stream.
    agent_read: u64,
    /// Bytes the agent wrote into its stream.
    agent_written: u64,
    /// Payload bytes the guest received on the flow.
    guest_received: u64,
    /// The credit the guest last advertised in a valid packet on the flow.
    guest_buf_alloc: u32,
    guest_fwd_cnt: u32,
    /// Our last advertised `fwd_cnt` on the flow.
    our_fwd_cnt: Option<u32>,
}

/// Counts of what happened, for the corpus test.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VsockOutcome {
    /// Connections the agent asked for.
    pub connects: usize,
    /// Connections the agent got a stream for.
    pub established: usize,
    /// Connect attempts that failed.
    pub refused: usize,
    /// Payload bytes the agent read (from the guest).
    pub to_agent: u64,
    /// Payload bytes the guest received (from the agent).
    pub to_guest: u64,
    /// Packets to the guest, by op: request, rst, shutdown, rw, credit update.
    pub packets: [usize; 5],
    /// Guest packets that failed validation.
    pub invalid: usize,
}

struct Harness {
    muxer: Muxer,
    buf_alloc: u32,
    conns: Vec<Conn>,
    scratch: Vec<u8>,
    outcome: VsockOutcome,
}

impl Harness {
    fn conn_mut(&mut self, selector: u8) -> Option<&mut Conn> {
        let len = self.conns.len();
        if len == 0 {
            return None;
        }
        self.conns.get_mut(usize::from(selector) % len)
    }

    fn connect(&mut self, selector: u8) {
        // Distinct guest ports, so the harness can tell its connections apart.
        let peer_port = match selector % 4 {
            0 => 10240 + self.conns.len() as u32,
            1 => u32::MAX - self.conns.len() as u32,
            _ => 1 + self.conns.len() as u32 * 1000 + u32::from(selector),
        };
        let mut peer_port = peer_port;
        while self.conns.iter().any(|c| c.peer_port == peer_port) {
            peer_port = peer_port.wrapping_add(0x1_0000);
        }
        let (reply, receiver) = oneshot::channel();
        self.muxer.connect(peer_port, reply);
        self.outcome.connects += 1;
        self.conns.push(Conn {
            peer_port,
            local_port: None,
            reply: Some(receiver),
            agent: None,
            guest_sent: 0,
            agent_read: 0,
            agent_written: 0,
            guest_received: 0,
            guest_buf_alloc: 0,
            guest_fwd_cnt: 0,
            our_fwd_cnt: None,
        });
    }

    /// A guest packet: `flow u8, op u8, len (u8 selector, u16), flags u8, buf_alloc
    /// (u8 selector, u32), fwd_cnt (u8 selector, u16), addressing u8`.
    fn packet(&mut self, input: &mut Input<'_>) {
        let flow_selector = input.u8();
        let (local_port, peer_port, conn_index) = match self.conns.len() {
            _ if flow_selector >= 0xe0 => (input.u32(), input.u32(), None),
            0 => (49152, 10240, None),
            n => {
                let index = usize::from(flow_selector) % n;
                let conn = &self.conns[index];
                match flow_selector >> 6 {
                    // Right ports.
                    0 | 1 => (
                        conn.local_port.unwrap_or(49152),
                        conn.peer_port,
                        Some(index),
                    ),
                    // Right local port, wrong peer port.
                    2 => (conn.local_port.unwrap_or(49152), conn.peer_port ^ 1, None),
                    _ => (conn.local_port.unwrap_or(0) + 1, conn.peer_port, None),
                }
            }
        };
        let op_selector = input.u8();
        let operation = match op_selector % 10 {
            0 => input.u16(),
            n @ 1..=7 => u16::from(n),
            8 => op::RW,
            _ => op::RESPONSE,
        };
        let len_selector = input.u8();
        let len_operand = input.u16();
        let len = match len_selector % 4 {
            0 if operation == op::RW => u32::from(len_operand % 4096) + 1,
            0 => 0,
            1 => u32::from(len_operand),
            2 => MAX_PAYLOAD + u32::from(len_operand % 2),
            _ => u32::from(len_operand) << 16 | u32::from(len_operand),
        };
        let flags = u32::from(input.u8());
        let buf_alloc = match input.u8() % 4 {
            0 => 65536,
            1 => input.u32(),
            2 => 0,
            _ => u32::from(input.u16()),
        };
        let fwd_selector = input.u8();
        let fwd_operand = u32::from(input.u16());
        let received = conn_index.map_or(0, |i| self.conns[i].guest_received as u32);
        let fwd_cnt = match fwd_selector % 4 {
            // Honest: everything received was consumed.
            0 => received,
            1 => received.wrapping_sub(fwd_operand),
            2 => received.wrapping_add(fwd_operand),
            _ => fwd_operand << 16 | fwd_operand,
        };
        let addressing = input.u8();
        let (src_cid, dst_cid, type_) = match addressing % 8 {
            0..=4 => (GUEST_CID, HOST_CID, TYPE_STREAM),
            5 => (input.u64(), HOST_CID, TYPE_STREAM),
            6 => (GUEST_CID, input.u64(), TYPE_STREAM),
            _ => (GUEST_CID, HOST_CID, input.u16()),
        };
        let header = Header {
            src_cid,
            dst_cid,
            src_port: peer_port,
            dst_port: local_port,
            len,
            type_,
            op: operation,
            flags,
            buf_alloc,
            fwd_cnt,
        };
        let wire: [u8; HEADER_SIZE] = header.to_bytes();
        let header = Header::from_bytes(&wire);
        assert_eq!(
            header.to_bytes(),
            wire,
            "the wire header does not round-trip"
        );
        match parse_guest_header(&header, GUEST_CID) {
            Ok(packet) => {
                assert_eq!(packet.flow, flow_of(&header));
                let payload_len = if header.op == op::RW {
                    header.len as usize
                } else {
                    0
                };
                assert!(
                    payload_len <= MAX_PAYLOAD as usize,
                    "payload beyond MAX_PAYLOAD"
                );
                // The flow's connection, if the harness knows it.
                let known = self.conns.iter().position(|c| {
                    c.local_port == Some(packet.flow.local_port)
                        && c.peer_port == packet.flow.peer_port
                });
                let offset = known.map_or(0, |i| self.conns[i].guest_sent);
                let seed = known.map_or(0, |i| i as u32);
                self.scratch.clear();
                self.scratch
                    .extend((0..payload_len as u64).map(|k| guest_byte(seed, offset + k)));
                if let Some(i) = known {
                    let conn = &mut self.conns[i];
                    conn.guest_sent += payload_len as u64;
                    conn.guest_buf_alloc = packet.credit.buf_alloc;
                    conn.guest_fwd_cnt = packet.credit.fwd_cnt;
                }
                self.muxer.handle_guest_packet(packet, &self.scratch);
            }
            Err(error) => {
                self.outcome.invalid += 1;
                self.muxer.handle_invalid_packet(&header, error);
            }
        }
    }

    fn host_write(&mut self, selector: u8, len: u16) {
        let index = usize::from(selector) % self.conns.len().max(1);
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        let Some(agent) = conn.agent.as_mut() else {
            return;
        };
        let bytes: Vec<u8> = (0..u64::from(len))
            .map(|k| agent_byte(index as u32, conn.agent_written + k))
            .collect();
        let mut written = 0;
        while written < bytes.len() {
            match agent.write(&bytes[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        conn.agent_written += written as u64;
    }

    fn agent_read(&mut self, selector: u8) {
        let index = usize::from(selector) % self.conns.len().max(1);
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        let Some(agent) = conn.agent.as_mut() else {
            return;
        };
        let mut buf = [0u8; 8192];
        loop {
            match agent.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    for (k, byte) in buf[..n].iter().enumerate() {
                        let offset = conn.agent_read + k as u64;
                        assert!(offset < conn.guest_sent, "the agent read bytes nobody sent");
                        assert_eq!(
                            *byte,
                            guest_byte(index as u32, offset),
                            "guest data corrupted at offset {offset}"
                        );
                    }
                    conn.agent_read += n as u64;
                    self.outcome.to_agent += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// The agent picks up connect replies.
    fn poll_replies(&mut self) {
        for conn in &mut self.conns {
            let Some(reply) = conn.reply.as_mut() else {
                continue;
            };
            match reply.try_recv() {
                Ok(Ok(stream)) => {
                    stream.set_nonblocking(true).expect("nonblocking stream");
                    conn.agent = Some(stream);
                    conn.reply = None;
                    self.outcome.established += 1;
                }
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => {
                    conn.reply = None;
                    self.outcome.refused += 1;
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
    }

    fn drain(&mut self, selector: u8) {
        let size = RX_BUFFERS[usize::from(selector) % RX_BUFFERS.len()];
        let mut buffer = vec![0u8; size];
        for _ in 0..512 {
            let Some(header) = self.muxer.next_rx_packet(&mut buffer) else {
                break;
            };
            self.check_rx(&header, &buffer);
        }
    }

    fn check_rx(&mut self, header: &Header, payload: &[u8]) {
        assert_eq!(
            (header.src_cid, header.dst_cid, header.type_),
            (HOST_CID, GUEST_CID, TYPE_STREAM),
            "addressing of {header:?}"
        );
        let kind = match header.op {
            op::REQUEST => 0,
            op::RST => 1,
            op::SHUTDOWN => 2,
            op::RW => 3,
            op::CREDIT_UPDATE => 4,
            other => panic!("op {other} sent to the guest"),
        };
        self.outcome.packets[kind] += 1;
        if header.op == op::RW {
            assert!(header.len > 0, "empty data packet");
            assert!(
                header.len as usize <= payload.len(),
                "payload beyond the buffer"
            );
            assert!(header.len <= MAX_PAYLOAD, "payload beyond MAX_PAYLOAD");
        } else {
            assert_eq!(header.len, 0, "payload on a control packet {header:?}");
        }
        if header.op == op::SHUTDOWN {
            assert_eq!(header.flags, SHUTDOWN_BOTH, "shutdown flags");
        }
        if header.op == op::REQUEST {
            let conn = self
                .conns
                .iter_mut()
                .find(|c| c.peer_port == header.dst_port && c.local_port.is_none())
                .expect("a request for a connection the agent asked for");
            conn.local_port = Some(header.src_port);
        }
        let index = self
            .conns
            .iter()
            .position(|c| c.local_port == Some(header.src_port) && c.peer_port == header.dst_port);
        let Some(index) = index else {
            // A stateless reset of a flow the guest made up.
            assert_eq!(header.op, op::RST, "{header:?} on an unknown flow");
            return;
        };
        if header.op == op::RST {
            // Stateless resets carry no credit; a connection's carries its own.
            return;
        }
        let buf_alloc = self.buf_alloc;
        let conn = &mut self.conns[index];
        assert_eq!(header.buf_alloc, buf_alloc, "advertised buf_alloc");
        let fwd_cnt = u64::from(header.fwd_cnt);
        assert!(
            fwd_cnt <= conn.guest_sent,
            "fwd_cnt beyond what the guest sent"
        );
        assert!(
            fwd_cnt >= conn.agent_read,
            "fwd_cnt behind what the agent read"
        );
        if let Some(previous) = conn.our_fwd_cnt {
            assert!(header.fwd_cnt >= previous, "fwd_cnt went backwards");
        }
        conn.our_fwd_cnt = Some(header.fwd_cnt);
        if header.op == op::RW {
            let in_flight = (Wrapping(conn.guest_received as u32) - Wrapping(conn.guest_fwd_cnt)).0;
            let free = conn.guest_buf_alloc.saturating_sub(in_flight);
            assert!(
                header.len <= free,
                "sent {} bytes with {free} free in the guest (buf_alloc {}, fwd_cnt {}, sent {})",
                header.len,
                conn.guest_buf_alloc,
                conn.guest_fwd_cnt,
                conn.guest_received
            );
            for (k, byte) in payload[..header.len as usize].iter().enumerate() {
                let offset = conn.guest_received + k as u64;
                assert!(
                    offset < conn.agent_written,
                    "the guest got bytes nobody wrote"
                );
                assert_eq!(
                    *byte,
                    agent_byte(index as u32, offset),
                    "agent data corrupted at offset {offset}"
                );
            }
            conn.guest_received += u64::from(header.len);
            self.outcome.to_guest += u64::from(header.len);
        }
    }

    fn check_bounds(&self) {
        let connections = self.muxer.connection_count();
        assert!(connections <= MAX_CONNECTIONS, "{connections} connections");
        assert!(
            self.muxer.pending_rsts() <= MAX_PENDING_RSTS,
            "pending resets"
        );
        assert!(
            self.muxer.buffered_to_host() as u64 <= connections as u64 * u64::from(self.buf_alloc),
            "buffered guest data beyond the credit"
        );
    }
}

/// Runs one input: the first byte selects `buf_alloc` from [`BUF_ALLOCS`], the rest is a
/// program of [`ops`]. A `PACKET` is `flow u8` (below 0xe0: a connection of the harness, with
/// the right or a wrong port, or the default flow if there is none; else two raw `u32` ports), `op u8` (1..=7 the op, 0 a raw
/// `u16`), a length, flags, a credit and the addressing (mostly right, or a raw source CID,
/// destination CID or type). Panics if the muxer breaks a property (see the module docs).
pub fn check_vsock_input(data: &[u8]) -> VsockOutcome {
    let mut input = Input::new(data);
    let buf_alloc = BUF_ALLOCS[usize::from(input.u8()) % BUF_ALLOCS.len()];
    let mut harness = Harness {
        muxer: Muxer::new(GUEST_CID, buf_alloc, MAX_CONNECTIONS).expect("muxer"),
        buf_alloc,
        conns: Vec::new(),
        scratch: Vec::with_capacity(MAX_PAYLOAD as usize),
        outcome: VsockOutcome::default(),
    };
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % ops::COUNT {
            ops::CONNECT => {
                let selector = input.u8();
                if harness.conns.len() < 64 {
                    harness.connect(selector);
                }
            }
            ops::PACKET => harness.packet(&mut input),
            ops::HOST_WRITE => {
                let selector = input.u8();
                let len = input.u16();
                harness.host_write(selector, len);
            }
            ops::HOST_CLOSE => {
                let selector = input.u8();
                if let Some(conn) = harness.conn_mut(selector) {
                    conn.agent = None;
                }
            }
            ops::HOST_EVENTS => {
                harness.muxer.handle_host_events();
            }
            ops::DRAIN => {
                let selector = input.u8();
                harness.drain(selector);
            }
            ops::AGENT_READ => {
                let selector = input.u8();
                harness.agent_read(selector);
            }
            ops::ABANDON => {
                let selector = input.u8();
                if let Some(conn) = harness.conn_mut(selector) {
                    conn.reply = None;
                }
                harness.muxer.sweep_abandoned();
            }
            _ => {
                harness.muxer.reset_all();
                for conn in &mut harness.conns {
                    // The guest forgets its side too.
                    conn.local_port = None;
                    conn.peer_port = conn.peer_port.wrapping_add(0x1000_0000);
                }
            }
        }
        harness.poll_replies();
        harness.check_bounds();
    }
    harness.outcome
}

/// Named seed inputs for `vsock_packets`, written into `agent/fuzz/corpus/vsock_packets` by the
/// corpus test's `write_seeds` (run with `--ignored`). Names starting with `valid-` carry data
/// both ways over an established connection; the corpus test checks it.
pub mod seeds {
    use super::ops;
    use crate::vsock::packet::op;

    /// Builds an input program.
    #[derive(Debug, Default)]
    pub struct Program(Vec<u8>);

    impl Program {
        /// A program with `buf_alloc` selector `config`.
        pub fn new(config: u8) -> Program {
            Program(vec![config])
        }

        /// An op and its operand byte (`HOST_EVENTS` and `RESET_ALL` take none: it is
        /// ignored).
        pub fn op(mut self, operation: u8, operand: u8) -> Program {
            self.0.push(operation);
            if !matches!(operation, ops::HOST_EVENTS | ops::RESET_ALL) {
                self.0.push(operand);
            }
            self
        }

        /// The agent writes `len` bytes on connection `conn`.
        pub fn write(mut self, conn: u8, len: u16) -> Program {
            self.0.extend_from_slice(&[ops::HOST_WRITE, conn]);
            self.0.extend_from_slice(&len.to_le_bytes());
            self
        }

        /// A guest packet on connection `conn`'s flow with an honest credit (65536, all
        /// consumed); `len` is a data packet's length minus one (below 4096).
        pub fn packet(self, conn: u8, operation: u16, len: u16, flags: u8) -> Program {
            self.raw_packet(conn, operation as u8, (0, len), flags, 0, (0, 0), 0)
        }

        /// A guest packet with every selector given (see [`super::check_vsock_input`]).
        #[allow(clippy::too_many_arguments)]
        pub fn raw_packet(
            mut self,
            flow: u8,
            op_selector: u8,
            len: (u8, u16),
            flags: u8,
            buf_alloc_selector: u8,
            fwd: (u8, u16),
            addressing: u8,
        ) -> Program {
            // The operands some selectors read, in the order the harness reads them.
            self.0.extend_from_slice(&[ops::PACKET, flow]);
            if flow >= 0xe0 {
                self.0
                    .extend_from_slice(&[0x34, 0x12, 0, 0, 0x78, 0x56, 0, 0]);
            }
            self.0.push(op_selector);
            if op_selector.is_multiple_of(10) {
                self.0.extend_from_slice(&[0x99, 0]);
            }
            self.0.push(len.0);
            self.0.extend_from_slice(&len.1.to_le_bytes());
            self.0.extend_from_slice(&[flags, buf_alloc_selector]);
            match buf_alloc_selector % 4 {
                1 => self.0.extend_from_slice(&[0xff; 4]),
                3 => self.0.extend_from_slice(&[0x00, 0x10]),
                _ => {}
            }
            self.0.push(fwd.0);
            self.0.extend_from_slice(&fwd.1.to_le_bytes());
            self.0.push(addressing);
            match addressing % 8 {
                5 | 6 => self.0.extend_from_slice(&[4, 0, 0, 0, 0, 0, 0, 0]),
                7 => self.0.extend_from_slice(&[5, 0]),
                _ => {}
            }
            self
        }

        /// The input bytes.
        pub fn bytes(self) -> Vec<u8> {
            self.0
        }
    }

    /// A connection established on the harness's connection 0.
    fn established(config: u8) -> Program {
        Program::new(config)
            .op(ops::CONNECT, 0)
            .op(ops::DRAIN, 0)
            .packet(0, op::RESPONSE, 0, 0)
    }

    /// Every seed: (name, input).
    pub fn all() -> Vec<(String, Vec<u8>)> {
        let seeds = vec![
            (
                "valid-data-both-ways",
                established(0)
                    .write(0, 100)
                    .op(ops::HOST_EVENTS, 0)
                    .op(ops::DRAIN, 0)
                    .packet(0, op::RW, 99, 0)
                    .op(ops::AGENT_READ, 0)
                    .bytes(),
            ),
            (
                "valid-credit-flow",
                established(0)
                    .packet(0, op::RW, 4095, 0)
                    .op(ops::AGENT_READ, 0)
                    .op(ops::HOST_EVENTS, 0)
                    .op(ops::DRAIN, 0)
                    .packet(0, op::CREDIT_REQUEST, 0, 0)
                    .op(ops::DRAIN, 0)
                    .write(0, 5000)
                    .op(ops::HOST_EVENTS, 0)
                    .op(ops::DRAIN, 5)
                    .op(ops::DRAIN, 2)
                    .bytes(),
            ),
            (
                "valid-shutdown-send-then-close",
                established(2)
                    .packet(0, op::RW, 1000, 0)
                    .packet(0, op::SHUTDOWN, 0, 2)
                    .op(ops::AGENT_READ, 0)
                    .write(0, 10)
                    .op(ops::HOST_EVENTS, 0)
                    .op(ops::DRAIN, 0)
                    .op(ops::HOST_CLOSE, 0)
                    .op(ops::HOST_EVENTS, 0)
                    .op(ops::DRAIN, 0)
                    .bytes(),
            ),
            (
                "overrun-credit",
                established(1)
                    .packet(0, op::RW, 63, 0)
                    .packet(0, op::RW, 0, 0)
                    .op(ops::DRAIN, 0)
                    .op(ops::AGENT_READ, 0)
                    .bytes(),
            ),
            (
                "refused-and-abandoned",
                Program::new(0)
                    .op(ops::CONNECT, 0)
                    .op(ops::CONNECT, 1)
                    .op(ops::DRAIN, 0)
                    .packet(0, op::RST, 0, 0)
                    .op(ops::ABANDON, 1)
                    .op(ops::DRAIN, 0)
                    .bytes(),
            ),
            (
                "connection-limit",
                Program::new(0)
                    .op(ops::CONNECT, 0)
                    .op(ops::CONNECT, 0)
                    .op(ops::CONNECT, 0)
                    .op(ops::CONNECT, 0)
                    .op(ops::CONNECT, 0)
                    .op(ops::CONNECT, 0)
                    .op(ops::DRAIN, 0)
                    .bytes(),
            ),
            (
                "unknown-flows-and-spoofing",
                Program::new(0)
                    .raw_packet(0xff, 1, (0, 0), 0, 0, (0, 0), 0)
                    .raw_packet(0xff, 5, (0, 10), 0, 0, (0, 0), 5)
                    .raw_packet(0xff, 0, (1, 0), 0, 0, (0, 0), 6)
                    .raw_packet(0xff, 8, (2, 0), 0, 0, (0, 0), 7)
                    .op(ops::DRAIN, 0)
                    .bytes(),
            ),
            (
                "lying-credit",
                established(0)
                    .write(0, 60000)
                    .raw_packet(0, 6, (0, 0), 0, 1, (2, 0xffff), 0)
                    .op(ops::HOST_EVENTS, 0)
                    .op(ops::DRAIN, 4)
                    .raw_packet(0, 6, (0, 0), 0, 2, (1, 100), 0)
                    .op(ops::DRAIN, 4)
                    .op(ops::RESET_ALL, 0)
                    .op(ops::DRAIN, 0)
                    .bytes(),
            ),
        ];
        seeds
            .into_iter()
            .map(|(name, bytes)| (name.to_string(), bytes))
            .collect()
    }
}
