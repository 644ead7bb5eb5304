//! Layer storage in the guest: the layer-store disk, a read-only loop device per layer extent,
//! one shared EROFS mount per layer, and each container's overlay root file system.
//!
//! Layers are reference counted: the first container that uses a layer mounts it; when the last
//! one goes it stays mounted, idle, for the next start, up to [`IDLE_LAYER_MOUNTS_KEPT`] idle
//! layers, the least recently released unmounted first (the loop device, set to auto-clear,
//! detaches with the mount).
//!
//! Deep images: `mount(2)` takes at most one page of options, and an overlay names every lower
//! directory in one `lowerdir=` option. So each layer is mounted under a short name (a small hex
//! slot number, `/run/gantry/layers/1f`), and the overlay names its lower directories relative to
//! that directory, from a thread whose working directory is there (see [`Rootfs::mount`]): the
//! stack is then limited by overlayfs (500 lower layers), not by the length of paths.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use gantry_proto::LayerExtent;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// The serial the agent gives its layer-store disk.
pub const LAYER_DISK_SERIAL: &str = "gantry-layers";
/// Where layers are mounted, each under its slot number in hex.
const LAYERS_DIR: &str = "/run/gantry/layers";
/// The most lower layers one overlay takes: `OVL_MAX_STACK` (fs/overlayfs/super.c in the guest's
/// Linux 6.1; the same 500 in later kernels).
pub const OVERLAY_MAX_LOWER_LAYERS: usize = 500;

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
    /// A lower directory's path cannot be written in overlayfs's `lowerdir=` option.
    #[error("lower directory {0:?} has a ':', ',', '\\' or newline, or no name")]
    BadLowerDir(PathBuf),
    /// The overlay's mount options do not fit the page the kernel copies them into.
    #[error(
        "the overlay's mount options for {layers} layers take {len} bytes, more than the kernel's \
         {max}"
    )]
    OptionsTooLong {
        /// How many lower layers.
        layers: usize,
        /// The options' length.
        len: usize,
        /// The most the kernel takes.
        max: usize,
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

/// Layers no container uses any more stay mounted for the next start, at most
/// [`IDLE_LAYER_MOUNTS_KEPT`] (the least recently released go first): a warm start then finds its
/// layers mounted and their pages cached, instead of rereading them cold through loop and
/// virtio-blk. Safe because the agent keeps a VM's layers mapped and never maps another layer at
/// an offset once used, so a kept mount never sees other bytes.
pub use gantry_proto::IDLE_LAYER_MOUNTS_KEPT;

#[derive(Debug)]
struct LayerMount {
    /// Names the mount point (`LAYERS_DIR/<slot in hex>`); the smallest free one is taken, so
    /// names stay short however long the guest runs.
    slot: u32,
    mount_point: PathBuf,
    loop_device: PathBuf,
    users: usize,
    /// When its last user gave it back (a release count), while no container uses it.
    idle_since: Option<u64>,
}

/// The layers mounted in this guest, shared between containers.
#[derive(Debug, Default)]
pub struct LayerMounts {
    disk: Option<PathBuf>,
    mounts: HashMap<(String, u64), LayerMount>,
    /// Counts releases: orders idle mounts from least to most recently released.
    releases: u64,
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
            mount.idle_since = None;
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
        let slot = self.free_slot();
        let mount_point = Path::new(LAYERS_DIR).join(format!("{slot:x}"));
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
        tracing::info!(
            digest = %extent.digest,
            loop_device = %loop_device.display(),
            mount_point = %mount_point.display(),
            "layer mounted"
        );
        self.mounts.insert(
            key,
            LayerMount {
                slot,
                mount_point: mount_point.clone(),
                loop_device,
                users: 1,
                idle_since: None,
            },
        );
        Ok((reference, mount_point))
    }

    /// The smallest slot no mounted layer uses.
    fn free_slot(&self) -> u32 {
        let used: HashSet<u32> = self.mounts.values().map(|mount| mount.slot).collect();
        (0..).find(|slot| !used.contains(slot)).unwrap_or(u32::MAX)
    }

    /// Gives a layer back. Without users it stays mounted, idle, unless more than
    /// [`IDLE_LAYER_MOUNTS_KEPT`] are: then the least recently released idle ones are unmounted.
    pub fn release(&mut self, reference: &LayerRef) -> Result<(), StorageError> {
        let key = (reference.digest.clone(), reference.offset);
        let Some(mount) = self.mounts.get_mut(&key) else {
            return Ok(());
        };
        mount.users = mount.users.saturating_sub(1);
        if mount.users > 0 {
            return Ok(());
        }
        self.releases += 1;
        mount.idle_since = Some(self.releases);
        self.unmount_idle_beyond(IDLE_LAYER_MOUNTS_KEPT)
    }

    /// Unmounts idle layers, least recently released first, until at most `kept` are left.
    fn unmount_idle_beyond(&mut self, kept: usize) -> Result<(), StorageError> {
        let mut idle: Vec<(u64, (String, u64))> = self
            .mounts
            .iter()
            .filter_map(|(key, mount)| Some((mount.idle_since?, key.clone())))
            .collect();
        idle.sort_unstable();
        let excess = idle.len().saturating_sub(kept);
        for (_, key) in idle.into_iter().take(excess) {
            let Some(mount) = self.mounts.get(&key) else {
                continue;
            };
            umount2(&mount.mount_point, MntFlags::empty())
                .map_err(errno(format!("unmounting layer {}", key.0)))?;
            let _ = std::fs::remove_dir(&mount.mount_point);
            tracing::info!(digest = %key.0, loop_device = %mount.loop_device.display(), "layer unmounted");
            self.mounts.remove(&key);
        }
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

/// A container's root file system: a size-limited tmpfs holding the overlay's upper and work
/// directories, and the overlay itself.
#[derive(Debug)]
pub struct Rootfs {
    base: PathBuf,
}

impl Rootfs {
    /// Mounts the overlay of `lower_dirs` (lowest first) under `base`. Lower directories that
    /// share a parent (the layer mounts do) are named relative to it: see [`LowerDirs`].
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
        let lower = LowerDirs::new(lower_dirs)?;
        let options = overlay_options(
            &lower.option,
            &base.join("upper"),
            &base.join("work"),
            lower_dirs.len(),
        )?;
        let target = self.path();
        let mount_it = || {
            mount(
                Some("overlay"),
                &target,
                Some("overlay"),
                MsFlags::empty(),
                Some(options.as_str()),
            )
            .map_err(errno(format!(
                "mounting the overlay root file system ({} layers)",
                lower_dirs.len()
            )))
        };
        match &lower.relative_to {
            Some(dir) => in_directory(dir, mount_it),
            None => mount_it(),
        }
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

/// The `lowerdir=` value of an overlay, and the directory its names are relative to.
///
/// Why relative names, from a thread of its own: `mount(2)` copies at most one page of options
/// (`copy_mount_options` in fs/namespace.c, NUL-terminated at `PAGE_SIZE - 1`), so absolute
/// layer paths of ~100 bytes capped images at ~40 layers, and even short absolute ones
/// (`/run/gantry/layers/1f3:`, 23 bytes) would stop at ~170. Linux 6.8's `fsconfig(2)`
/// `lowerdir+` (one layer per call) is not in the guest's 6.1 kernel, whose overlayfs still takes
/// its options as one legacy string capped at a page; stacking overlays of overlays is capped at
/// `FILESYSTEM_MAX_STACK_DEPTH` (2) and complicates whiteouts. So, as runc and containerd do, the
/// overlay names its layers relative to their common directory — with hex slot names, 500 layers
/// take ~2 KiB — and the kernel resolves them from the mounting task's working directory.
#[derive(Debug, PartialEq, Eq)]
struct LowerDirs {
    /// Colon-separated, top layer first (overlayfs's order).
    option: String,
    /// The working directory the names need (`None`: they are absolute).
    relative_to: Option<PathBuf>,
}

impl LowerDirs {
    /// `lower_dirs` is lowest first. When they all share a parent, they are named relative to
    /// it; otherwise by their absolute paths.
    fn new(lower_dirs: &[PathBuf]) -> Result<Self, StorageError> {
        let parent = lower_dirs.first().and_then(|dir| dir.parent());
        let common = parent.filter(|parent| {
            lower_dirs
                .iter()
                .all(|dir| dir.parent() == Some(*parent) && dir.file_name().is_some())
        });
        let mut names = Vec::with_capacity(lower_dirs.len());
        for dir in lower_dirs.iter().rev() {
            let name = match common {
                Some(_) => dir.file_name().map(Path::new).unwrap_or(dir),
                None => dir.as_path(),
            };
            let text = name
                .to_str()
                .filter(|text| !text.is_empty() && !text.contains([':', ',', '\\', '\n']))
                .ok_or_else(|| StorageError::BadLowerDir(dir.clone()))?;
            names.push(text);
        }
        Ok(Self {
            option: names.join(":"),
            relative_to: common.map(Path::to_path_buf),
        })
    }
}

/// The longest mount options the kernel takes: one page, less its terminating NUL.
fn max_mount_options_len() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| usize::try_from(size).ok())
        .unwrap_or(4096)
        .saturating_sub(1)
}

/// The overlay's mount options, refused (rather than cut short by the kernel, which then fails
/// with a misleading `EINVAL` or `ENOENT`) when they do not fit.
fn overlay_options(
    lowerdir: &str,
    upper: &Path,
    work: &Path,
    layers: usize,
) -> Result<String, StorageError> {
    let options = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let max = max_mount_options_len();
    if options.len() > max {
        return Err(StorageError::OptionsTooLong {
            layers,
            len: options.len(),
            max,
        });
    }
    Ok(options)
}

/// Runs `work` in a new thread whose working directory is `dir`, leaving the shim's alone.
///
/// The working directory belongs to the process (threads share one `fs_struct`), and the shim is a
/// multi-threaded tokio process, so it must not `chdir`. Nor does it fork a helper: its reaper
/// `waitpid(-1)`s every child. The thread instead `unshare(CLONE_FS)`s, which gives it a working
/// directory of its own (the mount namespace stays shared), and ends when `work` is done.
fn in_directory<T: Send>(
    dir: &Path,
    work: impl FnOnce() -> Result<T, StorageError> + Send,
) -> Result<T, StorageError> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("gantry-mount".into())
            .spawn_scoped(scope, || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                    .map_err(errno("unsharing the mounting thread's working directory"))?;
                nix::unistd::chdir(dir).map_err(errno(format!("entering {}", dir.display())))?;
                work()
            })
            .map_err(sys("starting the mounting thread"))?;
        thread.join().unwrap_or_else(|_| {
            Err(sys("the mounting thread")(std::io::Error::other(
                "it panicked",
            )))
        })
    })
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
    fn lower_dirs_are_named_relative_to_their_common_directory_top_first() {
        let layers = Path::new(LAYERS_DIR);
        let dirs: Vec<PathBuf> = ["0", "1", "a"].iter().map(|n| layers.join(n)).collect();
        assert_eq!(
            LowerDirs::new(&dirs).unwrap(),
            LowerDirs {
                option: "a:1:0".into(),
                relative_to: Some(layers.to_owned()),
            }
        );
        let mixed = vec![PathBuf::from("/x/low"), PathBuf::from("/y/high")];
        assert_eq!(
            LowerDirs::new(&mixed).unwrap(),
            LowerDirs {
                option: "/y/high:/x/low".into(),
                relative_to: None,
            }
        );
        for bad in ["a:b", "a,b", "a\\b", "a\nb"] {
            assert!(
                matches!(
                    LowerDirs::new(&[layers.join(bad)]),
                    Err(StorageError::BadLowerDir(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn five_hundred_layers_fit_the_kernels_options_page_and_too_long_options_are_refused() {
        // The worst case the shim meets: overlayfs's 500 layers, slot names of 4 hex digits
        // (4096 or more layers mounted in the guest) and the longest container id.
        let base = Path::new("/run/gantry/containers").join("x".repeat(128));
        let dirs: Vec<PathBuf> = (0x1000..0x1000 + OVERLAY_MAX_LOWER_LAYERS)
            .map(|slot| Path::new(LAYERS_DIR).join(format!("{slot:x}")))
            .collect();
        let lower = LowerDirs::new(&dirs).unwrap();
        let options =
            overlay_options(&lower.option, &base.join("upper"), &base.join("work"), 500).unwrap();
        assert!(options.len() < 4096, "{}", options.len());
        // Absolute names: what capped images at ~40 layers.
        let absolute: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        assert!(matches!(
            overlay_options(&absolute.join(":"), &base, &base, 500),
            Err(StorageError::OptionsTooLong { layers: 500, .. })
        ));
    }

    #[test]
    fn free_slots_are_reused_smallest_first() {
        let mut layers = LayerMounts::default();
        assert_eq!(layers.free_slot(), 0);
        for slot in [0, 1, 3] {
            layers.mounts.insert(
                (format!("sha256:{slot}"), u64::from(slot) << 20),
                LayerMount {
                    slot,
                    mount_point: Path::new(LAYERS_DIR).join(format!("{slot:x}")),
                    loop_device: PathBuf::from("/dev/loop0"),
                    users: 1,
                    idle_since: None,
                },
            );
        }
        assert_eq!(layers.free_slot(), 2);
    }

    /// Idle layers stay mounted up to the bound, the least recently released unmounted first,
    /// and a kept one is used again. tmpfs mounts stand in for the layers' EROFS mounts.
    #[test]
    fn released_layers_stay_mounted_up_to_the_bound_oldest_unmounted_first() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut layers = LayerMounts::default();
        let count = IDLE_LAYER_MOUNTS_KEPT + 2;
        let extent = |slot: usize| LayerRef {
            digest: format!("sha256:{slot}"),
            offset: (slot as u64) << 20,
        };
        let is_mounted = |path: &Path| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .any(|line| line.split(' ').nth(4) == Some(path.to_str().unwrap()))
        };
        for slot in 0..count {
            let mount_point = dir.path().join(slot.to_string());
            std::fs::create_dir(&mount_point).unwrap();
            mount(
                Some("tmpfs"),
                &mount_point,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            let reference = extent(slot);
            layers.mounts.insert(
                (reference.digest.clone(), reference.offset),
                LayerMount {
                    slot: slot as u32,
                    mount_point,
                    loop_device: PathBuf::from("/dev/loop0"),
                    users: 1,
                    idle_since: None,
                },
            );
        }
        for slot in 0..count {
            layers.release(&extent(slot)).unwrap();
        }
        // The two released first are gone; the rest stay, idle.
        for slot in 0..count {
            let mounted = is_mounted(&dir.path().join(slot.to_string()));
            assert_eq!(mounted, slot >= 2, "slot {slot}");
        }
        assert_eq!(layers.report().len(), IDLE_LAYER_MOUNTS_KEPT);
        assert!(layers.report().iter().all(|mount| mount.users == 0));
        // Slot 2 is used again (not idle any more), so one more release unmounts slot 3.
        let key = (extent(2).digest, extent(2).offset);
        layers.mounts.get_mut(&key).unwrap().users = 1;
        layers.mounts.get_mut(&key).unwrap().idle_since = None;
        layers.releases += 1;
        layers
            .mounts
            .get_mut(&(extent(4).digest, extent(4).offset))
            .unwrap()
            .idle_since = Some(layers.releases);
        layers
            .unmount_idle_beyond(IDLE_LAYER_MOUNTS_KEPT - 2)
            .unwrap();
        assert!(
            is_mounted(&dir.path().join("2")),
            "a used layer is never unmounted"
        );
        assert!(
            !is_mounted(&dir.path().join("3")),
            "the oldest idle one goes"
        );
        assert!(
            is_mounted(&dir.path().join("4")),
            "a re-released one is young again"
        );
        layers.unmount_idle_beyond(0).unwrap();
        assert!(is_mounted(&dir.path().join("2")));
        umount2(&dir.path().join("2"), MntFlags::empty()).unwrap();
    }

    /// The real thing on the host kernel: an overlay of overlayfs's 500 lower directories, with a
    /// whiteout and an opaque directory in the top one hiding what the bottom one has.
    #[test]
    fn an_overlay_of_five_hundred_layers_mounts_with_whiteouts_and_leaves_the_cwd_alone() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: mounting needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("gantry-shim-deep-{}", std::process::id()));
        let layers = dir.join("layers");
        std::fs::create_dir_all(&layers).unwrap();
        mount(
            Some("tmpfs"),
            &layers,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=64m"),
        )
        .unwrap();
        let count = OVERLAY_MAX_LOWER_LAYERS;
        let mut lower_dirs = Vec::new();
        for slot in 0..count {
            let layer = layers.join(format!("{slot:x}"));
            std::fs::create_dir_all(layer.join("files")).unwrap();
            std::fs::write(
                layer.join(format!("files/f{slot}")),
                format!("layer {slot}"),
            )
            .unwrap();
            lower_dirs.push(layer);
        }
        let (bottom, top) = (&lower_dirs[0], &lower_dirs[count - 1]);
        std::fs::write(bottom.join("files/gone"), "old").unwrap();
        std::fs::create_dir(bottom.join("hidden")).unwrap();
        std::fs::write(bottom.join("hidden/low"), "low").unwrap();
        nix::sys::stat::mknod(
            &top.join("files/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(0, 0),
        )
        .unwrap();
        std::fs::create_dir(top.join("hidden")).unwrap();
        std::fs::write(top.join("hidden/high"), "high").unwrap();
        let opaque =
            std::ffi::CString::new(top.join("hidden").into_os_string().into_encoded_bytes())
                .unwrap();
        // SAFETY: the path and attribute name are NUL-terminated strings and the value pointer is
        // valid for the given length during the call.
        let set = unsafe {
            libc::lsetxattr(
                opaque.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());

        let cwd = std::env::current_dir().unwrap();
        let result = Rootfs::mount(&dir.join("root"), &lower_dirs, 1 << 20);
        assert_eq!(std::env::current_dir().unwrap(), cwd);
        let rootfs = result.unwrap();
        let root = rootfs.path();
        let mut files: Vec<String> = std::fs::read_dir(root.join("files"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files.len(), count, "{files:?}");
        assert!(!files.contains(&"gone".to_owned()));
        for slot in [0, 1, count / 2, count - 1] {
            assert_eq!(
                std::fs::read_to_string(root.join(format!("files/f{slot}"))).unwrap(),
                format!("layer {slot}")
            );
        }
        let hidden: Vec<_> = std::fs::read_dir(root.join("hidden"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(hidden, ["high"]);
        rootfs.unmount().unwrap();
        umount2(&layers, MntFlags::MNT_DETACH).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-shim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
