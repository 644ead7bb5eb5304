//! Pulling layers that are EROFS images already (the chunked `application/vnd.erofs+zstd`
//! format): published lazily when their chunk index can be verified, pulled whole otherwise,
//! and refused when the decoded image is not the one the descriptor names.

mod registry_common;

use std::path::Path;
use std::sync::Arc;

use gantry_agent::cache::bitmap::ChunkBitmap;
use gantry_agent::cache::{Cache, CacheConfig, ImageRecord, LayerRecord};
use gantry_agent::images::pull::{self, LazyPull, no_progress};
use gantry_agent::lazy::origin::{BlobOrigin, FileOrigin};
use gantry_oci::chunked::{
    ANNOTATION_INDEX_DIGEST, ANNOTATION_UNCOMPRESSED_DIGEST, ChunkedLayerOptions,
    write_chunked_layer,
};
use gantry_oci::layout::{OciLayout, OciLayoutSource};
use gantry_oci::manifest::Descriptor;
use gantry_oci::{ConvertOptions, Digest, convert_layer};
use registry_common::*;
use serde_json::json;

/// An EROFS image of a small tree, and the chunked blob of it (16 KiB chunks).
fn chunked(dir: &Path) -> (Vec<u8>, Vec<u8>, Descriptor) {
    let tar = layer(&[
        Entry::Dir("srv"),
        Entry::File("srv/data", noise(300 << 10, 9)),
        Entry::File("srv/hello", b"hello\n".to_vec()),
    ]);
    let image_path = dir.join("layer.erofs");
    convert_layer(tar.as_slice(), &image_path, &ConvertOptions::default()).unwrap();
    let image = std::fs::read(&image_path).unwrap();
    let mut blob = Vec::new();
    let options = ChunkedLayerOptions {
        chunk_size: 16 << 10,
        ..ChunkedLayerOptions::default()
    };
    let written = write_chunked_layer(image.as_slice(), &mut blob, &options).unwrap();
    (image, blob, written.descriptor())
}

/// A layout with one image, `tag`, whose only layer is `blob` described by `descriptor`.
fn layout_with(dir: &Path, tag: &str, blob: &[u8], descriptor: &Descriptor) -> OciLayout {
    let mut builder = LayoutBuilder::new(dir);
    builder.blob(&descriptor.media_type, blob);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "os.features": ["erofs"],
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .unwrap();
    let config_descriptor = builder.blob("application/vnd.oci.image.config.v1+json", &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": [descriptor],
    }))
    .unwrap();
    let manifest_descriptor = builder.blob("application/vnd.oci.image.manifest.v1+json", &manifest);
    builder.tag(manifest_descriptor, tag);
    OciLayout::open(dir).unwrap()
}

/// Pulls image `v1` of `layout` as the agent does, the layout's blob files as the origins of
/// its lazy layers.
async fn pull_lazily(cache: &Cache, layout: &OciLayout) -> ImageRecord {
    let origin = {
        let layout = layout.clone();
        move |d: &Descriptor| {
            Arc::new(FileOrigin::new(layout.blob_path(&d.digest))) as Arc<dyn BlobOrigin>
        }
    };
    let lazy = LazyPull {
        origin: &origin,
        metrics: None,
    };
    let (record, _pins) = pull::pull_lazy(
        cache,
        &OciLayoutSource::new(layout, "v1"),
        &no_progress,
        Some(&lazy),
    )
    .await
    .unwrap();
    record
}

fn bitmap(layer: &LayerRecord) -> ChunkBitmap {
    ChunkBitmap::open(&layer.bitmap_path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifiable_chunked_layer_is_published_with_no_chunk_present() {
    let work = tempfile::tempdir().unwrap();
    let (image, blob, descriptor) = chunked(work.path());
    let layout = layout_with(&work.path().join("layout"), "v1", &blob, &descriptor);
    let cache = Cache::open(&work.path().join("cache"), CacheConfig::default()).unwrap();
    let record = pull_lazily(&cache, &layout).await;
    let layer = &record.layers[0];
    assert!(layer.lazy);
    assert_eq!(layer.erofs_size, image.len() as u64);
    assert_eq!(layer.erofs_digest, Digest::of(&image));
    let bits = bitmap(layer);
    assert_eq!(bits.present_count(), 0);
    assert!(bits.chunk_count() > 10, "{} chunks", bits.chunk_count());
    // The image file is sparse: nothing of it is on disk yet.
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&layer.erofs_path).unwrap());
    assert_eq!(allocated, 0);
    let index = cache.lazy_index(&layer.blob_digest).unwrap();
    assert_eq!(index.len() as u64, bits.chunk_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_layer_nothing_vouches_for_is_pulled_whole() {
    let work = tempfile::tempdir().unwrap();
    let (image, blob, mut descriptor) = chunked(work.path());
    // No index digest: the index cannot be trusted chunk by chunk, so the layer comes whole,
    // checked by the blob digest and the uncompressed digest.
    descriptor.annotations.remove(ANNOTATION_INDEX_DIGEST);
    let layout = layout_with(&work.path().join("layout"), "v1", &blob, &descriptor);
    let cache = Cache::open(&work.path().join("cache"), CacheConfig::default()).unwrap();
    let record = pull_lazily(&cache, &layout).await;
    let layer = &record.layers[0];
    assert!(!layer.lazy);
    assert!(bitmap(layer).is_complete());
    assert_eq!(std::fs::read(&layer.erofs_path).unwrap(), image);

    // Without a lazy fetcher at all (the local `pull`), a verifiable layer comes whole too.
    let (_, blob2, descriptor2) = chunked(work.path());
    let layout2 = layout_with(&work.path().join("layout2"), "v1", &blob2, &descriptor2);
    let fresh = Cache::open(&work.path().join("cache2"), CacheConfig::default()).unwrap();
    let record = pull::pull(&fresh, &OciLayoutSource::new(&layout2, "v1"), &no_progress)
        .await
        .unwrap();
    assert!(!record.layers[0].lazy);
    assert_eq!(std::fs::read(&record.layers[0].erofs_path).unwrap(), image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_decodes_to_another_image_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let (_, blob, mut descriptor) = chunked(work.path());
    descriptor.annotations.remove(ANNOTATION_INDEX_DIGEST);
    descriptor.annotations.insert(
        ANNOTATION_UNCOMPRESSED_DIGEST.into(),
        Digest::of(b"another image").to_string(),
    );
    let layout = layout_with(&work.path().join("layout"), "v1", &blob, &descriptor);
    let cache = Cache::open(&work.path().join("cache"), CacheConfig::default()).unwrap();
    let error = pull::pull(&cache, &OciLayoutSource::new(&layout, "v1"), &no_progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("not the annotated"), "{error}");
    assert!(
        cache.layer(&descriptor.digest).unwrap().is_none(),
        "nothing published"
    );
    assert_consistent(&work.path().join("cache"));
}
