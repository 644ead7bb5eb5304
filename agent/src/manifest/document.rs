//! The cluster manifest as a document: what the operator writes (TOML, or the same as JSON over
//! the API), parsed and checked whole before anything acts on it.
//!
//! ```toml
//! version = 1
//! [[registry]]
//! host = "registry.example:5000"
//! mirrors = ["http://127.0.0.1:5001"]
//! [[peer]]
//! url = "http://10.0.0.2:7420"
//! [[image]]
//! ref = "registry.example:5000/app/web:1.4"
//! priority = 100
//! pin = true
//! prefetch = "all"
//! [budget]
//! disk = "20G"
//! bandwidth = "200M"
//! ```
//!
//! A document that does not parse, or names something twice, or names something unusable, is
//! refused with where (the line, for TOML; the entry, always) and why.

use std::collections::BTreeSet;
use std::path::PathBuf;

use gantry_oci::Reference;
use gantry_oci::manifest::Platform;
use serde::{Deserialize, Serialize};

pub use gantry_api::PrefetchLevel;

use crate::units::parse_size;

/// The only manifest version.
pub const MANIFEST_VERSION: u32 = 1;
/// Most images one manifest may name.
pub const MAX_IMAGES: usize = 1024;

/// Why a manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster manifest: {}{reason}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct ManifestError {
    /// The line (TOML documents), when known.
    pub line: Option<usize>,
    /// What is wrong, naming the entry.
    pub reason: String,
}

/// A registry entry: the order registries and their mirrors are tried in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    /// `host[:port]` as image references name it.
    pub host: String,
    /// Mirrors tried before the registry itself, in order.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// A Docker-style credentials file for it.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// A CA file its TLS certificate is checked against.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Plain HTTP.
    #[serde(default)]
    pub insecure: bool,
    /// Most background fill fetches in flight to it (and its mirrors) at once; unset: only
    /// the agent's own `lazy.connections` bound them. A guest's reads never wait for it.
    #[serde(default)]
    pub max_fills: Option<usize>,
}

/// A peer agent (served and used by the peer cache).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// Its base URL.
    pub url: String,
}

/// An image the cluster is likely to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    /// A registry reference, by tag or digest.
    #[serde(rename = "ref")]
    pub reference: String,
    /// The platform to pick from a multi-platform image (default: the agent's).
    #[serde(default)]
    pub platform: Option<String>,
    /// Higher first.
    #[serde(default)]
    pub priority: i64,
    /// Keep its layers in the cache while the manifest names it (never evicted).
    #[serde(default)]
    pub pin: bool,
    /// How much of it to bring in.
    #[serde(default)]
    pub prefetch: PrefetchLevel,
}

impl ImageEntry {
    /// What identifies the entry across manifest versions: the same reference and platform
    /// are the same image (a changed priority, pin or level is a change of the same one).
    pub fn key(&self) -> (String, Option<String>) {
        (self.reference.clone(), self.platform.clone())
    }
}

/// Budgets of what prefetching may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Disk for prefetched content (`20G`).
    #[serde(default)]
    pub disk: Option<String>,
    /// Bandwidth of background fetching per second (`200M`).
    #[serde(default)]
    pub bandwidth: Option<String>,
}

/// A cluster manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterManifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Registries in the order they are tried.
    #[serde(default, rename = "registry")]
    pub registries: Vec<RegistryEntry>,
    /// Peer agents.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerEntry>,
    /// The images.
    #[serde(default, rename = "image")]
    pub images: Vec<ImageEntry>,
    /// Budgets.
    #[serde(default)]
    pub budget: Budget,
}

impl ClusterManifest {
    /// Parses and checks a TOML manifest.
    pub fn from_toml(text: &str) -> Result<ClusterManifest, ManifestError> {
        let manifest: ClusterManifest = toml::from_str(text).map_err(|error| ManifestError {
            line: error.span().map(|span| line_of(text, span.start)),
            reason: error.message().to_string(),
        })?;
        let lines = entry_lines(text);
        manifest.check().map_err(|(entry, reason)| ManifestError {
            line: entry.and_then(|entry| lines.get(entry).copied()),
            reason,
        })?;
        Ok(manifest)
    }

