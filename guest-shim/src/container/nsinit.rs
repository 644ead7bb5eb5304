//! What runs in the shim's helper process, `gantry-shim __container-init` or `__container-exec`.
//!
//! The shim is multi-threaded (tokio), and forking a multi-threaded process leaves a child that may
//! only call async-signal-safe functions. So the work that needs a fork (entering a new PID
//! namespace) happens in a freshly executed, single-threaded copy of the shim:
//!
//! - `__container-init`: joins the container's cgroup, unshares the mount, UTS, IPC, network and
//!   PID namespaces and forks. The parent reports the child's pid and exits, so the child (PID 1 of
//!   the new namespace) is re-parented to the shim, whose reaper then sees its real exit status.
//!   The child builds the root file system, reports `ready`, waits for the start byte, and execs the
//!   container's process.
//! - `__container-exec`: joins a running container's namespaces and cgroup and forks; the child
//!   execs the process, the parent stays as a relay that mirrors the child's exit (code or signal),
//!   because an orphan inside the container's PID namespace would be re-parented to the container's
//!   init, not to the shim.
//!
//! File descriptors from the shim: 0-2 the process's stdio, [`CONFIG_FD`] the plan (JSON, read to
//! EOF), [`STATUS_FD`] status lines to the shim (a unix stream socket, close-on-exec, so a
//! successful exec reads as EOF; the `pid N` line carries the process's pidfd), [`START_FD`]
//! (init only) the start byte, [`TARGET_FD`] (exec only) the pidfd of the container's init.
//!
//! Confinement, in the order it is applied (Docker's, see each module): cgroup (with its device
//! filter, attached by the shim), namespaces, masked and read-only `/proc` and `/sys` paths,
//! `pivot_root`, then in [`exec_process`] capabilities, ids, `no_new_privs`, and the seccomp
//! profile as the very last step before `execve`.

use std::ffi::CString;
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::stat::{Mode, SFlag, makedev, mknod, umask};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};
use serde::{Deserialize, Serialize};

use super::pidfd::PidFd;
use super::seccomp::Profile;
use super::user::ResolvedUser;

/// argv[1] that makes the shim run [`run_init`].
pub const INIT_ARG: &str = "__container-init";
/// argv[1] that makes the shim run [`run_exec`].
pub const EXEC_ARG: &str = "__container-exec";
/// The plan, as JSON.
pub const CONFIG_FD: RawFd = 3;
/// Status lines to the shim.
pub const STATUS_FD: RawFd = 4;
/// The start byte from the shim.
pub const START_FD: RawFd = 5;
/// The pidfd of the container's init, whose namespaces an exec joins.
pub const TARGET_FD: RawFd = 6;

/// The search path when the environment has none (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set without `CAP_MKNOD`, as Podman has it: every container of a
/// guest shares its kernel with the layer-store disk and the layers' loop devices, and a device
/// node is the one way to reach them. (The cgroup device filter refuses them too; see
/// `device_filter`.)
const DEFAULT_CAPABILITIES: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_NET_RAW,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETFCAP,
    caps::Capability::CAP_SETPCAP,
    caps::Capability::CAP_NET_BIND_SERVICE,
    caps::Capability::CAP_SYS_CHROOT,
    caps::Capability::CAP_KILL,
    caps::Capability::CAP_AUDIT_WRITE,
];

/// The process to exec, fully resolved by the shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessPlan {
    /// argv.
    pub args: Vec<String>,
    /// `KEY=VALUE`, with PATH and HOME filled in.
    pub env: Vec<String>,
    /// Working directory (created if missing).
    pub cwd: String,
    /// Who runs it.
    pub user: ResolvedUser,
    /// Whether stdin is a terminal to make the process's controlling terminal (in a session
    /// of its own).
    #[serde(default)]
    pub tty: bool,
}

/// Plan of `__container-init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitPlan {
    /// The merged overlay in the shim's mount namespace.
    pub rootfs: PathBuf,
    /// The container's cgroup directory.
    pub cgroup: PathBuf,
    /// Host name in the new UTS namespace.
    pub hostname: String,
    /// The container's main process.
    pub process: ProcessPlan,
}

/// Plan of `__container-exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecPlan {
    /// The container's init, whose namespaces to join.
    pub target_pid: i32,
    /// The container's cgroup directory.
    pub cgroup: PathBuf,
    /// The process.
    pub process: ProcessPlan,
}

