//! The peers as the fetcher sees them: who is live, who is asked first, who owns a chunk.
//!
//! **Rendezvous hashing** (highest random weight): a chunk's weight at a node is the first 8
//! bytes of SHA-256(node URL, 0, chunk checksum); the node of highest weight owns it. Every
//! agent computes the same owner from the same list, a node joining or leaving moves only the
//! chunks it wins or held, and the owners of an image's chunks spread evenly over the nodes.
//! Only live peers take part: one on backoff is as if gone, so its chunks pass to others.
//!
//! **Health**: a peer that fails (no connection, no answer, a stall, an error status) is put
//! on backoff, doubling from [`FAILURE_BACKOFF`] to [`MAX_BACKOFF`]; one whose bytes fail
//! verification for [`BAD_BYTES_BACKOFF`] at once. A 404 is no failure: the peer simply does
//! not hold those bytes (yet).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use gantry_api::{PeerHealth, PeerStats};
use gantry_oci::Digest;
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use super::client::{PeerClient, ReadError};
use crate::lazy::origin::{BlobOrigin, OriginError, PeerRoutes};
use crate::metrics::SourceKind;
use crate::sync::lock;

/// Backoff after a peer's first failure in a row.
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(2);
/// Longest backoff after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Backoff of a peer that sent bytes failing verification.
pub const BAD_BYTES_BACKOFF: Duration = Duration::from_secs(300);

/// What the peer endpoint counts (kept here, beside the client's counters, for one report).
#[derive(Debug, Default)]
pub struct ServedCounters {
    /// Requests answered with bytes.
    pub requests: AtomicU64,
    /// Bytes sent.
    pub bytes: AtomicU64,
    /// Requests answered 404.
    pub not_held: AtomicU64,
    /// Requests refused 401.
    pub unauthorized: AtomicU64,
}

#[derive(Debug, Default)]
struct Health {
    failures_in_row: u32,
    backoff_until: Option<Instant>,
}

/// One peer agent.
#[derive(Debug)]
pub struct Peer {
    url: String,
    health: Mutex<Health>,
    requests: AtomicU64,
    not_held: AtomicU64,
    failures: AtomicU64,
    bad_bytes: AtomicU64,
}

impl Peer {
    fn new(url: String) -> Peer {
        Peer {
            url,
            health: Mutex::new(Health::default()),
            requests: AtomicU64::new(0),
            not_held: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            bad_bytes: AtomicU64::new(0),
        }
    }

    /// Its base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether it is asked now.
    pub fn is_live(&self) -> bool {
        lock(&self.health)
            .backoff_until
            .is_none_or(|until| Instant::now() >= until)
    }

    fn failed(&self, reason: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut health = lock(&self.health);
        health.failures_in_row = health.failures_in_row.saturating_add(1);
        let backoff = FAILURE_BACKOFF
            .saturating_mul(1 << (health.failures_in_row - 1).min(8))
            .min(MAX_BACKOFF);
        health.backoff_until = Some(Instant::now() + backoff);
        warn!(peer = %self.url, reason, ?backoff, "peer failed: on backoff");
    }

    fn answered(&self) {
        lock(&self.health).failures_in_row = 0;
    }

    fn sent_bad_bytes(&self) {
        self.bad_bytes.fetch_add(1, Ordering::Relaxed);
        lock(&self.health).backoff_until = Some(Instant::now() + BAD_BYTES_BACKOFF);
        warn!(peer = %self.url, backoff = ?BAD_BYTES_BACKOFF, "peer sent bytes that failed verification: on backoff");
    }

    fn health(&self) -> PeerHealth {
        PeerHealth {
            url: self.url.clone(),
            live: self.is_live(),
            requests: self.requests.load(Ordering::Relaxed),
            not_held: self.not_held.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            bad_bytes: self.bad_bytes.load(Ordering::Relaxed),
        }
    }
}

/// A node's rendezvous weight for `key`.
fn weight(node: &str, key: &[u8]) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(node.as_bytes());
    hasher.update([0]);
    hasher.update(key);
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

