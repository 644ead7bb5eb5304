//! Layer storage in the guest: the layer-store disk, a read-only loop device per layer extent,
//! one shared EROFS mount per layer, and each container's overlay root file system.
//!
//! Layers are reference counted: the first container that uses a layer mounts it, the last one
//! to go unmounts it (and the loop device, set to auto-clear, detaches with the mount).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use gantry_proto::LayerExtent;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// The serial the agent gives its layer-store disk.
pub const LAYER_DISK_SERIAL: &str = "gantry-layers";
/// Where layers are mounted.
const LAYERS_DIR: &str = "/run/gantry/layers";

/// Errors of layer storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No disk has the layer-store serial.
    #[error("no virtio disk with serial {LAYER_DISK_SERIAL:?} (is the layer store attached?)")]
    NoLayerDisk,
    /// The extent is not something a loop device can map.
    #[error("layer {digest}: bad extent offset {offset} length {length}: {why}")]
    BadExtent {
        /// The layer.
        digest: String,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
    let what = what.into();
    move |source| StorageError::Sys { what, source }
}

fn errno(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> StorageError {
    let what = what.into();
    move |errno| StorageError::Sys {
        what,
        source: std::io::Error::from(errno),
    }
}

/// Finds the layer-store disk by its serial under `/sys/block`.
pub fn find_layer_disk(sys_block: &Path) -> Result<PathBuf, StorageError> {
    let entries =
        std::fs::read_dir(sys_block).map_err(sys(format!("reading {}", sys_block.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let serial =
            std::fs::read_to_string(sys_block.join(&name).join("serial")).unwrap_or_default();
        if serial.trim_end_matches(['\n', '\0']) == LAYER_DISK_SERIAL {
            return Ok(PathBuf::from("/dev").join(name));
        }
    }
    Err(StorageError::NoLayerDisk)
}

// The loop device ABI from <linux/loop.h>; the libc crate does not carry it.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// The disk's logical block size from sysfs (512 when it cannot be read).
fn logical_block_size(disk: &Path) -> u32 {
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::read_to_string(format!("/sys/block/{name}/queue/logical_block_size"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|size: &u32| size.is_power_of_two() && (512..=65536).contains(size))
        .unwrap_or(512)
}

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Attaches a read-only, direct-I/O, auto-clearing loop device over `[offset, offset+length)` of
/// `disk`. Returns the open loop device: the mount holds it afterwards, so it detaches when the
/// mount goes away.
fn attach_loop(disk: &Path, extent: &LayerExtent) -> Result<(PathBuf, File), StorageError> {
    let bad = |why| StorageError::BadExtent {
        digest: extent.digest.clone(),
        offset: extent.offset,
        length: extent.length,
        why,
    };
    if extent.length == 0 {
        return Err(bad("empty"));
    }
    // Direct I/O needs logical-block alignment on the backing disk.
    if !extent.offset.is_multiple_of(512) || !extent.length.is_multiple_of(512) {
        return Err(bad("not a multiple of 512 bytes"));
    }
    extent
        .offset
        .checked_add(extent.length)
        .ok_or_else(|| bad("overflows"))?;

    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(sys("opening /dev/loop-control"))?;
    let backing = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(disk)
        .map_err(sys(format!("opening {}", disk.display())))?;
    // Another process may grab the free device between GET_FREE and CONFIGURE: retry then.
    for _ in 0..8 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(sys("LOOP_CTL_GET_FREE")(std::io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let device = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(sys(format!("opening {}", path.display())))?;
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            // Direct I/O only engages when the loop's block size is at least the disk's; with a
            // smaller one the kernel silently reads through the disk's page cache, whose
            // readahead then runs past the layer into unmapped (IOERR) space.
            block_size: logical_block_size(disk),
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: extent.offset,
                lo_sizelimit: extent.length,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO,
                lo_file_name: [0; LO_NAME_SIZE],
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; LO_KEY_SIZE],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `LoopConfig` mirrors; the
        // pointer is valid for the duration of the call.
        let result = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_CONFIGURE,
                &config as *const LoopConfig,
            )
        };
        if result == 0 {
            return Ok((path, device));
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EBUSY) {
            return Err(sys(format!("LOOP_CONFIGURE {}", path.display()))(error));
        }
    }
    Err(sys("finding a free loop device")(
        std::io::Error::from_raw_os_error(libc::EBUSY),
    ))
}

#[derive(Debug)]
struct LayerMount {
    mount_point: PathBuf,
    loop_device: PathBuf,
    users: usize,
}

/// The layers mounted in this guest, shared between containers.
#[derive(Debug, Default)]
pub struct LayerMounts {
    disk: Option<PathBuf>,
    mounts: HashMap<(String, u64), LayerMount>,
}

/// What a container holds of a layer; give it back with [`LayerMounts::release`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerRef {
    digest: String,
    offset: u64,
}

impl LayerMounts {
    /// Mounts `extent` (or shares its existing mount); returns the mount point.
    pub fn acquire(&mut self, extent: &LayerExtent) -> Result<(LayerRef, PathBuf), StorageError> {
        let key = (extent.digest.clone(), extent.offset);
        let reference = LayerRef {
            digest: extent.digest.clone(),
            offset: extent.offset,
        };
        if let Some(mount) = self.mounts.get_mut(&key) {
            mount.users += 1;
            return Ok((reference, mount.mount_point.clone()));
        }
        let disk = match &self.disk {
            Some(disk) => disk.clone(),
            None => {
                let disk = find_layer_disk(Path::new("/sys/block"))?;
                self.disk = Some(disk.clone());
                disk
            }
        };
        let (loop_device, device) = attach_loop(&disk, extent)?;
        let mount_point =
            Path::new(LAYERS_DIR).join(format!("{}-{:x}", sanitize(&extent.digest), extent.offset));
        std::fs::create_dir_all(&mount_point)
            .map_err(sys(format!("creating {}", mount_point.display())))?;
        let mounted = mount(
            Some(&loop_device),
            &mount_point,
            Some("erofs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            None::<&str>,
        );
        // The mount holds the loop device now (or, on failure, closing it auto-clears it).
        drop(device);
        mounted.map_err(errno(format!(
            "mounting layer {} ({}) as EROFS",
            extent.digest,
            loop_device.display()
        )))?;
        tracing::info!(digest = %extent.digest, loop_device = %loop_device.display(), "layer mounted");
        self.mounts.insert(
            key,
            LayerMount {
                mount_point: mount_point.clone(),
                loop_device,
                users: 1,
            },
        );
        Ok((reference, mount_point))
    }

    /// Gives a layer back; the last user unmounts it.
    pub fn release(&mut self, reference: &LayerRef) -> Result<(), StorageError> {
        let key = (reference.digest.clone(), reference.offset);
        let Some(mount) = self.mounts.get_mut(&key) else {
            return Ok(());
        };
        mount.users = mount.users.saturating_sub(1);
        if mount.users > 0 {
            return Ok(());
        }
        umount2(&mount.mount_point, MntFlags::empty())
            .map_err(errno(format!("unmounting layer {}", reference.digest)))?;
        let _ = std::fs::remove_dir(&mount.mount_point);
        tracing::info!(digest = %reference.digest, loop_device = %mount.loop_device.display(), "layer unmounted");
        self.mounts.remove(&key);
        Ok(())
    }
}

impl LayerMounts {
    /// The mounted layers and how many containers use each.
    pub fn report(&self) -> Vec<gantry_proto::LayerMountInfo> {
        let mut report: Vec<_> = self
            .mounts
            .iter()
            .map(|((digest, offset), mount)| gantry_proto::LayerMountInfo {
                digest: digest.clone(),
                offset: *offset,
                users: u32::try_from(mount.users).unwrap_or(u32::MAX),
            })
            .collect();
        report.sort_by(|a, b| (&a.digest, a.offset).cmp(&(&b.digest, b.offset)));
        report
    }
}

/// Loop devices that have a backing file, from `/sys/block/loop*/loop/backing_file`.
pub fn loop_devices_in_use(sys_block: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut in_use: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("loop"))
        .filter(|name| sys_block.join(name).join("loop/backing_file").exists())
        .map(|name| format!("/dev/{name}"))
        .collect();
    in_use.sort();
    in_use
}

/// Overlay mounts in this mount namespace.
pub fn overlay_mount_count() -> u32 {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            line.split(" - ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with("overlay "))
        })
        .count() as u32
}