    /// Parses and checks a JSON manifest (the API's form).
    pub fn from_json(bytes: &[u8]) -> Result<ClusterManifest, ManifestError> {
        let manifest: ClusterManifest =
            serde_json::from_slice(bytes).map_err(|error| ManifestError {
                line: Some(error.line()),
                reason: error.to_string(),
            })?;
        manifest
            .check()
            .map_err(|(_, reason)| ManifestError { line: None, reason })?;
        Ok(manifest)
    }

    /// The images, highest priority first (the manifest's order among equals).
    pub fn by_priority(&self) -> Vec<&ImageEntry> {
        let mut images: Vec<&ImageEntry> = self.images.iter().collect();
        images.sort_by_key(|image| std::cmp::Reverse(image.priority));
        images
    }

    /// The disk budget in bytes, 0 for none.
    pub fn disk_budget(&self) -> u64 {
        budget_size(&self.budget.disk).unwrap_or(0)
    }

    /// The background bandwidth budget in bytes per second, if the manifest sets one.
    pub fn bandwidth_budget(&self) -> Option<u64> {
        budget_size(&self.budget.bandwidth)
    }

    /// Fill fetches allowed in flight per registry (`max_fills`), for the registries that set it.
    pub fn fill_limits(&self) -> std::collections::HashMap<String, usize> {
        self.registries
            .iter()
            .filter_map(|registry| Some((registry.host.clone(), registry.max_fills?)))
            .collect()
    }

    /// Checks what parsing cannot: on failure, the image entry at fault (if one) and why.
    fn check(&self) -> Result<(), (Option<usize>, String)> {
        if self.version != MANIFEST_VERSION {
            return Err((
                None,
                format!(
                    "version {} is not supported (this agent reads version {MANIFEST_VERSION})",
                    self.version
                ),
            ));
        }
        if self.images.len() > MAX_IMAGES {
            return Err((
                None,
                format!(
                    "{} images, more than the {MAX_IMAGES} a manifest may name",
                    self.images.len()
                ),
            ));
        }
        let mut hosts = BTreeSet::new();
        for registry in &self.registries {
            if registry.host.is_empty() || registry.host.contains('/') {
                return Err((
                    None,
                    format!("registry host {:?} is not host[:port]", registry.host),
                ));
            }
            if !hosts.insert(registry.host.as_str()) {
                return Err((None, format!("registry {} is listed twice", registry.host)));
            }
            if registry.max_fills == Some(0) {
                return Err((
                    None,
                    format!("registry {}: max_fills must be at least 1", registry.host),
                ));
            }
            for mirror in &registry.mirrors {
                check_url(mirror).map_err(|reason| {
                    (
                        None,
                        format!("registry {}: mirror {mirror:?} {reason}", registry.host),
                    )
                })?;
            }
        }
        for peer in &self.peers {
            check_url(&peer.url)
                .map_err(|reason| (None, format!("peer {:?} {reason}", peer.url)))?;
        }
        for (name, value) in [
            ("disk", &self.budget.disk),
            ("bandwidth", &self.budget.bandwidth),
        ] {
            if let Some(text) = value {
                parse_size(text).map_err(|error| (None, format!("budget.{name}: {error}")))?;
            }
        }
        let mut seen = BTreeSet::new();
        for (index, image) in self.images.iter().enumerate() {
            let at = |reason: String| {
                (
                    Some(index),
                    format!("image {} ({:?}): {reason}", index + 1, image.reference),
                )
            };
            image
                .reference
                .parse::<Reference>()
                .map_err(|error| at(format!("not an image reference: {error}")))?;
            if let Some(platform) = &image.platform {
                platform
                    .parse::<Platform>()
                    .map_err(|error| at(error.to_string()))?;
            }
            if !seen.insert(image.key()) {
                return Err(at("listed twice (same reference and platform)".into()));
            }
        }
        Ok(())
    }
}

/// A budget's size (checked by [`ClusterManifest::check`], so it parses).
fn budget_size(text: &Option<String>) -> Option<u64> {
    text.as_deref().and_then(|text| parse_size(text).ok())
}

