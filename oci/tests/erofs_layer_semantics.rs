//! OCI layer semantics: whiteouts, opaque directories, duplicate entries, and two converted
//! layers under overlayfs on the host kernel behaving as Docker's layering does.

mod erofs_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use erofs_common::*;
use gantry_oci::ConvertOptions;

const OPAQUE: &[u8] = b"trusted.overlay.opaque";

fn whiteout() -> Kind {
    Kind::Char(0, 0)
}

fn file_kind(content: &[u8]) -> Kind {
    Kind::File {
        size: content.len() as u64,
        sha256: sha256(content),
    }
}

fn convert_specs(specs: &[Spec], dir: &Path, name: &str) -> std::path::PathBuf {
    convert(
        &tar_of(specs, LongNames::Pax),
        dir,
        name,
        &ConvertOptions::default(),
    )
    .1
}

#[test]
fn whiteouts_and_opaque_markers_become_overlayfs_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let image = convert_specs(
        &[
            Spec::dir("a"),
            Spec::file("a/keep", "k"),
            Spec::file(".wh.gone", ""),
            Spec::file("a/.wh.old", "").mode(0o600),
            Spec::file("b/.wh..wh..opq", ""),
            // The directory's own entry after its opaque marker keeps it opaque.
            Spec::dir("b").mode(0o700),
            Spec::file("b/new", "n"),
            Spec::file("c/.wh..wh..opq", ""),
            // aufs bookkeeping is skipped.
            Spec::file(".wh..wh.plnk/12.34", "x"),
        ],
        dir.path(),
        "wh",
    );
    let (listing, _) = read_with_erofs_rs(&image);
    assert_eq!(listing[&b"gone".to_vec()].kind, whiteout());
    assert_eq!(listing[&b"a/old".to_vec()].kind, whiteout());
    assert_eq!(listing[&b"a/keep".to_vec()].kind, file_kind(b"k"));
    let b = &listing[&b"b".to_vec()];
    assert_eq!(b.perm, 0o700);
    assert_eq!(b.xattrs.get(OPAQUE).map(Vec::as_slice), Some(&b"y"[..]));
    assert_eq!(
        listing[&b"c".to_vec()]
            .xattrs
            .get(OPAQUE)
            .map(Vec::as_slice),
        Some(&b"y"[..])
    );
    assert!(listing[&b"a".to_vec()].xattrs.is_empty());
    let paths: BTreeSet<String> = listing
        .keys()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let expected: BTreeSet<String> = ["", "a", "a/keep", "a/old", "b", "b/new", "c", "gone"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(paths, expected);

    if let Some(mount) = Mount::erofs(&image, &dir.path().join("mnt")) {
        let (mounted, _) = read_directory_tree(&mount.dir, true);
        assert_eq!(mounted[&b"gone".to_vec()].kind, whiteout());
        assert_eq!(
            mounted[&b"b".to_vec()]
                .xattrs
                .get(OPAQUE)
                .map(Vec::as_slice),
            Some(&b"y"[..])
        );
    }
}

#[test]
fn the_lowest_layer_drops_its_whiteouts_and_opaque_markers() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        Spec::dir("a"),
        Spec::file("a/keep", "k"),
        Spec::file(".wh.gone", ""),
        Spec::file("a/.wh.old", ""),
        // Only a whiteout names this directory: an extractor would not create it.
        Spec::file("only/.wh.x", ""),
        Spec::file("b/.wh..wh..opq", ""),
        Spec::file("b/new", "n"),
    ];
    let lowest = ConvertOptions {
        lowest_layer: true,
        ..ConvertOptions::default()
    };
    let (_, image) = convert(&tar_of(&specs, LongNames::Pax), dir.path(), "low", &lowest);
    let (listing, _) = read_with_erofs_rs(&image);
    let paths: BTreeSet<String> = listing
        .keys()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let expected: BTreeSet<String> = ["", "a", "a/keep", "b", "b/new"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(paths, expected);
    assert!(listing.values().all(|attrs| attrs.kind != whiteout()));
    assert!(!listing[&b"b".to_vec()].xattrs.contains_key(OPAQUE));
    // A malformed whiteout is still an error in the lowest layer.
    let bad = tar_of(&[Spec::file("a/.wh..", "")], LongNames::Pax);
    let error =
        gantry_oci::convert_layer(&bad[..], &dir.path().join("bad.erofs"), &lowest).unwrap_err();
    assert!(error.to_string().contains("invalid whiteout"), "{error}");
}

