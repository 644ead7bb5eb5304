//! The push side of the distribution API: blob uploads, cross-repository mounts and manifest
//! puts, with the pulls' authentication, retries and error reporting.
//!
//! A blob is pushed as: `HEAD` (skip it when the repository has it), then
//! `POST …/blobs/uploads/` — with `?mount=<digest>&from=<repo>` when a repository of the same
//! registry may hold it: `201` means mounted, `202` starts an ordinary upload — then one
//! monolithic `PUT <Location>&digest=<digest>` streamed from memory or from a file. A
//! manifest is one `PUT …/manifests/<tag or digest>`. Pushes go to the registry itself, never
//! to a mirror (mirrors only serve pulls), with a token scoped `pull,push` on the repository
//! (plus `pull` on the repository mounted from). Every step is retried like a pull's on
//! 5xx/429/transport errors, restarting the upload from its `POST`; answers the registry
//! digests (`Docker-Content-Digest`) are checked against what was sent.

use futures::TryStreamExt as _;
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode, Url};
use tracing::debug;

use super::client::{
    Endpoint, RegistryClient, RegistryError, expect_status, header_str, same_origin,
};
use crate::destination::{BlobData, BlobOutcome, EncodedManifest, ImageDestination};
use crate::manifest::Descriptor;
use crate::reference::{Digest, Reference};
use crate::source::VerifyError;

/// Read size when streaming a blob from a file.
const UPLOAD_CHUNK: usize = 1 << 20;

/// One push session's target: the endpoint and the token scope every request uses.
struct PushTarget<'a> {
    endpoint: Endpoint,
    scope: String,
    reference: &'a Reference,
    /// A repository of the same registry to mount blobs from.
    mount_from: Option<&'a str>,
}