fn check_url(url: &str) -> Result<(), String> {
    match url.split_once("://") {
        Some(("http" | "https", rest)) if !rest.is_empty() => Ok(()),
        _ => Err("is not an http:// or https:// URL".into()),
    }
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line each `[[image]]` table starts on, in order (an inline `image = [...]` array has
/// none: its errors name the entry only).
fn entry_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let code = line.split('#').next().unwrap_or_default();
            code.split_whitespace().collect::<String>() == "[[image]]"
        })
        .map(|(index, _)| index + 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"version = 1
[[registry]]
host = "registry.example:5000"
mirrors = ["http://127.0.0.1:5001"]
[[peer]]
url = "http://10.0.0.2:7420"
[[image]]
ref = "registry.example:5000/app/web:1.4"
priority = 100
pin = true
prefetch = "all"
[[image]]
ref = "registry.example:5000/app/db:2"
priority = 200
[budget]
disk = "20G"
bandwidth = "200M"
"#;

    #[test]
    fn the_issue_s_example_parses_and_orders_by_priority() {
        let manifest = ClusterManifest::from_toml(EXAMPLE).unwrap();
        assert_eq!(manifest.registries[0].mirrors, ["http://127.0.0.1:5001"]);
        assert_eq!(manifest.peers[0].url, "http://10.0.0.2:7420");
        assert_eq!(manifest.disk_budget(), 20 << 30);
        let order: Vec<&str> = manifest
            .by_priority()
            .iter()
            .map(|image| image.reference.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "registry.example:5000/app/db:2",
                "registry.example:5000/app/web:1.4"
            ]
        );
        assert_eq!(manifest.images[1].prefetch, PrefetchLevel::Trace);
        assert!(manifest.images[0].pin && !manifest.images[1].pin);
        // The JSON form is the same document.
        let json = serde_json::to_vec(&manifest).unwrap();
        assert_eq!(ClusterManifest::from_json(&json).unwrap(), manifest);
    }

    #[test]
    fn bad_documents_are_refused_with_the_line_and_reason() {
        let refused = |text: &str| ClusterManifest::from_toml(text).unwrap_err();
        let error = refused("version = 2\n");
        assert!(error.reason.contains("version 2"), "{error}");

        let error = refused("version = 1\n[[image]]\nref = \"a/b:1\"\nprority = 3\n");
        assert_eq!(error.line, Some(4), "{error}");
        assert!(error.reason.contains("prority"), "{error}");

        let error = refused("version = 1\n[[image]]\nref = \"a/b:1\"\nprefetch = \"some\"\n");
        assert_eq!(error.line, Some(4), "{error}");

        let twice = "version = 1\n[[image]]\nref = \"a/b:1\"\n\n[[image]]\nref = \"a/b:1\"\n";
        let error = refused(twice);
        assert_eq!(error.line, Some(5), "{error}");
        assert!(
            error.reason.contains("image 2") && error.reason.contains("twice"),
            "{error}"
        );

        let error = refused("version = 1\n[[registry]]\nhost = \"r.example\"\nmax_fills = 0\n");
        assert!(error.reason.contains("max_fills"), "{error}");
        let limits = ClusterManifest::from_toml(
            "version = 1\n[[registry]]\nhost = \"r.example\"\nmax_fills = 3\n\
             [[registry]]\nhost = \"s.example\"\n",
        )
        .unwrap()
        .fill_limits();
        assert_eq!(limits, [("r.example".to_string(), 3)].into());

        let error = refused("version = 1\n[[image]]\nref = \"UPPER/Case:1\"\n");
        assert_eq!(error.line, Some(2), "{error}");
        assert!(error.reason.contains("not an image reference"), "{error}");

        let error = refused("version = 1\n[[image]]\nref = \"a/b:1\"\nplatform = \"linux\"\n");
        assert!(error.reason.contains("platform"), "{error}");

        let error = refused("version = 1\n[budget]\ndisk = \"lots\"\n");
        assert!(error.reason.contains("budget.disk"), "{error}");

        let error = refused("version = 1\n[[peer]]\nurl = \"10.0.0.2:7420\"\n");
        assert!(error.reason.contains("peer"), "{error}");

        let error = refused(
            "version = 1\n[[registry]]\nhost = \"r:5000\"\n[[registry]]\nhost = \"r:5000\"\n",
        );
        assert!(error.reason.contains("twice"), "{error}");

        let error =
            ClusterManifest::from_json(b"{\"version\": 1, \"image\": [{\"ref\": 3}]}").unwrap_err();
        assert_eq!(error.line, Some(1), "{error}");
    }
}