type Failure = String;

trait Context<T> {
    fn context(self, what: &str) -> Result<T, Failure>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Result<T, Failure> {
        self.map_err(|err| format!("{what}: {err}"))
    }
}

/// The status pipe, borrowed from the fixed descriptor.
fn status_pipe() -> File {
    // SAFETY: the shim dup2()s the status pipe's write end to STATUS_FD before exec; this process
    // owns it from here on and nothing else wraps it.
    unsafe { File::from_raw_fd(STATUS_FD) }
}

fn report(status: &mut File, line: &str) {
    // The shim may have given up on us already; nothing to do then but go on failing.
    let _ = status.write_all(format!("{line}\n").as_bytes());
}

/// Reports `pid N` with the child's pidfd attached. Only the parent can open a pidfd that is
/// sure to name this child: it has not waited for it, so the pid cannot have been reused.
fn report_pid(status: &mut File, child: Pid) -> Result<(), Failure> {
    let pidfd = PidFd::open(child.as_raw()).context("opening the process's pidfd")?;
    let line = format!("pid {child}\n");
    let fds = [pidfd.as_fd().as_raw_fd()];
    let sent = nix::sys::socket::sendmsg::<()>(
        status.as_raw_fd(),
        &[IoSlice::new(line.as_bytes())],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .context("reporting the pid")?;
    // A short line fits the socket buffer at once; finish it in the unlikely other case.
    status
        .write_all(&line.as_bytes()[sent..])
        .context("reporting the pid")
}

fn fail(status: &mut File, message: &str) -> ! {
    report(status, &format!("error {}", message.replace('\n', " ")));
    std::process::exit(127);
}

fn read_plan<T: for<'de> Deserialize<'de>>() -> Result<T, Failure> {
    // SAFETY: the shim dup2()s the plan pipe's read end to CONFIG_FD before exec; it is consumed
    // (and closed) here.
    let mut config = unsafe { File::from_raw_fd(CONFIG_FD) };
    let mut text = Vec::new();
    config.read_to_end(&mut text).context("reading the plan")?;
    serde_json::from_slice(&text).context("decoding the plan")
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: F_SETFD on a descriptor we own; a failure only leaves it inheritable.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

/// Joins the container's cgroup and gives up the shim's OOM protection: under systemd the shim
/// runs with `OOMScoreAdjust=-1000`, which children inherit, and a container process the OOM
/// killer may not take would leave its cgroup stuck at its memory limit instead of OOM-killed.
fn join_cgroup(cgroup: &Path) -> Result<(), Failure> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .context("joining the container's cgroup")?;
    std::fs::write("/proc/self/oom_score_adj", "0").context("resetting oom_score_adj")
}

/// Entry point of `__container-init`.
pub fn run_init() -> ! {
    let mut status = status_pipe();
    set_cloexec(STATUS_FD);
    set_cloexec(START_FD);
    let plan: InitPlan = match read_plan() {
        Ok(plan) => plan,
        Err(err) => fail(&mut status, &err),
    };
    if let Err(err) = join_cgroup(&plan.cgroup).and_then(|()| {
        unshare(
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWPID,
        )
        .context("unsharing namespaces")
    }) {
        fail(&mut status, &err);
    }
    // SAFETY: this process is single-threaded (a fresh exec that started no threads), so the
    // child may do anything after the fork.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            if let Err(err) = report_pid(&mut status, child) {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                fail(&mut status, &err);
            }
            // The child, orphaned, is re-parented to the shim.
            std::process::exit(0);
        }
        Ok(ForkResult::Child) => {
            let result = prepare_container(&plan);
            if let Err(err) = result {
                fail(&mut status, &err);
            }
            report(&mut status, "ready");
            // SAFETY: the shim dup2()s the start pipe's read end to START_FD before exec.
            let mut start = unsafe { File::from_raw_fd(START_FD) };
            let mut byte = [0u8; 1];
            match start.read(&mut byte) {
                Ok(1) => {}
                // The shim closed the pipe without starting us: the container is being deleted.
                _ => std::process::exit(0),
            }
            drop(start);
            exec_process(&plan.process, &mut status)
        }
        Err(errno) => fail(&mut status, &format!("fork: {errno}")),
    }
}

