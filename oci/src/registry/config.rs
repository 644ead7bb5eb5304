//! Registry client configuration: mirrors, credentials, TLS, timeouts and limits.
//!
//! TOML-friendly so the agent's configuration can embed it:
//!
//! ```toml
//! platform = "linux/amd64"
//! credentials_file = "/etc/gantry/registry-auth.json"   # docker config.json format
//! ca_files = ["/etc/gantry/registry-ca.pem"]
//! insecure_registries = ["registry.lab:5000"]            # plain HTTP
//! [mirrors]
//! "docker.io" = ["https://mirror-a.example", "http://10.0.0.5:5000"]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::manifest::{ManifestError, Platform};

/// Configuration of the registry client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// The platform picked from multi-platform indexes, `os/arch[/variant]`.
    pub platform: String,
    /// Per registry host (`docker.io`, `host:port`), mirror base URLs tried in order before
    /// the registry itself, e.g. `https://mirror.example` or `http://127.0.0.1:5001`.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Registry hosts reached over plain HTTP. Loopback hosts (`localhost`, `127.0.0.0/8`,
    /// `[::1]`) always are, as with Docker's default insecure registries.
    pub insecure_registries: Vec<String>,
    /// Extra PEM CA certificates trusted for HTTPS, besides the system's.
    pub ca_files: Vec<PathBuf>,
    /// A docker-style `config.json` holding credentials (`auths`).
    pub credentials_file: Option<PathBuf>,
    /// Per registry host, the other hosts whose token service (a `WWW-Authenticate` realm) may
    /// receive that registry's credentials. Without an entry credentials go only to the registry's
    /// own host, and only over HTTPS unless the host is an insecure (plain HTTP) registry: a
    /// registry cannot send them to a server of its choosing. Docker Hub's token service is
    /// allowed by default.
    pub auth_realm_hosts: BTreeMap<String, Vec<String>>,
    /// Timeout for establishing a connection, in milliseconds.
    pub connect_timeout_ms: u64,
    /// A response that sends nothing for this long is abandoned (and retried), in ms.
    pub stall_timeout_ms: u64,
    /// Retries per endpoint for 5xx, 429, timeouts, resets and truncated bodies.
    pub retries: u32,
    /// First retry delay in ms; it doubles each retry up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    /// Longest retry delay in ms.
    pub backoff_max_ms: u64,
    /// Largest manifest or index accepted, in bytes.
    pub max_manifest_bytes: u64,
    /// Largest image config accepted, in bytes.
    pub max_config_bytes: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            platform: "linux/amd64".into(),
            mirrors: BTreeMap::new(),
            insecure_registries: Vec::new(),
            ca_files: Vec::new(),
            credentials_file: None,
            auth_realm_hosts: BTreeMap::from([(
                "registry-1.docker.io".to_owned(),
                vec!["auth.docker.io".to_owned()],
            )]),
            connect_timeout_ms: 10_000,
            stall_timeout_ms: 30_000,
            retries: 4,
            backoff_initial_ms: 200,
            backoff_max_ms: 5_000,
            max_manifest_bytes: 4 << 20,
            max_config_bytes: 8 << 20,
        }
    }
}

impl RegistryConfig {
    /// Loads a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: RegistryConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        config.platform()?;
        Ok(config)
    }

    /// The configured platform, parsed.
    pub fn platform(&self) -> Result<Platform, ConfigError> {
        self.platform.parse().map_err(ConfigError::Platform)
    }

    /// The retry delay before retry number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u64::MAX);
        Duration::from_millis(
            self.backoff_initial_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }

    /// Whether the credentials of registry `registry_host` may be sent to `url` (a registry
    /// endpoint or a token realm); the reason why not otherwise.
    pub fn may_send_credentials(&self, registry_host: &str, url: &str) -> Result<(), String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not an absolute URL"))?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        // userinfo in a URL would be a way to confuse the host comparison.
        if host.contains('@') || host.is_empty() {
            return Err(format!("{url:?} has no plain host"));
        }
        let allowed_host = host.eq_ignore_ascii_case(registry_host)
            || self
                .auth_realm_hosts
                .get(registry_host)
                .is_some_and(|hosts| hosts.iter().any(|h| h.eq_ignore_ascii_case(host)));
        if !allowed_host {
            return Err(format!(
                "{host} is not {registry_host} (allow it in auth_realm_hosts)"
            ));
        }
        match scheme {
            "https" => Ok(()),
            "http" if self.is_insecure(host) => Ok(()),
            _ => Err(format!(
                "{url} is not HTTPS and {host} is not an insecure registry"
            )),
        }
    }

    /// Whether `host` is reached over plain HTTP.
    pub fn is_insecure(&self, host: &str) -> bool {
        crate::reference::host_is_loopback(host)
            || self.insecure_registries.iter().any(|h| h == host)
    }
}

