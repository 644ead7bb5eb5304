//! OCI 1.1 referrers: small artifacts stored beside an image that name its manifest as their
//! `subject` (Gantry's startup traces; signatures and SBOMs are found the same way).
//!
//! Pushing one stores the empty config `{}` and the artifact's one blob, then its manifest by
//! digest. A registry with the referrers API indexes it itself and says so with the
//! `OCI-Subject` header. For one without it (Debian's `docker-registry` 2.8), the pusher keeps
//! the listing, as the distribution spec's referrers tag schema says: the image index tagged
//! `sha256-<subject hex>`, read, extended and put back. (Two cards doing so at the same moment
//! can lose one entry: the spec offers no lock; a lost trace costs a recording, nothing else.)
//!
//! Finding them is `GET /v2/<name>/referrers/<digest>?artifactType=…`; a `404` means the
//! registry has no such API, and the tag is read instead. A listing is a hint, not trusted:
//! each entry is fetched by digest (verified), its type and `subject` checked, and its blob
//! fetched verified and bounded in size.
//!
//! Referrers live in the subject's own repository, on the registry itself: mirrors serve
//! images, not their listings.

use std::collections::BTreeMap;

use bytes::Bytes;
use reqwest::header;
use reqwest::{Method, StatusCode, Url};
use tracing::debug;

use super::client::{RegistryClient, RegistryError, expect_status, header_str};
use crate::destination::{BlobData, EncodedManifest};
use crate::manifest::{
    Descriptor, EMPTY_JSON, ImageIndex, ImageManifest, MANIFEST_ACCEPT, ManifestDocument,
    OCI_EMPTY, OCI_INDEX, OCI_MANIFEST,
};
use crate::reference::{Digest, Reference};
use crate::source::MemorySink;

/// An artifact to store as a referrer: one blob of `media_type`, typed `artifact_type`.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// The artifact's type (the manifest's `artifactType`).
    pub artifact_type: String,
    /// The media type of its blob.
    pub media_type: String,
    /// The blob.
    pub bytes: Bytes,
    /// Annotations of the manifest (repeated in listings).
    pub annotations: BTreeMap<String, String>,
}

impl Artifact {
    /// The artifact's manifest naming `subject`: the empty config and the one blob (both
    /// must be stored beside it).
    pub fn manifest(&self, subject: &Descriptor) -> ImageManifest {
        ImageManifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.into()),
            config: Descriptor::of(OCI_EMPTY, EMPTY_JSON),
            layers: vec![Descriptor::of(self.media_type.clone(), &self.bytes)],
            annotations: self.annotations.clone(),
            artifact_type: Some(self.artifact_type.clone()),
            subject: Some(Box::new(Descriptor::new(
                subject.media_type.clone(),
                subject.digest.clone(),
                subject.size,
            ))),
        }
    }
}

/// Where a pushed referrer is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferrerListing {
    /// The registry's referrers API lists it (it answered with `OCI-Subject`).
    ReferrersApi,
    /// The index under this tag lists it (the referrers tag schema).
    Tag(String),
}

/// A referrer stored by [`RegistryClient::push_referrer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedReferrer {
    /// The referrer's manifest, as listings describe it (with its type and annotations).
    pub manifest: Descriptor,
    /// Where it is listed.
    pub listing: ReferrerListing,
}

/// A referrer read back by [`RegistryClient::fetch_referrer`], verified.
#[derive(Debug, Clone)]
pub struct FetchedReferrer {
    /// Its manifest.
    pub manifest: ImageManifest,
    /// The manifest's digest.
    pub digest: Digest,
    /// Its one blob.
    pub blob: Bytes,
}

/// The tag under which the referrers tag schema lists the referrers of `subject`.
pub fn referrers_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

impl RegistryClient {
    /// Stores `artifact` in the repository of `reference` as a referrer of the manifest
    /// `subject`, and makes sure it is listed (by the registry, or under the referrers tag).
    pub async fn push_referrer(
        &self,
        reference: &Reference,
        subject: &Descriptor,
        artifact: &Artifact,
    ) -> Result<PushedReferrer, RegistryError> {
        let config = Descriptor::of(OCI_EMPTY, EMPTY_JSON);
        let empty = BlobData::Bytes(Bytes::from_static(EMPTY_JSON));
        self.push_blob(reference, &config, &empty, None).await?;
        let blob = Descriptor::of(artifact.media_type.clone(), &artifact.bytes);
        self.push_blob(
            reference,
            &blob,
            &BlobData::Bytes(artifact.bytes.clone()),
            None,
        )
        .await?;
        let manifest = artifact.manifest(subject);
        let encoded = encode(&subject.digest, &manifest, OCI_MANIFEST)?;
        let headers = self
            .push_manifest_answer(reference, &encoded.digest.to_string(), &encoded)
            .await?;
        let mut listed = encoded.descriptor();
        listed.artifact_type = manifest.artifact_type.clone();
        listed.annotations = manifest.annotations.clone();
        if header_str(&headers, "oci-subject").is_some() {
            debug!(digest = %listed.digest, "the registry lists referrers itself");
            return Ok(PushedReferrer {
                manifest: listed,
                listing: ReferrerListing::ReferrersApi,
            });
        }
        let tag = referrers_tag(&subject.digest);
        let url = self.manifest_url(reference, &tag);
        let mut index = self
            .read_listing(reference, &url)
            .await?
            .unwrap_or(ImageIndex {
                schema_version: 2,
                media_type: Some(OCI_INDEX.into()),
                manifests: Vec::new(),
                annotations: BTreeMap::new(),
            });
        if !index.manifests.iter().any(|d| d.digest == listed.digest) {
            index.manifests.push(listed.clone());
            let encoded = encode(&subject.digest, &index, OCI_INDEX)?;
            self.push_manifest_answer(reference, &tag, &encoded).await?;
        }
        Ok(PushedReferrer {
            manifest: listed,
            listing: ReferrerListing::Tag(tag),
        })
    }

