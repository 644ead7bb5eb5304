//! The card's images as the agent's policy sees them; the formats and the registry client are
//! in `gantry-oci`.
//!
//! - [`service`]: [`ImageService`], where an image name leads and the cache it is pulled into.
//! - [`pull`]: fetch, verify, convert and publish an image into the cache.
//! - [`traces`]: startup traces at a cold start: replayed, fetched from the registry, recorded.
//! - [`bundle`]: images carried between cards' caches as OCI layouts (export, import).
//! - [`default_image`]: the embedded busybox image, built from the card's `busybox-static`.

pub mod bundle;
pub mod default_image;
pub mod pull;
pub mod service;
pub mod traces;

pub use service::{ImageError, ImageRef, ImageService, PulledImage, parse_image};