/// The peer agents of this one: from `agent.toml`, and from the cluster manifest in force.
#[derive(Debug)]
pub struct PeerSet {
    own_url: Option<String>,
    configured: Vec<String>,
    peers: RwLock<Vec<Arc<Peer>>>,
    client: PeerClient,
    /// What this agent's own endpoint served.
    pub served: ServedCounters,
}

impl PeerSet {
    /// The peers `configured` (normalized URLs), `own_url` left out; `client` asks them.
    pub fn new(own_url: Option<String>, configured: Vec<String>, client: PeerClient) -> PeerSet {
        let set = PeerSet {
            own_url,
            configured,
            peers: RwLock::new(Vec::new()),
            client,
            served: ServedCounters::default(),
        };
        set.set_manifest_peers(&[]);
        set
    }

    /// The peers from now on: `agent.toml`'s and `manifest` (normalized URLs) together, this
    /// agent left out. A peer listed before keeps its health.
    pub fn set_manifest_peers(&self, manifest: &[String]) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        let mut next: Vec<Arc<Peer>> = Vec::new();
        for url in self.configured.iter().chain(manifest) {
            if Some(url) == self.own_url.as_ref() || next.iter().any(|peer| peer.url == *url) {
                continue;
            }
            let known = peers.iter().find(|peer| peer.url == *url).cloned();
            next.push(known.unwrap_or_else(|| Arc::new(Peer::new(url.clone()))));
        }
        if next.len() != peers.len() || next.iter().zip(peers.iter()).any(|(a, b)| a.url != b.url) {
            info!(peers = ?next.iter().map(|peer| peer.url.as_str()).collect::<Vec<_>>(), "peers");
        }
        *peers = next;
    }

    fn live(&self) -> Vec<Arc<Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|peer| peer.is_live())
            .cloned()
            .collect()
    }

    /// The live peers for `key`, highest weight first.
    pub fn ranked(&self, key: &[u8]) -> Vec<Arc<Peer>> {
        let mut live: Vec<(u64, Arc<Peer>)> = self
            .live()
            .into_iter()
            .map(|peer| (weight(&peer.url, key), peer))
            .collect();
        live.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.url.cmp(&b.1.url)));
        live.into_iter().map(|(_, peer)| peer).collect()
    }

    /// The peers and what the endpoint served, for `GET /v1/lazy`.
    pub fn stats(&self) -> PeerStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PeerStats {
            peers: self
                .peers
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|peer| peer.health())
                .collect(),
            served_requests: load(&self.served.requests),
            served_bytes: load(&self.served.bytes),
            not_held: load(&self.served.not_held),
            unauthorized: load(&self.served.unauthorized),
        }
    }
}

impl PeerRoutes for PeerSet {
    fn origins(&self, blob: &Digest, key: &[u8]) -> Vec<Arc<dyn BlobOrigin>> {
        self.ranked(key)
            .into_iter()
            .map(|peer| {
                Arc::new(PeerOrigin {
                    peer,
                    client: self.client.clone(),
                    blob: blob.clone(),
                }) as Arc<dyn BlobOrigin>
            })
            .collect()
    }

    fn owner(&self, key: &[u8]) -> Option<String> {
        let best = self.ranked(key).into_iter().next()?;
        match &self.own_url {
            Some(me) if weight(me, key) > weight(&best.url, key) => None,
            _ => Some(best.url.clone()),
        }
    }

