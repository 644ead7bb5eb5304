//! Resolving an image's `User` (`name`, `uid`, `name:group`, `uid:gid`) through the container's
//! own `/etc/passwd` and `/etc/group`, as Docker does.

use std::path::Path;

/// Errors resolving a user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
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
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    resolve_in(&passwd, &group, user)
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
