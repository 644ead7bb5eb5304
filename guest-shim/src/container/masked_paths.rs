//! Docker's masked and read-only paths of `/proc` and `/sys`.
//!
//! Containers share the guest's kernel and run as root without a user namespace, so the
//! container's procfs is the real one: without these mounts, container root can write
//! `/proc/sys/kernel/core_pattern` (run a program as guest root on the next crash) or
//! `/proc/sysrq-trigger` (reboot or crash the guest), and read `/proc/kcore` or `/proc/keys`.
//! The lists are moby's `oci/defaults.go` (`MaskedPaths`, `ReadonlyPaths`); runc applies them the
//! same way: `/dev/null` bound over files, an empty read-only tmpfs over directories, and a
//! read-only bind of each read-only path onto itself. The container keeps no `CAP_SYS_ADMIN`, so it
//! cannot unmount any of them.

use std::path::Path;

use nix::mount::{MsFlags, mount};

/// Hidden entirely (moby's `MaskedPaths`, plus `/sys/devices/virtual/powercap`, masked by
/// newer Docker releases against the RAPL energy side channel, CVE-2020-8694).
pub const MASKED: &[&str] = &[
    "proc/asound",
    "proc/acpi",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

/// Visible but read-only (moby's `ReadonlyPaths`).
pub const READ_ONLY: &[&str] = &[
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// Errors masking a path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {errno}")]
pub struct MaskError {
    action: &'static str,
    path: String,
    errno: nix::errno::Errno,
}

/// Applies both lists under `root` (the container's root before `pivot_root`, with its `/proc`
/// and `/sys` mounted). Paths this kernel does not have are skipped, as runc does.
pub fn apply(root: &Path) -> Result<(), MaskError> {
    for relative in MASKED {
        let path = root.join(relative);
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let fail = |errno| MaskError {
            action: "masking",
            path: format!("/{relative}"),
            errno,
        };
        if metadata.is_dir() {
            mount(
                Some("tmpfs"),
                &path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0,mode=0555"),
            )
            .map_err(fail)?;
        } else {
            // Before pivot_root, "/dev/null" is the guest's own node: a bind of it reads as empty
            // and swallows writes, whatever the container later does to its own /dev.
            mount(
                Some("/dev/null"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(fail)?;
        }
    }
    for relative in READ_ONLY {
        let path = root.join(relative);
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        let fail = |errno| MaskError {
            action: "making read-only",
            path: format!("/{relative}"),
            errno,
        };
        mount(
            Some(&path),
            &path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(fail)?;
        // A bind mount takes MS_RDONLY only on a remount; keep proc's nosuid/nodev/noexec.
        mount(
            None::<&str>,
            &path,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(fail)?;
    }
    Ok(())
}
