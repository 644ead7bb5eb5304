//! vhost-user-vsock backend: the agent terminates the guest's vsock connections itself.
//!
//! QEMU's `vhost-user-vsock-pci` attaches to a [`VsockDevice`] over a unix socket; the agent opens
//! stream connections into the guest with a [`VsockConnector`] and gets one end of a unix
//! socketpair per connection. Nothing listens on the host side: connections the guest opens are
//! refused with `OP_RST`.
//!
//! Behaviour worth knowing (decisions, not accidents):
//! - Every VM has its own [`VsockDevice`] with its own threads (a serving thread, and per QEMU
//!   session a vhost-user request thread and one worker for rx, tx and the host streams). No lock
//!   or thread is shared between devices, so a flood on one VM cannot starve another.
//! - When QEMU disconnects, the device closes every stream and listens again; a restarted QEMU
//!   re-attaches to the same socket. A guest driver reset (the frontend stops the vrings) also
//!   closes every stream. The agent sees EOF and reconnects.
//! - [`VsockConnector::connect`] fails fast with [`VsockError::NotReady`] while no frontend is
//!   attached or the guest driver has not started the queues, with [`VsockError::Refused`] when
//!   nothing listens on the guest port, and with [`VsockError::TimedOut`] after
//!   [`VsockDeviceConfig::connect_timeout`] (the half-open connection is then reset).
//! - Closing the agent's stream is a full close: the guest gets `OP_SHUTDOWN` (both directions)
//!   immediately followed by `OP_RST`. Half-close from the agent is not supported. A guest
//!   `OP_SHUTDOWN(SEND)` half-closes the agent's stream (it reads EOF, and can still write).
//! - Credit: the guest may have at most `conn_buffer_size` bytes in flight, counted against the
//!   `fwd_cnt` we last told it, and `fwd_cnt` only counts bytes written into the host stream. A
//!   guest that sends more is reset. We send `OP_CREDIT_UPDATE` when asked, and unasked when the
//!   space the guest believes free falls under half of `conn_buffer_size`. Host-to-guest data never
//!   exceeds the guest's advertised free space; meanwhile the host stream is not read, which
//!   back-pressures the agent.
//! - Memory per VM is bounded: `max_connections × conn_buffer_size` of buffered guest data, one
//!   64 KiB staging buffer, and at most 256 queued stateless `OP_RST`s (a connection storm beyond
//!   that drops RSTs; the guest's connects then time out).
//! - Malformed guest packets never stop the device: a header with a forged source or destination
//!   CID is dropped; any other bad header or descriptor layout resets the flow it names.
//!
//! Modules, one concern each:
//! - `packet`: the wire header and its validation (parsing only);
//! - `connection`: one connection's state machine and credit accounting;
//! - `muxer`: the connection table, what to send to the guest next, host stream readiness;
//! - `requests`: the bounded channel from connectors to a device's worker thread;
//! - `backend`: the `VhostUserBackend` glue between the virtqueues and the muxer;
//! - `device`: the listening socket, the frontend reconnect loop and the connector.

mod backend;
mod connection;
mod device;
#[doc(hidden)]
pub mod fuzzing;
mod muxer;
pub mod packet;
mod requests;

#[cfg(test)]
mod tests;

pub use device::{
    DEFAULT_CONN_BUFFER_SIZE, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS, VsockConnector,
    VsockDevice, VsockDeviceConfig, VsockError,
};