#[test]
fn later_entries_win_as_with_a_tar_extractor() {
    let dir = tempfile::tempdir().unwrap();
    let image = convert_specs(
        &[
            Spec::file("f", "first"),
            Spec::file("f", "second").mode(0o600),
            Spec::dir("d").mode(0o755).mtime(1),
            Spec::file("d/x", "x"),
            Spec::dir("d").mode(0o700).mtime(2).owner(5, 6),
            Spec::dir("e"),
            Spec::file("e/y", "y"),
            Spec::file("e", "now a file"),
            Spec::file("g", "old g"),
            Spec::hardlink("h", "g"),
            Spec::file("g", "new g"),
            Spec::symlink("s", "one"),
            Spec::symlink("s", "two"),
        ],
        dir.path(),
        "dup",
    );
    let (listing, links) = read_with_erofs_rs(&image);
    assert_eq!(listing[&b"f".to_vec()].kind, file_kind(b"second"));
    assert_eq!(listing[&b"f".to_vec()].perm, 0o600);
    let d = &listing[&b"d".to_vec()];
    assert_eq!((d.perm, d.mtime, d.uid, d.gid), (0o700, 2, 5, 6));
    assert_eq!(listing[&b"d/x".to_vec()].kind, file_kind(b"x"));
    assert_eq!(listing[&b"e".to_vec()].kind, file_kind(b"now a file"));
    assert!(!listing.contains_key(b"e/y".as_slice()));
    assert_eq!(listing[&b"g".to_vec()].kind, file_kind(b"new g"));
    assert_eq!(listing[&b"h".to_vec()].kind, file_kind(b"old g"));
    assert!(links.is_empty(), "the overwrite broke the link: {links:?}");
    assert_eq!(listing[&b"s".to_vec()].kind, Kind::Symlink(b"two".to_vec()));
    let (ok, log) = fsck_check(&image);
    assert!(ok, "{log}");
}

#[test]
fn a_whiteout_never_hides_an_entry_of_its_own_layer() {
    let dir = tempfile::tempdir().unwrap();
    let image = convert_specs(
        &[
            Spec::file("w", "real"),
            Spec::file(".wh.w", ""),
            Spec::file(".wh.v", ""),
            Spec::file("v", "real v"),
            // Whiteout of a directory, then content under it: the layer deletes the lower
            // directory and creates a new one, which must hide the lower content.
            Spec::file(".wh.p", ""),
            Spec::file("p/q", "q"),
        ],
        dir.path(),
        "same-layer",
    );
    let (listing, _) = read_with_erofs_rs(&image);
    assert_eq!(listing[&b"w".to_vec()].kind, file_kind(b"real"));
    assert_eq!(listing[&b"v".to_vec()].kind, file_kind(b"real v"));
    let p = &listing[&b"p".to_vec()];
    assert_eq!(p.kind, Kind::Dir);
    assert_eq!(p.xattrs.get(OPAQUE).map(Vec::as_slice), Some(&b"y"[..]));
}

