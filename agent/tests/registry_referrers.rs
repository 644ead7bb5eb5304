//! OCI 1.1 referrers through `gantry_oci`'s registry client: against the real
//! `docker-registry` 2.8 (no referrers API: the client keeps the `sha256-<hex>` tag listing),
//! and against an in-process registry that has the API (the registry lists them; no tag is
//! written). Listings are hints: a referrer about another manifest, of another type, or with
//! a blob over the limit is refused, and a tag that is not an index is an error.

mod registry_common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use gantry_oci::destination::{BlobData, EncodedManifest};
use gantry_oci::manifest::{Descriptor, ImageIndex, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};
use gantry_oci::reference::{Digest, Reference};
use gantry_oci::registry::RegistryClient;
use gantry_oci::registry::referrers::{Artifact, ReferrerListing, referrers_tag};
use registry_common::*;
use serde_json::json;

const TRACE_TYPE: &str = "application/vnd.gantry.startup-trace.v1+json";
const OTHER_TYPE: &str = "application/vnd.example.signature.v1+json";

fn artifact(artifact_type: &str, bytes: &[u8]) -> Artifact {
    Artifact {
        artifact_type: artifact_type.into(),
        media_type: artifact_type.into(),
        bytes: bytes.to_vec().into(),
        annotations: BTreeMap::from([("dev.gantry.test".to_string(), "yes".to_string())]),
    }
}

