//! Shared helpers for the EROFS writer tests: a tar writer with full control over headers,
//! the expected tree, and three independent readers of an image (erofs-rs, `fsck.erofs
//! --extract`, and the host kernel through a loop mount).

#![allow(dead_code)]

pub mod roots;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use gantry_oci::{ConvertOptions, ConvertSummary, convert_layer};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Writing tars
// ---------------------------------------------------------------------------------------------

/// Octal field, NUL-terminated, or GNU base-256 if it does not fit.
pub fn put_number(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    if value < (1u64 << (3 * digits)) {
        let text = format!("{value:0digits$o}");
        field[..digits].copy_from_slice(text.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        let bytes = value.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&bytes);
        assert_eq!(
            field[0] & 0x80,
            0,
            "value too large for base-256 in this field"
        );
        field[0] |= 0x80;
    }
}

/// A ustar header with a correct checksum. `name` and `link` must fit (100 bytes).
#[allow(clippy::too_many_arguments)]
pub fn ustar_header(
    name: &[u8],
    type_flag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    link: &[u8],
    dev: (u32, u32),
) -> [u8; 512] {
    let mut h = [0u8; 512];
    let name = &name[..name.len().min(100)];
    h[..name.len()].copy_from_slice(name);
    put_number(&mut h[100..108], u64::from(mode));
    put_number(&mut h[108..116], uid);
    put_number(&mut h[116..124], gid);
    put_number(&mut h[124..136], size);
    put_number(&mut h[136..148], mtime);
    h[156] = type_flag;
    let link = &link[..link.len().min(100)];
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    put_number(&mut h[329..337], u64::from(dev.0));
    put_number(&mut h[337..345], u64::from(dev.1));
    set_checksum(&mut h);
    h
}

/// Recomputes the header checksum.
pub fn set_checksum(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
}

/// One pax record with its length prefix.
pub fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body_len = key.len() + value.len() + 2; // '=' and '\n'
    let mut len = body_len + 2;
    loop {
        let total = body_len + len.to_string().len() + 1;
        if total == len {
            break;
        }
        len = total;
    }
    let mut record = format!("{len} ").into_bytes();
    record.extend_from_slice(key);
    record.push(b'=');
    record.extend_from_slice(value);
    record.push(b'\n');
    assert_eq!(record.len(), len);
    record
}

/// What an entry is, in a test tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecKind {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// One tar entry to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub path: Vec<u8>,
    pub kind: SpecKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Spec {
    pub fn new(path: impl AsRef<[u8]>, kind: SpecKind) -> Self {
        let mode = match kind {
            SpecKind::Dir => 0o755,
            SpecKind::Symlink(_) => 0o777,
            _ => 0o644,
        };
        Spec {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            xattrs: BTreeMap::new(),
        }
    }
    pub fn dir(path: impl AsRef<[u8]>) -> Self {
        Self::new(path, SpecKind::Dir)
    }
    pub fn file(path: impl AsRef<[u8]>, content: impl AsRef<[u8]>) -> Self {
        Self::new(path, SpecKind::File(content.as_ref().to_vec()))
    }
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Self::new(path, SpecKind::Symlink(target.as_ref().to_vec()))
    }
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Self::new(path, SpecKind::Hardlink(target.as_ref().to_vec()))
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, mtime: i64) -> Self {
        self.mtime = mtime;
        self
    }
    pub fn xattr(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        self.xattrs
            .insert(name.as_ref().to_vec(), value.as_ref().to_vec());
        self
    }
}

/// How a tar writer stores names that do not fit the ustar header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongNames {
    Pax,
    Gnu,
}

/// Writes tar archives into memory.
#[derive(Debug)]
pub struct TarWriter {
    pub out: Vec<u8>,
    pub long_names: LongNames,
}

impl TarWriter {
    pub fn new(long_names: LongNames) -> Self {
        TarWriter {
            out: Vec::new(),
            long_names,
        }
    }

    fn pad(&mut self) {
        let len = self.out.len().next_multiple_of(512);
        self.out.resize(len, 0);
    }

