//! The cgroup v2 device filter: a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to each
//! container's cgroup, the v2 counterpart of v1's `devices.allow`/`devices.deny`.
//!
//! Every guest's containers share one kernel with the layer-store disk (serial `gantry-layers`)
//! and the loop devices that map each layer: a container that could open a block device could
//! read every layer mapped into the VM, its neighbours' included. `CAP_MKNOD` is dropped (see
//! `nsinit::DEFAULT_CAPABILITIES`) and the container's `/dev` holds only character devices, but a
//! device node can also come from an image layer (EROFS stores them) — this filter is what makes
//! such a node useless. It allows only the devices runc and Docker give every container and
//! denies everything else, block devices entirely, for open (read or write) and `mknod` alike.
//!
//! The program is built here, as runc's `devicefilter` builds it, instead of being compiled from C:
//! it is a dozen instructions and the kernel verifies it on load.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Character devices a container may create, read and write: (major, minor, `None` = any minor).
/// null, zero, full, random, urandom, tty, console, ptmx, the pts slaves, and /dev/net/tun.
pub const ALLOWED_CHAR_DEVICES: &[(u32, Option<u32>)] = &[
    (1, Some(3)),
    (1, Some(5)),
    (1, Some(7)),
    (1, Some(8)),
    (1, Some(9)),
    (5, Some(0)),
    (5, Some(1)),
    (5, Some(2)),
    (136, None),
    (10, Some(200)),
];

