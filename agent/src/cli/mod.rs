//! The operator CLI's container commands, on top of the API client.

pub mod containers;
pub mod stream;
