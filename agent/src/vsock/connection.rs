//! One host-initiated stream connection: its state machine and its credit accounting.
//!
//! The host side of a connection is one end of a unix socketpair (the agent holds the other end).
//! Bytes from the guest are written into it; bytes the agent writes are read from it straight into
//! the guest's receive buffers, never more than the guest's advertised free space.
//!
//! Credit, per the virtio-vsock spec:
//! - we advertise `buf_alloc` and `fwd_cnt` (bytes of guest payload actually written into the
//!   host stream). The guest may have at most `buf_alloc - (rx_cnt - fwd_cnt_we_last_sent)` bytes
//!   in flight; a guest that sends more has ignored its credit and the connection is reset. Bytes
//!   not yet written to the host stream wait in `to_host`, which therefore never exceeds
//!   `buf_alloc`.
//! - the guest advertises its own `buf_alloc`/`fwd_cnt`; we never send more than the free space
//!   they describe, and stop reading the host stream meanwhile (back-pressure on the agent).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use tracing::debug;

use super::VsockError;
use super::packet::{Credit, FlowKey, GuestOp, Header, MAX_PAYLOAD, SHUTDOWN_BOTH, op};
use super::requests::ConnectReply;

/// Where a connection is in its life.
#[derive(Debug)]
enum State {
    /// Our `OP_REQUEST` is queued (`request_sent == false`) or sent; waiting for `OP_RESPONSE`.
    Connecting {
        request_sent: bool,
        agent_end: Option<UnixStream>,
        reply: Option<ConnectReply>,
    },
    /// Data flows both ways.
    Established,
    /// The host side closed: send `OP_SHUTDOWN`, then `OP_RST`, then forget the connection.
    SendShutdown,
    /// Send `OP_RST`, then forget the connection.
    SendRst,
    /// Nothing left to do: the connection table drops it.
    Closed,
}

/// A host-initiated vsock stream connection.
#[derive(Debug)]
pub struct Connection {
    flow: FlowKey,
    guest_cid: u64,
    state: State,
    /// The device's end of the socketpair; `None` once closed toward the agent.
    stream: Option<UnixStream>,
    /// Our receive buffer, advertised to the guest.
    buf_alloc: u32,
    /// Payload bytes received from the guest.
    rx_cnt: Wrapping<u32>,
    /// Payload bytes from the guest written into the host stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    sent_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// The guest's latest credit information.
    peer: Credit,
    /// Guest bytes not yet accepted by the host stream (at most `buf_alloc`).
    to_host: VecDeque<u8>,
    /// The host stream may have data (edge-triggered readiness, cleared on `WouldBlock`).
    host_readable: bool,
    /// The guest sent `SHUTDOWN` with `RCV`: it will receive no more data.
    guest_no_more_rx: bool,
    /// The guest sent `SHUTDOWN` with `SEND`: it will send no more data.
    guest_no_more_tx: bool,
    /// The host stream's write side was shut after the guest's `SHUTDOWN(SEND)`.
    host_write_shut: bool,
    /// A `CREDIT_UPDATE` should be sent (asked for, or our free space grew a lot unseen).
    credit_update_due: bool,
    /// Maintained by the connection table: this connection is in its work queue.
    pub(crate) queued: bool,
}

impl Connection {
    /// A connection the host opens to `flow.peer_port` in the guest. `stream` is the device's
    /// end of the socketpair, `agent_end` is handed to the connector once the guest accepts.
    pub fn new_outgoing(
        flow: FlowKey,
        guest_cid: u64,
        buf_alloc: u32,
        stream: UnixStream,
        agent_end: UnixStream,
        reply: ConnectReply,
    ) -> Connection {
        Connection {
            flow,
            guest_cid,
            state: State::Connecting {
                request_sent: false,
                agent_end: Some(agent_end),
                reply: Some(reply),
            },
            stream: Some(stream),
            buf_alloc,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            sent_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer: Credit::default(),
            to_host: VecDeque::new(),
            host_readable: false,
            guest_no_more_rx: false,
            guest_no_more_tx: false,
            host_write_shut: false,
            credit_update_due: false,
            queued: false,
        }
    }

    /// The connection's ports.
    pub fn flow(&self) -> FlowKey {
        self.flow
    }

