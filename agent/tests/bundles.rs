//! `gantry-agent cache export` and `cache import` on cache directories, no agent running:
//! a lazy-format image (converted by `image convert` into an OCI layout, imported from it)
//! and a tar image (pulled from a layout, converted on the card) go from card A's cache into
//! a bundle and from the bundle into card B's fresh cache. What B holds is checked byte for
//! byte against A, the lazy image keeps its manifest digest and its startup trace, the tar
//! image arrives in the lazy format, and a bundle with one corrupted blob imports everything
//! but the image that needs the blob, naming it.

mod convert_common;
mod registry_common;

use std::path::{Path, PathBuf};
use std::process::Output;

use convert_common::*;
use serde_json::{Value, json};

const LAZY: &str = "lazy";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn on_cache(cache: &Path, args: &[&str]) -> Output {
    let mut full: Vec<&str> = args.to_vec();
    let cache = cache.display().to_string();
    full.extend(["--cache-dir", &cache]);
    gantry(&full)
}

fn succeed(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        text(&output.stderr)
    );
    text(&output.stdout)
}

fn json_of(output: Output, what: &str) -> Value {
    serde_json::from_str(&succeed(output, what)).expect("JSON output")
}

/// `images --json` of a cache, by name.
fn images(cache: &Path) -> Vec<Value> {
    json_of(on_cache(cache, &["cache", "images", "--json"]), "images")
        .as_array()
        .cloned()
        .unwrap()
}

fn image<'a>(images: &'a [Value], name: &str) -> &'a Value {
    images
        .iter()
        .find(|image| image["name"] == name)
        .unwrap_or_else(|| panic!("no image {name} in {images:?}"))
}

fn layer_image(cache: &Path, blob: &str) -> Vec<u8> {
    let dir = cache
        .join("layers")
        .join(blob.replace("sha256:", "sha256-"));
    std::fs::read(dir.join("image.erofs")).expect("layer image")
}

/// Every layer of `image` has all its chunks.
fn assert_complete(image: &Value) {
    assert_eq!(image["missing_layers"], json!([]), "{image}");
    for layer in image["layer_presence"].as_array().unwrap() {
        assert_eq!(layer["present_chunks"], layer["chunks"], "{layer}");
        assert!(layer["chunks"].as_u64().unwrap() > 0, "{layer}");
    }
}

struct Setup {
    _work: tempfile::TempDir,
    work: PathBuf,
    card_a: PathBuf,
    /// The lazy image's manifest digest, as `image convert` wrote it.
    lazy_digest: String,
    tar_name: String,
}

/// Card A: the lazy image imported from `image convert`'s layout (so all its chunks are
/// present), the tar image pulled from the source layout, and a startup trace for the lazy one.
fn setup() -> Setup {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().to_path_buf();
    let source = source_layout(&root);
    let converted_dir = root.join("converted");
    let converted = convert(&[
        &format!("oci:{}:{SOURCE_TAG}", source.display()),
        &format!("oci:{}:{LAZY}", converted_dir.display()),
    ]);
    let lazy_digest = converted["digest"].as_str().unwrap().to_string();
    let card_a = root.join("card-a");
    let imported = json_of(
        on_cache(
            &card_a,
            &["cache", "import", "--json", converted_dir.to_str().unwrap()],
        ),
        "importing image convert's layout",
    );
    assert_eq!(imported["imported"][0]["name"], LAZY, "{imported}");
    assert_eq!(imported["imported"][0]["manifest_digest"], lazy_digest);
    assert!(imported["imported"][0]["chunks_stored"].as_u64().unwrap() > 3);
    let tar_ref = format!("oci:{}:{SOURCE_TAG}", source.display());
    succeed(
        on_cache(&card_a, &["pull", &tar_ref]),
        "pulling the tar image",
    );
    // A startup trace, as a first lazy start would have recorded it.
    let lazy = image(&images(&card_a), LAZY).clone();
    let trace = json!({
        "version": 1,
        "manifest_digest": lazy_digest,
        "window_ms": 4000,
        "recorded_unix": 1,
        "layers": [{"blob_digest": lazy["layers"][0]["blob_digest"], "chunks": [0, 2, 1]}],
    });
    let traces = card_a.join("traces");
    std::fs::create_dir_all(&traces).unwrap();
    std::fs::write(
        traces.join(format!(
            "{}.json",
            lazy_digest.trim_start_matches("sha256:")
        )),
        serde_json::to_vec(&trace).unwrap(),
    )
    .unwrap();
    Setup {
        _work: work,
        work: root,
        card_a,
        lazy_digest,
        tar_name: tar_ref,
    }
}