impl RegistryClient {
    fn push_target<'a>(
        &self,
        reference: &'a Reference,
        mount_from: Option<&'a str>,
    ) -> PushTarget<'a> {
        // Mounting from the repository itself would only repeat the HEAD.
        let mount_from = mount_from.filter(|from| *from != reference.repository);
        let mut scope = format!("repository:{}:pull,push", reference.repository);
        if let Some(from) = mount_from {
            scope.push_str(&format!(" repository:{from}:pull"));
        }
        PushTarget {
            endpoint: self.origin(reference),
            scope,
            reference,
            mount_from,
        }
    }

    /// Stores a blob in the repository `reference` names: skipped when there, mounted from
    /// `mount_from` (a repository of the same registry) when it holds it, else uploaded from
    /// `data`.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        data: &BlobData,
        mount_from: Option<&str>,
    ) -> Result<BlobOutcome, RegistryError> {
        let target = self.push_target(reference, mount_from);
        let outcome = self
            .push_blob_to(&target, descriptor, Some(data))
            .await
            .map_err(|error| push_error(reference, format!("blob {}", descriptor.digest), error))?;
        // With data, every path ends with the blob present.
        Ok(outcome.unwrap_or(BlobOutcome::Stored))
    }

    /// Makes a blob present without its bytes when possible: `Existed` when the repository
    /// holds it, `Mounted` when `mount_from` did; `None` when it must be uploaded.
    pub async fn reuse_blob(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        mount_from: Option<&str>,
    ) -> Result<Option<BlobOutcome>, RegistryError> {
        let target = self.push_target(reference, mount_from);
        self.push_blob_to(&target, descriptor, None)
            .await
            .map_err(|error| push_error(reference, format!("blob {}", descriptor.digest), error))
    }

    /// Stores a manifest or index under `target` (a tag or its digest); returns its digest.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        target: &str,
        manifest: &EncodedManifest,
    ) -> Result<Digest, RegistryError> {
        self.push_manifest_answer(reference, target, manifest)
            .await?;
        Ok(manifest.digest.clone())
    }

    /// [`RegistryClient::push_manifest`], returning the headers of the registry's answer
    /// (which say, for instance, whether it indexed the manifest's `subject`).
    pub(super) async fn push_manifest_answer(
        &self,
        reference: &Reference,
        target: &str,
        manifest: &EncodedManifest,
    ) -> Result<HeaderMap, RegistryError> {
        let push = self.push_target(reference, None);
        let url = self.manifest_url(reference, target);
        let bytes = bytes::Bytes::from(manifest.bytes.clone());
        let headers = self
            .retrying(&url, || async {
                let response = self
                    .send_as(&push.endpoint, &push.scope, Method::PUT, &url, |request| {
                        request
                            .header(header::CONTENT_TYPE, &manifest.media_type)
                            .body(bytes.clone())
                    })
                    .await?;
                let response = expect_status(&url, response, &[StatusCode::CREATED]).await?;
                check_served_digest(&url, response.headers(), &manifest.digest)?;
                Ok(response.headers().clone())
            })
            .await
            .map_err(|error| push_error(reference, format!("manifest {target}"), error))?;
        debug!(%url, digest = %manifest.digest, "pushed manifest");
        Ok(headers)
    }

    async fn push_blob_to(
        &self,
        target: &PushTarget<'_>,
        descriptor: &Descriptor,
        data: Option<&BlobData>,
    ) -> Result<Option<BlobOutcome>, RegistryError> {
        if self.blob_exists(target, descriptor).await? {
            debug!(digest = %descriptor.digest, "blob already in the repository");
            return Ok(Some(BlobOutcome::Existed));
        }
        let url = upload_start_url(target, &descriptor.digest);
        self.retrying(&url, || self.upload_once(target, &url, descriptor, data))
            .await
    }

    /// `HEAD` on the blob: present with the right size, or not.
    async fn blob_exists(
        &self,
        target: &PushTarget<'_>,
        descriptor: &Descriptor,
    ) -> Result<bool, RegistryError> {
        let url = format!(
            "{}/v2/{}/blobs/{}",
            target.endpoint.base, target.reference.repository, descriptor.digest
        );
        self.retrying(&url, || async {
            let response = self
                .send_as(&target.endpoint, &target.scope, Method::HEAD, &url, |r| r)
                .await?;
            if response.status() == StatusCode::NOT_FOUND {
                return Ok(false);
            }
            let response = expect_status(&url, response, &[StatusCode::OK]).await?;
            // A HEAD has no body: the size is the header's.
            let size = header_str(response.headers(), header::CONTENT_LENGTH)
                .and_then(|length| length.trim().parse::<u64>().ok());
            Ok(size.is_none_or(|size| size == descriptor.size))
        })
        .await
    }

    /// One upload: `POST` (maybe a mount), then the `PUT` of the bytes. Without `data`, a
    /// started upload is cancelled and `None` returned.
    async fn upload_once(
        &self,
        target: &PushTarget<'_>,
        url: &str,
        descriptor: &Descriptor,
        data: Option<&BlobData>,
    ) -> Result<Option<BlobOutcome>, RegistryError> {
        let response = self
            .send_as(
                &target.endpoint,
                &target.scope,
                Method::POST,
                url,
                |request| request.header(header::CONTENT_LENGTH, 0),
            )
            .await?;
        let mounting = target.mount_from.is_some();
        let wanted: &[StatusCode] = if mounting {
            &[StatusCode::CREATED, StatusCode::ACCEPTED]
        } else {
            &[StatusCode::ACCEPTED]
        };
        let response = expect_status(url, response, wanted).await?;
        if response.status() == StatusCode::CREATED {
            check_served_digest(url, response.headers(), &descriptor.digest)?;
            debug!(digest = %descriptor.digest, from = target.mount_from, "mounted blob");
            return Ok(Some(BlobOutcome::Mounted));
        }
        let session = upload_session(url, response.headers())?;
        let Some(data) = data else {
            self.cancel_upload(target, &session).await;
            return Ok(None);
        };
        let mut put = session;
        put.query_pairs_mut()
            .append_pair("digest", &descriptor.digest.to_string());
        let put = put.to_string();
        let response = self
            .send_as(
                &target.endpoint,
                &target.scope,
                Method::PUT,
                &put,
                |request| {
                    request
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .header(header::CONTENT_LENGTH, descriptor.size)
                        .body(request_body(data))
                },
            )
            .await?;
        let response = expect_status(&put, response, &[StatusCode::CREATED]).await?;
        check_served_digest(&put, response.headers(), &descriptor.digest)?;
        debug!(digest = %descriptor.digest, size = descriptor.size, "uploaded blob");
        Ok(Some(BlobOutcome::Stored))
    }

    /// Ends an upload session that will not be used (best effort: registries expire them).
    async fn cancel_upload(&self, target: &PushTarget<'_>, session: &Url) {
        let result = self
            .send_as(
                &target.endpoint,
                &target.scope,
                Method::DELETE,
                session.as_str(),
                |r| r,
            )
            .await;
        debug!(%session, ok = result.is_ok(), "cancelled the upload session");
    }

    /// Runs `step` until it succeeds, fails for good, or the retries are spent.
    pub(super) async fn retrying<T, F, Fut>(
        &self,
        url: &str,
        mut step: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let mut attempt = 0;
        loop {
            match step().await {
                Err(error) if error.is_retriable() && attempt < self.config().retries => {
                    attempt += 1;
                    self.back_off(url, attempt, &error).await;
                }
                other => return other,
            }
        }
    }
}