    /// Whether the connection is finished and can be dropped.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether the connection is established.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    /// Guest bytes buffered for the host stream.
    pub fn buffered_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Whether the connection has a packet for the guest.
    pub fn wants_rx(&self) -> bool {
        match &self.state {
            State::Connecting { request_sent, .. } => !request_sent,
            State::Established => self.credit_update_due || self.may_send_data(),
            State::SendShutdown | State::SendRst => true,
            State::Closed => false,
        }
    }

    /// Free space in the guest's receive buffer for this connection.
    fn peer_free(&self) -> u32 {
        let in_flight = (self.tx_cnt - Wrapping(self.peer.fwd_cnt)).0;
        self.peer.buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest's advertised receive space is used up: data for it waits for its
    /// credit update.
    pub fn peer_credit_used_up(&self) -> bool {
        self.peer_free() == 0
    }

    fn may_send_data(&self) -> bool {
        self.host_readable
            && self.stream.is_some()
            && !self.guest_no_more_rx
            && self.peer_free() > 0
    }

    fn header(&mut self, op: u16) -> Header {
        self.sent_fwd_cnt = self.fwd_cnt;
        self.credit_update_due = false;
        Header::to_guest(
            self.flow,
            self.guest_cid,
            op,
            Credit {
                buf_alloc: self.buf_alloc,
                fwd_cnt: self.fwd_cnt.0,
            },
        )
    }

    /// Produces the next packet for the guest, reading payload from the host stream into
    /// `payload` (the guest buffer's capacity). Returns the header (its `len` is the number of
    /// payload bytes written to `payload`), or `None` when there is nothing to send.
    pub fn next_packet(&mut self, payload: &mut [u8]) -> Option<Header> {
        match &mut self.state {
            State::Connecting { request_sent, .. } => {
                if *request_sent {
                    return None;
                }
                *request_sent = true;
                Some(self.header(op::REQUEST))
            }
            State::SendShutdown => {
                self.state = State::SendRst;
                let mut header = self.header(op::SHUTDOWN);
                header.flags = SHUTDOWN_BOTH;
                Some(header)
            }
            State::SendRst => {
                self.state = State::Closed;
                Some(self.header(op::RST))
            }
            State::Closed => None,
            State::Established => {
                if self.may_send_data() && !payload.is_empty() {
                    let limit = payload
                        .len()
                        .min(self.peer_free() as usize)
                        .min(MAX_PAYLOAD as usize);
                    if let Some(read) = self.read_host(payload.get_mut(..limit)?) {
                        if read == 0 {
                            // The agent closed its end.
                            self.close_from_host();
                            return self.next_packet(payload);
                        }
                        self.tx_cnt += Wrapping(read as u32);
                        let mut header = self.header(op::RW);
                        header.len = read as u32;
                        return Some(header);
                    }
                }
                if self.credit_update_due {
                    return Some(self.header(op::CREDIT_UPDATE));
                }
                None
            }
        }
    }

    /// Reads from the host stream into `buf` (non-empty). `Some(0)` means end of stream (or a
    /// fatal error), `None` means no data for now.
    fn read_host(&mut self, buf: &mut [u8]) -> Option<usize> {
        let stream = self.stream.as_mut()?;
        loop {
            match stream.read(buf) {
                Ok(read) => return Some(read),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return None;
                }
                Err(e) => {
                    debug!(flow = ?self.flow, error = %e, "vsock: host stream read failed");
                    return Some(0);
                }
            }
        }
    }

    /// The agent closed its end (or it failed): tell the guest with `SHUTDOWN` then `RST`.
    fn close_from_host(&mut self) {
        self.stream = None;
        self.to_host = VecDeque::new();
        self.state = State::SendShutdown;
    }

    /// Resets the connection: the agent's stream is closed and the guest gets `OP_RST`.
    pub fn reset(&mut self) {
        if let State::Connecting {
            request_sent,
            reply,
            ..
        } = &mut self.state
        {
            if let Some(reply) = reply.take() {
                let _ = reply.send(Err(VsockError::Refused));
            }
            if !*request_sent {
                // The guest never heard of this connection.
                self.stream = None;
                self.state = State::Closed;
                return;
            }
        }
        self.stream = None;
        self.to_host = VecDeque::new();
        if !matches!(self.state, State::Closed) {
            self.state = State::SendRst;
        }
    }

    /// Whether this is a pending connect whose connector gave up waiting.
    pub fn is_abandoned(&self) -> bool {
        match &self.state {
            State::Connecting { reply, .. } => reply.as_ref().is_none_or(|r| r.is_closed()),
            _ => false,
        }
    }

