//! `gantry-agent image convert` end to end, against a real `docker-registry` on 127.0.0.1 and
//! OCI layouts: a three-layer image (tar+gzip, tar+zstd, plain tar; whiteouts and an opaque
//! directory) is converted into the lazy EROFS format and checked from the outside with
//! skopeo (media types, annotations, `os.features`), layer by layer (`zstd -d` of each blob is
//! an EROFS image listing exactly what its tar holds), for determinism (converting twice gives
//! one digest, the second push sends nothing), mounts across repositories, basic auth, layouts
//! as source and destination, multi-platform indexes and bad input.
//!
//! Running the original and the converted image and comparing their files needs a guest: see
//! `convert_common`, which that test can share.

mod convert_common;
#[path = "../../oci/tests/erofs_common/mod.rs"]
mod erofs_common;
mod registry_common;

use std::path::Path;
use std::process::Command;

use convert_common::*;
use erofs_common::{Check, Listing, Spec, SpecKind, diff_listings, expected_listing, fsck_check};
use gantry_oci::manifest::Descriptor;
use gantry_oci::reference::{Digest, Reference};
use gantry_oci::registry::RegistryClient;
use gantry_oci::source::MemorySink;
use registry_common::*;
use serde_json::{Value, json};

const EROFS_ZSTD: &str = "application/vnd.erofs+zstd";
const OPAQUE: &[u8] = b"trusted.overlay.opaque";

