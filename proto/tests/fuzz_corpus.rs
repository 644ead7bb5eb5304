//! Replays the fuzz corpus (seeds plus any crash the fuzzer found) in the normal test suite.

use std::path::Path;

#[test]
fn the_fuzz_corpus_replays_without_failure() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_decode");
    let mut replayed = 0;
    let mut valid = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus directory is committed") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = gantry_proto::fuzzing::check_frame_bytes(&data)
            .unwrap_or_else(|violation| panic!("{}: {violation}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with("valid-") {
            assert!(
                outcome.clean_end && outcome.messages.len() == 1,
                "{name}: {outcome:?}"
            );
            valid += 1;
        }
        replayed += 1;
    }
    assert!(
        valid >= 5,
        "expected the committed valid seeds, found {valid}"
    );
    assert!(replayed >= valid);
}
