//! Image references (`host[:port]/repo[:tag][@sha256:…]`, Docker Hub short names) and digests.
//!
//! Parsing follows the grammar of the distribution project's `reference` package: the first
//! path component is a registry host only if it contains a `.` or a `:` or is `localhost`;
//! otherwise the image is on Docker Hub, and a single-component name gets the `library/`
//! prefix. A reference without tag or digest means the tag `latest`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's distribution API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// Longest repository name accepted (the distribution spec's limit).
const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted.
const MAX_TAG_LEN: usize = 128;

/// Errors of parsing a reference or a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The reference is empty.
    #[error("empty image reference")]
    Empty,
    /// The registry host is malformed.
    #[error("invalid registry host {0:?}")]
    InvalidHost(String),
    /// A repository path component is malformed.
    #[error("invalid repository name {0:?} (lowercase letters, digits and . _ - separators)")]
    InvalidRepository(String),
    /// The repository name is longer than 255 bytes.
    #[error("repository name longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    /// The tag is malformed.
    #[error("invalid tag {0:?}")]
    InvalidTag(String),
    /// The digest is malformed or uses an unsupported algorithm.
    #[error("invalid digest {0:?} (expected sha256:<64 lowercase hex digits>)")]
    InvalidDigest(String),
}

/// A content digest. Only SHA-256 is supported (it is what every registry produces).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_sha256(Sha256::digest(bytes).into())
    }

    /// A digest from a finished SHA-256 hash.
    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        Digest {
            hex: hash.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// The lowercase hex of the hash, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A file-name-safe form: `sha256-<hex>`.
    pub fn file_name(&self) -> String {
        format!("sha256-{}", self.hex)
    }

    /// Parses the file-name form made by [`Digest::file_name`].
    pub fn from_file_name(name: &str) -> Option<Digest> {
        name.strip_prefix("sha256-")
            .and_then(|hex| format!("sha256:{hex}").parse().ok())
    }
}

impl FromStr for Digest {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<Digest, ReferenceError> {
        let invalid = || ReferenceError::InvalidDigest(text.to_string());
        let hex = text.strip_prefix("sha256:").ok_or_else(invalid)?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid());
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with optional port, e.g. `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/debian`.
    pub repository: String,
    /// Tag, if given (or `latest` when neither tag nor digest was given).
    pub tag: Option<String>,
    /// Digest, if given; it wins over the tag when fetching.
    pub digest: Option<Digest>,
}