/// Pushes a small image (a config, no layers) under `tag`; its manifest's descriptor.
async fn push_image(client: &RegistryClient, image: &Reference, tag: &str) -> Descriptor {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_descriptor = Descriptor::of(OCI_CONFIG, config);
    client
        .push_blob(
            image,
            &config_descriptor,
            &BlobData::Bytes(config.to_vec().into()),
            None,
        )
        .await
        .unwrap();
    let manifest = EncodedManifest::new(
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_descriptor,
            "layers": [], "annotations": {"tag": tag}
        }))
        .unwrap(),
        OCI_MANIFEST,
    );
    client.push_manifest(image, tag, &manifest).await.unwrap();
    manifest.descriptor()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_referrers_api_the_tag_schema_lists_them() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let client = RegistryClient::new(fast_config()).unwrap();
    let image: Reference = format!("{}/r/app:v1", registry.host()).parse().unwrap();
    let subject = push_image(&client, &image, "v1").await;
    let other_image = push_image(&client, &image, "v2").await;

    let first = client
        .push_referrer(&image, &subject, &artifact(TRACE_TYPE, b"{\"trace\":1}"))
        .await
        .unwrap();
    let tag = referrers_tag(&subject.digest);
    assert_eq!(tag, format!("sha256-{}", subject.digest.hex()));
    assert_eq!(first.listing, ReferrerListing::Tag(tag.clone()));
    let second = client
        .push_referrer(&image, &subject, &artifact(TRACE_TYPE, b"{\"trace\":2}"))
        .await
        .unwrap();
    let signature = client
        .push_referrer(&image, &subject, &artifact(OTHER_TYPE, b"signed"))
        .await
        .unwrap();
    // The same referrer again is not listed twice.
    let again = client
        .push_referrer(&image, &subject, &artifact(TRACE_TYPE, b"{\"trace\":1}"))
        .await
        .unwrap();
    assert_eq!(again.manifest, first.manifest);

    // The tag is an index of the three, each with its type and annotations, as skopeo sees it.
    let raw = skopeo(&["inspect", "--tls-verify=false", "--raw"], &image, &tag);
    let index: ImageIndex = serde_json::from_slice(&raw).unwrap();
    assert_eq!(index.media_type.as_deref(), Some(OCI_INDEX));
    let listed: Vec<&Digest> = index.manifests.iter().map(|d| &d.digest).collect();
    assert_eq!(
        listed,
        [
            &first.manifest.digest,
            &second.manifest.digest,
            &signature.manifest.digest
        ]
    );
    assert!(
        index
            .manifests
            .iter()
            .all(|d| d.annotations.get("dev.gantry.test").map(String::as_str) == Some("yes"))
    );

    // Lookups filter by type and find nothing for a manifest without referrers.
    let traces = client
        .referrers(&image, &subject.digest, TRACE_TYPE)
        .await
        .unwrap();
    assert_eq!(traces, [first.manifest.clone(), second.manifest.clone()]);
    assert_eq!(
        client
            .referrers(&image, &subject.digest, OTHER_TYPE)
            .await
            .unwrap(),
        std::slice::from_ref(&signature.manifest)
    );
    assert!(
        client
            .referrers(&image, &other_image.digest, TRACE_TYPE)
            .await
            .unwrap()
            .is_empty()
    );

    // Fetched verified, with the checks a listing cannot be trusted for.
    let fetched = client
        .fetch_referrer(&image, &traces[1], &subject.digest, TRACE_TYPE, 1024)
        .await
        .unwrap();
    assert_eq!(&fetched.blob[..], b"{\"trace\":2}");
    assert_eq!(
        fetched.manifest.subject.as_ref().map(|s| &s.digest),
        Some(&subject.digest)
    );
    let refused = |result: Result<_, gantry_oci::registry::RegistryError>| {
        result.map(|_| ()).unwrap_err().to_string()
    };
    let about_another = refused(
        client
            .fetch_referrer(&image, &traces[0], &other_image.digest, TRACE_TYPE, 1024)
            .await,
    );
    assert!(about_another.contains("not about"), "{about_another}");
    let wrong_type = refused(
        client
            .fetch_referrer(
                &image,
                &signature.manifest,
                &subject.digest,
                TRACE_TYPE,
                1024,
            )
            .await,
    );
    assert!(wrong_type.contains("artifact type"), "{wrong_type}");
    let too_big = refused(
        client
            .fetch_referrer(&image, &traces[0], &subject.digest, TRACE_TYPE, 4)
            .await,
    );
    assert!(too_big.contains("more than the limit"), "{too_big}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_that_is_not_an_index_is_refused() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let client = RegistryClient::new(fast_config()).unwrap();
    let image: Reference = format!("{}/r/odd:v1", registry.host()).parse().unwrap();
    let subject = push_image(&client, &image, "v1").await;
    // Someone tagged an image manifest where the listing should be.
    let squatter = push_image(&client, &image, &referrers_tag(&subject.digest)).await;
    assert_ne!(squatter.digest, subject.digest);
    let error = client
        .referrers(&image, &subject.digest, TRACE_TYPE)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a referrers listing"), "{error}");
    let error = client
        .push_referrer(&image, &subject, &artifact(TRACE_TYPE, b"{}"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a referrers listing"), "{error}");
}

fn skopeo(args: &[&str], image: &Reference, tag: &str) -> Vec<u8> {
    let target = format!("docker://{}/{}:{tag}", image.registry, image.repository);
    let output = std::process::Command::new("skopeo")
        .args(args)
        .arg(&target)
        .output()
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo {args:?} {target}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// What the in-process registry holds and saw.
#[derive(Default)]
struct Store {
    blobs: HashMap<String, Vec<u8>>,
    manifests: HashMap<String, (String, Vec<u8>)>,
    /// Subject digest → listed referrer descriptors (the registry's own index).
    referrers: HashMap<String, Vec<serde_json::Value>>,
    /// Every manifest `PUT` target.
    manifest_puts: Vec<String>,
    /// Every referrers query.
    referrer_queries: Vec<String>,
}

/// A registry with the referrers API: enough of the distribution API for referrers (blob
/// uploads in one `PUT`, manifests by tag or digest, `GET …/referrers/<digest>`).
async fn referrers_registry(store: Arc<Mutex<Store>>) -> (u16, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .fallback(
            |State(store): State<Arc<Mutex<Store>>>, request: Request| async move {
                let method = request.method().as_str().to_string();
                let path = request.uri().path().to_string();
                let query = request.uri().query().unwrap_or_default().to_string();
                let content_type = request
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let body = axum::body::to_bytes(request.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default()
                    .to_vec();
                let mut store = store.lock().unwrap();
                let last = path.rsplit('/').next().unwrap_or_default().to_string();
                let response = Response::builder();
                let response = if path.contains("/blobs/uploads/") {
                    // Every upload goes to one session URL, in one PUT.
                    response
                        .status(StatusCode::ACCEPTED)
                        .header("location", "/v2/upload/1")
                        .body(Body::empty())
                } else if path.contains("/upload/") {
                    let digest = query
                        .split('&')
                        .find_map(|pair| pair.strip_prefix("digest="))
                        .unwrap_or_default()
                        .replace("%3A", ":");
                    store.blobs.insert(digest.clone(), body);
                    response
                        .status(StatusCode::CREATED)
                        .header("docker-content-digest", digest)
                        .body(Body::empty())
                } else if path.contains("/blobs/") {
                    match store.blobs.get(&last) {
                        Some(blob) if method == "HEAD" => response
                            .header("content-length", blob.len())
                            .body(Body::empty()),
                        Some(blob) => response.body(Body::from(blob.clone())),
                        None => response.status(StatusCode::NOT_FOUND).body(Body::empty()),
                    }
                } else if path.contains("/manifests/") && method == "PUT" {
                    let digest = Digest::of(&body).to_string();
                    store.manifest_puts.push(last.clone());
                    let document: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    let mut response = response
                        .status(StatusCode::CREATED)
                        .header("docker-content-digest", &digest);
                    if let Some(subject) = document["subject"]["digest"].as_str() {
                        store
                            .referrers
                            .entry(subject.to_string())
                            .or_default()
                            .push(json!({
                                "mediaType": OCI_MANIFEST,
                                "digest": digest,
                                "size": body.len(),
                                "artifactType": document["artifactType"],
                                "annotations": document["annotations"],
                            }));
                        response = response.header("oci-subject", subject);
                    }
                    store
                        .manifests
                        .insert(digest.clone(), (content_type.clone(), body.clone()));
                    store.manifests.insert(last, (content_type, body));
                    response.body(Body::empty())
                } else if path.contains("/manifests/") {
                    match store.manifests.get(&last) {
                        Some((media_type, bytes)) => response
                            .header("content-type", media_type)
                            .header("docker-content-digest", Digest::of(bytes).to_string())
                            .body(Body::from(bytes.clone())),
                        None => response.status(StatusCode::NOT_FOUND).body(Body::empty()),
                    }
                } else if path.contains("/referrers/") {
                    store.referrer_queries.push(query);
                    let listed = store.referrers.get(&last).cloned().unwrap_or_default();
                    // Like some registries: the filter is not applied (the client must).
                    response.header("content-type", OCI_INDEX).body(Body::from(
                        serde_json::to_vec(&json!({
                            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed
                        }))
                        .unwrap(),
                    ))
                } else {
                    response.status(StatusCode::NOT_FOUND).body(Body::empty())
                };
                response.unwrap()
            },
        )
        .with_state(store);
    serve_stub(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_with_the_referrers_api_lists_them_itself() {
    let store = Arc::new(Mutex::new(Store::default()));
    let (port, server) = referrers_registry(store.clone()).await;
    let client = RegistryClient::new(fast_config()).unwrap();
    let image: Reference = format!("127.0.0.1:{port}/r/api:v1").parse().unwrap();
    let subject = push_image(&client, &image, "v1").await;

    let trace = client
        .push_referrer(&image, &subject, &artifact(TRACE_TYPE, b"{\"trace\":1}"))
        .await
        .unwrap();
    assert_eq!(trace.listing, ReferrerListing::ReferrersApi);
    let signature = client
        .push_referrer(&image, &subject, &artifact(OTHER_TYPE, b"signed"))
        .await
        .unwrap();
    assert_eq!(signature.listing, ReferrerListing::ReferrersApi);
    {
        let store = store.lock().unwrap();
        assert!(
            !store
                .manifest_puts
                .contains(&referrers_tag(&subject.digest)),
            "no tag listing where the registry lists: {:?}",
            store.manifest_puts
        );
    }

    let listed = client
        .referrers(&image, &subject.digest, TRACE_TYPE)
        .await
        .unwrap();
    assert_eq!(
        listed.len(),
        1,
        "the other type is filtered out: {listed:?}"
    );
    assert_eq!(listed[0].digest, trace.manifest.digest);
    assert_eq!(listed[0].artifact_type.as_deref(), Some(TRACE_TYPE));
    let query = store.lock().unwrap().referrer_queries.last().cloned();
    assert_eq!(
        query.as_deref(),
        Some("artifactType=application%2Fvnd.gantry.startup-trace.v1%2Bjson")
    );
    let fetched = client
        .fetch_referrer(&image, &listed[0], &subject.digest, TRACE_TYPE, 1024)
        .await
        .unwrap();
    assert_eq!(&fetched.blob[..], b"{\"trace\":1}");

    // A listing that lies about an entry's type is caught: the type checked is the manifest's.
    let mut forged = listed[0].clone();
    forged.digest = signature.manifest.digest.clone();
    forged.artifact_type = Some(TRACE_TYPE.into());
    let error = client
        .fetch_referrer(&image, &forged, &subject.digest, TRACE_TYPE, 1024)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(error.contains("artifact type"), "{error}");
    server.abort();
}
