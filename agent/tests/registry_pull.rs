//! Pulls from a real `docker-registry` on 127.0.0.1: anonymous, basic and bearer auth,
//! platform selection, digests, single flight, and the OCI layout source.

mod registry_common;

use std::sync::Mutex;

use gantry_agent::cache::Cache;
use gantry_agent::images::pull::{PullEvent, no_progress, pull};
use gantry_oci::layout::{OciLayout, OciLayoutSource};
use gantry_oci::reference::Reference;
use gantry_oci::registry::auth::CredentialStore;
use gantry_oci::registry::{RegistryClient, RegistrySource};
use registry_common::*;
use serde_json::json;

fn reference(text: &str) -> Reference {
    text.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_registry_converts_and_records_the_image() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    let built = layout.simple_image("v1", &small_layers(1));
    registry.push(&layout.root, "v1", "test/app:v1");

    let cache_dir = work.path().join("cache");
    let cache = open_cache(&cache_dir);
    let client = RegistryClient::new(fast_config()).unwrap();
    let image = reference(&format!("{}/test/app:v1", registry.host()));
    let events = Mutex::new(Vec::new());
    let record = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &image,
        },
        &|e: &PullEvent| events.lock().unwrap().push(e.clone()),
    )
    .await
    .unwrap();

    assert_eq!(record.name, format!("{}/test/app:v1", registry.host()));
    assert_eq!(record.manifest_digest, built.manifest_digest);
    assert_eq!(record.config_digest, built.config_digest);
    let process = record.config.config.clone().unwrap();
    assert_eq!(process.entrypoint.unwrap(), ["/bin/app"]);
    assert_eq!(process.cmd.unwrap(), ["--serve"]);
    assert_eq!(process.env.unwrap(), ["PATH=/bin", "MODE=test"]);
    assert_eq!(process.working_dir.as_deref(), Some("/srv"));
    assert_eq!(process.user.as_deref(), Some("1000:1000"));
    let blob_digests: Vec<_> = record
        .layers
        .iter()
        .map(|l| l.blob_digest.clone())
        .collect();
    assert_eq!(blob_digests, built.layer_digests);

    for layer in &record.layers {
        let bytes = std::fs::read(&layer.erofs_path).unwrap();
        assert_eq!(bytes.len() as u64, layer.erofs_size);
        assert_eq!(
            gantry_oci::reference::Digest::of(&bytes),
            layer.erofs_digest
        );
        let bitmap = gantry_agent::cache::bitmap::ChunkBitmap::open(&layer.bitmap_path).unwrap();
        assert!(bitmap.is_complete());
        assert_eq!(bitmap.image_size(), layer.erofs_size);
    }
    let base = extract_erofs(&record.layers[0].erofs_path, work.path());
    assert_eq!(
        std::fs::read_to_string(base.join("bin/app")).unwrap(),
        "#!/bin/sh\necho app 1\n"
    );
    let app = extract_erofs(&record.layers[1].erofs_path, work.path());
    assert_eq!(
        std::fs::read(app.join("srv/data.bin")).unwrap(),
        noise(300_000, 1)
    );
    assert_eq!(
        std::fs::read_link(app.join("srv/link")).unwrap().to_str(),
        Some("data.bin")
    );
    let done = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, PullEvent::LayerDone { .. }))
        .count();
    assert_eq!(done, 2);
    assert_consistent(&cache_dir);

    // The record survives reopening; a second pull is all cache hits.
    drop(cache);
    let cache = open_cache(&cache_dir);
    let images = cache.images().unwrap();
    assert_eq!(images.len(), 1);
    assert!(images[0].missing_layers.is_empty());
    assert_eq!(images[0].record, record);
    let events = Mutex::new(Vec::new());
    let again = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &image,
        },
        &|e: &PullEvent| events.lock().unwrap().push(e.clone()),
    )
    .await
    .unwrap();
    assert_eq!(again.layers, record.layers);
    let cached = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, PullEvent::LayerCached { .. }))
        .count();
    assert_eq!(cached, 2);

    // By digest too.
    let by_digest = reference(&format!(
        "{}/test/app@{}",
        registry.host(),
        built.manifest_digest
    ));
    let record = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &by_digest,
        },
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(record.manifest_digest, built.manifest_digest);
    assert_eq!(cache.images().unwrap().len(), 2);

    // A missing tag is a clean error naming the registry.
    let missing = reference(&format!("{}/test/app:nope", registry.host()));
    let error = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &missing,
        },
        &no_progress,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("404") && error.contains(&registry.host()),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_index_picks_the_configured_platform() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    let process = json!({"Cmd": ["/bin/sh"]});
    let amd = small_layers(10);
    let arm = small_layers(20);
    let (amd_desc, amd_built) = layout.image(&amd, "amd64", process.clone());
    let (mut arm_desc, arm_built) = layout.image(&arm, "arm64", process);
    arm_desc["platform"]["variant"] = json!("v8");
    let index = layout.index(vec![arm_desc, amd_desc]);
    layout.tag(index, "multi");
    registry.push(&layout.root, "multi", "test/multi:latest");

    let image = reference(&format!("{}/test/multi", registry.host()));
    let cache = open_cache(&work.path().join("cache"));
    let client = RegistryClient::new(fast_config()).unwrap();
    let record = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(record.manifest_digest, amd_built.manifest_digest);
    assert!(record.index_digest.is_some());

    let mut config = fast_config();
    config.platform = "linux/arm64".into();
    let arm_client = RegistryClient::new(config).unwrap();
    let arm_cache = open_cache(&work.path().join("cache-arm"));
    let record = pull(
        &arm_cache,
        &RegistrySource {
            client: &arm_client,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(record.manifest_digest, arm_built.manifest_digest);
    assert_eq!(record.layers[0].blob_digest, arm_built.layer_digests[0]);

    let mut config = fast_config();
    config.platform = "linux/riscv64".into();
    let none = RegistryClient::new(config).unwrap();
    let error = pull(
        &arm_cache,
        &RegistrySource {
            client: &none,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("no manifest for platform linux/riscv64"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_htpasswd_and_a_docker_config_file() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start_with(Some(("gantry", "s3cret")));
    let work = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    layout.simple_image("v1", &small_layers(3));
    registry.push(&layout.root, "v1", "private/app:v1");
    let image = reference(&format!("{}/private/app:v1", registry.host()));
    let cache_dir = work.path().join("cache");
    let cache = open_cache(&cache_dir);

    let anonymous = RegistryClient::new(fast_config()).unwrap();
    let error = pull(
        &cache,
        &RegistrySource {
            client: &anonymous,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("unauthorized"), "{error}");

    let mut wrong = CredentialStore::default();
    wrong.insert(
        &registry.host(),
        gantry_oci::registry::auth::Credential {
            username: "gantry".into(),
            password: "wrong".into(),
        },
    );
    let wrong_client = RegistryClient::new(fast_config())
        .unwrap()
        .with_credentials(wrong);
    let error = pull(
        &cache,
        &RegistrySource {
            client: &wrong_client,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("unauthorized"), "{error}");
    assert!(cache.images().unwrap().is_empty());

    let mut config = fast_config();
    config.credentials_file = Some(docker_config(
        work.path(),
        &registry.host(),
        "gantry",
        "s3cret",
    ));
    let client = RegistryClient::new(config).unwrap();
    let record = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(record.layers.len(), 2);
    assert_consistent(&cache_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_refreshes_an_expired_token_mid_pull() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    layout.simple_image("v1", &small_layers(4));
    registry.push(&layout.root, "v1", "tok/app:v1");

    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    // Each token is good for two requests: the pull (manifest, config, two layers) must
    // refresh it at least once.
    proxy
        .faults
        .bearer_token_uses
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let image = reference(&format!("{}/tok/app:v1", proxy.host()));
    let cache = open_cache(&work.path().join("cache"));
    let client = RegistryClient::new(fast_config()).unwrap();
    let record = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(record.layers.len(), 2);
    let tokens = proxy.log.lock().unwrap().token_requests;
    assert!(
        tokens >= 2,
        "expected a token refresh, saw {tokens} token requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_fetch_each_layer_once() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    let shared_base = small_layers(5).remove(0);
    let a = layout.simple_image("a", &[shared_base.clone(), small_layers(6).remove(1)]);
    let b = layout.simple_image("b", &[shared_base, small_layers(7).remove(1)]);
    registry.push(&layout.root, "a", "multi/app:a");
    registry.push(&layout.root, "b", "multi/app:b");
    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    let cache_dir = work.path().join("cache");
    let cache = open_cache(&cache_dir);
    // A second cache handle on the same directory stands for another process.
    let other = Cache::open(&cache_dir, Default::default()).unwrap();
    let client = RegistryClient::new(fast_config()).unwrap();
    let image_a = reference(&format!("{}/multi/app:a", proxy.host()));
    let image_b = reference(&format!("{}/multi/app:b", proxy.host()));
    let source_a = RegistrySource {
        client: &client,
        reference: &image_a,
    };
    let source_b = RegistrySource {
        client: &client,
        reference: &image_b,
    };
    let (r1, r2, r3, r4) = tokio::join!(
        pull(&cache, &source_a, &no_progress),
        pull(&cache, &source_a, &no_progress),
        pull(&other, &source_b, &no_progress),
        pull(&cache, &source_b, &no_progress),
    );
    let (r1, r2, r3, r4) = (r1.unwrap(), r2.unwrap(), r3.unwrap(), r4.unwrap());
    assert_eq!(r1.layers, r2.layers);
    assert_eq!(r3.layers, r4.layers);
    assert_eq!(r1.layers[0], r3.layers[0]);
    assert_eq!(
        proxy.blob_requests(&a.layer_digests[0]),
        1,
        "shared base fetched twice"
    );
    assert_eq!(proxy.blob_requests(&a.layer_digests[1]), 1);
    assert_eq!(proxy.blob_requests(&b.layer_digests[1]), 1);
    assert_eq!(cache.images().unwrap().len(), 2);
    assert_eq!(list(&cache_dir.join("layers")).len(), 3);
    assert_consistent(&cache_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_layout_source_verifies_every_blob() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    let built = layout.simple_image("default", &small_layers(8));
    let cache_dir = work.path().join("cache");
    let cache = open_cache(&cache_dir);
    let opened = OciLayout::open(&layout.root).unwrap();
    assert_eq!(opened.names(), ["default"]);
    let record = pull(
        &cache,
        &OciLayoutSource::new(&opened, "default"),
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(record.manifest_digest, built.manifest_digest);
    assert_eq!(record.layers.len(), 2);
    assert!(
        cache
            .image(&format!("oci:{}:default", layout.root.display()))
            .unwrap()
            .is_some()
    );
    let error = pull(
        &cache,
        &OciLayoutSource::new(&opened, "other"),
        &no_progress,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("no image named \"other\""), "{error}");

    // A tampered layer in a second layout: the error names the file; nothing is cached.
    let mut bad = LayoutBuilder::new(&work.path().join("bad"));
    let bad_built = bad.simple_image("default", &small_layers(9));
    let blob = bad
        .root
        .join("blobs/sha256")
        .join(bad_built.layer_digests[1].hex());
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let bad_layout = OciLayout::open(&bad.root).unwrap();
    let error = pull(
        &cache,
        &OciLayoutSource::new(&bad_layout, "default"),
        &no_progress,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("digest mismatch")
            && error.contains(&bad_built.layer_digests[1].hex()[..12]),
        "{error}"
    );
    assert!(cache.layer(&bad_built.layer_digests[1]).unwrap().is_none());
    assert_eq!(cache.images().unwrap().len(), 1);
    assert_consistent(&cache_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_mirror_with_a_custom_ca() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (registry, ca) = Registry::start_tls(work.path());
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    layout.simple_image("v1", &small_layers(11));
    registry.push(&layout.root, "v1", "tls/app:v1");
    let image = reference(&format!("{}/tls/app:v1", registry.host()));
    let https = format!("https://{}", registry.host());
    let cache = open_cache(&work.path().join("cache"));

    // Without the CA, the certificate is refused (and the plain-HTTP fallback fails too).
    let mut config = fast_config();
    config.retries = 0;
    config.mirrors.insert(registry.host(), vec![https.clone()]);
    let client = RegistryClient::new(config.clone()).unwrap();
    let error = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap_err();
    assert!(
        format!("{error:?}").contains("InvalidCertificate"),
        "{error:?}"
    );
    assert!(cache.images().unwrap().is_empty());

    config.ca_files = vec![ca];
    let client = RegistryClient::new(config).unwrap();
    let record = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(record.layers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_to_the_registrys_own_token_service_only() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(&work.path().join("layout"));
    layout.simple_image("v1", &small_layers(5));
    registry.push(&layout.root, "v1", "tok/app:v1");
    let proxy = FaultProxy::start(&format!("http://{}", registry.host())).await;
    proxy
        .faults
        .bearer_token_uses
        .store(100, std::sync::atomic::Ordering::SeqCst);
    let credentials = docker_config(work.path(), &proxy.host(), "alice", "secret");
    let client = RegistryClient::new(fast_config())
        .unwrap()
        .with_credentials(CredentialStore::load(&credentials).unwrap());
    let image = reference(&format!("{}/tok/app:v1", proxy.host()));
    let pull_once = |dir: &str| {
        let cache = open_cache(&work.path().join(dir));
        let client = &client;
        let image = &image;
        async move {
            pull(
                &cache,
                &RegistrySource {
                    client,
                    reference: image,
                },
                &no_progress,
            )
            .await
            .map(|record| record.layers.len())
        }
    };
    // The registry's own host as realm: the credentials go along.
    assert_eq!(pull_once("one").await.unwrap(), 2);
    let with = proxy.log.lock().unwrap().token_requests_with_credentials;
    assert!(
        with >= 1,
        "credentials were sent to the registry's own realm"
    );

    // A realm on another host (same machine, other name): a token is asked for without them.
    *proxy.faults.realm_host.lock().unwrap() = Some(format!("localhost:{}", proxy.port));
    let client = RegistryClient::new(fast_config())
        .unwrap()
        .with_credentials(CredentialStore::load(&credentials).unwrap());
    let cache = open_cache(&work.path().join("two"));
    let record = pull(
        &cache,
        &RegistrySource {
            client: &client,
            reference: &image,
        },
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(record.layers.len(), 2);
    let log = proxy.log.lock().unwrap();
    assert!(log.token_requests > with);
    assert_eq!(
        log.token_requests_with_credentials, with,
        "no credentials to a realm on another host"
    );
}
