//! OCI distribution client: manifests, indexes and blobs over HTTP(S), with mirrors,
//! authentication, retries and verification.
//!
//! - [`config`]: the client's TOML-friendly configuration.
//! - [`auth`]: challenges, credential files, tokens.
//! - [`manifest`]: the OCI/Docker document types and platform selection.
//! - [`client`]: the HTTP client itself ([`RegistryClient`]).

pub mod auth;
pub mod client;
pub mod config;
pub mod manifest;

pub use client::{RegistryClient, RegistryError, RegistrySource};
pub use config::RegistryConfig;