/// Entry point of `__container-exec`.
pub fn run_exec() -> ! {
    let mut status = status_pipe();
    set_cloexec(STATUS_FD);
    let plan: ExecPlan = match read_plan() {
        Ok(plan) => plan,
        Err(err) => fail(&mut status, &err),
    };
    if let Err(err) = join_container(&plan) {
        fail(&mut status, &err);
    }
    // SAFETY: single-threaded process, as in `run_init`.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            if let Err(err) = report_pid(&mut status, child) {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                fail(&mut status, &err);
            }
            drop(status);
            relay_exit(child)
        }
        Ok(ForkResult::Child) => exec_process(&plan.process, &mut status),
        Err(errno) => fail(&mut status, &format!("fork: {errno}")),
    }
}

fn join_container(plan: &ExecPlan) -> Result<(), Failure> {
    // SAFETY: the shim dup2()s the init's pidfd to TARGET_FD before exec (exec helpers only);
    // it is consumed here, and closed before the process execs.
    let target = unsafe { OwnedFd::from_raw_fd(TARGET_FD) };
    join_cgroup(&plan.cgroup)?;
    // setns through the pidfd joins all five namespaces of that very process at once; by pid
    // (/proc/N/ns/*), an init that exited during the shim's drain window could have handed its
    // number to a process of another container. A dead init gives ESRCH.
    setns(
        &target,
        CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNS,
    )
    .map_err(|errno| match errno {
        nix::errno::Errno::ESRCH => {
            format!("the container's init (pid {}) has exited", plan.target_pid)
        }
        errno => format!("joining the container's namespaces: {errno}"),
    })
}

/// Waits for the exec'd child and exits the same way it did.
fn relay_exit(child: Pid) -> ! {
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                // Die of the same signal, without a core dump of the relay.
                let _ =
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
                // SAFETY: restoring the default disposition of a signal is always sound.
                let _ = unsafe {
                    nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl)
                };
                let _ = nix::sys::signal::kill(Pid::this(), signal);
                std::process::exit(128 + signal as i32);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => std::process::exit(126),
        }
    }
}

fn mount_at(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Failure> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(target)
        .context(&format!("creating {}", target.display()))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .context(&format!("mounting {fstype} at {}", target.display()))
}