impl Reference {
    /// The host to contact for the distribution API (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// What to ask the registry's manifest endpoint for: the digest if known, else the tag.
    pub fn manifest_target(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// Whether the registry host is a loopback address (`localhost`, `127.x.x.x`, `[::1]`).
    pub fn is_loopback(&self) -> bool {
        host_is_loopback(&self.registry)
    }
}

/// Whether `host[:port]` names a loopback address.
pub fn host_is_loopback(host_port: &str) -> bool {
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    if host == "localhost" {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<Reference, ReferenceError> {
        if text.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name_and_tag, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(digest.parse::<Digest>()?)),
            None => (text, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_and_tag.get(last_slash..).and_then(|t| t.rfind(':')) {
            Some(colon) => {
                let split = last_slash + colon;
                (
                    name_and_tag.get(..split).unwrap_or_default(),
                    Some(name_and_tag.get(split + 1..).unwrap_or_default()),
                )
            }
            None => (name_and_tag, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag)?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                validate_host(first)?;
                (first.to_string(), rest.to_string())
            }
            Some(_) => (DOCKER_HUB.to_string(), name.to_string()),
            None => (DOCKER_HUB.to_string(), format!("library/{name}")),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        validate_repository(&repository)?;
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Where an image is: a registry reference, or an image of an OCI layout directory
/// (`oci:DIR[:NAME]`, as skopeo writes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// An image in a registry.
    Registry(Reference),
    /// An image in an OCI image layout directory.
    Layout {
        /// The layout directory.
        dir: std::path::PathBuf,
        /// The image's `org.opencontainers.image.ref.name` (a tag), a digest, or empty for "the
        /// only image" (sources) or "no name" (destinations).
        name: String,
    },
}

impl FromStr for ImageLocation {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<ImageLocation, ReferenceError> {
        let Some(layout) = text.strip_prefix("oci:") else {
            return text.parse().map(ImageLocation::Registry);
        };
        // oci:DIR[:NAME]: the name is after the last ':' unless that part has a '/', so a DIR
        // containing ':' needs the NAME part.
        let (dir, name) = match layout.rsplit_once(':') {
            Some((dir, name)) if !name.contains('/') => (dir, name),
            _ => (layout, ""),
        };
        if dir.is_empty() {
            return Err(ReferenceError::Empty);
        }
        Ok(ImageLocation::Layout {
            dir: dir.into(),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageLocation::Registry(reference) => reference.fmt(f),
            ImageLocation::Layout { dir, name } if name.is_empty() => {
                write!(f, "oci:{}", dir.display())
            }
            ImageLocation::Layout { dir, name } => write!(f, "oci:{}:{name}", dir.display()),
        }
    }
}

fn validate_host(host: &str) -> Result<(), ReferenceError> {
    let invalid = || ReferenceError::InvalidHost(host.to_string());
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(invalid)?;
        inside
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| invalid())?;
        (None, after.strip_prefix(':'))
    } else {
        match host.split_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(name) = name {
        let label_ok = |label: &str| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if !name.split('.').all(label_ok) {
            return Err(invalid());
        }
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(invalid());
    }
    Ok(())
}

/// Checks a repository name (`library/busybox`) against the distribution spec's grammar.
pub fn validate_repository(repository: &str) -> Result<(), ReferenceError> {
    if repository.len() > MAX_NAME_LEN {
        return Err(ReferenceError::NameTooLong);
    }
    let invalid = || ReferenceError::InvalidRepository(repository.to_string());
    for component in repository.split('/') {
        if !component_ok(component) {
            return Err(invalid());
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn component_ok(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or one or more '-'.
        let start = i;
        while bytes.get(i).is_some_and(|&b| !alnum(b)) {
            i += 1;
        }
        let separator = bytes.get(start..i).unwrap_or_default();
        let ok = separator == b"."
            || separator == b"_"
            || separator == b"__"
            || separator.iter().all(|&b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let bytes = tag.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && bytes.first().is_some_and(|&b| word(b))
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag(tag.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(text: &str) -> Reference {
        text.parse().unwrap()
    }

    #[test]
    fn docker_hub_short_names() {
        let r = parse("debian");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/debian:latest");

        let r = parse("bitnami/redis:7.2");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "bitnami/redis");
        assert_eq!(r.tag.as_deref(), Some("7.2"));
        assert_eq!(
            parse("index.docker.io/library/busybox").registry,
            "docker.io"
        );
    }

    #[test]
    fn hosts_ports_tags_and_digests() {
        let r = parse("127.0.0.1:5000/test/app:v1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "test/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(r.is_loopback());

        let r = parse("localhost/app");
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.tag.as_deref(), Some("latest"));

        let r = parse(&format!("ghcr.io/o/r@sha256:{HEX}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().unwrap().hex(), HEX);
        assert_eq!(r.manifest_target(), format!("sha256:{HEX}"));

        let r = parse(&format!("registry.example.com:443/a/b/c:tag@sha256:{HEX}"));
        assert_eq!(r.tag.as_deref(), Some("tag"));
        assert_eq!(r.manifest_target(), format!("sha256:{HEX}"));
        assert_eq!(
            r.to_string(),
            format!("registry.example.com:443/a/b/c:tag@sha256:{HEX}")
        );
        assert!(!r.is_loopback());
        assert_eq!(parse("[::1]:5000/x").registry, "[::1]:5000");
        assert!(parse("[::1]:5000/x").is_loopback());
    }

    #[test]
    fn malformed_references_are_rejected() {
        for bad in [
            "",
            "UPPER/case",
            "a//b",
            "a/b:",
            "a/b:-tag",
            "a/b@sha256:abc",
            "a/b@md5:0123",
            "host:99999/a",
            "host:0/a",
            "-host.com/a",
            "a/.b",
            "a/b-",
            "a/b___c",
            &format!("a/b:{}", "t".repeat(129)),
            &format!("{}/x", "a".repeat(300)),
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?} was accepted");
        }
        assert!("a/b__c-d--e.f".parse::<Reference>().is_ok());
    }

    #[test]
    fn layout_locations() {
        let layout = |dir: &str, name: &str| ImageLocation::Layout {
            dir: dir.into(),
            name: name.into(),
        };
        let parse = |text: &str| text.parse::<ImageLocation>().unwrap();
        assert_eq!(parse("oci:/tmp/l:v1"), layout("/tmp/l", "v1"));
        assert_eq!(parse("oci:/tmp/l"), layout("/tmp/l", ""));
        assert_eq!(parse("oci:/a:b/c"), layout("/a:b/c", ""));
        assert_eq!(parse("oci:/a:b/c:t"), layout("/a:b/c", "t"));
        assert_eq!(parse("oci:/tmp/l:v1").to_string(), "oci:/tmp/l:v1");
        assert_eq!(
            parse("127.0.0.1:5000/a:1"),
            ImageLocation::Registry("127.0.0.1:5000/a:1".parse().unwrap())
        );
        assert!("oci:".parse::<ImageLocation>().is_err());
        assert!("oci::t".parse::<ImageLocation>().is_err());
        assert!("UPPER".parse::<ImageLocation>().is_err());
    }

    #[test]
    fn digests() {
        let d = Digest::of(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Digest::from_file_name(&d.file_name()), Some(d.clone()));
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
        assert!(
            format!("sha256:{}", HEX.to_uppercase())
                .parse::<Digest>()
                .is_err()
        );
        assert!(serde_json::from_str::<Digest>("\"sha256:00\"").is_err());
    }
}
