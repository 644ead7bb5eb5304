//! Replays the fuzz corpora (`agent/fuzz/corpus/`: seeds plus any crash the fuzzer found) in the
//! normal test suite, through the entry points the fuzz targets call.
//!
//! Regenerate the named seeds with
//! `cargo test -p gantry-agent --test fuzz_corpus -- --ignored write_seeds`.

use std::path::{Path, PathBuf};

use gantry_agent::blk::fuzzing as blk;
use gantry_agent::fuzzing::{check_blk_input, check_vsock_input};
use gantry_agent::vsock::fuzzing as vsock;

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
fn the_blk_corpus_replays_and_seeds_behave_as_named() {
    let (mut valid, mut ioerr, mut replayed) = (0, 0, 0);
    for (name, data) in files("blk_queue") {
        let outcome = check_blk_input(&data);
        if name.starts_with("valid-") {
            assert!(
                outcome.ok > 0
                    && outcome.ok == outcome.completed
                    && outcome.verified_reads > 0
                    && outcome.unpredictable_kicks == 0,
                "{name}: {outcome:?}"
            );
            valid += 1;
        }
        if name.starts_with("ioerr-") {
            assert!(outcome.ioerr > 0, "{name}: {outcome:?}");
            ioerr += 1;
        }
        replayed += 1;
    }
    assert!(
        valid >= 5,
        "expected the committed valid seeds, found {valid}"
    );
    assert!(
        ioerr >= 3,
        "expected the committed IOERR seeds, found {ioerr}"
    );
    assert!(
        replayed > valid + ioerr,
        "expected the committed hostile seeds"
    );
}

#[test]
fn the_vsock_corpus_replays_and_valid_seeds_carry_data() {
    let (mut valid, mut replayed) = (0, 0);
    for (name, data) in files("vsock_packets") {
        let outcome = check_vsock_input(&data);
        if name.starts_with("valid-") {
            assert!(
                outcome.established == 1 && outcome.to_agent > 0 && outcome.to_guest > 0,
                "{name}: {outcome:?}"
            );
            valid += 1;
        }
        replayed += 1;
    }
    assert!(
        valid >= 3,
        "expected the committed valid seeds, found {valid}"
    );
    assert!(replayed > valid, "expected the committed edge-case seeds");
}

#[test]
#[ignore = "writes the named seeds into the committed corpus"]
fn write_seeds() {
    for (target, seeds) in [
        ("blk_queue", blk::seeds::all()),
        ("vsock_packets", vsock::seeds::all()),
    ] {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