/// Errors loading or attaching the filter.
#[derive(Debug, thiserror::Error)]
pub enum DeviceFilterError {
    /// `bpf(BPF_PROG_LOAD)` failed.
    #[error("loading the cgroup device filter: {source} (verifier: {log})")]
    Load {
        /// Why.
        source: std::io::Error,
        /// The verifier's log, if it said anything.
        log: String,
    },
    /// Opening the cgroup or `bpf(BPF_PROG_ATTACH)` failed.
    #[error("attaching the device filter to {path}: {source}")]
    Attach {
        /// The cgroup directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

// From linux/bpf.h.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// `bpf_cgroup_dev_ctx.access_type`'s low half: the device type.
const BPF_DEVCG_DEV_CHAR: i32 = 2;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes (BPF_CLASS | BPF_SIZE/OP | BPF_MODE/SRC).
/// `dst = *(u32 *)(src + off)`
const LDX_W: u8 = 0x61;
/// `dst &= imm` (64-bit)
const AND_K: u8 = 0x57;
/// `dst = imm` (64-bit)
const MOV_K: u8 = 0xb7;
/// `if dst != imm goto pc + off`
const JNE_K: u8 = 0x55;
const EXIT: u8 = 0x95;

/// Builds the program: `r1` is a `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major;
/// u32 minor; }`; return 1 allows, 0 denies.
fn program(allowed: &[(u32, Option<u32>)]) -> Vec<Insn> {
    let mut code = vec![
        insn(LDX_W, 2, 1, 0, 0),      // r2 = access_type
        insn(AND_K, 2, 0, 0, 0xffff), // r2 = device type
        insn(LDX_W, 4, 1, 4, 0),      // r4 = major
        insn(LDX_W, 5, 1, 8, 0),      // r5 = minor
    ];
    // Rules only ever allow character devices: anything else goes straight to the denial,
    // whose offset is patched once its position is known.
    let type_check = code.len();
    code.push(insn(JNE_K, 2, 0, 0, BPF_DEVCG_DEV_CHAR));
    for &(major, minor) in allowed {
        // Each rule: compare major (and minor), then allow; a mismatch skips to the next rule.
        let body = if minor.is_some() { 4 } else { 3 };
        code.push(insn(JNE_K, 4, 0, body - 1, major as i32));
        if let Some(minor) = minor {
            code.push(insn(JNE_K, 5, 0, 2, minor as i32));
        }
        code.push(insn(MOV_K, 0, 0, 0, 1));
        code.push(insn(EXIT, 0, 0, 0, 0));
    }
    let deny = code.len();
    code[type_check].off = (deny - type_check - 1) as i16;
    code.push(insn(MOV_K, 0, 0, 0, 0));
    code.push(insn(EXIT, 0, 0, 0, 0));
    // The access bits (access_type >> 16: mknod 1, read 2, write 4) are not looked at: every
    // allowed device gets all three, as in Docker.
    code
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`; the kernel zero-fills
/// the rest of its own copy.
#[repr(C)]
#[derive(Debug, Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Debug, Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

fn load(program: &[Insn]) -> Result<OwnedFd, DeviceFilterError> {
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 16 * 1024];
    let mut name = [0u8; 16];
    name[..14].copy_from_slice(b"gantry_devices");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for BPF_PROG_LOAD whose pointers
    // (instructions, license, log buffer with its size) outlive the call; the kernel reads the
    // first `size_of` bytes and writes at most `log_size` bytes of log.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let source = std::io::Error::last_os_error();
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        return Err(DeviceFilterError::Load {
            source,
            log: String::from_utf8_lossy(&log[..end]).trim().to_owned(),
        });
    }
    // SAFETY: the kernel returned a new program descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads the filter and attaches it to the cgroup directory `cgroup`, before any process joins
/// it. The attachment keeps the program alive; it goes away with the cgroup. Attached without
/// `BPF_F_ALLOW_OVERRIDE`/`MULTI`, so no sub-cgroup can replace it.
pub fn attach(cgroup: &Path) -> Result<(), DeviceFilterError> {
    let attach_error = |source| DeviceFilterError::Attach {
        path: cgroup.display().to_string(),
        source,
    };
    let program = load(&program(ALLOWED_CHAR_DEVICES))?;
    let directory = std::fs::File::open(cgroup).map_err(attach_error)?;
    let attr = ProgAttachAttr {
        target_fd: directory.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: 0,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for BPF_PROG_ATTACH naming two
    // descriptors we hold open for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if rc < 0 {
        return Err(attach_error(std::io::Error::last_os_error()));
    }
    tracing::debug!(cgroup = %cgroup.display(), "device filter attached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::path::PathBuf;
    use std::process::Command;

    use super::*;

    /// Where cgroup2 is mounted on this machine (the unified hierarchy, possibly hybrid).
    fn cgroup2_mount() -> PathBuf {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        mounts
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
            })
            .expect("a cgroup2 mount (the test needs the unified hierarchy)")
    }

    #[test]
    fn the_program_denies_by_default_and_jumps_stay_in_bounds() {
        let code = program(ALLOWED_CHAR_DEVICES);
        assert_eq!(code.last().unwrap().code, EXIT);
        for (at, insn) in code.iter().enumerate() {
            if insn.code == JNE_K {
                let target = at as i64 + 1 + i64::from(insn.off);
                assert!(target > at as i64 && (target as usize) < code.len(), "{at}");
            }
        }
    }

    #[test]
    fn block_devices_are_refused_and_allowed_char_devices_open() {
        // A cgroup of our own on the machine's cgroup2, the filter attached, and a shell in it
        // that opens device nodes made outside the cgroup (we are root, mknod is not the test).
        let cgroup = cgroup2_mount().join(format!("gantry-devfilter-{}", std::process::id()));
        std::fs::create_dir(&cgroup).unwrap();
        attach(&cgroup).unwrap();
        let nodes = tempfile::tempdir().unwrap();
        let block = nodes.path().join("loop0");
        let char_null = nodes.path().join("null");
        let char_mem = nodes.path().join("mem");
        use nix::sys::stat::{Mode, SFlag, makedev, mknod};
        mknod(
            &block,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            makedev(7, 0),
        )
        .unwrap();
        mknod(
            &char_null,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .unwrap();
        mknod(
            &char_mem,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(1, 1),
        )
        .unwrap();
        let procs = cgroup.join("cgroup.procs");
        let run = |script: &str| {
            let procs = procs.clone();
            let mut command = Command::new("/bin/sh");
            command.args(["-c", script]).current_dir(nodes.path());
            // SAFETY: the closure only writes the child's pid to a file (open/write/close,
            // through std, which allocates the path before the fork).
            unsafe {
                let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).unwrap();
                command.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if rc < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let output = command.output().unwrap();
            (
                output.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        };
        let null = run("echo x > ./null");
        let loop_device = run("head -c 1 ./loop0");
        let mem = run("head -c 1 ./mem");
        let mknod_block = run("mknod ./vda b 254 0");
        let _ = std::fs::remove_dir(&cgroup);
        assert_eq!(null.0, 0, "/dev/null is allowed: {}", null.1);
        assert_ne!(loop_device.0, 0);
        assert!(
            loop_device.1.contains("Operation not permitted"),
            "{}",
            loop_device.1
        );
        assert_ne!(mem.0, 0, "/dev/mem (1:1) is not in the list");
        assert!(mem.1.contains("Operation not permitted"), "{}", mem.1);
        assert_ne!(
            mknod_block.0, 0,
            "mknod of a block device is refused even to root"
        );
        assert!(
            mknod_block.1.contains("Operation not permitted"),
            "{}",
            mknod_block.1
        );
    }
}
