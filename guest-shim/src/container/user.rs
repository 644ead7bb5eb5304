//! Resolving an image's `User` (`name`, `uid`, `name:group`, `uid:gid`) through the container's
//! own `/etc/passwd` and `/etc/group`, as Docker does.
//!
//! Both files come from the image (or, for an exec, from a running container's writable layer)
//! and are read by PID 1 of the guest, so they are hostile input: [`read_database`] resolves them
//! inside the container's root (`openat2` with `RESOLVE_IN_ROOT`, so `..` and absolute symlinks
//! stay in it, and no `/proc` magic links), opens only regular files (a FIFO would block the
//! shim, a device such as `/dev/zero` would never end) and reads at most [`MAX_DATABASE_BYTES`].

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{SFlag, fstat};

/// The largest `/etc/passwd` or `/etc/group` read (real ones are a few KiB).
pub const MAX_DATABASE_BYTES: u64 = 4 << 20;

/// Errors resolving a user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// The image's /etc/passwd or /etc/group cannot be used.
    #[error("the image's {path}: {reason}")]
    Database {
        /// The file, as the container sees it.
        path: &'static str,
        /// Why not.
        reason: String,
    },
    /// The name is not in the image's /etc/passwd.
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    /// The group is not in the image's /etc/group.
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (from /etc/group membership).
    pub additional_gids: Vec<u32>,
    /// The home directory, for `HOME` when the environment has none.
    pub home: String,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: (*fields.first()?).to_owned(),
                uid: fields.get(2)?.parse().ok()?,
                gid: fields.get(3)?.parse().ok()?,
                home: fields.get(5).copied().unwrap_or("/").to_owned(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: (*fields.first()?).to_owned(),
                gid: fields.get(2)?.parse().ok()?,
                members: fields
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `user` against the root file system at `rootfs`.
pub fn resolve(rootfs: &Path, user: &str) -> Result<ResolvedUser, UserError> {
    let root = open_root(rootfs)?;
    let passwd = read_database(&root, "/etc/passwd")?;
    let group = read_database(&root, "/etc/group")?;
    resolve_in(&passwd, &group, user)
}

fn open_root(rootfs: &Path) -> Result<OwnedFd, UserError> {
    let fd = nix::fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|errno| UserError::Database {
        path: "/",
        reason: format!("opening the root file system {}: {errno}", rootfs.display()),
    })?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads the user database `path` (absolute, as the container sees it) of the root `root`.
/// A missing file reads as empty, as in Docker (numeric users still work).
fn read_database(root: &OwnedFd, path: &'static str) -> Result<String, UserError> {
    let fail = |reason: String| UserError::Database { path, reason };
    // O_PATH first: it opens nothing (a FIFO does not wait for a writer, a device's open
    // routine does not run), yet names the inode, so the type check below cannot be raced by a
    // running container swapping the file.
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match nix::fcntl::openat2(root.as_raw_fd(), path, how) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(String::new()),
        Err(errno) => return Err(fail(format!("cannot be opened: {errno}"))),
    };
    // SAFETY: openat2 just returned this descriptor; nothing else owns it.
    let located = unsafe { OwnedFd::from_raw_fd(fd) };
    let stat = fstat(located.as_raw_fd()).map_err(|errno| fail(format!("fstat: {errno}")))?;
    let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    if kind != SFlag::S_IFREG {
        return Err(fail(format!(
            "is not a regular file (mode {:o})",
            stat.st_mode
        )));
    }
    // Reopening through the shim's /proc/self/fd reopens that same inode, without resolving
    // the path again. O_NONBLOCK and O_NOCTTY are belt and braces: it is a regular file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", located.as_raw_fd()))
        .map_err(|err| fail(format!("reopening for reading: {err}")))?;
    if stat.st_size as u64 > MAX_DATABASE_BYTES {
        return Err(fail(format!(
            "is {} bytes, more than the {MAX_DATABASE_BYTES} allowed",
            stat.st_size
        )));
    }
    // The size can still change (an exec reads a running container's file): cap the read too.
    let mut bytes = Vec::new();
    file.take(MAX_DATABASE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| fail(format!("reading: {err}")))?;
    if bytes.len() as u64 > MAX_DATABASE_BYTES {
        return Err(fail(format!(
            "grew past the {MAX_DATABASE_BYTES} bytes allowed while being read"
        )));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn resolve_in(passwd: &str, group: &str, user: &str) -> Result<ResolvedUser, UserError> {
    let passwd = parse_passwd(passwd);
    let groups = parse_group(group);
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            passwd
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_owned()))?,
        ),
    };
    let uid = entry.map_or_else(|| user_part.parse().unwrap_or(0), |e| e.uid);
    let name = entry.map(|e| e.name.clone());
    let gid = match group_part {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
        },
        None => entry.map_or(0, |e| e.gid),
    };
    let mut additional_gids: Vec<u32> = match &name {
        // An explicit group replaces the supplementary list, as in Docker.
        Some(name) if group_part.is_none() => groups
            .iter()
            .filter(|g| g.members.iter().any(|m| m == name))
            .map(|g| g.gid)
            .filter(|g| *g != gid)
            .collect(),
        _ => Vec::new(),
    };
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: entry.map_or_else(|| "/".to_owned(), |e| e.home.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nnogroup:x:65534:\nalice:x:1000:\nwheel:x:10:alice,bob\naudio:x:29:alice\n";

    #[test]
    fn names_and_numbers_resolve_like_docker() {
        let root = resolve_in(PASSWD, GROUP, "").unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        let alice = resolve_in(PASSWD, GROUP, "alice").unwrap();
        assert_eq!((alice.uid, alice.gid), (1000, 1000));
        assert_eq!(alice.additional_gids, vec![10, 29]);
        let by_number = resolve_in(PASSWD, GROUP, "1000").unwrap();
        assert_eq!(
            (by_number.uid, by_number.gid, by_number.home.as_str()),
            (1000, 1000, "/home/alice")
        );
        let with_group = resolve_in(PASSWD, GROUP, "alice:wheel").unwrap();
        assert_eq!((with_group.uid, with_group.gid), (1000, 10));
        assert!(with_group.additional_gids.is_empty());
        let unknown_number = resolve_in(PASSWD, GROUP, "4242:4343").unwrap();
        assert_eq!((unknown_number.uid, unknown_number.gid), (4242, 4343));
        let nobody = resolve_in(PASSWD, GROUP, "nobody").unwrap();
        assert_eq!((nobody.uid, nobody.gid), (65534, 65534));
    }

    /// A root file system with `etc/` in a temporary directory.
    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        dir
    }

    fn database_error(root: &Path) -> String {
        match resolve(root, "alice") {
            Err(err @ UserError::Database { .. }) => err.to_string(),
            other => panic!("expected a database error, got {other:?}"),
        }
    }

    #[test]
    fn the_databases_are_read_from_the_container_root() {
        let root = rootfs();
        std::fs::write(root.path().join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(root.path().join("etc/group"), GROUP).unwrap();
        let alice = resolve(root.path(), "alice").unwrap();
        assert_eq!((alice.uid, alice.gid), (1000, 1000));
        // Missing files read as empty, as in Docker: numbers still resolve.
        let bare = rootfs();
        assert_eq!(resolve(bare.path(), "4242").unwrap().uid, 4242);
    }

    #[test]
    fn a_symlink_to_dev_zero_stays_in_the_root_and_is_refused() {
        let root = rootfs();
        std::os::unix::fs::symlink("/dev/zero", root.path().join("etc/passwd")).unwrap();
        // Inside the root, /dev/zero does not exist: no endless read of the shim's /dev/zero.
        assert_eq!(resolve(root.path(), "0").unwrap().uid, 0);
        // And where the root has a device there, it is not a regular file.
        std::fs::create_dir(root.path().join("dev")).unwrap();
        nix::sys::stat::mknod(
            &root.path().join("dev/zero"),
            SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 5),
        )
        .unwrap();
        let err = database_error(root.path());
        assert!(
            err.contains("/etc/passwd") && err.contains("not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let root = rootfs();
        nix::unistd::mkfifo(
            &root.path().join("etc/group"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let path = root.path().to_owned();
        std::thread::spawn(move || {
            let _ = done_tx.send(database_error(&path));
        });
        let err = done_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading a FIFO must not block");
        assert!(
            err.contains("/etc/group") && err.contains("not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn dot_dot_and_absolute_links_cannot_escape_the_root() {
        // outside/passwd knows alice; the root's files are links climbing out towards it, one
        // by `..`, one by its absolute path on the host.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), PASSWD).unwrap();
        let root_dir = outside.path().join("root");
        std::fs::create_dir_all(root_dir.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../../../passwd", root_dir.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("passwd"), root_dir.join("etc/group"))
            .unwrap();
        // Both resolve inside the root, where there is no such file: alice is unknown, the
        // escape found nothing.
        assert_eq!(
            resolve(&root_dir, "alice"),
            Err(UserError::UnknownUser("alice".into()))
        );
        // The same `..` link does work when its target exists inside the root: `..` stops at
        // the root, as at a real `/`.
        std::fs::write(root_dir.join("passwd"), PASSWD).unwrap();
        assert_eq!(resolve(&root_dir, "alice").unwrap().uid, 1000);
    }

    #[test]
    fn an_oversized_database_is_refused() {
        let root = rootfs();
        let file = std::fs::File::create(root.path().join("etc/passwd")).unwrap();
        file.set_len(MAX_DATABASE_BYTES + 1).unwrap();
        let err = database_error(root.path());
        assert!(err.contains("more than the"), "{err}");
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            resolve_in(PASSWD, GROUP, "mallory"),
            Err(UserError::UnknownUser("mallory".into()))
        );
        assert_eq!(
            resolve_in(PASSWD, GROUP, "alice:staff"),
            Err(UserError::UnknownGroup("staff".into()))
        );
    }
}
