//! OCI distribution client: manifests, indexes and blobs over HTTP(S), with mirrors,
//! authentication, retries and verification.
//!
//! - [`config`]: the client's TOML-friendly configuration.
//! - [`auth`]: challenges, credential files, tokens.
//! - [`client`]: the HTTP client itself ([`RegistryClient`]), including ranged blob reads.
//! - [`push`]: blob uploads, cross-repository mounts and manifest puts
//!   ([`RegistryDestination`]).
//! - [`referrers`]: OCI 1.1 referrers (artifacts about an image), with the tag-schema
//!   fallback for registries without the referrers API.
//!
//! The document types it fetches are in [`crate::manifest`].

pub mod auth;
pub mod client;
pub mod config;
pub mod push;
pub mod referrers;

pub use client::{BlobRange, RegistryClient, RegistryError, RegistrySource};
pub use config::RegistryConfig;
pub use push::RegistryDestination;