#[test]
fn overlay_xattrs_in_the_tar_are_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let image = convert_specs(
        &[
            Spec::dir("redirected").xattr("trusted.overlay.redirect", "/etc"),
            Spec::file("meta", "x").xattr("trusted.overlay.metacopy", ""),
            Spec::dir("opaque").xattr("trusted.overlay.opaque", "y"),
            Spec::file("other", "x").xattr("trusted.other", "kept"),
            Spec::file("ns", "x").xattr("system.nfs4_acl", "dropped"),
        ],
        dir.path(),
        "xattrs",
    );
    let (listing, _) = read_with_erofs_rs(&image);
    assert!(listing[&b"redirected".to_vec()].xattrs.is_empty());
    assert!(listing[&b"meta".to_vec()].xattrs.is_empty());
    assert!(listing[&b"ns".to_vec()].xattrs.is_empty());
    assert_eq!(
        listing[&b"opaque".to_vec()].xattrs,
        BTreeMap::from([(OPAQUE.to_vec(), b"y".to_vec())])
    );
    assert_eq!(
        listing[&b"other".to_vec()].xattrs,
        BTreeMap::from([(b"trusted.other".to_vec(), b"kept".to_vec())])
    );
}

/// The union a container sees, as path → content (directories as `None`).
fn union_view(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let (listing, _) = read_directory_tree(root, false);
    listing
        .into_iter()
        .map(|(path, attrs)| {
            let content = match attrs.kind {
                Kind::Dir => None,
                _ => Some(std::fs::read(root.join(os(&path))).unwrap_or_default()),
            };
            (String::from_utf8_lossy(&path).into_owned(), content)
        })
        .collect()
}

#[test]
fn two_layers_under_overlayfs_behave_like_docker_layers() {
    let dir = tempfile::tempdir().unwrap();
    let lower = convert_specs(
        &[
            Spec::dir("etc"),
            Spec::file("etc/passwd", "root:x:0:0"),
            Spec::file("etc/group", "root:x:0:"),
            Spec::file("etc/hosts", "127.0.0.1 localhost"),
            Spec::dir("usr/share/doc"),
            Spec::file("usr/share/doc/a", "a"),
            Spec::file("usr/share/doc/b", "b"),
            Spec::dir("var/cache"),
            Spec::file("var/cache/x", "x"),
            Spec::dir("opt/dir"),
            Spec::file("opt/dir/keep", "lower"),
        ],
        dir.path(),
        "lower",
    );
    let upper = convert_specs(
        &[
            Spec::dir("etc"),
            Spec::file("etc/passwd", "root:x:0:0\nuser:x:1000:1000"),
            Spec::file("etc/.wh.group", ""),
            Spec::dir("usr/share/doc"),
            Spec::file("usr/share/doc/.wh..wh..opq", ""),
            Spec::file("usr/share/doc/c", "c"),
            Spec::file("var/cache/.wh.x", ""),
            Spec::file("opt/.wh.dir", ""),
            Spec::file("opt/dir/new", "upper"),
            Spec::file("home/u", "u"),
        ],
        dir.path(),
        "upper",
    );
    let Some(lower_mount) = Mount::erofs(&lower, &dir.path().join("lower")) else {
        return;
    };
    let Some(upper_mount) = Mount::erofs(&upper, &dir.path().join("upper")) else {
        return;
    };
    let Some(union) = Mount::overlay(
        &[&upper_mount.dir, &lower_mount.dir],
        &dir.path().join("union"),
    ) else {
        return;
    };
    let view = union_view(&union.dir);
    let file = |s: &str| Some(s.as_bytes().to_vec());
    let expected: BTreeMap<String, Option<Vec<u8>>> = [
        ("", None),
        ("etc", None),
        ("etc/passwd", file("root:x:0:0\nuser:x:1000:1000")),
        ("etc/hosts", file("127.0.0.1 localhost")),
        ("usr", None),
        ("usr/share", None),
        ("usr/share/doc", None),
        ("usr/share/doc/c", file("c")),
        ("var", None),
        ("var/cache", None),
        ("opt", None),
        ("opt/dir", None),
        ("opt/dir/new", file("upper")),
        ("home", None),
        ("home/u", file("u")),
    ]
    .into_iter()
    .map(|(p, c)| (p.to_string(), c))
    .collect();
    assert_eq!(view, expected);
    drop(union);
}
