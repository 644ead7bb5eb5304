//! Property tests over generated trees: whatever the tree, the image reads back (erofs-rs,
//! and the host kernel when it can mount) exactly as the tar says, fsck.erofs accepts it, and
//! converting the same tar twice gives the same bytes.

mod erofs_common;

use std::collections::BTreeSet;

use erofs_common::*;
use gantry_oci::ConvertOptions;
use proptest::prelude::*;

/// A file name: mostly short ASCII, sometimes bytes that are not UTF-8, sometimes long.
fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::collection::vec(
            prop_oneof![b'a'..=b'z', b'0'..=b'9', Just(b'-'), Just(b'.'), Just(b'_'), Just(b' ')],
            1..12
        ),
        1 => proptest::collection::vec(prop_oneof![1u8..=46, 48u8..=255], 1..20),
        1 => (200usize..=255).prop_map(|n| vec![b'L'; n]),
    ]
    .prop_filter("not . or .. or a whiteout", |n| {
        n != b"." && n != b".." && !n.starts_with(b".wh.")
    })
}

/// File content built from 4 KiB blocks that are zero (holes) or filled, plus a tail.
fn content() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..300),
        3 => (
            proptest::collection::vec(prop_oneof![Just(None), any::<u8>().prop_map(Some)], 0..6),
            0usize..4096,
            any::<u8>(),
        )
            .prop_map(|(blocks, tail, seed)| {
                let mut data = Vec::new();
                for (i, block) in blocks.iter().enumerate() {
                    match block {
                        None => data.extend_from_slice(&[0u8; 4096]),
                        Some(b) => data.extend((0..4096).map(|j| (j as u8) ^ b ^ (i as u8))),
                    }
                }
                data.extend((0..tail).map(|j| (j as u8).wrapping_mul(seed) | 1));
                data
            }),
    ]
}

/// Xattrs Linux accepts: names within 255 bytes, `user.*` only on files and directories (see
/// [`apply`]), and `security.capability` values the kernel parses (revision 2).
fn xattrs() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let value = || {
        prop_oneof![
            4 => proptest::collection::vec(any::<u8>(), 0..40),
            1 => Just(b"same value everywhere".to_vec()),
            1 => (1000usize..3000).prop_map(|n| vec![b'x'; n]),
        ]
    };
    let capability = (any::<u32>(), any::<u32>()).prop_map(|(permitted, inheritable)| {
        let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
        v.extend_from_slice(&permitted.to_le_bytes());
        v.extend_from_slice(&inheritable.to_le_bytes());
        v.extend_from_slice(&[0u8; 8]);
        (b"security.capability".to_vec(), v)
    });
    let entry = prop_oneof![
        2 => (Just(b"user.a".to_vec()), value()),
        1 => (Just(b"user.shared".to_vec()), value()),
        2 => (Just(b"trusted.t".to_vec()), value()),
        1 => capability,
        // Linux limits full xattr names to 255 bytes; a pax key cannot contain '='.
        1 => (
            name()
                .prop_filter("no '=' in a pax key", |n| !n.contains(&b'='))
                .prop_map(|n| [b"user.".as_slice(), &n[..n.len().min(250)]].concat()),
            value()
        ),
    ];
    proptest::collection::vec(entry, 0..3)
}

