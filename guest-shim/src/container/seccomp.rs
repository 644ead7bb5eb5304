//! Docker's default seccomp profile, built with `seccompiler` and installed as the last step
//! before a container process execs.
//!
//! The policy is moby's `profiles/seccomp/default.json` for x86_64, resolved for Gantry's fixed
//! capability set (Docker's default minus `CAP_MKNOD`, see `nsinit::DEFAULT_CAPABILITIES`): a
//! syscall not allowed returns `EPERM` (Docker's `defaultErrnoRet: 1`), never a kill, so programs
//! that probe for a syscall fall back as they do under Docker.
//!
//! Argument-conditional rules, as Docker has them:
//! - `clone` only without namespace flags (`flags & 0x7E020000 == 0`); `clone3` returns `ENOSYS`
//!   (not `EPERM`), so libc falls back to `clone`, whose flags a filter can inspect (`clone3`
//!   passes them in memory, out of BPF's reach);
//! - `personality` only for the five personas Docker allows (`PER_LINUX`, `PER_LINUX32`,
//!   `UNAME26`, both, and the `0xffffffff` query);
//! - `socket` for every family except `AF_ALG` (38) and `AF_VSOCK` (40): vsock is the guest's
//!   control channel to the agent, which a container has no business speaking on.
//!
//! Cap-gated groups follow the capability set: `chroot` is allowed (`CAP_SYS_CHROOT`); the
//! `CAP_SYS_ADMIN` group (`mount`, `umount2`, `unshare`, `setns`, `bpf`, `fsopen`, …),
//! `reboot`, module loading, `kexec_*`, `acct`, `swapon`, clock setting, `iopl`/`ioperm`,
//! `kcmp`/`pidfd_getfd`/`process_madvise`, the NUMA policy calls, `syslog`, `perf_event_open`,
//! `open_by_handle_at`, `vhangup` and the key management calls (`add_key`, `keyctl`,
//! `request_key`) are not in the allowlist and so return `EPERM`. `ptrace` and
//! `process_vm_{readv,writev}` are allowed, as Docker does on kernels ≥ 4.8.
//!
//! Left out of Docker's profile, and why:
//! - The 32-bit ABIs. Docker's profile also lists `SCMP_ARCH_X86` and `SCMP_ARCH_X32` and applies
//!   the same names to them. This filter checks `AUDIT_ARCH_X86_64` only, and `seccompiler`'s
//!   architecture check kills a process that enters the kernel through another ABI (`int 0x80`),
//!   which is stricter than Docker: i386 binaries do not run in Gantry containers. x32 calls
//!   (numbers with bit 30 set) match no allowed number and get `EPERM`.
//! - Names that do not exist on x86_64 (`chown32`, `_llseek`, `socketcall`, `*_time64`, …) and
//!   the other architectures' groups (arm, s390, ppc64le, riscv64): nothing to allow.
//! - The `minKernel`/`includes.caps` machinery itself: the capability set is fixed, so the
//!   profile is resolved here once instead of per container.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the seccomp policy is written for x86_64 (the guest's architecture)");

/// Errors building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The policy did not compile (a bug in the policy).
    #[error("building the seccomp filter: {0}")]
    Build(BackendError),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter: {0}")]
    Install(seccompiler::Error),
}

/// `clone` flags that create namespaces (`CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER |
/// NEWPID | NEWNET`), Docker's mask.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
/// `personality` values Docker allows.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];
const AF_ALG: u64 = 38;
const AF_VSOCK: u64 = 40;

/// x86_64 numbers of allowed syscalls that the `libc` crate has no constant for yet. On the
/// guest's 6.1 kernel most of them do not exist: allowing them lets the kernel answer `ENOSYS`,
/// which is what libc's fallbacks expect, instead of `EPERM`.
const NEWER_SYSCALLS: &[i64] = &[
    333, // io_pgetevents
    335, // uretprobe
    451, // cachestat
    453, // map_shadow_stack
    454, // futex_wake
    455, // futex_wait
    456, // futex_requeue
    457, // statmount
    458, // listmount
    463, // setxattrat
    464, // getxattrat
    465, // listxattrat
    466, // removexattrat
];