    /// A header and its data, padded.
    pub fn raw(&mut self, header: &[u8; 512], data: &[u8]) {
        self.out.extend_from_slice(header);
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// A pax extended header ('x') with the given records.
    pub fn pax(&mut self, records: &[(Vec<u8>, Vec<u8>)]) {
        let data: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        let h = ustar_header(
            b"././@PaxHeader",
            b'x',
            0o644,
            0,
            0,
            data.len() as u64,
            0,
            b"",
            (0, 0),
        );
        self.raw(&h, &data);
    }

    /// A GNU long name ('L') or long link ('K') record.
    pub fn gnu_long(&mut self, type_flag: u8, name: &[u8]) {
        let mut data = name.to_vec();
        data.push(0);
        let mut h = ustar_header(
            b"././@LongLink",
            type_flag,
            0o644,
            0,
            0,
            data.len() as u64,
            0,
            b"",
            (0, 0),
        );
        h[257..265].copy_from_slice(b"ustar  \0");
        set_checksum(&mut h);
        self.raw(&h, &data);
    }

    /// Writes one entry, with pax records or GNU long names as needed.
    pub fn add(&mut self, spec: &Spec) {
        let (type_flag, data, link, dev): (u8, &[u8], &[u8], (u32, u32)) = match &spec.kind {
            SpecKind::Dir => (b'5', b"", b"", (0, 0)),
            SpecKind::File(content) => (b'0', content, b"", (0, 0)),
            SpecKind::Symlink(target) => (b'2', b"", target, (0, 0)),
            SpecKind::Hardlink(target) => (b'1', b"", target, (0, 0)),
            SpecKind::Char(a, b) => (b'3', b"", b"", (*a, *b)),
            SpecKind::Block(a, b) => (b'4', b"", b"", (*a, *b)),
            SpecKind::Fifo => (b'6', b"", b"", (0, 0)),
        };
        let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (name, value) in &spec.xattrs {
            records.push(([b"SCHILY.xattr.".as_slice(), name].concat(), value.clone()));
        }
        if spec.mtime < 0 {
            records.push((b"mtime".to_vec(), spec.mtime.to_string().into_bytes()));
        }
        let long_path = spec.path.len() > 100;
        let long_link = link.len() > 100;
        match self.long_names {
            LongNames::Pax => {
                if long_path {
                    records.push((b"path".to_vec(), spec.path.clone()));
                }
                if long_link {
                    records.push((b"linkpath".to_vec(), link.to_vec()));
                }
            }
            LongNames::Gnu => {
                if long_path {
                    self.gnu_long(b'L', &spec.path);
                }
                if long_link {
                    self.gnu_long(b'K', link);
                }
            }
        }
        if !records.is_empty() {
            self.pax(&records);
        }
        let mtime = u64::try_from(spec.mtime).unwrap_or(0);
        let h = ustar_header(
            &spec.path,
            type_flag,
            spec.mode,
            u64::from(spec.uid),
            u64::from(spec.gid),
            data.len() as u64,
            mtime,
            link,
            dev,
        );
        self.raw(&h, data);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        self.out
    }
}

/// A tar with `specs` in order.
pub fn tar_of(specs: &[Spec], long_names: LongNames) -> Vec<u8> {
    let mut writer = TarWriter::new(long_names);
    for spec in specs {
        writer.add(spec);
    }
    writer.finish()
}

// ---------------------------------------------------------------------------------------------
// Expected and observed trees
// ---------------------------------------------------------------------------------------------

/// Content-level description of one inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File { size: u64, sha256: [u8; 32] },
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// What a reader observed (or the tar says) at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attrs {
    pub kind: Kind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Every path (relative, without a leading `./`; the root is the empty path) with its attrs.
pub type Listing = BTreeMap<Vec<u8>, Attrs>;

/// Paths that share an inode (only groups of two or more).
pub type LinkGroups = BTreeSet<BTreeSet<Vec<u8>>>;

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The listing a tar of `specs` must produce, applying "later wins" and hard links. Implicit
/// directories are root-owned, 0755, mtime 0. `root` gives the root's attributes if the specs
/// do not.
pub fn expected_listing(specs: &[Spec]) -> (Listing, LinkGroups) {
    let mut listing = Listing::new();
    let mut groups: Vec<BTreeSet<Vec<u8>>> = Vec::new();
    let implicit = |kind| Attrs {
        kind,
        perm: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        xattrs: BTreeMap::new(),
    };
    listing.insert(Vec::new(), implicit(Kind::Dir));
    for spec in specs {
        let path = normalize(&spec.path);
        // parents
        let mut prefix = Vec::new();
        for component in path
            .split(|&b| b == b'/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(component);
            listing
                .entry(prefix.clone())
                .or_insert_with(|| implicit(Kind::Dir));
        }
        for group in &mut groups {
            group.remove(&path);
        }
        let attrs = |kind| Attrs {
            kind,
            perm: spec.mode & 0o7777,
            uid: spec.uid,
            gid: spec.gid,
            mtime: spec.mtime,
            xattrs: spec.xattrs.clone(),
        };
        match &spec.kind {
            SpecKind::Dir => {
                listing.insert(path, attrs(Kind::Dir));
            }
            SpecKind::File(content) => {
                remove_subtree(&mut listing, &path);
                listing.insert(
                    path,
                    attrs(Kind::File {
                        size: content.len() as u64,
                        sha256: sha256(content),
                    }),
                );
            }
            SpecKind::Symlink(target) => {
                remove_subtree(&mut listing, &path);
                listing.insert(path, attrs(Kind::Symlink(target.clone())));
            }
            SpecKind::Hardlink(target) => {
                let target = normalize(target);
                let target_attrs = listing.get(&target).expect("hardlink target").clone();
                remove_subtree(&mut listing, &path);
                listing.insert(path.clone(), target_attrs);
                match groups.iter_mut().find(|g| g.contains(&target)) {
                    Some(group) => {
                        group.insert(path);
                    }
                    None => groups.push(BTreeSet::from([target, path])),
                }
            }
            SpecKind::Char(a, b) => {
                remove_subtree(&mut listing, &path);
                listing.insert(path, attrs(Kind::Char(*a, *b)));
            }
            SpecKind::Block(a, b) => {
                remove_subtree(&mut listing, &path);
                listing.insert(path, attrs(Kind::Block(*a, *b)));
            }
            SpecKind::Fifo => {
                remove_subtree(&mut listing, &path);
                listing.insert(path, attrs(Kind::Fifo));
            }
        }
    }
    let groups = groups.into_iter().filter(|g| g.len() > 1).collect();
    (listing, groups)
}

fn remove_subtree(listing: &mut Listing, path: &[u8]) {
    let mut prefix = path.to_vec();
    prefix.push(b'/');
    listing.retain(|p, _| p != path && !p.starts_with(&prefix));
}

/// `./a//b/` → `a/b`.
pub fn normalize(path: &[u8]) -> Vec<u8> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect::<Vec<_>>()
        .join(&b'/')
}

