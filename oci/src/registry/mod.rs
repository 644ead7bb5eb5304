//! OCI distribution client: manifests, indexes and blobs over HTTP(S), with mirrors,
//! authentication, retries and verification.
//!
//! - [`config`]: the client's TOML-friendly configuration.
//! - [`auth`]: challenges, credential files, tokens.
//! - [`client`]: the HTTP client itself ([`RegistryClient`]), including ranged blob reads.
//!
//! The document types it fetches are in [`crate::manifest`].

pub mod auth;
pub mod client;
pub mod config;

pub use client::{BlobRange, RegistryClient, RegistryError, RegistrySource};
pub use config::RegistryConfig;
