//! Registry authentication: `WWW-Authenticate` challenges, docker-style credential files and
//! bearer tokens.
//!
//! The flow is the distribution spec's: a request without credentials gets `401` with a
//! challenge; for `Basic` the client resends with the user's credentials, for `Bearer` it asks
//! the named realm for a token (with the credentials, if any, else anonymously) and resends
//! with the token. Tokens are cached per host and scope until shortly before they expire; a
//! `401` with a cached token drops it and fetches a new one once.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm="…"`.
    Basic,
    /// `Bearer realm="…",service="…",scope="…"`.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// The `service` parameter to pass on.
        service: Option<String>,
        /// The scope the server asked for, if it said.
        scope: Option<String>,
    },
}

/// Errors of authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The challenge header is missing or not understood.
    #[error("unsupported or malformed WWW-Authenticate challenge {0:?}")]
    BadChallenge(String),
    /// The credentials file is unreadable or malformed.
    #[error("credentials file {path}: {reason}")]
    CredentialsFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl Challenge {
    /// Parses the first challenge of a `WWW-Authenticate` header value.
    pub fn parse(header: &str) -> Result<Challenge, AuthError> {
        let bad = || AuthError::BadChallenge(header.chars().take(200).collect());
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        let params = parse_params(rest).ok_or_else(bad)?;
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => Ok(Challenge::Basic),
            "bearer" => {
                let realm = params.get("realm").cloned().ok_or_else(bad)?;
                if !(realm.starts_with("https://") || realm.starts_with("http://")) {
                    return Err(bad());
                }
                Ok(Challenge::Bearer {
                    realm,
                    service: params.get("service").cloned(),
                    scope: params.get("scope").cloned(),
                })
            }
            _ => Err(bad()),
        }
    }
}

/// Parses `key="value", key=token, …` (RFC 7235 auth-params).
fn parse_params(text: &str) -> Option<HashMap<String, String>> {
    let mut params = HashMap::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.push(chars.next()?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, quoted.get(end?..)?)
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after.get(..end)?.trim().to_string(), after.get(end..)?)
        };
        params.insert(key, value);
        rest = remaining.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(params)
}

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Credentials by registry host, read from a docker-style `config.json`.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    by_host: HashMap<String, Credential>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl CredentialStore {
    /// Reads `auths` from a docker `config.json` (credential helpers are not supported).
    pub fn load(path: &Path) -> Result<CredentialStore, AuthError> {
        let fail = |reason: String| AuthError::CredentialsFile {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        CredentialStore::parse(&bytes).map_err(fail)
    }

    /// Parses the JSON of a docker `config.json`.
    pub fn parse(bytes: &[u8]) -> Result<CredentialStore, String> {
        let config: DockerConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut by_host = HashMap::new();
        for (key, entry) in config.auths {
            let credential = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|e| format!("auth for {key}: {e}"))?;
                    let decoded = String::from_utf8(decoded)
                        .map_err(|_| format!("auth for {key} is not UTF-8"))?;
                    let (username, password) = decoded
                        .split_once(':')
                        .ok_or_else(|| format!("auth for {key} is not user:password"))?;
                    Credential {
                        username: username.into(),
                        password: password.into(),
                    }
                }
                (_, Some(username), Some(password)) => Credential { username, password },
                _ => continue,
            };
            by_host.insert(normalize_host(&key), credential);
        }
        Ok(CredentialStore { by_host })
    }

    /// Adds or replaces the credential for `host`.
    pub fn insert(&mut self, host: &str, credential: Credential) {
        self.by_host.insert(normalize_host(host), credential);
    }

    /// The credential for a registry host (`host[:port]`).
    pub fn get(&self, host: &str) -> Option<&Credential> {
        self.by_host.get(&normalize_host(host))
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://h:5000/x` → `h:5000`.
fn normalize_host(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        other => other.to_ascii_lowercase(),
    }
}

/// A bearer token and when to stop using it.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token.
    pub value: String,
    /// After this instant the token is considered expired.
    pub refresh_at: Instant,
}

/// The token endpoint's JSON answer.
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    /// The token (distribution's field).
    #[serde(default)]
    pub token: Option<String>,
    /// The token (OAuth2's field).
    #[serde(default)]
    pub access_token: Option<String>,
    /// Lifetime in seconds (the spec's default is 60).
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token, refreshed a little before the server's expiry.
    pub fn into_token(self, now: Instant) -> Option<Token> {
        let value = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let lifetime = Duration::from_secs(self.expires_in.unwrap_or(60).max(1));
        // Refresh at 90% of the lifetime so a request does not race the expiry.
        Some(Token {
            value,
            refresh_at: now + lifetime.mul_f64(0.9),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#
            )
            .unwrap(),
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/debian:pull".into()),
            }
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#).unwrap(),
            Challenge::Basic
        );
        assert_eq!(
            Challenge::parse(r#"bearer realm=http://127.0.0.1:1/t, service = "a\"b""#).unwrap(),
            Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: Some("a\"b".into()),
                scope: None,
            }
        );
        for bad in [
            "",
            "Negotiate abc",
            r#"Bearer service="x""#,
            r#"Bearer realm="file:///etc/passwd""#,
            r#"Bearer realm="unterminated"#,
        ] {
            assert!(Challenge::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn docker_config_credentials() {
        let store = CredentialStore::parse(
            br#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNzOndpdGg6Y29sb25z"},
                "127.0.0.1:5000":{"username":"u","password":"p"},
                "empty.example":{}
            },"credsStore":"desktop"}"#,
        )
        .unwrap();
        let hub = store.get("docker.io").unwrap();
        assert_eq!(hub.username, "user");
        assert_eq!(hub.password, "pass:with:colons");
        assert_eq!(store.get("127.0.0.1:5000").unwrap().password, "p");
        assert!(store.get("empty.example").is_none());
        assert!(!format!("{hub:?}").contains("pass:with"));
        assert!(CredentialStore::parse(br#"{"auths":{"h":{"auth":"!!"}}}"#).is_err());
    }

    #[test]
    fn tokens_expire_early() {
        let now = Instant::now();
        let token = TokenResponse {
            token: None,
            access_token: Some("t".into()),
            expires_in: Some(100),
        }
        .into_token(now)
        .unwrap();
        assert_eq!(token.value, "t");
        assert_eq!(token.refresh_at, now + Duration::from_secs(90));
        assert!(
            TokenResponse {
                token: Some(String::new()),
                access_token: None,
                expires_in: None
            }
            .into_token(now)
            .is_none()
        );
    }
}