/// Compares two listings field by field, describing every difference (empty if equal).
/// `check` selects what the reader under test can observe.
pub fn diff_listings(expected: &Listing, actual: &Listing, check: Check) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, want) in expected {
        let shown = String::from_utf8_lossy(path);
        let Some(got) = actual.get(path) else {
            problems.push(format!("missing: {shown:?}"));
            continue;
        };
        if want.kind != got.kind {
            problems.push(format!("{shown:?}: kind {:?} != {:?}", got.kind, want.kind));
        }
        if want.perm & check.perm != got.perm & check.perm {
            problems.push(format!("{shown:?}: perm {:o} != {:o}", got.perm, want.perm));
        }
        if check.owner && (want.uid, want.gid) != (got.uid, got.gid) {
            problems.push(format!(
                "{shown:?}: owner {}:{} != {}:{}",
                got.uid, got.gid, want.uid, want.gid
            ));
        }
        let is_symlink = matches!(want.kind, Kind::Symlink(_));
        let mtime_visible = check.mtime && (check.symlink_mtime || !is_symlink);
        if mtime_visible && want.mtime != got.mtime {
            problems.push(format!("{shown:?}: mtime {} != {}", got.mtime, want.mtime));
        }
        if check.xattrs && want.xattrs != got.xattrs {
            problems.push(format!(
                "{shown:?}: xattrs {:?} != {:?}",
                got.xattrs, want.xattrs
            ));
        }
    }
    for path in actual.keys() {
        if !expected.contains_key(path) {
            problems.push(format!("unexpected: {:?}", String::from_utf8_lossy(path)));
        }
    }
    problems
}

/// Which attributes a reader can see.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    /// Permission bits compared (0 for none).
    pub perm: u32,
    pub owner: bool,
    pub mtime: bool,
    pub symlink_mtime: bool,
    pub xattrs: bool,
}

impl Check {
    pub const ALL: Check = Check {
        perm: 0o7777,
        owner: true,
        mtime: true,
        symlink_mtime: true,
        xattrs: true,
    };
}

// ---------------------------------------------------------------------------------------------
// Converting
// ---------------------------------------------------------------------------------------------