    /// The referrers of the manifest `subject` of type `artifact_type`, as the registry (or
    /// the referrers tag) lists them: hints to fetch with [`RegistryClient::fetch_referrer`].
    pub async fn referrers(
        &self,
        reference: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        let endpoint = self.origin(reference);
        let mut url = Url::parse(&format!(
            "{}/v2/{}/referrers/{subject}",
            endpoint.base, reference.repository
        ))
        .map_err(|error| RegistryError::Referrer {
            digest: subject.clone(),
            reason: format!("cannot build the referrers URL: {error}"),
        })?;
        url.query_pairs_mut()
            .append_pair("artifactType", artifact_type);
        let listed = match self.read_listing(reference, url.as_str()).await? {
            Some(index) => index.manifests,
            None => {
                debug!(%url, "no referrers API: reading the referrers tag");
                let tag_url = self.manifest_url(reference, &referrers_tag(subject));
                self.read_listing(reference, &tag_url)
                    .await?
                    .map_or_else(Vec::new, |index| index.manifests)
            }
        };
        // Registries may ignore the filter (and tags hold every type): apply it here.
        Ok(listed
            .into_iter()
            .filter(|d| d.artifact_type.as_deref() == Some(artifact_type))
            .collect())
    }

    /// Fetches the referrer `listed` names, verified: its manifest by digest, which must be of
    /// `artifact_type`, name `subject`, and carry one blob of at most `max_blob` bytes; then
    /// that blob, checked against its digest.
    pub async fn fetch_referrer(
        &self,
        reference: &Reference,
        listed: &Descriptor,
        subject: &Digest,
        artifact_type: &str,
        max_blob: u64,
    ) -> Result<FetchedReferrer, RegistryError> {
        let bad = |reason: String| RegistryError::Referrer {
            digest: listed.digest.clone(),
            reason,
        };
        let fetched = self
            .fetch_manifest(reference, &listed.digest.to_string())
            .await?;
        let manifest = match ManifestDocument::parse_with(
            &fetched.bytes,
            fetched.media_type.as_deref(),
            |_| true,
        ) {
            Ok(ManifestDocument::Image(manifest)) => manifest,
            Ok(ManifestDocument::Index(_)) => return Err(bad("an index, not a manifest".into())),
            Err(error) => return Err(bad(error.to_string())),
        };
        if manifest.artifact_type.as_deref() != Some(artifact_type) {
            return Err(bad(format!(
                "artifact type {:?}, not {artifact_type:?}",
                manifest.artifact_type
            )));
        }
        if manifest.subject.as_ref().map(|s| &s.digest) != Some(subject) {
            return Err(bad(format!("it is not about {subject}")));
        }
        let [blob] = manifest.layers.as_slice() else {
            return Err(bad(format!("{} blobs, not one", manifest.layers.len())));
        };
        if blob.size > max_blob {
            return Err(bad(format!(
                "its blob has {} bytes, more than the limit of {max_blob}",
                blob.size
            )));
        }
        let mut sink = MemorySink::default();
        self.fetch_blob(reference, blob, &mut sink).await?;
        Ok(FetchedReferrer {
            digest: fetched.digest,
            blob: Bytes::from(sink.bytes),
            manifest,
        })
    }

    /// Reads a listing (an image index) at `url`: `None` when the registry answers `404`.
    async fn read_listing(
        &self,
        reference: &Reference,
        url: &str,
    ) -> Result<Option<ImageIndex>, RegistryError> {
        let endpoint = self.origin(reference);
        let scope = format!("repository:{}:pull", reference.repository);
        let limit = self.config().max_manifest_bytes;
        let read = self
            .retrying(url, || async {
                let response = self
                    // Every manifest type, so that something else under the tag is seen as what it
                    // is (a registry hides a manifest whose type is not accepted behind a 404).
                    .send_as(&endpoint, &scope, Method::GET, url, |request| {
                        request.header(header::ACCEPT, MANIFEST_ACCEPT)
                    })
                    .await?;
                if response.status() == StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                let response = expect_status(url, response, &[StatusCode::OK]).await?;
                let media_type = header_str(response.headers(), header::CONTENT_TYPE);
                let bytes = self.read_capped(url, response, limit).await?;
                Ok(Some((bytes, media_type)))
            })
            .await?;
        let Some((bytes, media_type)) = read else {
            return Ok(None);
        };
        let bad = |reason: String| RegistryError::Listing {
            url: url.to_string(),
            reason,
        };
        match ManifestDocument::parse_with(&bytes, media_type.as_deref(), |_| true) {
            Ok(ManifestDocument::Index(index)) => Ok(Some(index)),
            Ok(ManifestDocument::Image(_)) => Err(bad("a manifest, not an index".into())),
            Err(error) => Err(bad(error.to_string())),
        }
    }
}

/// Serializes a document the client built (cannot fail for these types; reported, not
/// unwrapped, all the same).
fn encode<T: serde::Serialize>(
    subject: &Digest,
    document: &T,
    media_type: &str,
) -> Result<EncodedManifest, RegistryError> {
    let bytes = serde_json::to_vec(document).map_err(|error| RegistryError::Referrer {
        digest: subject.clone(),
        reason: format!("encoding: {error}"),
    })?;
    Ok(EncodedManifest::new(bytes, media_type))
}
