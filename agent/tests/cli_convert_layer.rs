//! `gantry-agent image convert-layer` converts a layer file exactly as the library does, and
//! names a missing input in its error.

#[path = "../../oci/tests/erofs_common/mod.rs"]
mod erofs_common;

use erofs_common::*;
use gantry_agent::cli::image::{ConvertLayerArgs, run_convert_layer};
use gantry_oci::ConvertOptions;

#[test]
fn the_cli_entry_point_converts_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let tar = tar_of(&rich_tree(), LongNames::Pax);
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    let input = dir.path().join("layer.tar.zst");
    std::fs::write(&input, zst).unwrap();
    let output = dir.path().join("layer.erofs");
    let args = ConvertLayerArgs {
        input: input.display().to_string(),
        output: output.clone(),
        max_uncompressed_size: 1 << 30,
        max_entries: 10_000,
        no_holes: false,
        sync: true,
        json: true,
    };
    run_convert_layer(&args).unwrap();
    let (library, _) = convert(&tar, dir.path(), "library", &ConvertOptions::default());
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(&output).unwrap());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, library.digest);

    let missing = ConvertLayerArgs {
        input: dir.path().join("missing").display().to_string(),
        ..args
    };
    let err = run_convert_layer(&missing).unwrap_err();
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}
