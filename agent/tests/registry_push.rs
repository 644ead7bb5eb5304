//! The distribution push API of `gantry_oci`'s registry client against a real
//! `docker-registry` on 127.0.0.1: uploads from memory and from files, skips of blobs that are
//! there, cross-repository mounts (201) and their fallback (202), relative and absolute upload
//! locations, basic auth, manifest puts and the registry's error messages, retries through
//! server errors. An in-process stub shows what the real registry cannot: an upload `Location`
//! on another host gets no credentials, a registry that stores other bytes than sent is caught.

mod registry_common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use gantry_oci::destination::{BlobData, BlobOutcome, EncodedManifest};
use gantry_oci::manifest::{Descriptor, OCI_CONFIG, OCI_MANIFEST};
use gantry_oci::reference::{Digest, Reference};
use gantry_oci::registry::auth::{Credential, CredentialStore};
use gantry_oci::registry::{RegistryClient, RegistryError};
use gantry_oci::source::MemorySink;
use registry_common::*;
use serde_json::json;

fn reference(text: &str) -> Reference {
    text.parse().unwrap()
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor::of(media_type, bytes)
}

/// Pushes `bytes` from memory.
async fn push_bytes(
    client: &RegistryClient,
    image: &Reference,
    bytes: &[u8],
    mount_from: Option<&str>,
) -> Result<BlobOutcome, RegistryError> {
    let data = BlobData::Bytes(bytes.to_vec().into());
    client
        .push_blob(
            image,
            &descriptor("application/octet-stream", bytes),
            &data,
            mount_from,
        )
        .await
}

fn with_credentials(
    client: RegistryClient,
    host: &str,
    user: &str,
    password: &str,
) -> RegistryClient {
    let mut store = CredentialStore::default();
    store.insert(
        host,
        Credential {
            username: user.into(),
            password: password.into(),
        },
    );
    client.with_credentials(store)
}