/// Converts `tar` into `dir/name.erofs`.
pub fn convert(
    tar: &[u8],
    dir: &Path,
    name: &str,
    options: &ConvertOptions,
) -> (ConvertSummary, PathBuf) {
    let output = dir.join(format!("{name}.erofs"));
    let summary = convert_layer(tar, &output, options).expect("conversion");
    (summary, output)
}

// ---------------------------------------------------------------------------------------------
// Reader 1: erofs-rs
// ---------------------------------------------------------------------------------------------

/// Reads the whole image with the erofs-rs crate.
pub fn read_with_erofs_rs(image: &Path) -> (Listing, LinkGroups) {
    use erofs_rs::EroFS;
    use erofs_rs::backend::MmapImage;

    // SAFETY: the test owns the image file and does not modify it while it is mapped.
    let image = unsafe { MmapImage::new_from_path(image) }.expect("mmap image");
    let fs = EroFS::new(image).expect("erofs-rs parses the superblock");
    let root_nid = fs.super_block().root_inode_id();
    let root = fs.get_inode(root_nid).expect("root inode");
    let mut listing = Listing::new();
    let mut by_nid: BTreeMap<u64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    listing.insert(Vec::new(), erofs_rs_attrs(&fs, root));
    for entry in fs.walk_dir("/").expect("walk") {
        let entry = entry.expect("walk entry");
        let path = entry.dir_entry.path();
        let path = normalize(path.as_bytes());
        let inode = entry.inode;
        if !inode.is_dir() && inode.nlink() > 1 {
            by_nid.entry(inode.id()).or_default().insert(path.clone());
        }
        listing.insert(path, erofs_rs_attrs(&fs, inode));
    }
    let groups = by_nid.into_values().filter(|g| g.len() > 1).collect();
    (listing, groups)
}

fn erofs_rs_attrs<I: erofs_rs::backend::Image>(
    fs: &erofs_rs::EroFS<I>,
    inode: erofs_rs::types::Inode,
) -> Attrs {
    use std::os::unix::fs::PermissionsExt;
    let file_type = inode.file_type();
    let kind = if inode.is_dir() {
        Kind::Dir
    } else if inode.is_file() {
        let mut file = fs.open_inode_file(inode).expect("open file");
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buffer).expect("read file");
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            size += n as u64;
        }
        assert_eq!(size, inode.data_size(), "erofs-rs read the whole file");
        Kind::File {
            size,
            sha256: hasher.finalize().into(),
        }
    } else if inode.is_symlink() {
        Kind::Symlink(
            fs.read_link_inode(inode)
                .expect("read link")
                .as_bytes()
                .to_vec(),
        )
    } else if format!("{file_type:?}") == "CharacterDevice" {
        let (major, minor) = inode.device().expect("device");
        Kind::Char(major, minor)
    } else if format!("{file_type:?}") == "BlockDevice" {
        let (major, minor) = inode.device().expect("device");
        Kind::Block(major, minor)
    } else {
        Kind::Fifo
    };
    let xattrs = fs.xattrs_inode(inode).expect("xattrs");
    Attrs {
        kind,
        perm: inode.permissions().mode() & 0o7777,
        uid: inode.uid(),
        gid: inode.gid(),
        mtime: inode.modified_unix().0,
        xattrs,
    }
}

// ---------------------------------------------------------------------------------------------
// Readers 2 and 3: a directory tree on the host (fsck.erofs --extract, or a kernel mount)
// ---------------------------------------------------------------------------------------------