fn export(setup: &Setup, bundle: &Path) -> Vec<Value> {
    json_of(
        on_cache(
            &setup.card_a,
            &[
                "cache",
                "export",
                "--json",
                LAZY,
                &setup.tar_name,
                bundle.to_str().unwrap(),
            ],
        ),
        "cache export",
    )
    .as_array()
    .cloned()
    .unwrap()
}

#[test]
fn a_bundle_carries_images_byte_for_byte_into_a_fresh_cache() {
    let setup = setup();
    let bundle = setup.work.join("bundle");
    let exported = export(&setup, &bundle);
    println!("exported {exported:#?}");
    let lazy = exported.iter().find(|i| i["name"] == LAZY).unwrap();
    assert_eq!(lazy["manifest_digest"], setup.lazy_digest.as_str());
    assert_eq!(lazy["layers_rechunked"], 0);
    assert_eq!(lazy["layers_copied"], 3);
    assert_eq!(lazy["trace"], true);
    let tar = exported
        .iter()
        .find(|i| i["name"] == setup.tar_name)
        .unwrap();
    assert_eq!(tar["layers_rechunked"], 3);
    assert_ne!(tar["manifest_digest"], tar["cached_manifest_digest"]);
    assert_eq!(tar["trace"], false);

    let card_b = setup.work.join("card-b");
    let report = json_of(
        on_cache(
            &card_b,
            &["cache", "import", "--json", bundle.to_str().unwrap()],
        ),
        "cache import",
    );
    println!("imported {report:#}");
    assert_eq!(report["failed"], json!([]));
    assert_eq!(report["imported"].as_array().unwrap().len(), 2);

    let (a, b) = (images(&setup.card_a), images(&card_b));
    // The lazy image: the same manifest, layers and bytes; all chunks present; its trace.
    let (lazy_a, lazy_b) = (image(&a, LAZY), image(&b, LAZY));
    assert_eq!(lazy_b["manifest_digest"], lazy_a["manifest_digest"]);
    assert_eq!(lazy_b["config_digest"], lazy_a["config_digest"]);
    assert_complete(lazy_b);
    for (layer_a, layer_b) in lazy_a["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lazy_b["layers"].as_array().unwrap())
    {
        assert_eq!(layer_a["blob_digest"], layer_b["blob_digest"]);
        let blob = layer_b["blob_digest"].as_str().unwrap();
        assert!(
            layer_image(&card_b, blob) == layer_image(&setup.card_a, blob),
            "layer {blob} differs between the caches"
        );
    }
    let trace = |cache: &Path| {
        json_of(
            on_cache(cache, &["image", "trace", "--json", LAZY]),
            "image trace",
        )
    };
    assert_eq!(trace(&card_b), trace(&setup.card_a));

    // The tar image: now lazy-format layers holding exactly the EROFS images A converted.
    let (tar_a, tar_b) = (image(&a, &setup.tar_name), image(&b, &setup.tar_name));
    assert_complete(tar_b);
    assert_eq!(tar_b["manifest_digest"], tar["manifest_digest"]);
    // The same entrypoint, environment, …; the layers' DiffIDs are now the EROFS images'.
    for field in ["config", "architecture", "os"] {
        assert_eq!(tar_b["config"][field], tar_a["config"][field], "{field}");
    }
    let diff_ids: Vec<&Value> = tar_b["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| &layer["erofs_digest"])
        .collect();
    assert_eq!(
        tar_b["config"]["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        diff_ids
    );
    for (layer_a, layer_b) in tar_a["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(tar_b["layers"].as_array().unwrap())
    {
        assert_eq!(layer_b["lazy"], true);
        assert_eq!(layer_a["erofs_digest"], layer_b["erofs_digest"]);
        assert!(
            layer_image(&card_b, layer_b["blob_digest"].as_str().unwrap())
                == layer_image(&setup.card_a, layer_a["blob_digest"].as_str().unwrap()),
            "the tar image's layer {} differs",
            layer_a["blob_digest"]
        );
    }

    // B's copy is as good as A's: exported again, it is the same bundle.
    let again = setup.work.join("bundle-again");
    let reexported = json_of(
        on_cache(
            &card_b,
            &[
                "cache",
                "export",
                "--json",
                LAZY,
                &setup.tar_name,
                again.to_str().unwrap(),
            ],
        ),
        "export from card B",
    );
    for image in reexported.as_array().unwrap() {
        assert_eq!(image["layers_rechunked"], 0, "{image}");
    }
    assert_eq!(
        std::fs::read(again.join("index.json")).unwrap(),
        std::fs::read(bundle.join("index.json")).unwrap()
    );
}

#[test]
fn a_corrupted_blob_keeps_its_image_out_and_is_named() {
    let setup = setup();
    let bundle = setup.work.join("bundle");
    let exported = export(&setup, &bundle);
    let tar = exported
        .iter()
        .find(|i| i["name"] == setup.tar_name)
        .unwrap();
    // One byte of the tar image's lowest layer flipped, inside a chunk's frame (the layers
    // above are the same blobs in both images: the lowest differs, converted with the
    // lowest-layer rules by `image convert`, not by the card).
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(
            bundle.join("blobs/sha256").join(
                tar["manifest_digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:"),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    let bad = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let path = bundle
        .join("blobs/sha256")
        .join(bad.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();

    let card_c = setup.work.join("card-c");
    let output = on_cache(&card_c, &["cache", "import", bundle.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    println!("{}\n{stderr}", text(&output.stdout));
    assert!(!output.status.success(), "a bad bundle fails the import");
    assert!(stderr.contains(&bad), "the bad blob is named: {stderr}");
    let c = images(&card_c);
    assert_complete(image(&c, LAZY));
    assert!(
        c.iter().all(|image| image["name"] != setup.tar_name),
        "the image with the bad blob is not imported: {c:?}"
    );
    let layers: Vec<String> = std::fs::read_dir(card_c.join("layers"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(layers.len(), 3, "only the lazy image's layers: {layers:?}");
}

#[test]
fn what_a_cache_cannot_vouch_for_is_not_exported() {
    let setup = setup();
    // A cache from before documents were kept: the image cannot be handed on byte for byte.
    std::fs::remove_dir_all(setup.card_a.join("documents")).unwrap();
    let bundle = setup.work.join("bundle");
    let output = on_cache(
        &setup.card_a,
        &["cache", "export", LAZY, bundle.to_str().unwrap()],
    );
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("pull it again"), "{stderr}");
    let output = on_cache(
        &setup.card_a,
        &["cache", "export", "no/such:image", bundle.to_str().unwrap()],
    );
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("no image named"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn a_cluster_manifest_names_what_to_export() {
    let setup = setup();
    let manifest = setup.work.join("cluster.toml");
    std::fs::write(
        &manifest,
        format!("version = 1\n[[image]]\nref = \"{LAZY}\"\nprefetch = \"all\"\n"),
    )
    .unwrap();
    let bundle = setup.work.join("bundle");
    let exported = json_of(
        on_cache(
            &setup.card_a,
            &[
                "cache",
                "export",
                "--json",
                "--manifest",
                manifest.to_str().unwrap(),
                bundle.to_str().unwrap(),
            ],
        ),
        "cache export --manifest",
    );
    assert_eq!(exported[0]["name"], LAZY, "{exported}");
    assert_eq!(exported.as_array().unwrap().len(), 1, "{exported}");
    // Named as cached and as the manifest's reference normalizes, so a card finds it by either.
    let index: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("index.json")).unwrap()).unwrap();
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|entry| entry["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    assert_eq!(names, [LAZY, "docker.io/library/lazy:latest"], "{index}");
    let output = on_cache(
        &setup.card_a,
        &["cache", "export", bundle.to_str().unwrap()],
    );
    assert!(!output.status.success(), "nothing named: refused");
}