    fn is_empty(&self) -> bool {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

/// One layer blob at one peer.
#[derive(Debug)]
pub struct PeerOrigin {
    peer: Arc<Peer>,
    client: PeerClient,
    blob: Digest,
}

impl BlobOrigin for PeerOrigin {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, OriginError>> {
        Box::pin(async move {
            let mut bytes = Vec::new();
            self.read_range_into(range, &mut bytes).await?;
            Ok(Bytes::from(bytes))
        })
    }

    fn read_range_into<'a>(
        &'a self,
        range: Range<u64>,
        into: &'a mut Vec<u8>,
    ) -> BoxFuture<'a, Result<(), OriginError>> {
        Box::pin(async move {
            self.peer.requests.fetch_add(1, Ordering::Relaxed);
            match self
                .client
                .read_range(&self.peer.url, &self.blob, range, into)
                .await
            {
                Ok(()) => {
                    self.peer.answered();
                    Ok(())
                }
                Err(ReadError::NotHeld) => {
                    self.peer.answered();
                    self.peer.not_held.fetch_add(1, Ordering::Relaxed);
                    Err(OriginError::NotHeld(self.describe()))
                }
                Err(ReadError::Failed(reason)) => {
                    self.peer.failed(&reason);
                    Err(OriginError::Peer {
                        origin: self.describe(),
                        reason,
                    })
                }
            }
        })
    }

    fn describe(&self) -> String {
        format!("peer {}", self.peer.url)
    }

    fn counted_as(&self) -> Option<(SourceKind, &str)> {
        Some((SourceKind::Peer, &self.peer.url))
    }

    fn delivered_bad_bytes(&self) {
        self.peer.sent_bad_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(own: Option<&str>, peers: &[&str]) -> PeerSet {
        PeerSet::new(
            own.map(str::to_string),
            peers.iter().map(|p| p.to_string()).collect(),
            PeerClient::new(None).unwrap(),
        )
    }

    #[test]
    fn every_node_computes_the_same_owners_and_they_spread() {
        let nodes = ["http://a:1", "http://b:1", "http://c:1"];
        let views: Vec<PeerSet> = nodes.iter().map(|me| set(Some(me), &nodes)).collect();
        let mut owned = [0usize; 3];
        for chunk in 0u32..3000 {
            let key = Digest::of(&chunk.to_le_bytes()).hex().as_bytes().to_vec();
            // Each view names the owner: itself (None) or a peer's URL.
            let named: Vec<String> = views
                .iter()
                .zip(nodes)
                .map(|(view, me)| view.owner(&key).unwrap_or_else(|| me.to_string()))
                .collect();
            assert!(named.iter().all(|owner| *owner == named[0]), "{named:?}");
            let index = nodes.iter().position(|node| *node == named[0]).unwrap();
            owned[index] += 1;
            // The owner is asked first by the others.
            for (view, me) in views.iter().zip(nodes) {
                if *me != named[0] {
                    assert_eq!(view.ranked(&key)[0].url(), named[0]);
                }
            }
        }
        for count in owned {
            assert!((850..=1150).contains(&count), "{owned:?}");
        }
    }

    #[test]
    fn a_peer_on_backoff_passes_its_chunks_on_and_keeps_its_health_across_lists() {
        let view = set(Some("http://a:1"), &["http://b:1", "http://c:1"]);
        let keys: Vec<Vec<u8>> = (0u32..200).map(|i| i.to_le_bytes().to_vec()).collect();
        let owned_by_b: Vec<&Vec<u8>> = keys
            .iter()
            .filter(|key| view.owner(key).as_deref() == Some("http://b:1"))
            .collect();
        assert!(!owned_by_b.is_empty());
        let b = view.ranked(owned_by_b[0])[0].clone();
        b.failed("test");
        assert!(!b.is_live());
        for key in &owned_by_b {
            assert_ne!(view.owner(key).as_deref(), Some("http://b:1"));
            assert!(
                view.ranked(key)
                    .iter()
                    .all(|peer| peer.url() != "http://b:1")
            );
        }
        // The manifest lists b again, with d: b stays on backoff; a is never its own peer.
        view.set_manifest_peers(&[
            "http://b:1".into(),
            "http://d:1".into(),
            "http://a:1".into(),
        ]);
        let urls: Vec<String> = view.stats().peers.into_iter().map(|p| p.url).collect();
        assert_eq!(urls, ["http://b:1", "http://c:1", "http://d:1"]);
        assert!(!view.stats().peers[0].live);
        assert_eq!(view.stats().peers[0].failures, 1);
    }
}
