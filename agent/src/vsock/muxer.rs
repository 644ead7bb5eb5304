//! The connection table of one device: routes validated guest packets to connections, decides
//! what goes to the guest next, and watches the host ends of the connections.
//!
//! Bounds, whatever the guest does:
//! - at most `max_connections` connections (all opened by the host);
//! - the guest cannot create state: a packet for an unknown flow is answered with a stateless
//!   `OP_RST`, and those wait in a queue of at most [`MAX_PENDING_RSTS`] (more are dropped; the
//!   guest's connect then times out);
//! - each connection buffers at most its `buf_alloc` bytes (see `connection.rs`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use tracing::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::VsockError;
use super::connection::Connection;
use super::packet::{Credit, FlowKey, GuestOp, GuestPacket, Header, PacketError, flow_of, op};
use super::requests::ConnectReply;
use crate::metrics::VsockMetrics;

/// Most stateless `OP_RST`s waiting for a guest receive buffer.
pub const MAX_PENDING_RSTS: usize = 256;
/// First host port handed out to host-initiated connections.
const FIRST_EPHEMERAL_PORT: u32 = 49152;
/// Epoll token of the connect-request eventfd; connection tokens have [`CONNECTION_TOKEN`] set.
pub const CONTROL_TOKEN: u64 = 0;
/// Marks an epoll token as a connection's; the low 32 bits are its local port.
const CONNECTION_TOKEN: u64 = 1 << 32;
/// Host events handled per wake-up; the rest are picked up on the next one.
const EVENTS_PER_WAKE: usize = 64;

/// The connections of one device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    buf_alloc: u32,
    max_connections: usize,
    /// Keyed by local (host) port: every connection is host-initiated, so it is unique.
    connections: HashMap<u32, Connection>,
    /// Local ports of connections with a packet for the guest, each at most once.
    work: VecDeque<u32>,
    /// Flows to answer with a stateless `OP_RST`.
    rsts: VecDeque<FlowKey>,
    dropped_rsts: u64,
    next_port: u32,
    epoll: Epoll,
    metrics: VsockMetrics,
}

impl Muxer {
    /// An empty table for the guest `guest_cid`.
    pub fn new(guest_cid: u64, buf_alloc: u32, max_connections: usize) -> io::Result<Muxer> {
        Ok(Muxer {
            guest_cid,
            buf_alloc,
            max_connections,
            connections: HashMap::new(),
            work: VecDeque::new(),
            rsts: VecDeque::new(),
            dropped_rsts: 0,
            next_port: FIRST_EPHEMERAL_PORT,
            epoll: Epoll::new()?,
            metrics: VsockMetrics::default(),
        })
    }

    /// Counts connections and bytes into `metrics` from now on.
    pub fn count_into(&mut self, metrics: VsockMetrics) {
        self.metrics = metrics;
    }