/// Lists a directory tree with lstat, readlink and (optionally) the xattrs.
pub fn read_directory_tree(root: &Path, with_xattrs: bool) -> (Listing, LinkGroups) {
    let mut listing = Listing::new();
    let mut by_ino: BTreeMap<u64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let full = root.join(&relative);
        let meta = fs::symlink_metadata(&full).expect("lstat");
        let file_type = meta.file_type();
        let kind = if file_type.is_dir() {
            for child in fs::read_dir(&full).expect("read_dir") {
                let child = child.expect("dir entry");
                stack.push(relative.join(child.file_name()));
            }
            Kind::Dir
        } else if file_type.is_file() {
            let content = fs::read(&full).expect("read");
            Kind::File {
                size: content.len() as u64,
                sha256: sha256(&content),
            }
        } else if file_type.is_symlink() {
            Kind::Symlink(
                fs::read_link(&full)
                    .expect("readlink")
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if file_type.is_char_device() {
            Kind::Char(libc::major(meta.rdev()), libc::minor(meta.rdev()))
        } else if file_type.is_block_device() {
            Kind::Block(libc::major(meta.rdev()), libc::minor(meta.rdev()))
        } else {
            Kind::Fifo
        };
        let path = relative.as_os_str().as_bytes().to_vec();
        if !file_type.is_dir() && meta.nlink() > 1 {
            by_ino.entry(meta.ino()).or_default().insert(path.clone());
        }
        let xattrs = if with_xattrs {
            list_xattrs(&full)
        } else {
            BTreeMap::new()
        };
        listing.insert(
            path,
            Attrs {
                kind,
                perm: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: meta.mtime(),
                xattrs,
            },
        );
    }
    let groups = by_ino.into_values().filter(|g| g.len() > 1).collect();
    (listing, groups)
}

/// All xattrs of `path` (not following symlinks).
pub fn list_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let mut names = vec![0u8; 65536];
    // SAFETY: c_path is NUL-terminated and names is a writable buffer of the given length.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        len >= 0,
        "llistxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    names.truncate(len as usize);
    let mut xattrs = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name).expect("xattr name");
        let mut value = vec![0u8; 65536];
        // SAFETY: both strings are NUL-terminated; value is writable for its length.
        let n = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(n >= 0, "lgetxattr {}", std::io::Error::last_os_error());
        value.truncate(n as usize);
        xattrs.insert(name.to_vec(), value);
    }
    xattrs
}

/// Runs `fsck.erofs --extract` into a fresh directory under `work` and lists it.
pub fn read_with_fsck(image: &Path, work: &Path) -> (Listing, LinkGroups) {
    let target = work.join("fsck-extract");
    let _ = fs::remove_dir_all(&target);
    let output = Command::new("fsck.erofs")
        .arg(format!("--extract={}", target.display()))
        .arg("--preserve")
        .arg(image)
        .output()
        .expect("run fsck.erofs (apt-get install erofs-utils)");
    assert!(
        output.status.success(),
        "fsck.erofs failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    read_directory_tree(&target, false)
}

/// Runs `fsck.erofs` without extraction; returns its success and output.
pub fn fsck_check(image: &Path) -> (bool, String) {
    let output = Command::new("fsck.erofs")
        .arg(image)
        .output()
        .expect("run fsck.erofs");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// A mount that is undone on drop.
#[derive(Debug)]
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// Mounts `image` read-only through a loop device. `None` (after saying why) when this host
    /// cannot: not root, or the kernel refuses (EPERM in a container).
    pub fn erofs(image: &Path, dir: &Path) -> Option<Mount> {
        Self::run(dir, &["-t", "erofs", "-o", "loop,ro"], Some(image))
    }

    /// Mounts overlayfs with `lower` dirs (top first) read-only.
    pub fn overlay(lower: &[&Path], dir: &Path) -> Option<Mount> {
        let lowerdir = lower
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let options = format!("lowerdir={lowerdir}");
        Self::run(dir, &["-t", "overlay", "-o", &options, "overlay"], None)
    }

    fn run(dir: &Path, args: &[&str], source: Option<&Path>) -> Option<Mount> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: mounting needs root");
            return None;
        }
        fs::create_dir_all(dir).expect("mount point");
        let mut command = Command::new("mount");
        command.args(args);
        if let Some(source) = source {
            command.arg(source);
        }
        let output = command.arg(dir).output().expect("run mount");
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if stderr.contains("ermission denied") || stderr.contains("not permitted") {
                eprintln!("SKIP: this host refuses mounts: {stderr}");
                return None;
            }
            panic!("mount {args:?} failed: {stderr}");
        }
        Some(Mount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// `OsStr` from raw bytes, for non-UTF-8 names.
pub fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

/// A directory under the cargo target dir (kept between runs, for caches).
pub fn target_cache_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = base.join("gantry-test-cache").join(name);
    fs::create_dir_all(&dir).expect("cache dir");
    dir
}

// ---------------------------------------------------------------------------------------------
// A tree with every kind of entry
// ---------------------------------------------------------------------------------------------

/// Bytes that look like file content: not compressible into zeros, different per seed.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// A `security.capability` value (cap_dac_override + cap_fowner = 0x0a = '\n' in the mask).
pub fn capability_with_newline() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // VFS_CAP_REVISION_2, effective
    v.extend_from_slice(&0x0000_000au32.to_le_bytes()); // permitted (low)
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable (low)
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted (high)
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable (high)
    v
}