#[derive(Debug, Clone)]
enum Leaf {
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Hardlink(usize),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

fn leaf() -> impl Strategy<Value = Leaf> {
    prop_oneof![
        6 => content().prop_map(Leaf::File),
        2 => prop_oneof![
            proptest::collection::vec(1u8..=255, 1..100),
            (1000usize..4096).prop_map(|n| vec![b's'; n]),
        ]
        .prop_map(Leaf::Symlink),
        1 => any::<usize>().prop_map(Leaf::Hardlink),
        1 => (0u32..4096, 0u32..1_048_576).prop_map(|(a, b)| Leaf::Char(a, b)),
        1 => (0u32..4096, 0u32..1_048_576).prop_map(|(a, b)| Leaf::Block(a, b)),
        1 => Just(Leaf::Fifo),
    ]
}

#[derive(Debug, Clone)]
struct Attributes {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn attributes() -> impl Strategy<Value = Attributes> {
    (
        0u32..0o10000,
        prop_oneof![Just(0u32), 0u32..70_000, any::<u32>()],
        prop_oneof![Just(0u32), 0u32..70_000, any::<u32>()],
        prop_oneof![
            Just(1_700_000_000i64),
            0i64..2_000_000_000,
            -1_000_000i64..0
        ],
        xattrs(),
    )
        .prop_map(|(mode, uid, gid, mtime, xattrs)| Attributes {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
}

fn apply(mut spec: Spec, attributes: &Attributes) -> Spec {
    spec.mode = attributes.mode;
    spec.uid = attributes.uid;
    spec.gid = attributes.gid;
    spec.mtime = attributes.mtime;
    // Linux allows user.* xattrs only on regular files and directories.
    let user_allowed = matches!(spec.kind, SpecKind::File(_) | SpecKind::Dir);
    for (name, value) in &attributes.xattrs {
        if user_allowed || !name.starts_with(b"user.") {
            spec.xattrs.insert(name.clone(), value.clone());
        }
    }
    spec
}

/// A tree as tar entries: directories first (each under an earlier one), then leaves in
/// random directories, then some files overwritten.
fn tree() -> impl Strategy<Value = Vec<Spec>> {
    (
        proptest::collection::vec((any::<usize>(), name(), attributes(), any::<bool>()), 0..12),
        proptest::collection::vec((any::<usize>(), name(), leaf(), attributes()), 0..40),
        proptest::collection::vec((any::<usize>(), content()), 0..3),
        attributes(),
    )
        .prop_map(|(dirs, leaves, overwrites, root)| {
            let mut specs = vec![apply(Spec::dir("."), &root)];
            let mut dir_paths: Vec<Vec<u8>> = vec![Vec::new()];
            let mut used: BTreeSet<Vec<u8>> = BTreeSet::new();
            let join = |parent: &[u8], name: &[u8]| {
                if parent.is_empty() {
                    name.to_vec()
                } else {
                    [parent, b"/", name].concat()
                }
            };
            for (parent, name, attributes, explicit) in dirs {
                let parent = dir_paths[parent % dir_paths.len()].clone();
                let path = join(&parent, &name);
                if !used.insert(path.clone()) {
                    continue;
                }
                dir_paths.push(path.clone());
                // A directory without an entry of its own exists only if something is put in
                // it, with the attributes of an implicit directory.
                if explicit {
                    specs.push(apply(Spec::dir(&path), &attributes));
                }
            }
            let mut files: Vec<Vec<u8>> = Vec::new();
            for (parent, name, leaf, attributes) in leaves {
                let parent = dir_paths[parent % dir_paths.len()].clone();
                let path = join(&parent, &name);
                if !used.insert(path.clone()) {
                    continue;
                }
                let spec = match leaf {
                    Leaf::File(content) => {
                        files.push(path.clone());
                        Spec::new(&path, SpecKind::File(content))
                    }
                    Leaf::Symlink(target) => Spec::new(&path, SpecKind::Symlink(target)),
                    Leaf::Hardlink(i) if !files.is_empty() => {
                        let target = files[i % files.len()].clone();
                        specs.push(Spec::hardlink(&path, target));
                        continue;
                    }
                    Leaf::Hardlink(_) => Spec::new(&path, SpecKind::Fifo),
                    Leaf::Char(a, b) => Spec::new(&path, SpecKind::Char(a, b)),
                    Leaf::Block(a, b) => Spec::new(&path, SpecKind::Block(a, b)),
                    Leaf::Fifo => Spec::new(&path, SpecKind::Fifo),
                };
                specs.push(apply(spec, &attributes));
            }
            // Overwrite some files before anything links to them would be ambiguous for the
            // model; overwrite only files no hard link points at.
            let linked: BTreeSet<Vec<u8>> = specs
                .iter()
                .filter_map(|s| match &s.kind {
                    SpecKind::Hardlink(t) => Some(t.clone()),
                    _ => None,
                })
                .collect();
            for (i, content) in overwrites {
                if files.is_empty() {
                    break;
                }
                let path = files[i % files.len()].clone();
                if !linked.contains(&path) {
                    specs.push(Spec::new(&path, SpecKind::File(content)));
                }
            }
            specs
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES=1000 for a longer run.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_trees_round_trip(specs in tree(), gnu in any::<bool>()) {
        let long_names = if gnu { LongNames::Gnu } else { LongNames::Pax };
        let tar = tar_of(&specs, long_names);
        let dir = tempfile::tempdir().unwrap();
        let (first, image) = convert(&tar, dir.path(), "a", &ConvertOptions::default());
        let (second, _) = convert(&tar, dir.path(), "b", &ConvertOptions::default());
        prop_assert_eq!(&first.digest, &second.digest);

        let (expected, expected_links) = expected_listing(&specs);
        let (actual, links) = read_with_erofs_rs(&image);
        let problems = diff_listings(&expected, &actual, Check::ALL);
        prop_assert!(problems.is_empty(), "erofs-rs:\n{}", problems.join("\n"));
        prop_assert_eq!(&links, &expected_links);

        let (ok, log) = fsck_check(&image);
        prop_assert!(ok, "fsck.erofs: {}", log);

        if let Some(mount) = Mount::erofs(&image, &dir.path().join("mnt")) {
            let (mounted, links) = read_directory_tree(&mount.dir, true);
            let problems = diff_listings(&expected, &mounted, Check::ALL);
            prop_assert!(problems.is_empty(), "kernel:\n{}", problems.join("\n"));
            prop_assert_eq!(&links, &expected_links);
        }
    }
}
