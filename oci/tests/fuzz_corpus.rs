//! Replays the fuzz corpora (`oci/fuzz/corpus/`: seeds plus any crash the fuzzer found) in the
//! normal test suite, through the entry points the fuzz targets call.
//!
//! Regenerate the named seeds with
//! `cargo test -p gantry-oci --test fuzz_corpus -- --ignored write_seeds`.

use std::path::{Path, PathBuf};

use gantry_oci::fuzzing::{self, ManifestOutcome};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn files(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus(target))
        .expect("the corpus directory is committed")
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_tar_corpus_replays_and_valid_seeds_convert() {
    let mut valid = 0;
    let mut replayed = 0;
    for (name, data) in files("tar_convert") {
        let outcome = fuzzing::check_tar_layer_always(&data);
        if name.starts_with("valid-") {
            assert!(
                outcome.reader_ok && outcome.converted.is_ok(),
                "{name}: {outcome:?}"
            );
            valid += 1;
        }
        replayed += 1;
    }
    assert!(
        valid >= 6,
        "expected the committed valid seeds, found {valid}"
    );
    assert!(replayed > valid, "expected the committed edge-case seeds");
}

#[test]
fn the_manifest_corpus_replays_and_valid_seeds_parse() {
    let mut valid = 0;
    let mut replayed = 0;
    for (name, data) in files("manifest_parse") {
        let outcome = fuzzing::check_manifest(&data);
        if name.starts_with("valid-") {
            match &outcome {
                ManifestOutcome::Image { layers } => assert_eq!(*layers, 2, "{name}"),
                ManifestOutcome::Index {
                    manifests,
                    selected,
                } => {
                    assert_eq!(*manifests, 4, "{name}");
                    // linux/amd64, linux/arm64 (the entry without variant), linux/arm64/v8,
                    // linux/arm/v7, windows/amd64.
                    assert_eq!(
                        selected,
                        &[Some(0), Some(3), Some(1), Some(2), None],
                        "{name}"
                    );
                }
                ManifestOutcome::Rejected => panic!("{name} was rejected"),
            }
            valid += 1;
        }
        replayed += 1;
    }
    assert!(
        valid >= 9,
        "expected the committed valid seeds, found {valid}"
    );
    assert!(replayed > valid, "expected the committed edge-case seeds");
}

#[test]
fn the_chunk_index_corpus_replays_and_valid_seeds_decode() {
    let mut valid = 0;
    let mut replayed = 0;
    for (name, data) in files("chunk_index") {
        let outcome = fuzzing::check_chunk_index(&data);
        if name.starts_with("valid-") {
            let chunks = outcome
                .parsed
                .clone()
                .unwrap_or_else(|e| panic!("{name} was refused: {e}"));
            assert_eq!(outcome.decoded, chunks, "{name}: {outcome:?}");
            assert!(outcome.eager.is_ok(), "{name}: {outcome:?}");
            valid += 1;
        }
        match name.as_str() {
            "no-digest" | "lying-count" | "zstd-as-raw" => {
                assert!(outcome.parsed.is_err(), "{name}: {outcome:?}")
            }
            // Parsed (only decoding can tell), then refused chunk by chunk.
            "lying-size" | "corrupt-chunk" => {
                let chunks = outcome.parsed.clone().unwrap();
                assert!(outcome.decoded < chunks, "{name}: {outcome:?}");
            }
            _ => {}
        }
        replayed += 1;
    }
    assert!(
        valid >= 5,
        "expected the committed valid seeds, found {valid}"
    );
    assert!(replayed > valid, "expected the committed edge-case seeds");
}

#[test]
fn edge_case_seeds_are_refused() {
    for (name, data) in files("tar_convert") {
        let outcome = fuzzing::check_tar_layer_always(&data);
        match name.as_str() {
            "truncated" | "missing-end-marker" | "bad-checksum" | "huge-size" => {
                assert!(!outcome.reader_ok && outcome.converted.is_err(), "{name}")
            }
            "path-escape" | "too-many-entries" | "over-size-cap-zstd" | "xz-magic" => {
                assert!(outcome.converted.is_err(), "{name}: {outcome:?}")
            }
            _ => {}
        }
    }
    for (name, data) in files("manifest_parse") {
        let named_rejection = !name.starts_with("valid-")
            && !name.starts_with("platform")
            && !name.starts_with("regression-")
            && name.len() < 40;
        if named_rejection {
            assert_eq!(
                fuzzing::check_manifest(&data),
                ManifestOutcome::Rejected,
                "{name}"
            );
        }
    }
}

#[test]
fn the_gzip_index_corpus_replays_and_valid_seeds_extract() {
    let mut valid = 0;
    let mut replayed = 0;
    for (name, data) in files("gzip_index") {
        let outcome = fuzzing::gzip_index::check_gzip_index(&data);
        if name.starts_with("valid-") {
            let (checkpoints, _) = outcome
                .built
                .clone()
                .unwrap_or_else(|e| panic!("{name} was refused: {e}"));
            assert!(outcome.spans_equal > 0, "{name}: {outcome:?}");
            assert_eq!(outcome.tampered_refused, outcome.spans_equal, "{name}");
            if name == "valid-spans" {
                assert!(checkpoints > 2, "{name}: {outcome:?}");
            }
            valid += 1;
        }
        if matches!(
            name.as_str(),
            "truncated" | "two-members" | "not-a-tar" | "not-gzip"
        ) {
            assert!(outcome.built.is_err(), "{name}: {outcome:?}");
        }
        replayed += 1;
    }
    assert_eq!(valid, 2, "the committed valid seeds");
    assert!(replayed >= 6, "the committed edge-case seeds");
}

#[test]
#[ignore = "writes the named seeds into the committed corpus"]
fn write_seeds() {
    for (target, seeds) in [
        ("tar_convert", fuzzing::seeds::tar()),
        ("manifest_parse", fuzzing::seeds::manifest()),
        ("chunk_index", fuzzing::chunk_index::seeds()),
        ("gzip_index", fuzzing::gzip_index::seeds()),
    ] {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