/// Turns a digest (`sha256:…`) into a safe file name.
fn sanitize(digest: &str) -> String {
    digest
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(100)
        .collect()
}

/// A container's root file system: a size-limited tmpfs holding the overlay's upper and work
/// directories, and the overlay itself.
#[derive(Debug)]
pub struct Rootfs {
    base: PathBuf,
}

impl Rootfs {
    /// Mounts the overlay of `lower_dirs` (lowest first) under `base`.
    pub fn mount(
        base: &Path,
        lower_dirs: &[PathBuf],
        writable_bytes: u64,
    ) -> Result<Self, StorageError> {
        std::fs::create_dir_all(base).map_err(sys(format!("creating {}", base.display())))?;
        let size = format!("size={writable_bytes},mode=0700");
        mount(
            Some("tmpfs"),
            base,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(size.as_str()),
        )
        .map_err(errno(format!(
            "mounting the writable layer at {}",
            base.display()
        )))?;
        let rootfs = Self {
            base: base.to_owned(),
        };
        // Anything failing after the tmpfs is mounted must not leave it behind.
        if let Err(error) = rootfs.mount_overlay(lower_dirs) {
            let _ = rootfs.unmount();
            return Err(error);
        }
        Ok(rootfs)
    }

    fn mount_overlay(&self, lower_dirs: &[PathBuf]) -> Result<(), StorageError> {
        let base = &self.base;
        for dir in ["upper", "work", "rootfs"] {
            std::fs::create_dir(base.join(dir)).map_err(sys(format!("creating {dir}")))?;
        }
        // overlayfs lists lower directories top first.
        let lower: Vec<String> = lower_dirs
            .iter()
            .rev()
            .map(|dir| dir.display().to_string())
            .collect();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            base.join("upper").display(),
            base.join("work").display()
        );
        mount(
            Some("overlay"),
            &self.path(),
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(errno("mounting the overlay root file system"))?;
        Ok(())
    }