/// Errors of loading a registry configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading registry config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("parsing registry config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: toml::de::Error,
    },
    /// The platform does not parse.
    #[error(transparent)]
    Platform(ManifestError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_only_to_the_registry_or_a_configured_realm_and_never_in_clear() {
        let mut config = RegistryConfig::default();
        config.insecure_registries.push("plain.example:5000".into());
        let ok = |host: &str, url: &str| config.may_send_credentials(host, url);
        assert_eq!(ok("reg.example", "https://reg.example/token"), Ok(()));
        assert_eq!(ok("REG.example", "https://reg.EXAMPLE/v2/"), Ok(()));
        assert_eq!(
            ok("plain.example:5000", "http://plain.example:5000/token"),
            Ok(())
        );
        assert_eq!(ok("127.0.0.1:5000", "http://127.0.0.1:5000/token"), Ok(()));
        assert_eq!(
            ok("registry-1.docker.io", "https://auth.docker.io/token"),
            Ok(())
        );
        for (host, url) in [
            ("reg.example", "http://reg.example/token"),
            ("reg.example", "https://evil.example/token"),
            ("reg.example", "https://reg.example@evil.example/token"),
            ("reg.example", "https://reg.example.evil.example/token"),
            ("127.0.0.1:5000", "http://127.0.0.1:6000/token"),
            ("reg.example", "ftp://reg.example/token"),
            ("reg.example", "/token"),
            ("other.example", "https://auth.docker.io/token"),
        ] {
            assert!(ok(host, url).is_err(), "{host} -> {url}");
        }
        config
            .auth_realm_hosts
            .insert("reg.example".into(), vec!["auth.example".into()]);
        assert_eq!(
            config.may_send_credentials("reg.example", "https://auth.example/t"),
            Ok(())
        );
        assert!(
            config
                .may_send_credentials("reg.example", "http://auth.example/t")
                .is_err()
        );
    }

    #[test]
    fn toml_round_trip_and_defaults() {
        let config: RegistryConfig = toml::from_str(
            r#"
            platform = "linux/arm64/v8"
            insecure_registries = ["lab:5000"]
            retries = 2
            [mirrors]
            "docker.io" = ["https://a.example", "http://127.0.0.1:5001"]
            "#,
        )
        .unwrap();
        assert_eq!(config.platform().unwrap().to_string(), "linux/arm64/v8");
        assert_eq!(config.mirrors["docker.io"].len(), 2);
        assert_eq!(config.retries, 2);
        assert_eq!(config.max_manifest_bytes, 4 << 20);
        assert!(config.is_insecure("lab:5000"));
        assert!(config.is_insecure("127.0.0.1:5000"));
        assert!(!config.is_insecure("ghcr.io"));
        assert!(toml::from_str::<RegistryConfig>("bogus = 1").is_err());
        let text = toml::to_string(&config).unwrap();
        assert_eq!(toml::from_str::<RegistryConfig>(&text).unwrap(), config);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let config = RegistryConfig::default();
        assert_eq!(config.backoff(1), Duration::from_millis(200));
        assert_eq!(config.backoff(2), Duration::from_millis(400));
        assert_eq!(config.backoff(10), Duration::from_millis(5_000));
        assert_eq!(config.backoff(200), Duration::from_millis(5_000));
    }
}
