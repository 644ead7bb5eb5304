//! Gantry agent <-> shim protocol.