fn push_error(reference: &Reference, what: String, error: RegistryError) -> RegistryError {
    RegistryError::Push {
        what,
        repository: format!("{}/{}", reference.registry, reference.repository),
        error: Box::new(error),
    }
}

/// `POST …/blobs/uploads/`, with the mount query when mounting.
fn upload_start_url(target: &PushTarget<'_>, digest: &Digest) -> String {
    let mut url = format!(
        "{}/v2/{}/blobs/uploads/",
        target.endpoint.base, target.reference.repository
    );
    if let Some(from) = target.mount_from {
        // Repository names are [a-z0-9._/-] and digests [a-z0-9:]: nothing to escape.
        url.push_str(&format!("?mount={digest}&from={from}"));
    }
    url
}

/// The upload session URL of a `202`: its `Location`, relative to the request or absolute,
/// possibly with a query of its own (kept).
fn upload_session(request_url: &str, headers: &HeaderMap) -> Result<Url, RegistryError> {
    let location = header_str(headers, header::LOCATION).unwrap_or_default();
    let bad = || RegistryError::BadLocation {
        url: request_url.to_string(),
        location: location.chars().take(200).collect(),
    };
    if location.is_empty() {
        return Err(bad());
    }
    let session = Url::parse(request_url)
        .and_then(|base| base.join(&location))
        .map_err(|_| bad())?;
    if !matches!(session.scheme(), "http" | "https") {
        return Err(bad());
    }
    if !same_origin(session.as_str(), request_url) {
        debug!(%session, "the upload goes to another host: no credentials are sent there");
    }
    Ok(session)
}

/// Checks the digest a registry says it stored, when it says.
fn check_served_digest(url: &str, headers: &HeaderMap, sent: &Digest) -> Result<(), RegistryError> {
    let Some(served) = header_str(headers, "docker-content-digest") else {
        return Ok(());
    };
    match served.trim().parse::<Digest>() {
        Ok(served) if served == *sent => Ok(()),
        Ok(served) => Err(RegistryError::Verify {
            url: url.to_string(),
            error: VerifyError::Digest {
                expected: sent.clone(),
                actual: served,
            },
        }),
        // A digest of another algorithm says nothing about ours.
        Err(_) => Ok(()),
    }
}

/// A fresh request body for `data`: files are opened when the body is first polled and
/// streamed, so a retry reads the file again and a large blob is never all in memory.
fn request_body(data: &BlobData) -> reqwest::Body {
    match data {
        BlobData::Bytes(bytes) => reqwest::Body::from(bytes.clone()),
        BlobData::File(path) => {
            let stream = futures::stream::once(tokio::fs::File::open(path.clone()))
                .map_ok(|file| tokio_util::io::ReaderStream::with_capacity(file, UPLOAD_CHUNK))
                .try_flatten();
            reqwest::Body::wrap_stream(stream)
        }
    }
}

/// A repository of a registry, as an [`ImageDestination`].
#[derive(Debug, Clone)]
pub struct RegistryDestination<'a> {
    /// The client.
    pub client: &'a RegistryClient,
    /// The repository and the tag the image gets.
    pub reference: &'a Reference,
    /// A repository of the same registry that may hold blobs to mount (the source image's).
    pub mount_from: Option<String>,
}