fn tools() -> bool {
    let ok = tools_available()
        && ["zstd", "fsck.erofs"].iter().all(|tool| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if !ok {
        eprintln!("SKIP: zstd and fsck.erofs are needed too");
    }
    ok
}

/// `skopeo inspect [--config] --raw` of `image` (`docker://…` or `oci:…`), as JSON.
fn skopeo_raw(image: &str, config: bool, creds: Option<&str>) -> Value {
    let mut command = Command::new("skopeo");
    command.args(["inspect", "--tls-verify=false", "--raw"]);
    if config {
        command.arg("--config");
    }
    if let Some(creds) = creds {
        command.arg(format!("--creds={creds}"));
    }
    let output = command.arg(image).output().expect("skopeo");
    assert!(
        output.status.success(),
        "skopeo inspect {image}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// What the converter must make of a layer's tar, worked out from the tar alone: OCI
/// whiteouts become overlayfs whiteouts (character devices 0:0), opaque markers an xattr;
/// in the `lowest` layer both are dropped (an extractor on an empty root does nothing for
/// them).
fn expected_from_tar(tar: &[u8], lowest: bool) -> Listing {
    let mut specs = Vec::new();
    let mut opaque = Vec::new();
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path_bytes().to_vec();
        let header = entry.header().clone();
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(slash) => (path[..slash].to_vec(), path[slash + 1..].to_vec()),
            None => (Vec::new(), path.clone()),
        };
        let join = |name: &[u8]| {
            let mut joined = parent.clone();
            if !joined.is_empty() {
                joined.push(b'/');
            }
            joined.extend_from_slice(name);
            joined
        };
        if name == b".wh..wh..opq" {
            if !lowest {
                opaque.push(parent.clone());
            }
            continue;
        }
        let kind = if let Some(hidden) = name.strip_prefix(b".wh.") {
            if lowest {
                continue;
            }
            specs.push(
                Spec::new(join(hidden), SpecKind::Char(0, 0))
                    .mode(header.mode().unwrap())
                    .mtime(0),
            );
            continue;
        } else {
            match header.entry_type() {
                tar::EntryType::Directory => SpecKind::Dir,
                tar::EntryType::Symlink => {
                    SpecKind::Symlink(entry.link_name_bytes().unwrap().to_vec())
                }
                tar::EntryType::Regular => {
                    let mut content = Vec::new();
                    std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
                    SpecKind::File(content)
                }
                other => panic!("the test layers hold no {other:?}"),
            }
        };
        specs.push(
            Spec::new(&path, kind)
                .mode(header.mode().unwrap())
                .owner(header.uid().unwrap() as u32, header.gid().unwrap() as u32)
                .mtime(header.mtime().unwrap() as i64),
        );
    }
    let (mut listing, _) = expected_listing(&specs);
    for dir in opaque {
        listing
            .get_mut(&erofs_common::normalize(&dir))
            .expect("an opaque directory is listed")
            .xattrs
            .insert(OPAQUE.to_vec(), b"y".to_vec());
    }
    listing
}

async fn fetch(client: &RegistryClient, image: &Reference, layer: &Value) -> Vec<u8> {
    let descriptor: Descriptor = serde_json::from_value(layer.clone()).unwrap();
    let mut sink = MemorySink::default();
    client
        .fetch_blob(image, &descriptor, &mut sink)
        .await
        .unwrap();
    sink.bytes
}

/// Checks each converted layer blob against the source layer it came from: `zstd -d` gives an
/// EROFS image with the annotated digest that `fsck.erofs` accepts and that lists exactly
/// what the tar holds.
fn check_layer(blob: &[u8], layer: &Value, tar: &[u8], work: &Path, n: usize) {
    let blob_path = work.join(format!("layer{n}.erofs.zst"));
    let image_path = work.join(format!("layer{n}.erofs"));
    std::fs::write(&blob_path, blob).unwrap();
    let status = Command::new("zstd")
        .args(["-q", "-f", "-d"])
        .arg(&blob_path)
        .arg("-o")
        .arg(&image_path)
        .status()
        .unwrap();
    assert!(status.success(), "zstd -d of layer {n}");
    let image = std::fs::read(&image_path).unwrap();
    assert_eq!(
        Digest::of(&image).to_string(),
        layer["annotations"]["org.erofs.uncompressed-digest"],
        "layer {n}: the annotated DiffID is the image's digest"
    );
    let (ok, output) = fsck_check(&image_path);
    assert!(ok, "fsck.erofs on layer {n}: {output}");
    let (actual, _) = erofs_common::read_with_erofs_rs(&image_path);
    let problems = diff_listings(&expected_from_tar(tar, n == 0), &actual, Check::ALL);
    assert!(problems.is_empty(), "layer {n}: {problems:#?}");
}

/// The access log lines of blob uploads (the POSTs that start them and the PUTs that end them).
fn uploads(log: &[String]) -> Vec<&String> {
    log.iter()
        .filter(|line| line.contains("/blobs/uploads/") && !line.starts_with("HEAD"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_image_is_converted_pushed_and_reads_back_layer_by_layer() {
    if !tools() {
        return;
    }
    let registry = Registry::start_options(&RegistryOptions {
        access_log: true,
        ..RegistryOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let layout = source_layout(work.path());
    registry.push(&layout, SOURCE_TAG, "conv/a:1");
    let host = registry.host();
    let source = format!("{host}/conv/a:1");
    let target = format!("{host}/conv/a:1-erofs");

    let first = convert(&[&source, &target]);
    assert_eq!(first["destination"], target);
    assert_eq!(
        first["media_type"],
        "application/vnd.oci.image.manifest.v1+json"
    );

    // From the outside: skopeo sees an OCI manifest of EROFS layers with their annotations.
    let manifest = skopeo_raw(&format!("docker://{target}"), false, None);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for (n, layer) in layers.iter().enumerate() {
        assert_eq!(layer["mediaType"], EROFS_ZSTD, "layer {n}");
        let annotations = &layer["annotations"];
        for key in [
            "org.erofs.chunk-index.range",
            "org.erofs.chunk-index.digest",
            "org.erofs.uncompressed-digest",
        ] {
            assert!(
                annotations[key].is_string(),
                "layer {n} lacks {key}: {layer}"
            );
        }
        let role = annotations.get("org.erofs.role");
        if n < 2 {
            assert_eq!(role, Some(&json!("overlay-lower")), "layer {n}");
        } else {
            assert_eq!(role, None, "the top layer has no role");
        }
    }
    let inspected = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{target}"))
        .output()
        .unwrap();
    assert!(inspected.status.success());
    let inspected: Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(inspected["Digest"], first["digest"]);
    assert_eq!(inspected["Os"], "linux");
    assert_eq!(inspected["Architecture"], "amd64");

    // The config: the source's, with the EROFS DiffIDs and the feature.
    let config = skopeo_raw(&format!("docker://{target}"), true, None);
    let original_config = skopeo_raw(&format!("docker://{source}"), true, None);
    assert_eq!(config["os.features"], json!(["erofs"]));
    assert_eq!(config["rootfs"]["type"], "layers");
    let diff_ids: Vec<&Value> = layers
        .iter()
        .map(|l| &l["annotations"]["org.erofs.uncompressed-digest"])
        .collect();
    assert_eq!(config["rootfs"]["diff_ids"], json!(diff_ids));
    assert_eq!(config["config"], original_config["config"]);
    assert_eq!(config["config"]["WorkingDir"], "/srv");

    // Every layer, pulled back: an EROFS image of exactly what its tar holds.
    let client = RegistryClient::new(fast_config()).unwrap();
    let target_ref: Reference = target.parse().unwrap();
    let tars: Vec<Vec<u8>> = source_layers()
        .iter()
        .map(|l| l.to_tar().unwrap())
        .collect();
    for (n, layer) in layers.iter().enumerate() {
        let blob = fetch(&client, &target_ref, layer).await;
        check_layer(&blob, layer, &tars[n], work.path(), n);
    }
    let big = &first["manifests"][0]["layers"][0];
    assert!(big["chunks"].as_u64().unwrap() >= 4, "{big}");
    assert!(
        first["manifests"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["converted"] == true && l["blob"] == "stored")
    );

    // Converting again gives the same image, and the push sends nothing.
    let before = registry.access_log().len();
    let second = convert(&[&source, &target]);
    assert_eq!(second["digest"], first["digest"]);
    for layer in second["manifests"][0]["layers"].as_array().unwrap() {
        assert_eq!(layer["blob"], "existed", "{layer}");
    }
    let log = registry.access_log();
    assert!(uploads(&log[before..]).is_empty(), "{:#?}", &log[before..]);

    // Into another repository of the registry: the blobs are mounted, not sent.
    let before = log.len();
    let other = convert(&[&source, &format!("{host}/conv/b:1")]);
    assert_eq!(other["digest"], first["digest"]);
    for layer in other["manifests"][0]["layers"].as_array().unwrap() {
        assert_eq!(layer["blob"], "mounted", "{layer}");
    }
    let log = registry.access_log();
    let new = uploads(&log[before..]);
    assert!(
        new.iter()
            .all(|line| line.contains("mount=") && line.ends_with(" 201")),
        "{new:#?}"
    );
    assert_eq!(new.len(), 4, "the three layers and the config: {new:#?}");

    // A converted image converts to itself: EROFS layers are copied as they are.
    let again = convert(&[&target, &format!("{host}/conv/a:again")]);
    assert_eq!(again["digest"], first["digest"]);
    for layer in again["manifests"][0]["layers"].as_array().unwrap() {
        assert_eq!(layer["converted"], false, "{layer}");
        assert_eq!(layer["blob"], "existed", "{layer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_layouts_give_the_same_image() {
    if !tools() {
        return;
    }
    let registry = Registry::start_with(Some(("conv", "pa55")));
    let work = tempfile::tempdir().unwrap();
    let layout = source_layout(work.path());
    registry.push(&layout, SOURCE_TAG, "auth/a:1");
    let host = registry.host();
    let source = format!("{host}/auth/a:1");

    // Without credentials the pull is refused, and the error says so.
    let refused = gantry(&["image", "convert", &source, &format!("{host}/auth/a:2")]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no credentials"), "{stderr}");

    let credentials = docker_config(work.path(), &host, "conv", "pa55");
    let credentials = credentials.to_str().unwrap();
    let pushed = convert(&[
        "--credentials",
        credentials,
        &source,
        &format!("{host}/auth/a:2"),
    ]);
    let layout_dir = work.path().join("converted");
    let in_layout = format!("oci:{}:erofs", layout_dir.display());
    let from_registry = convert(&["--credentials", credentials, &source, &in_layout]);
    let from_layout = convert(&[
        &format!("oci:{}:{SOURCE_TAG}", layout.display()),
        &format!("oci:{}:also", layout_dir.display()),
    ]);
    assert_eq!(pushed["digest"], from_registry["digest"]);
    assert_eq!(pushed["digest"], from_layout["digest"]);
    // The second image in the layout shares every blob with the first.
    for layer in from_layout["manifests"][0]["layers"].as_array().unwrap() {
        assert_eq!(layer["blob"], "existed", "{layer}");
    }

    let manifest = skopeo_raw(&in_layout, false, None);
    assert_eq!(manifest["layers"][0]["mediaType"], EROFS_ZSTD);
    let config = skopeo_raw(&in_layout, true, None);
    assert_eq!(config["os.features"], json!(["erofs"]));
    let remote = skopeo_raw(
        &format!("docker://{host}/auth/a:2"),
        false,
        Some("conv:pa55"),
    );
    assert_eq!(manifest, remote);
    // The layout names both images and stays valid for other tools.
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout_dir.join("index.json")).unwrap()).unwrap();
    let names: Vec<&Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["annotations"]["org.opencontainers.image.ref.name"])
        .collect();
    assert_eq!(names, [&json!("erofs"), &json!("also")]);
}

/// A layout holding a two-platform index of small images, tagged `multi`.
fn multi_platform_layout(dir: &Path) -> (std::path::PathBuf, Vec<Digest>) {
    let mut layout = LayoutBuilder::new(&dir.join("multi"));
    let (amd64, amd64_built) = layout.image(&small_layers(1), "amd64", json!({"Cmd": ["sh"]}));
    let (arm64, arm64_built) = layout.image(&small_layers(2), "arm64", json!({"Cmd": ["sh"]}));
    let mut attestation = amd64.clone();
    attestation["platform"] = json!({"os": "unknown", "architecture": "unknown"});
    attestation["annotations"] = json!({"vnd.docker.reference.type": "attestation-manifest"});
    let index = layout.index(vec![amd64, arm64, attestation]);
    layout.tag(index, "multi");
    (
        layout.root.clone(),
        vec![amd64_built.manifest_digest, arm64_built.manifest_digest],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_platform_of_an_index_or_the_one_named() {
    if !tools() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (layout, sources) = multi_platform_layout(work.path());
    registry.push(&layout, "multi", "multi/app:1");
    let host = registry.host();

    let all = convert(&[
        &format!("{host}/multi/app:1"),
        &format!("{host}/multi/app:erofs"),
    ]);
    assert_eq!(all["media_type"], "application/vnd.oci.image.index.v1+json");
    let manifests = all["manifests"].as_array().unwrap();
    let converted_sources: Vec<&Value> = manifests.iter().map(|m| &m["source_digest"]).collect();
    assert_eq!(converted_sources, [&json!(sources[0]), &json!(sources[1])]);
    let index = skopeo_raw(&format!("docker://{host}/multi/app:erofs"), false, None);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "the attestation is left out: {index}");
    for (entry, arch) in entries.iter().zip(["amd64", "arm64"]) {
        assert_eq!(
            entry["platform"],
            json!({"os": "linux", "architecture": arch, "os.features": ["erofs"]})
        );
        assert_eq!(
            entry["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
    }
    // Each platform's manifest is there by digest, with its own config.
    for (entry, arch) in entries.iter().zip(["amd64", "arm64"]) {
        let digest = entry["digest"].as_str().unwrap();
        let config = skopeo_raw(&format!("docker://{host}/multi/app@{digest}"), true, None);
        assert_eq!(config["architecture"], arch);
        assert_eq!(config["os.features"], json!(["erofs"]));
    }

    // One platform, from the layout directly: an index of that one, the same manifest as above.
    let one = convert(&[
        "--platform",
        "linux/arm64",
        &format!("oci:{}:multi", layout.display()),
        &format!("oci:{}:arm", work.path().join("out").display()),
    ]);
    let one_manifests = one["manifests"].as_array().unwrap();
    assert_eq!(one_manifests.len(), 1);
    assert_eq!(one_manifests[0]["digest"], entries[1]["digest"]);
    assert_eq!(one_manifests[0]["platform"], "linux/arm64");
    let refused = gantry(&[
        "image",
        "convert",
        "--platform",
        "linux/s390x",
        &format!("oci:{}:multi", layout.display()),
        &format!("oci:{}:none", work.path().join("out").display()),
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("linux/amd64, linux/arm64"), "{stderr}");
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let out = format!("oci:{}:x", work.path().join("out").display());
    let fails = |args: &[&str], wanted: &str| {
        let mut full = vec!["image", "convert"];
        full.extend_from_slice(args);
        let output = gantry(&full);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
    };
    fails(
        &["--chunk-size", "1000", "oci:/nonexistent:1", &out],
        "multiple of 4K",
    );
    fails(
        &["--chunk-size", "128M", "oci:/nonexistent:1", &out],
        "multiple of 4K",
    );
    fails(&["oci:/nonexistent:1", &out], "/nonexistent");
    fails(
        &[
            "oci:/nonexistent:1",
            &format!("127.0.0.1:1/x@sha256:{}", "a".repeat(64)),
        ],
        "not a digest",
    );

    // A foreign layer type is named with its layer.
    let mut layout = LayoutBuilder::new(&work.path().join("foreign"));
    let foreign = layout.blob("application/vnd.example.unknown", b"not a tar");
    let config = layout.blob(
        "application/vnd.oci.image.config.v1+json",
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [foreign],
    });
    let manifest = layout.blob(
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    layout.tag(manifest, "bad");
    let digest = foreign["digest"].as_str().unwrap().to_string();
    let source = format!("oci:{}:bad", layout.root.display());
    fails(&[&source, &out], &digest);
    fails(&[&source, &out], "application/vnd.example.unknown");
    // Nothing was named in the destination.
    let index = work.path().join("out/index.json");
    let index: Value = serde_json::from_slice(&std::fs::read(index).unwrap()).unwrap();
    assert_eq!(index["manifests"], json!([]));
}