    /// Handles a validated packet from the guest on this connection.
    pub fn on_guest_packet(&mut self, op: GuestOp, credit: Credit, payload: &[u8]) {
        match &mut self.state {
            State::Connecting {
                request_sent,
                agent_end,
                reply,
            } => match op {
                GuestOp::Response if *request_sent => {
                    self.peer = credit;
                    let sent = match (reply.take(), agent_end.take()) {
                        (Some(reply), Some(agent_end)) => reply.send(Ok(agent_end)).is_ok(),
                        _ => false,
                    };
                    if sent {
                        self.state = State::Established;
                        // The agent may already have written.
                        self.host_readable = true;
                    } else {
                        // The connector gave up: the guest must forget the connection.
                        self.reset();
                    }
                }
                GuestOp::Rst => {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Err(VsockError::Refused));
                    }
                    self.stream = None;
                    self.state = State::Closed;
                }
                _ => {
                    debug!(flow = ?self.flow, ?op, "vsock: unexpected packet while connecting");
                    self.reset();
                }
            },
            State::Established => {
                self.peer = credit;
                match op {
                    GuestOp::Rw { .. } => self.on_guest_data(payload),
                    GuestOp::CreditUpdate => {}
                    GuestOp::CreditRequest => self.credit_update_due = true,
                    GuestOp::Shutdown {
                        no_more_rx,
                        no_more_tx,
                    } => {
                        self.guest_no_more_rx |= no_more_rx;
                        self.guest_no_more_tx |= no_more_tx;
                        self.after_host_write();
                    }
                    GuestOp::Rst => {
                        self.stream = None;
                        self.to_host = VecDeque::new();
                        self.state = State::Closed;
                    }
                    GuestOp::Request | GuestOp::Response => {
                        debug!(flow = ?self.flow, ?op, "vsock: unexpected packet on open connection");
                        self.reset();
                    }
                }
            }
            // We are tearing the connection down; only the guest's RST matters.
            State::SendShutdown | State::SendRst => {
                if op == GuestOp::Rst {
                    self.state = State::Closed;
                }
            }
            State::Closed => {}
        }
    }

    /// Payload from the guest: enforce its credit, then write through to the host stream.
    fn on_guest_data(&mut self, payload: &[u8]) {
        if self.guest_no_more_tx {
            debug!(flow = ?self.flow, "vsock: guest sent data after SHUTDOWN(SEND)");
            self.reset();
            return;
        }
        let Ok(len) = u32::try_from(payload.len()) else {
            self.reset();
            return;
        };
        // What the guest may have in flight is bounded by the fwd_cnt we last told it.
        let in_flight = (self.rx_cnt - self.sent_fwd_cnt).0;
        if u64::from(in_flight) + u64::from(len) > u64::from(self.buf_alloc) {
            debug!(
                flow = ?self.flow,
                in_flight,
                len,
                buf_alloc = self.buf_alloc,
                "vsock: guest overran its credit; resetting"
            );
            self.reset();
            return;
        }
        self.rx_cnt += Wrapping(len);
        let mut rest = payload;
        if self.to_host.is_empty() {
            match self.write_host(payload) {
                Ok(written) => rest = payload.get(written..).unwrap_or_default(),
                Err(()) => return,
            }
        }
        self.to_host.extend(rest);
        self.after_host_write();
    }

    /// Writes to the host stream; `Err` means the stream is gone and the connection is closing.
    fn write_host(&mut self, data: &[u8]) -> Result<usize, ()> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(0);
        };
        let mut written = 0;
        while written < data.len() {
            match stream.write(data.get(written..).unwrap_or_default()) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!(flow = ?self.flow, error = %e, "vsock: host stream write failed");
                    self.close_from_host();
                    return Err(());
                }
            }
        }
        self.fwd_cnt += Wrapping(written as u32);
        Ok(written)
    }

    /// The host stream became writable: flush what the guest sent.
    pub fn on_host_writable(&mut self) {
        if !self.is_established() || self.to_host.is_empty() {
            return;
        }
        loop {
            let (front, _) = self.to_host.as_slices();
            if front.is_empty() {
                break;
            }
            let chunk = front.to_vec();
            match self.write_host(&chunk) {
                Ok(0) => break,
                Ok(written) => {
                    self.to_host.drain(..written.min(self.to_host.len()));
                }
                Err(()) => return,
            }
        }
        self.after_host_write();
    }

    /// The host stream may have data to read (or reached end of stream).
    pub fn on_host_readable(&mut self) {
        self.host_readable = true;
    }

    /// Bookkeeping after bytes moved into the host stream: credit updates and shutdown progress.
    fn after_host_write(&mut self) {
        if !self.is_established() {
            return;
        }
        // Tell the guest about freed space once what it believes is free drops below half.
        let unseen = (self.fwd_cnt - self.sent_fwd_cnt).0;
        let believed_in_flight = (self.rx_cnt - self.sent_fwd_cnt).0;
        let believed_free = self.buf_alloc.saturating_sub(believed_in_flight);
        if unseen > 0 && believed_free < self.buf_alloc / 2 {
            self.credit_update_due = true;
        }
        if self.to_host.is_empty() && self.guest_no_more_tx {
            if self.guest_no_more_rx {
                // The guest closed: everything it sent reached the agent, now confirm with RST.
                self.stream = None;
                self.state = State::SendRst;
            } else if !self.host_write_shut {
                self.host_write_shut = true;
                if let Some(stream) = &self.stream {
                    let _ = stream.shutdown(Shutdown::Write);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsock::packet::{HOST_CID, TYPE_STREAM};
    use tokio::sync::oneshot;

    const GUEST_CID: u64 = 3;
    const FLOW: FlowKey = FlowKey {
        local_port: 50000,
        peer_port: 10240,
    };

    struct Fixture {
        conn: Connection,
        agent: Option<UnixStream>,
        reply: oneshot::Receiver<Result<UnixStream, VsockError>>,
    }

    fn connecting(buf_alloc: u32) -> Fixture {
        let (device_end, agent_end) = UnixStream::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        let (tx, rx) = oneshot::channel();
        Fixture {
            conn: Connection::new_outgoing(FLOW, GUEST_CID, buf_alloc, device_end, agent_end, tx),
            agent: None,
            reply: rx,
        }
    }

    fn established(buf_alloc: u32, peer: Credit) -> Fixture {
        let mut f = connecting(buf_alloc);
        let mut buf = [0u8; 0];
        assert_eq!(f.conn.next_packet(&mut buf).unwrap().op, op::REQUEST);
        f.conn.on_guest_packet(GuestOp::Response, peer, &[]);
        assert!(f.conn.is_established());
        f.agent = Some(f.reply.try_recv().unwrap().unwrap());
        f
    }

    #[test]
    fn request_header_describes_the_connection() {
        let mut f = connecting(1234);
        assert!(f.conn.wants_rx());
        let header = f.conn.next_packet(&mut [0u8; 16]).unwrap();
        assert_eq!(header.src_cid, HOST_CID);
        assert_eq!(header.dst_cid, GUEST_CID);
        assert_eq!(header.src_port, FLOW.local_port);
        assert_eq!(header.dst_port, FLOW.peer_port);
        assert_eq!(header.type_, TYPE_STREAM);
        assert_eq!(header.op, op::REQUEST);
        assert_eq!(header.buf_alloc, 1234);
        assert_eq!(header.len, 0);
        assert!(!f.conn.wants_rx());
    }

    #[test]
    fn host_data_never_exceeds_peer_credit() {
        let mut f = established(
            4096,
            Credit {
                buf_alloc: 10,
                fwd_cnt: 0,
            },
        );
        f.agent.as_mut().unwrap().write_all(&[7u8; 25]).unwrap();
        let mut buf = [0u8; 4096];
        let header = f.conn.next_packet(&mut buf).unwrap();
        assert_eq!((header.op, header.len), (op::RW, 10));
        assert!(!f.conn.wants_rx(), "no credit left");
        assert!(f.conn.next_packet(&mut buf).is_none());
        // The guest consumed 4 bytes.
        f.conn.on_guest_packet(
            GuestOp::CreditUpdate,
            Credit {
                buf_alloc: 10,
                fwd_cnt: 4,
            },
            &[],
        );
        assert!(f.conn.wants_rx());
        let header = f.conn.next_packet(&mut buf).unwrap();
        assert_eq!((header.op, header.len), (op::RW, 4));
    }

    #[test]
    fn lying_peer_fwd_cnt_gives_no_credit() {
        // fwd_cnt ahead of what we ever sent: treated as no free space, not as a huge one.
        let mut f = established(
            4096,
            Credit {
                buf_alloc: 10,
                fwd_cnt: 5,
            },
        );
        f.agent.as_mut().unwrap().write_all(b"data").unwrap();
        assert!(!f.conn.wants_rx());
        assert!(f.conn.next_packet(&mut [0u8; 64]).is_none());
    }

    #[test]
    fn guest_overrun_resets_and_closes_the_host_stream() {
        let mut f = established(
            100,
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
        );
        f.conn.on_guest_packet(
            GuestOp::Rw { len: 100 },
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
            &[1u8; 100],
        );
        assert!(f.conn.is_established());
        f.conn.on_guest_packet(
            GuestOp::Rw { len: 1 },
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
            &[1u8; 1],
        );
        let header = f.conn.next_packet(&mut [0u8; 64]).unwrap();
        assert_eq!(header.op, op::RST);
        assert!(f.conn.is_closed());
        let mut received = Vec::new();
        f.agent
            .as_mut()
            .unwrap()
            .read_to_end(&mut received)
            .unwrap();
        assert_eq!(
            received,
            vec![1u8; 100],
            "bytes within credit arrived, then EOF"
        );
    }

    #[test]
    fn credit_update_follows_consumption() {
        let mut f = established(
            100,
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
        );
        f.conn.on_guest_packet(
            GuestOp::Rw { len: 60 },
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
            &[1u8; 60],
        );
        // 60 bytes written through: the guest believes only 40 are free.
        assert!(f.conn.wants_rx());
        let header = f.conn.next_packet(&mut [0u8; 64]).unwrap();
        assert_eq!(
            (header.op, header.fwd_cnt, header.buf_alloc),
            (op::CREDIT_UPDATE, 60, 100)
        );
        // Now the guest may send 100 more.
        f.conn.on_guest_packet(
            GuestOp::Rw { len: 100 },
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
            &[2u8; 100],
        );
        assert!(f.conn.is_established());
    }

    #[test]
    fn host_close_sends_shutdown_then_rst() {
        let mut f = established(
            100,
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
        );
        f.agent = None;
        f.conn.on_host_readable();
        let mut buf = [0u8; 64];
        let header = f.conn.next_packet(&mut buf).unwrap();
        assert_eq!((header.op, header.flags), (op::SHUTDOWN, SHUTDOWN_BOTH));
        assert_eq!(f.conn.next_packet(&mut buf).unwrap().op, op::RST);
        assert!(f.conn.is_closed());
    }

    #[test]
    fn guest_rst_while_connecting_refuses() {
        let mut f = connecting(100);
        f.conn.next_packet(&mut []).unwrap();
        f.conn.on_guest_packet(GuestOp::Rst, Credit::default(), &[]);
        assert!(f.conn.is_closed());
        assert!(matches!(f.reply.try_recv(), Ok(Err(VsockError::Refused))));
    }

    #[test]
    fn guest_shutdown_both_flushes_then_resets() {
        let mut f = established(
            100,
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
        );
        f.conn
            .on_guest_packet(GuestOp::Rw { len: 3 }, Credit::default(), b"bye");
        f.conn.on_guest_packet(
            GuestOp::Shutdown {
                no_more_rx: true,
                no_more_tx: true,
            },
            Credit::default(),
            &[],
        );
        assert_eq!(f.conn.next_packet(&mut [0u8; 8]).unwrap().op, op::RST);
        let mut received = Vec::new();
        f.agent
            .as_mut()
            .unwrap()
            .read_to_end(&mut received)
            .unwrap();
        assert_eq!(received, b"bye");
    }

    #[test]
    fn guest_shutdown_send_half_closes_host_stream() {
        let mut f = established(
            100,
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
        );
        f.conn.on_guest_packet(
            GuestOp::Rw { len: 2 },
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
            b"hi",
        );
        f.conn.on_guest_packet(
            GuestOp::Shutdown {
                no_more_rx: false,
                no_more_tx: true,
            },
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
            &[],
        );
        let agent = f.agent.as_mut().unwrap();
        let mut received = Vec::new();
        agent.read_to_end(&mut received).unwrap();
        assert_eq!(received, b"hi");
        // The agent can still send.
        agent.write_all(b"ok").unwrap();
        f.conn.on_host_readable();
        let mut buf = [0u8; 8];
        let header = f.conn.next_packet(&mut buf).unwrap();
        assert_eq!((header.op, header.len), (op::RW, 2));
        assert_eq!(&buf[..2], b"ok");
    }
}