impl ImageDestination for RegistryDestination<'_> {
    type Error = RegistryError;

    fn describe(&self) -> String {
        self.reference.to_string()
    }

    async fn reuse_blob(
        &self,
        descriptor: &Descriptor,
    ) -> Result<Option<BlobOutcome>, RegistryError> {
        self.client
            .reuse_blob(self.reference, descriptor, self.mount_from.as_deref())
            .await
    }

    async fn put_blob(
        &self,
        descriptor: &Descriptor,
        data: BlobData,
    ) -> Result<BlobOutcome, RegistryError> {
        self.client
            .push_blob(
                self.reference,
                descriptor,
                &data,
                self.mount_from.as_deref(),
            )
            .await
    }

    async fn put_manifest(
        &self,
        manifest: &EncodedManifest,
        tagged: bool,
    ) -> Result<(), RegistryError> {
        let target = match (&self.reference.tag, tagged) {
            (Some(tag), true) => tag.clone(),
            _ => manifest.digest.to_string(),
        };
        self.client
            .push_manifest(self.reference, &target, manifest)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn upload_locations_resolve_against_the_request() {
        let post = "http://127.0.0.1:5000/v2/a/b/blobs/uploads/";
        let session = |location: &str| {
            upload_session(post, &headers(&[("location", location)])).map(|u| u.to_string())
        };
        assert_eq!(
            session("/v2/a/b/blobs/uploads/u1?_state=xyz").unwrap(),
            "http://127.0.0.1:5000/v2/a/b/blobs/uploads/u1?_state=xyz"
        );
        assert_eq!(
            session("u2").unwrap(),
            "http://127.0.0.1:5000/v2/a/b/blobs/uploads/u2"
        );
        assert_eq!(
            session("https://storage.example/up/u3?sig=1").unwrap(),
            "https://storage.example/up/u3?sig=1"
        );
        for bad in ["", "file:///etc/passwd", "http://[::1"] {
            assert!(
                matches!(session(bad), Err(RegistryError::BadLocation { .. })),
                "{bad:?}"
            );
        }
        // The digest joins a query the registry already put there.
        let mut put = Url::parse("http://h/v2/x/blobs/uploads/u?_state=a%2Bb").unwrap();
        put.query_pairs_mut().append_pair("digest", "sha256:00");
        assert_eq!(
            put.as_str(),
            "http://h/v2/x/blobs/uploads/u?_state=a%2Bb&digest=sha256%3A00"
        );
    }

    #[test]
    fn served_digests_are_checked_when_sent() {
        let sent = Digest::of(b"a");
        let url = "http://h/v2/x/manifests/t";
        assert!(check_served_digest(url, &headers(&[]), &sent).is_ok());
        let same = sent.to_string();
        assert!(
            check_served_digest(url, &headers(&[("docker-content-digest", &same)]), &sent).is_ok()
        );
        let other = Digest::of(b"b").to_string();
        let error = check_served_digest(url, &headers(&[("docker-content-digest", &other)]), &sent)
            .unwrap_err();
        assert!(error.to_string().contains(&other), "{error}");
    }

    #[test]
    fn scopes_and_mount_urls() {
        let client = RegistryClient::new(super::super::RegistryConfig::default()).unwrap();
        let reference: Reference = "127.0.0.1:5000/team/app:v1".parse().unwrap();
        let digest = Digest::of(b"x");
        let target = client.push_target(&reference, Some("team/base"));
        assert_eq!(
            target.scope,
            "repository:team/app:pull,push repository:team/base:pull"
        );
        assert_eq!(
            upload_start_url(&target, &digest),
            format!(
                "http://127.0.0.1:5000/v2/team/app/blobs/uploads/?mount={digest}&from=team/base"
            )
        );
        let target = client.push_target(&reference, Some("team/app"));
        assert_eq!(
            target.mount_from, None,
            "no mount from the repository itself"
        );
        assert_eq!(target.scope, "repository:team/app:pull,push");
        assert_eq!(
            upload_start_url(&target, &digest),
            "http://127.0.0.1:5000/v2/team/app/blobs/uploads/"
        );
    }
}