async fn fetch(client: &RegistryClient, reference: &Reference, descriptor: &Descriptor) -> Vec<u8> {
    let mut sink = MemorySink::default();
    client
        .fetch_blob(reference, descriptor, &mut sink)
        .await
        .unwrap();
    sink.bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_uploaded_skipped_and_mounted() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start_options(&RegistryOptions {
        access_log: true,
        ..RegistryOptions::default()
    });
    let client = RegistryClient::new(fast_config()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let repo_a = reference(&format!("{}/push/a:v1", registry.host()));
    let repo_b = reference(&format!("{}/push/b:v1", registry.host()));
    let repo_c = reference(&format!("{}/push/c:v1", registry.host()));

    // A large blob streamed from a file, then a small one from memory.
    let big = noise(9 << 20, 7);
    let big_file = work.path().join("big");
    std::fs::write(&big_file, &big).unwrap();
    let big_descriptor = descriptor("application/octet-stream", &big);
    let pushed = client
        .push_blob(
            &repo_a,
            &big_descriptor,
            &BlobData::File(big_file.clone()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(pushed, BlobOutcome::Stored);
    assert_eq!(fetch(&client, &repo_a, &big_descriptor).await, big);
    let small = b"{\"small\":true}".to_vec();
    let small_descriptor = descriptor(OCI_CONFIG, &small);
    let data = BlobData::Bytes(small.clone().into());
    assert_eq!(
        client
            .push_blob(&repo_a, &small_descriptor, &data, None)
            .await
            .unwrap(),
        BlobOutcome::Stored
    );

    // Present: nothing is sent again.
    assert_eq!(
        client
            .push_blob(
                &repo_a,
                &big_descriptor,
                &BlobData::File(big_file.clone()),
                None
            )
            .await
            .unwrap(),
        BlobOutcome::Existed
    );
    // Another repository mounts it from the first (201).
    assert_eq!(
        client
            .push_blob(
                &repo_b,
                &big_descriptor,
                &BlobData::File(big_file.clone()),
                Some("push/a")
            )
            .await
            .unwrap(),
        BlobOutcome::Mounted
    );
    assert_eq!(fetch(&client, &repo_b, &big_descriptor).await, big);
    // Without bytes: mounted when possible, else nothing and `None`.
    assert_eq!(
        client
            .reuse_blob(&repo_c, &small_descriptor, Some("push/a"))
            .await
            .unwrap(),
        Some(BlobOutcome::Mounted)
    );
    let other = noise(5000, 8);
    let other_descriptor = descriptor("application/octet-stream", &other);
    assert_eq!(
        client
            .reuse_blob(&repo_c, &other_descriptor, Some("push/a"))
            .await
            .unwrap(),
        None
    );
    // A mount the source cannot serve (202) falls back to the upload it started.
    assert_eq!(
        push_bytes(&client, &repo_c, &other, Some("push/a"))
            .await
            .unwrap(),
        BlobOutcome::Stored
    );
    assert_eq!(fetch(&client, &repo_c, &other_descriptor).await, other);

    let log = registry.access_log();
    let mounts = |status: &str| {
        log.iter()
            .filter(|line| {
                line.starts_with("POST ") && line.contains("mount=") && line.ends_with(status)
            })
            .count()
    };
    assert_eq!(mounts(" 201"), 2, "{log:#?}");
    assert_eq!(mounts(" 202"), 2, "{log:#?}");
    // The cancelled session of the blob-less mount attempt.
    assert!(
        log.iter().any(|line| line.starts_with("DELETE ")),
        "{log:#?}"
    );
    let big_puts = log
        .iter()
        .filter(|line| line.starts_with("PUT ") && line.contains(big_descriptor.digest.hex()))
        .count();
    assert_eq!(big_puts, 1, "the big blob was uploaded once: {log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_locations_and_basic_auth() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start_options(&RegistryOptions {
        credentials: Some(("pusher", "s3cret")),
        relative_urls: true,
        ..RegistryOptions::default()
    });
    let image = reference(&format!("{}/auth/app:v1", registry.host()));
    let blob = noise(100_000, 3);
    let blob_descriptor = descriptor("application/octet-stream", &blob);

    let anonymous = RegistryClient::new(fast_config()).unwrap();
    let error = push_bytes(&anonymous, &image, &blob, None)
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, RegistryError::Push { .. }), "{text}");
    assert!(text.contains(&blob_descriptor.digest.to_string()), "{text}");
    assert!(text.contains("no credentials"), "{text}");

    let client = with_credentials(
        RegistryClient::new(fast_config()).unwrap(),
        &registry.host(),
        "pusher",
        "s3cret",
    );
    assert_eq!(
        push_bytes(&client, &image, &blob, None).await.unwrap(),
        BlobOutcome::Stored
    );
    assert_eq!(fetch(&client, &image, &blob_descriptor).await, blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_put_by_tag_and_digest_and_refusals_are_explained() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let client = RegistryClient::new(fast_config()).unwrap();
    let image = reference(&format!("{}/m/app:v1", registry.host()));
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_descriptor = descriptor(OCI_CONFIG, config);
    client
        .push_blob(
            &image,
            &config_descriptor,
            &BlobData::Bytes(config.to_vec().into()),
            None,
        )
        .await
        .unwrap();
    let manifest = EncodedManifest::new(
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_descriptor, "layers": []
        }))
        .unwrap(),
        OCI_MANIFEST,
    );
    let digest = client.push_manifest(&image, "v1", &manifest).await.unwrap();
    assert_eq!(digest, manifest.digest);
    let fetched = client.fetch_manifest(&image, "v1").await.unwrap();
    assert_eq!(fetched.digest, manifest.digest);
    client
        .push_manifest(&image, &manifest.digest.to_string(), &manifest)
        .await
        .unwrap();

    // A manifest naming a blob the registry lacks: the registry's own words come through.
    let missing = descriptor("application/vnd.oci.image.layer.v1.tar", b"not pushed");
    let dangling = EncodedManifest::new(
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_descriptor, "layers": [missing]
        }))
        .unwrap(),
        OCI_MANIFEST,
    );
    let error = client
        .push_manifest(&image, "v2", &dangling)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("manifest v2"), "{error}");
    assert!(error.contains("HTTP 400"), "{error}");
    assert!(error.contains("MANIFEST_BLOB_UNKNOWN"), "{error}");
    assert!(error.len() < 1500, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_retry_through_server_errors() {
    if !tools_available() {
        return;
    }
    // Relative locations keep the upload on the proxy, so every step can fail.
    let registry = Registry::start_options(&RegistryOptions {
        relative_urls: true,
        ..RegistryOptions::default()
    });
    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    let client = RegistryClient::new(fast_config()).unwrap();
    let image = reference(&format!("{}/retry/app:v1", proxy.host()));
    for failures in [1, 2, 3] {
        let blob = noise(200_000, failures);
        let blob_descriptor = descriptor("application/octet-stream", &blob);
        let before = proxy.request_count();
        proxy
            .faults
            .fail_requests
            .store(failures as u32, std::sync::atomic::Ordering::SeqCst);
        let pushed = push_bytes(&client, &image, &blob, None).await.unwrap();
        assert_eq!(pushed, BlobOutcome::Stored);
        // HEAD, POST, PUT, and one more request per failure.
        assert_eq!(proxy.request_count() - before, 3 + failures as usize);
        assert_eq!(fetch(&client, &image, &blob_descriptor).await, blob);
    }
    // Errors that do not go away end the push, naming the blob and the status.
    proxy
        .faults
        .always_fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let blob = noise(200_000, 4);
    let error = push_bytes(&client, &image, &blob, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(Digest::of(&blob).hex()), "{error}");
    assert!(error.contains("HTTP 500"), "{error}");
}

/// What the stub's second host saw.
#[derive(Default)]
struct StubLog {
    upload_authorization: Option<bool>,
    upload_query: String,
    upload_body: Vec<u8>,
}

/// A registry stub that wants basic auth and sends uploads to another host, and whose
/// manifest puts answer with a digest of other bytes.
async fn stub_registry(storage_port: u16) -> (u16, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().fallback(move |request: Request| async move {
        if !request.headers().contains_key("authorization") {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", "Basic realm=\"stub\"")
                .body(Body::empty())
                .unwrap();
        }
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        let response = Response::builder();
        match (
            method.as_str(),
            path.contains("/blobs/uploads/"),
            path.contains("/manifests/"),
        ) {
            ("HEAD", _, _) => response.status(StatusCode::NOT_FOUND).body(Body::empty()),
            ("POST", true, _) => response
                .status(StatusCode::ACCEPTED)
                .header(
                    "location",
                    format!("http://127.0.0.1:{storage_port}/upload/1?sig=abc"),
                )
                .body(Body::empty()),
            ("PUT", _, true) => response
                .status(StatusCode::CREATED)
                .header(
                    "docker-content-digest",
                    Digest::of(b"something else").to_string(),
                )
                .body(Body::empty()),
            _ => response.status(StatusCode::NOT_FOUND).body(Body::empty()),
        }
        .unwrap()
    });
    serve_stub(app).await
}

