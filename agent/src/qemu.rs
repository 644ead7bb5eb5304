//! The QEMU launch recipe for a guest attached to this agent.