    /// The merged root file system.
    pub fn path(&self) -> PathBuf {
        self.base.join("rootfs")
    }

    /// Unmounts the overlay and the writable layer; what was written is gone.
    pub fn unmount(&self) -> Result<(), StorageError> {
        let rootfs = self.path();
        if is_mount_point(&rootfs) {
            umount2(&rootfs, MntFlags::MNT_DETACH).map_err(errno("unmounting the overlay"))?;
        }
        if is_mount_point(&self.base) {
            umount2(&self.base, MntFlags::MNT_DETACH)
                .map_err(errno("unmounting the writable layer"))?;
        }
        let _ = std::fs::remove_dir(&self.base);
        Ok(())
    }
}

/// Whether `path` is listed as a mount point in `/proc/self/mountinfo`.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.display().to_string();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| mount_point == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_disk_by_serial() {
        let sys_block = tempfile_dir();
        for (name, serial) in [("vda", "other\n"), ("vdb", "gantry-layers\n")] {
            std::fs::create_dir_all(sys_block.join(name)).unwrap();
            std::fs::write(sys_block.join(name).join("serial"), serial).unwrap();
        }
        std::fs::create_dir_all(sys_block.join("loop0")).unwrap();
        assert_eq!(
            find_layer_disk(&sys_block).unwrap(),
            PathBuf::from("/dev/vdb")
        );
        std::fs::write(sys_block.join("vdb/serial"), "nope").unwrap();
        assert!(matches!(
            find_layer_disk(&sys_block),
            Err(StorageError::NoLayerDisk)
        ));
        std::fs::remove_dir_all(sys_block).unwrap();
    }

    #[test]
    fn misaligned_and_empty_extents_are_refused_before_any_system_call() {
        for (offset, length) in [(0, 0), (1, 512), (512, 100), (u64::MAX - 511, 1024)] {
            let extent = LayerExtent {
                digest: "d".into(),
                offset,
                length,
            };
            assert!(
                matches!(
                    attach_loop(Path::new("/nonexistent"), &extent),
                    Err(StorageError::BadExtent { .. })
                ),
                "{offset} {length}"
            );
        }
    }

    #[test]
    fn digests_become_safe_names() {
        assert_eq!(sanitize("sha256:ab/../c"), "sha256-ab----c");
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-shim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
