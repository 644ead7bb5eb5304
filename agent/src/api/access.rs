//! Who may use the operator API socket.
//!
//! The socket is the card's control: whoever can talk to it can run anything in any VM. It is
//! created mode 0600 (root only) or, with `api_group` configured, 0660 owned by that group, and
//! every accepted connection is checked again by the peer's credentials (`SO_PEERCRED`), so a
//! client that slipped in before the mode was set, or through a socket file whose permissions
//! were widened later, is still refused. Allowed: root, the agent's own user, and members of the
//! configured group.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

/// Errors preparing the socket.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The configured group does not exist.
    #[error("api_group {0:?}: no such group")]
    NoSuchGroup(String),
    /// Something other than a socket is at the socket's path: never deleted.
    #[error("{0} exists and is not a socket; remove it or choose another api_socket")]
    NotASocket(PathBuf),
    /// Another agent answers on the socket already.
    #[error("another agent is already listening on {0}")]
    InUse(PathBuf),
    /// A file-system step failed.
    #[error("API socket {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The access rule: root, this process's user, and optionally one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiAccess {
    group: Option<u32>,
    own_uid: u32,
}

impl ApiAccess {
    /// The rule for `group` (a name or a number), or root and this user only.
    pub fn new(group: Option<&str>) -> Result<Self, AccessError> {
        let group = match group {
            None => None,
            Some(text) => Some(match text.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => Group::from_name(text)
                    .ok()
                    .flatten()
                    .ok_or_else(|| AccessError::NoSuchGroup(text.to_owned()))?
                    .gid
                    .as_raw(),
            }),
        };
        Ok(ApiAccess {
            group,
            own_uid: Uid::effective().as_raw(),
        })
    }

    /// Whether a peer with these credentials may use the API.
    pub fn permits(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 || uid == self.own_uid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        if gid == group {
            return true;
        }
        // Supplementary membership, as /etc/group lists it.
        let name = User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        let members = Group::from_gid(Gid::from_raw(group))
            .ok()
            .flatten()
            .map(|g| g.mem)
            .unwrap_or_default();
        name.is_some_and(|name| members.contains(&name))
    }

    /// Binds `path` with the rule's mode and owner. A stale socket left by a dead agent is
    /// replaced; anything else at the path is left alone and refused.
    pub fn bind(&self, path: &Path) -> Result<UnixListener, AccessError> {
        let io_error = |source| AccessError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(AccessError::InUse(path.to_owned()));
                }
                std::fs::remove_file(path).map_err(io_error)?;
            }
            Ok(_) => return Err(AccessError::NotASocket(path.to_owned())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error(err)),
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error)?;
        }
        let listener = UnixListener::bind(path).map_err(io_error)?;
        let mode = if self.group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_error)?;
        if let Some(group) = self.group {
            nix::unistd::chown(path, None, Some(Gid::from_raw(group)))
                .map_err(|errno| io_error(errno.into()))?;
        }
        Ok(listener)
    }
}

/// A listener that hands out only connections [`ApiAccess`] permits.
#[derive(Debug)]
pub struct CheckedListener {
    inner: UnixListener,
    access: ApiAccess,
}

impl CheckedListener {
    /// Checks every connection `inner` accepts against `access`.
    pub fn new(inner: UnixListener, access: ApiAccess) -> Self {
        CheckedListener { inner, access }
    }
}

impl axum::serve::Listener for CheckedListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    warn!(%error, "API socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if self.access.permits(cred.uid(), cred.gid()) => return (stream, addr),
                Ok(cred) => warn!(
                    uid = cred.uid(),
                    gid = cred.gid(),
                    pid = ?cred.pid(),
                    "API socket: connection refused (not root, the agent's user or api_group)"
                ),
                Err(error) => warn!(%error, "API socket: no peer credentials; connection refused"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn root_the_agent_and_the_group_are_permitted() {
        let access = ApiAccess::new(None).unwrap();
        assert!(access.permits(0, 0));
        assert!(access.permits(Uid::effective().as_raw(), 12345));
        assert!(!access.permits(65534, 65534));
        let grouped = ApiAccess::new(Some("4242")).unwrap();
        assert!(grouped.permits(65534, 4242));
        assert!(!grouped.permits(65534, 65534));
        assert!(matches!(
            ApiAccess::new(Some("no-such-group-here")),
            Err(AccessError::NoSuchGroup(_))
        ));
    }

    #[tokio::test]
    async fn the_socket_is_private_and_other_files_are_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let access = ApiAccess::new(None).unwrap();
        let listener = access.bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(matches!(access.bind(&path), Err(AccessError::InUse(_))));
        drop(listener);
        // A stale socket is replaced...
        access.bind(&path).unwrap();
        // ...a regular file is not touched.
        let file = dir.path().join("precious");
        std::fs::write(&file, "data").unwrap();
        assert!(matches!(
            access.bind(&file),
            Err(AccessError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");

        let grouped = ApiAccess::new(Some("4242")).unwrap();
        let path = dir.path().join("group.sock");
        let _listener = grouped.bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 4242));
    }
}