/// A tree with every kind of entry and attribute a layer can carry.
pub fn rich_tree() -> Vec<Spec> {
    let long_dir = "d".repeat(120);
    let long_name = format!("{long_dir}/{}", "n".repeat(200));
    let mut holes = pattern(4096, 1);
    holes.extend_from_slice(&[0u8; 3 * 4096]);
    holes.extend_from_slice(&pattern(4096 * 2, 2));
    holes.extend_from_slice(&[0u8; 4096]);
    holes.extend_from_slice(&pattern(100, 3));
    let mut specs = vec![
        Spec::dir("./").mode(0o755).mtime(1_600_000_000),
        Spec::dir("./etc").mtime(1_600_000_001),
        Spec::file("./etc/hostname", "gantry\n").mtime(1_600_000_002),
        Spec::file("./etc/empty", ""),
        Spec::file("./etc/shadow", "root:*:19000::::::\n")
            .mode(0o640)
            .owner(0, 42),
        Spec::dir("./tmp").mode(0o1777),
        Spec::dir("./srv").mode(0o2775).owner(1000, 1000),
        Spec::dir("./usr"),
        Spec::dir("./usr/bin"),
        Spec::file("./usr/bin/sudo", pattern(10_000, 4))
            .mode(0o4755)
            .xattr("security.capability", capability_with_newline()),
        Spec::file("./usr/bin/ping", pattern(4096, 5))
            .mode(0o755)
            .xattr("security.capability", capability_with_newline()),
        Spec::file("./usr/bin/wall", pattern(4095, 6))
            .mode(0o2755)
            .owner(0, 5),
        Spec::file("./usr/bin/big", pattern(1 << 20 | 3, 7)),
        Spec::file("./usr/bin/exact", pattern(8192, 8)),
        Spec::file("./usr/bin/one", "x"),
        Spec::file("./usr/bin/4097", pattern(4097, 9)),
        Spec::hardlink("./usr/bin/sudoedit", "./usr/bin/sudo"),
        Spec::hardlink("./usr/bin/sudo2", "usr/bin/sudo"),
        Spec::symlink("./usr/bin/vi", "vim.basic"),
        Spec::symlink("./usr/bin/abs", "/usr/bin/vim.basic"),
        Spec::symlink("./usr/bin/longlink", "t/".repeat(1500)),
        Spec::dir("./dev"),
        Spec::new("./dev/null", SpecKind::Char(1, 3)).mode(0o666),
        Spec::new("./dev/sda", SpecKind::Block(8, 0))
            .mode(0o660)
            .owner(0, 6),
        Spec::new("./dev/big", SpecKind::Char(4095, 1_048_575)),
        Spec::new("./dev/fifo", SpecKind::Fifo).mode(0o600),
        Spec::dir("./home")
            .owner(70_000, 80_000)
            .mtime(1_500_000_000),
        Spec::file("./home/big-ids", "ids").owner(4_000_000_000, 70_000),
        Spec::file("./home/old", "before 1970").mtime(-86_400),
        Spec::file("./home/xattrs", "x")
            .xattr("user.empty", "")
            .xattr("user.mime_type", "text/plain")
            .xattr("trusted.md5", "0123")
            .xattr("security.selinux", "system_u:object_r:etc_t:s0\0")
            .xattr("user.big", vec![b'v'; 3000]),
        Spec::file("./home/big-xattr-tail", pattern(5000, 10)).xattr("user.big", vec![b'w'; 4000]),
        Spec::file("./home/shared1", "s1").xattr("user.shared", "same value"),
        Spec::file("./home/shared2", "s2").xattr("user.shared", "same value"),
        Spec::dir("./home/shared-dir").xattr("user.shared", "same value"),
        Spec::file("./home/holes", holes),
        Spec::file("./home/zeros", vec![0u8; 3 * 4096 + 10]),
        Spec::file(b"./home/latin1-\xe9t\xe9".as_slice(), "not utf-8"),
        Spec::dir(b"./home/\xff\xfe-dir".as_slice()),
        Spec::symlink(b"./home/\xff\xfe-dir/link".as_slice(), b"\xe9".as_slice()),
        Spec::dir(format!("./{long_dir}")),
        Spec::file(format!("./{long_name}"), "long name"),
        Spec::hardlink(format!("./{long_dir}/hl"), format!("./{long_name}")),
        Spec::file("./a/b/c/d/e/f/g/deep", "implicit parents"),
    ];
    specs.push(Spec::dir("./many"));
    for i in 0..600 {
        specs.push(Spec::file(
            format!("./many/file-{i:04}-{}", "p".repeat(i % 40)),
            format!("{i}"),
        ));
    }
    specs
}