/// Docker's unconditional allowlist for x86_64 (its first `SCMP_ACT_ALLOW` group, the names
/// that exist on x86_64), plus `arch_prctl`, `modify_ldt` (its amd64 groups), `chroot`
/// (`CAP_SYS_CHROOT`) and `ptrace`/`process_vm_*` (`minKernel` 4.8).
const ALLOWED: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_access,
    libc::SYS_adjtimex,
    libc::SYS_alarm,
    libc::SYS_arch_prctl,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_chroot,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_creat,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_ctl_old,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_wait_old,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fanotify_mark,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fork,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_futimesat,
    libc::SYS_get_robust_list,
    libc::SYS_get_thread_area,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpgrp,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_io_cancel,
    libc::SYS_io_destroy,
    libc::SYS_io_getevents,
    libc::SYS_io_setup,
    libc::SYS_io_submit,
    libc::SYS_ioctl,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_kill,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self,
    libc::SYS_lchown,
    libc::SYS_lgetxattr,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_lstat,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_memfd_secret,
    libc::SYS_mincore,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mlockall,
    libc::SYS_mmap,
    libc::SYS_modify_ldt,
    libc::SYS_mprotect,
    libc::SYS_mq_getsetattr,
    libc::SYS_mq_notify,
    libc::SYS_mq_open,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_unlink,
    libc::SYS_mremap,
    libc::SYS_mseal,
    libc::SYS_msgctl,
    libc::SYS_msgget,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munlockall,
    libc::SYS_munmap,
    libc::SYS_name_to_handle_at,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pause,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_process_mrelease,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pselect6,
    libc::SYS_ptrace,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_remap_file_pages,
    libc::SYS_removexattr,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rmdir,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_select,
    libc::SYS_semctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_set_thread_area,
    libc::SYS_set_tid_address,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_setrlimit,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_setuid,
    libc::SYS_setxattr,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_shmdt,
    libc::SYS_shmget,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    libc::SYS_socketpair,
    libc::SYS_splice,
    libc::SYS_stat,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_time,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_utime,
    libc::SYS_utimensat,
    libc::SYS_utimes,
    libc::SYS_vfork,
    libc::SYS_vmsplice,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
];

fn condition(index: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompRule {
    // A condition's index and a rule's condition list are checked by seccompiler; the values
    // below are constants, so a failure here is a bug in this file.
    SeccompRule::new(vec![
        SeccompCondition::new(index, len, op, value).expect("a valid seccomp condition"),
    ])
    .expect("a valid seccomp rule")
}

/// The allow filter: Docker's allowlist, `EPERM` for everything else.
fn allow_filter() -> Result<BpfProgram, BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in ALLOWED.iter().chain(NEWER_SYSCALLS) {
        // An empty rule list matches unconditionally.
        rules.insert(nr, Vec::new());
    }
    rules.insert(
        libc::SYS_clone,
        vec![condition(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS),
            0,
        )],
    );
    // The kernel reads personality's argument as an unsigned int: compare 32 bits.
    rules.insert(
        libc::SYS_personality,
        PERSONALITIES
            .iter()
            .map(|&persona| condition(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, persona))
            .collect(),
    );
    rules.insert(
        libc::SYS_socket,
        vec![
            condition(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Lt, AF_ALG),
            condition(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, AF_ALG + 1),
            condition(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Gt, AF_VSOCK),
        ],
    );
    // clone3 is allowed here and refused with ENOSYS by the second filter.
    rules.insert(libc::SYS_clone3, Vec::new());
    SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()
}

/// The `ENOSYS` filter: seccompiler gives one match action per filter, so Docker's
/// `clone3 → ENOSYS` rule is a second filter. The kernel runs every installed filter and takes
/// the strictest verdict, so ERRNO(ENOSYS) here wins over the allow filter's ALLOW.
fn enosys_filter() -> Result<BpfProgram, BackendError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?
    .try_into()
}

/// The compiled profile, ready to install.
#[derive(Debug)]
pub struct Profile {
    filters: Vec<BpfProgram>,
}

impl Profile {
    /// Docker's default profile (see the module documentation).
    pub fn docker_default() -> Result<Self, SeccompError> {
        Ok(Self {
            filters: vec![
                allow_filter().map_err(SeccompError::Build)?,
                enosys_filter().map_err(SeccompError::Build)?,
            ],
        })
    }

    /// Installs the profile on the calling thread (the helper is single-threaded). Needs
    /// `no_new_privs` or `CAP_SYS_ADMIN`. Allocates nothing.
    pub fn install(&self) -> Result<(), SeccompError> {
        for filter in &self.filters {
            seccompiler::apply_filter(filter).map_err(SeccompError::Install)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use super::*;

    /// Runs `sh -c script` under the profile; returns (exit code, stderr).
    fn confined(script: &str) -> (i32, String) {
        let profile = Profile::docker_default().unwrap();
        let mut command = Command::new("/bin/sh");
        command.args(["-c", script]);
        // SAFETY: between fork and exec the closure only calls prctl and seccomp (through
        // `install`, which allocates nothing) on a program built before the fork.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_no_new_privs()?;
                profile.install().map_err(std::io::Error::other)
            });
        }
        let output = command.output().unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    #[test]
    fn the_policy_builds() {
        let profile = Profile::docker_default().unwrap();
        assert_eq!(profile.filters.len(), 2);
        assert!(ALLOWED.contains(&libc::SYS_execve));
        for refused in [
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_keyctl,
            libc::SYS_reboot,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_kexec_load,
            libc::SYS_bpf,
        ] {
            assert!(!ALLOWED.contains(&refused), "{refused} must not be allowed");
        }
    }

    #[test]
    fn ordinary_programs_run_and_privileged_calls_get_eperm() {
        // A dynamically linked shell forks, execs, reads and pipes under the profile.
        let (code, stderr) = confined("echo hi | cat >/dev/null && ls / >/dev/null");
        assert_eq!(code, 0, "{stderr}");
        // unshare(2) is refused with EPERM, as util-linux reports it.
        let (code, stderr) = confined("unshare -U true");
        assert_ne!(code, 0);
        assert!(stderr.contains("Operation not permitted"), "{stderr}");
    }
}