    /// Also watches `fd` (readable) and reports it from [`Muxer::handle_host_events`].
    pub fn watch_control_fd(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
        )
    }

    /// Number of connections in the table.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Number of stateless `OP_RST`s waiting to be sent.
    pub fn pending_rsts(&self) -> usize {
        self.rsts.len()
    }

    /// Guest bytes buffered for the host streams, over all connections.
    pub fn buffered_to_host(&self) -> usize {
        self.connections
            .values()
            .map(Connection::buffered_to_host)
            .sum()
    }

    /// Opens a connection to `port` in the guest; the outcome goes to `reply`.
    pub fn connect(&mut self, port: u32, reply: ConnectReply) {
        if self.connections.len() >= self.max_connections {
            let _ = reply.send(Err(VsockError::TooManyConnections));
            return;
        }
        let Some(local_port) = self.allocate_port() else {
            let _ = reply.send(Err(VsockError::TooManyConnections));
            return;
        };
        let pair = UnixStream::pair().and_then(|(device_end, agent_end)| {
            device_end.set_nonblocking(true)?;
            agent_end.set_nonblocking(true)?;
            self.epoll.ctl(
                ControlOperation::Add,
                device_end.as_raw_fd(),
                EpollEvent::new(
                    EventSet::IN
                        | EventSet::OUT
                        | EventSet::READ_HANG_UP
                        | EventSet::EDGE_TRIGGERED,
                    CONNECTION_TOKEN | u64::from(local_port),
                ),
            )?;
            Ok((device_end, agent_end))
        });
        let (device_end, agent_end) = match pair {
            Ok(pair) => pair,
            Err(e) => {
                let _ = reply.send(Err(VsockError::Io(e)));
                return;
            }
        };
        let flow = FlowKey {
            local_port,
            peer_port: port,
        };
        let connection = Connection::new_outgoing(
            flow,
            self.guest_cid,
            self.buf_alloc,
            device_end,
            agent_end,
            reply,
        );
        self.connections.insert(local_port, connection);
        self.schedule(local_port);
    }

    fn allocate_port(&mut self) -> Option<u32> {
        // The table is bounded, so a free port is found within max_connections + 1 tries.
        for _ in 0..=self.max_connections {
            let port = self.next_port;
            self.next_port = match self.next_port.checked_add(1) {
                Some(next) if next != u32::MAX => next,
                _ => FIRST_EPHEMERAL_PORT,
            };
            if !self.connections.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }

    /// Drops pending connects whose connector stopped waiting (the guest gets `OP_RST` if it
    /// already saw our `OP_REQUEST`).
    pub fn sweep_abandoned(&mut self) {
        let abandoned: Vec<u32> = self
            .connections
            .iter()
            .filter(|(_, c)| c.is_abandoned())
            .map(|(port, _)| *port)
            .collect();
        for port in abandoned {
            if let Some(connection) = self.connections.get_mut(&port) {
                connection.reset();
            }
            self.schedule(port);
        }
    }

    /// Puts the connection in the work queue if it has something for the guest, or drops it if
    /// it is finished.
    fn schedule(&mut self, local_port: u32) {
        let Some(connection) = self.connections.get_mut(&local_port) else {
            return;
        };
        if connection.is_closed() {
            self.connections.remove(&local_port);
        } else if connection.wants_rx() && !connection.queued {
            connection.queued = true;
            self.work.push_back(local_port);
        }
    }

    fn queue_rst(&mut self, flow: FlowKey) {
        if self.rsts.len() >= MAX_PENDING_RSTS {
            self.dropped_rsts = self.dropped_rsts.saturating_add(1);
            if self.dropped_rsts.is_power_of_two() {
                warn!(
                    dropped = self.dropped_rsts,
                    "vsock: guest floods unknown flows; dropping RSTs"
                );
            }
            return;
        }
        self.rsts.push_back(flow);
    }

    /// Handles a validated packet from the guest.
    pub fn handle_guest_packet(&mut self, packet: GuestPacket, payload: &[u8]) {
        let port = packet.flow.local_port;
        match self.connections.get_mut(&port) {
            Some(connection) if connection.flow() == packet.flow => {
                let was_established = connection.is_established();
                connection.on_guest_packet(packet.op, packet.credit, payload);
                self.metrics.guest_packet(
                    !was_established && connection.is_established(),
                    payload.len(),
                );
                self.schedule(port);
            }
            // Nothing listens on the host and the flow is unknown: refuse, keep no state.
            // Never answer an RST with an RST.
            _ if packet.op == GuestOp::Rst => {}
            _ => {
                debug!(flow = ?packet.flow, op = ?packet.op, "vsock: packet for unknown flow");
                self.queue_rst(packet.flow);
            }
        }
    }

    /// Handles a header from the guest that failed validation.
    pub fn handle_invalid_packet(&mut self, header: &Header, error: PacketError) {
        debug!(?header, %error, "vsock: invalid packet from guest");
        if !error.resets_flow() || header.op == op::RST {
            return;
        }
        let flow = flow_of(header);
        match self.connections.get_mut(&flow.local_port) {
            Some(connection) if connection.flow() == flow => {
                connection.reset();
                self.schedule(flow.local_port);
            }
            _ => self.queue_rst(flow),
        }
    }

    /// Polls the host ends of the connections (without blocking) and updates them. Returns
    /// whether the control fd was readable.
    pub fn handle_host_events(&mut self) -> bool {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAKE];
        let count = match self.epoll.wait(0, &mut events) {
            Ok(count) => count,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "vsock: epoll_wait on host streams failed");
                }
                return false;
            }
        };
        let mut control = false;
        for event in events.iter().take(count) {
            let token = event.data();
            if token == CONTROL_TOKEN {
                control = true;
                continue;
            }
            let Ok(port) = u32::try_from(token & !CONNECTION_TOKEN) else {
                continue;
            };
            let Some(connection) = self.connections.get_mut(&port) else {
                continue;
            };
            let set = event.event_set();
            if set.intersects(EventSet::OUT | EventSet::ERROR) {
                connection.on_host_writable();
            }
            if set.intersects(
                EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
            ) {
                connection.on_host_readable();
            }
            self.schedule(port);
        }
        control
    }

    /// Whether a packet may be waiting for the guest.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.work.is_empty()
    }

    /// Produces the next packet for the guest; payload bytes go to `payload` (the capacity of the
    /// guest's buffer) and the header's `len` tells how many. `None`: nothing to send.
    pub fn next_rx_packet(&mut self, payload: &mut [u8]) -> Option<Header> {
        if let Some(flow) = self.rsts.pop_front() {
            return Some(Header::to_guest(
                flow,
                self.guest_cid,
                op::RST,
                Credit::default(),
            ));
        }
        // Visit each queued connection at most once: one that cannot use this buffer (e.g. it is
        // too small for data) is requeued and must not be polled again in this call.
        for _ in 0..self.work.len() {
            let Some(port) = self.work.pop_front() else {
                break;
            };
            let Some(connection) = self.connections.get_mut(&port) else {
                continue;
            };
            connection.queued = false;
            let packet = connection.next_packet(payload);
            if let Some(header) = packet.as_ref().filter(|header| header.op == op::RW) {
                self.metrics
                    .data_to_guest(header.len, connection.peer_credit_used_up());
            }
            // Round robin: a connection with more to send goes to the back of the queue.
            self.schedule(port);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// Drops every connection (the agent sees its streams close, pending connects fail) and
    /// every pending packet. Used when the guest driver or the frontend goes away.
    pub fn reset_all(&mut self) {
        if !self.connections.is_empty() {
            debug!(
                count = self.connections.len(),
                "vsock: closing all connections"
            );
        }
        self.connections.clear();
        self.work.clear();
        self.rsts.clear();
    }
}

impl AsRawFd for Muxer {
    /// The epoll fd watching the host streams and the control fd.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsock::packet::HOST_CID;
    use std::io::{Read, Write};
    use tokio::sync::oneshot;

    const GUEST_CID: u64 = 3;

    fn guest_packet(flow: FlowKey, op: GuestOp) -> GuestPacket {
        GuestPacket {
            flow,
            credit: Credit {
                buf_alloc: 65536,
                fwd_cnt: 0,
            },
            op,
        }
    }

    fn drain(muxer: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Some(header) = muxer.next_rx_packet(&mut buf) {
            out.push((header, buf[..header.len as usize].to_vec()));
        }
        out
    }

    #[test]
    fn connect_handshake_and_data_both_ways() {
        let mut muxer = Muxer::new(GUEST_CID, 4096, 4).unwrap();
        let (reply, mut rx) = oneshot::channel();
        muxer.connect(10240, reply);
        let sent = drain(&mut muxer);
        assert_eq!(sent.len(), 1);
        let request = sent[0].0;
        assert_eq!(request.op, op::REQUEST);
        assert_eq!((request.src_cid, request.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(request.dst_port, 10240);
        let flow = FlowKey {
            local_port: request.src_port,
            peer_port: 10240,
        };
        muxer.handle_guest_packet(guest_packet(flow, GuestOp::Response), &[]);
        let mut agent = rx.try_recv().unwrap().unwrap();
        agent.set_nonblocking(false).unwrap();

        agent.write_all(b"ping").unwrap();
        muxer.handle_host_events();
        let sent = drain(&mut muxer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0.op, op::RW);
        assert_eq!(sent[0].1, b"ping");

        muxer.handle_guest_packet(guest_packet(flow, GuestOp::Rw { len: 4 }), b"pong");
        let mut buf = [0u8; 4];
        agent.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn unknown_flows_get_bounded_stateless_rsts() {
        let mut muxer = Muxer::new(GUEST_CID, 4096, 4).unwrap();
        for port in 0..(MAX_PENDING_RSTS as u32 * 4) {
            let flow = FlowKey {
                local_port: port,
                peer_port: 1000 + port,
            };
            muxer.handle_guest_packet(guest_packet(flow, GuestOp::Request), &[]);
        }
        assert_eq!(muxer.connection_count(), 0);
        assert_eq!(muxer.pending_rsts(), MAX_PENDING_RSTS);
        let sent = drain(&mut muxer);
        assert_eq!(sent.len(), MAX_PENDING_RSTS);
        assert!(
            sent.iter()
                .all(|(h, _)| h.op == op::RST && h.dst_port == h.src_port + 1000)
        );
        // An RST for an unknown flow is not answered.
        let flow = FlowKey {
            local_port: 1,
            peer_port: 2,
        };
        muxer.handle_guest_packet(guest_packet(flow, GuestOp::Rst), &[]);
        assert_eq!(muxer.pending_rsts(), 0);
    }

    #[test]
    fn connection_limit_is_enforced() {
        let mut muxer = Muxer::new(GUEST_CID, 4096, 2).unwrap();
        let mut receivers = Vec::new();
        for _ in 0..3 {
            let (reply, rx) = oneshot::channel();
            muxer.connect(10240, reply);
            receivers.push(rx);
        }
        assert_eq!(muxer.connection_count(), 2);
        assert!(matches!(
            receivers[2].try_recv(),
            Ok(Err(VsockError::TooManyConnections))
        ));
        muxer.reset_all();
        assert_eq!(muxer.connection_count(), 0);
        // The pending connects learn that the device went away.
        assert!(receivers[0].try_recv().is_err());
    }

    #[test]
    fn abandoned_connect_is_reset_in_the_guest() {
        let mut muxer = Muxer::new(GUEST_CID, 4096, 2).unwrap();
        let (reply, rx) = oneshot::channel();
        muxer.connect(10240, reply);
        let request = drain(&mut muxer)[0].0;
        drop(rx);
        muxer.sweep_abandoned();
        let sent = drain(&mut muxer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0.op, op::RST);
        assert_eq!(sent[0].0.src_port, request.src_port);
        assert_eq!(muxer.connection_count(), 0);
    }
}