async fn stub_storage(log: Arc<Mutex<StubLog>>) -> (u16, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .fallback(
            |State(log): State<Arc<Mutex<StubLog>>>, request: Request| async move {
                let authorized = request.headers().contains_key("authorization");
                let query = request.uri().query().unwrap_or_default().to_string();
                let body = axum::body::to_bytes(request.into_body(), usize::MAX)
                    .await
                    .unwrap_or_default();
                let mut log = log.lock().unwrap();
                log.upload_authorization = Some(authorized);
                log.upload_query = query;
                log.upload_body = body.to_vec();
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Body::empty())
                    .unwrap()
            },
        )
        .with_state(log);
    serve_stub(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_stay_on_the_registry_and_stored_digests_are_checked() {
    let log = Arc::new(Mutex::new(StubLog::default()));
    let (storage_port, storage) = stub_storage(log.clone()).await;
    let (registry_port, stub) = stub_registry(storage_port).await;
    let host = format!("127.0.0.1:{registry_port}");
    let client = with_credentials(RegistryClient::new(fast_config()).unwrap(), &host, "u", "p");
    let image = reference(&format!("{host}/stub/app:v1"));

    let blob = b"blob bytes".to_vec();
    let blob_descriptor = descriptor("application/octet-stream", &blob);
    let pushed = push_bytes(&client, &image, &blob, None).await.unwrap();
    assert_eq!(pushed, BlobOutcome::Stored);
    {
        let log = log.lock().unwrap();
        assert_eq!(
            log.upload_authorization,
            Some(false),
            "credentials went to another host"
        );
        assert_eq!(
            log.upload_query,
            format!(
                "sig=abc&digest={}",
                blob_descriptor.digest.to_string().replace(':', "%3A")
            )
        );
        assert_eq!(log.upload_body, blob);
    }

    let manifest = EncodedManifest::new(b"{}".to_vec(), OCI_MANIFEST);
    let error = client
        .push_manifest(&image, "v1", &manifest)
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(text.contains("digest mismatch"), "{text}");
    assert!(
        text.contains(&Digest::of(b"something else").to_string()),
        "{text}"
    );
    stub.abort();
    storage.abort();
}