/// Builds the container's view of the world; runs as PID 1 of the new PID namespace.
fn prepare_container(plan: &InitPlan) -> Result<(), Failure> {
    let root = &plan.rootfs;
    // Nothing mounted from here on may propagate back to the shim's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("binding the root file system")?;
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_at(
        "proc",
        &root.join("proc"),
        "proc",
        nosuid_nodev_noexec,
        None,
    )?;
    mount_at(
        "sysfs",
        &root.join("sys"),
        "sysfs",
        nosuid_nodev_noexec | MsFlags::MS_RDONLY,
        None,
    )?;
    populate_dev(&root.join("dev"))?;
    super::masked_paths::apply(root).map_err(|err| err.to_string())?;
    nix::unistd::sethostname(&plan.hostname).context("setting the host name")?;
    bring_up_loopback()?;

    // pivot_root(".", ".") stacks the old root under the new one; unmounting "." then drops it.
    nix::unistd::chdir(root).context("entering the root file system")?;
    nix::unistd::pivot_root(".", ".").context("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

/// A minimal /dev: a tmpfs with the usual character devices, a private devpts, and /dev/shm.
fn populate_dev(dev: &Path) -> Result<(), Failure> {
    mount_at(
        "tmpfs",
        dev,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    umask(Mode::empty());
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = dev.join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .context(&format!("creating /dev/{name}"))?;
    }
    mount_at(
        "devpts",
        &dev.join("pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_at(
        "shm",
        &dev.join("shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .context(&format!("linking /dev/{link}"))?;
    }
    umask(Mode::from_bits_truncate(0o022));
    Ok(())
}

/// The new network namespace has only `lo`, and it starts down.
fn bring_up_loopback() -> Result<(), Failure> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("opening a socket for lo")?;
    // SAFETY: ifreq is plain old data; zero is a valid value for every field.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills `ifr_ifru.ifru_flags` of the ifreq we pass.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(format!(
            "reading lo's flags: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the union's flags member is the one SIOCGIFFLAGS just set.
    unsafe {
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(format!(
            "bringing lo up: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Drops privileges as Docker does and execs the process. Never returns.
fn exec_process(process: &ProcessPlan, status: &mut File) -> ! {
    // Built while nothing is confined yet, so a policy bug reports as an error, not as EPERM.
    let profile = match Profile::docker_default() {
        Ok(profile) => profile,
        Err(err) => fail(status, &err.to_string()),
    };
    match prepare_and_find(process) {
        Ok((program, argv, envp)) => {
            // Last, after no_new_privs (set in drop_privileges): from here on only execve and,
            // if it fails, the report and exit below run, all allowed by the profile.
            if let Err(err) = profile.install() {
                fail(status, &err.to_string());
            }
            let Err(errno) = nix::unistd::execve(&program, &argv, &envp);
            fail(
                status,
                &format!("exec {}: {errno}", program.to_string_lossy()),
            )
        }
        Err(err) => fail(status, &err),
    }
}

type ExecArgs = (CString, Vec<CString>, Vec<CString>);

fn prepare_and_find(process: &ProcessPlan) -> Result<ExecArgs, Failure> {
    let to_c = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let argv = process
        .args
        .iter()
        .map(|a| to_c(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = process
        .env
        .iter()
        .map(|e| to_c(e))
        .collect::<Result<Vec<_>, _>>()?;
    let first = process.args.first().ok_or("no command to run")?;

    if process.tty {
        super::tty::make_controlling_terminal()
            .context("making the terminal the controlling terminal")?;
    }

    let nofile = 1 << 20;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, nofile, nofile)
        .context("setting RLIMIT_NOFILE")?;

    // The working directory exists for the user only if we make it so while still root.
    let cwd = Path::new(&process.cwd);
    if !cwd.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(cwd)
            .context(&format!("creating the working directory {}", process.cwd))?;
    }
    nix::unistd::chdir(cwd).context(&format!("entering the working directory {}", process.cwd))?;

    drop_privileges(&process.user)?;
    let program = find_program(first, &process.env)?;
    Ok((to_c(&program.to_string_lossy())?, argv, envp))
}

fn drop_privileges(user: &ResolvedUser) -> Result<(), Failure> {
    use caps::CapSet;
    let keep: caps::CapsHashSet = DEFAULT_CAPABILITIES.iter().copied().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .context(&format!("dropping {cap} from the bounding set"))?;
        }
    }
    let groups: Vec<Gid> = user
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).context("setting supplementary groups")?;
    let gid = Gid::from_raw(user.gid);
    nix::unistd::setresgid(gid, gid, gid).context("setting the group id")?;
    let uid = Uid::from_raw(user.uid);
    // A uid change away from 0 clears the permitted and effective sets, as Docker leaves them
    // for non-root users; root keeps exactly the default set.
    nix::unistd::setresuid(uid, uid, uid).context("setting the user id")?;
    if user.uid == 0 {
        // The kernel requires effective ⊆ permitted at every step: shrink effective first.
        caps::set(None, CapSet::Effective, &keep).context("setting effective capabilities")?;
        caps::set(None, CapSet::Permitted, &keep).context("setting permitted capabilities")?;
        caps::set(None, CapSet::Inheritable, &keep).context("setting inheritable capabilities")?;
    }
    nix::sys::prctl::set_no_new_privs().context("setting no_new_privs")?;
    Ok(())
}

/// `execvp`'s search, in the container's file system and with the process's own PATH.
fn find_program(name: &str, env: &[String]) -> Result<PathBuf, Failure> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = env
        .iter()
        .find_map(|entry| entry.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if let Ok(metadata) = std::fs::metadata(&candidate)
            && metadata.is_file()
            && metadata.permissions().mode() & 0o111 != 0
        {
            return Ok(candidate);
        }
    }
    Err(format!(
        "{name}: executable file not found in $PATH ({path})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_search_follows_path_and_skips_non_executables() {
        let dir = std::env::temp_dir().join(format!("gantry-nsinit-{}", std::process::id()));
        let bin = dir.join("bin");
        let other = dir.join("other");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("tool"), "").unwrap();
        std::fs::write(bin.join("tool"), "").unwrap();
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = vec![format!("PATH={}:{}", other.display(), bin.display())];
        assert_eq!(find_program("tool", &env).unwrap(), bin.join("tool"));
        assert_eq!(
            find_program("/abs/tool", &env).unwrap(),
            PathBuf::from("/abs/tool")
        );
        let err = find_program("missing", &env).unwrap_err();
        assert!(err.contains("not found in $PATH"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
