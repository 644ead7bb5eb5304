//! A containerd of the test's own ([`TestContainerd`]): its root, state directory, gRPC socket,
//! config and log all in one temporary directory, stopped and cleaned up on drop, for the
//! containerd shim's tests and the runc reference they stand beside. And the images those tests
//! need, built here without a registry: a pause image for CRI's `sandbox_image`
//! ([`pause_image_archive`]) and a busybox image ([`busybox_image_archive`]), both as OCI archives
//! `ctr images import` reads, and a busybox root directory for `ctr run --rootfs`
//! ([`busybox_rootfs`]).
//!
//! Containerd's shims outlive it by design (a containerd restart keeps its containers), and their
//! containers and mounts outlive the shims: drop kills and unmounts all of it, so a test run
//! leaves no process and no mount behind. Debian's containerd 1.6, runc and ctr are needed
//! (`qemu/setup-host.sh` installs them).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gantry_agent::images::default_image;
use gantry_agent::keeper::client::process_alive;
use gantry_oci::builder::{self, ImageConfigSpec};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::output_within;

/// CRI's namespace: images a pod uses must be imported there.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The CRI runtime handler of Gantry's containerd shim.
pub const GANTRY_HANDLER: &str = "gantry";
/// The runtime type (`io.containerd.<name>.<version>`) by which containerd finds Gantry's shim,
/// `containerd-shim-gantry-v2`, on its `PATH`.
pub const GANTRY_RUNTIME_TYPE: &str = "io.containerd.gantry.v2";
/// The snapshotter: overlayfs works on this host's ext4 root (the runc reference test unpacks
/// and runs an image on it); [`ContainerdOptions::snapshotter`] can ask for `native`.
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";
/// How long a `ctr` command may take by default ([`TestContainerd::ctr`]).
const CTR_TIMEOUT: Duration = Duration::from_secs(60);
/// How long containerd may take to answer `ctr version` after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long containerd has to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One CRI runtime handler in the config:
/// `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.<handler>]`.
#[derive(Debug, Clone)]
pub struct CriRuntime {
    /// The handler name a `RunPodSandbox` request gives (`runtime_handler`).
    pub handler: String,
    /// Its `runtime_type`, e.g. `io.containerd.gantry.v2`.
    pub runtime_type: String,
}

impl CriRuntime {
    /// Gantry's shim: handler `gantry`, runtime type `io.containerd.gantry.v2`.
    pub fn gantry() -> Self {
        Self {
            handler: GANTRY_HANDLER.to_owned(),
            runtime_type: GANTRY_RUNTIME_TYPE.to_owned(),
        }
    }
}

/// How to start a [`TestContainerd`]. `runc` is always registered as a CRI runtime (the
/// default one); [`ContainerdOptions::default`] adds Gantry's handler beside it.
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// Extra environment for containerd, which passes it on to the shims it starts (Gantry's
    /// shim reads `GANTRY_API_SOCKET` from it).
    pub env: Vec<(String, String)>,
    /// Directories put before `PATH`: containerd 1.6 finds `containerd-shim-<name>-<version>`
    /// on its `PATH` (a test puts `target/debug` there for Gantry's shim).
    pub path_prepend: Vec<PathBuf>,
    /// CRI's `sandbox_image`: the pause image a pod's sandbox container runs. It must be
    /// imported into [`CRI_NAMESPACE`] before `RunPodSandbox` (there is no registry to pull from).
    pub sandbox_image: String,
    /// CRI runtime handlers besides `runc`.
    pub runtimes: Vec<CriRuntime>,
    /// The snapshotter for CRI and for this harness's `ctr` commands.
    pub snapshotter: String,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            path_prepend: Vec::new(),
            sandbox_image: "gantry.invalid/pause:1".to_owned(),
            runtimes: vec![CriRuntime::gantry()],
            snapshotter: DEFAULT_SNAPSHOTTER.to_owned(),
        }
    }
}

impl ContainerdOptions {
    /// The defaults: CRI runtimes `runc` and `gantry`, overlayfs, sandbox image
    /// `gantry.invalid/pause:1`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `KEY=VALUE` to containerd's (and so its shims') environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Puts `dir` before containerd's `PATH` (after directories added earlier).
    pub fn path_prepend(mut self, dir: impl Into<PathBuf>) -> Self {
        self.path_prepend.push(dir.into());
        self
    }

    /// CRI's `sandbox_image`.
    pub fn sandbox_image(mut self, image: &str) -> Self {
        self.sandbox_image = image.to_owned();
        self
    }

    /// Registers (or replaces) the CRI runtime `handler` of type `runtime_type`.
    pub fn runtime(mut self, handler: &str, runtime_type: &str) -> Self {
        self.runtimes.retain(|runtime| runtime.handler != handler);
        self.runtimes.push(CriRuntime {
            handler: handler.to_owned(),
            runtime_type: runtime_type.to_owned(),
        });
        self
    }

    /// The snapshotter (`overlayfs` or `native`).
    pub fn snapshotter(mut self, snapshotter: &str) -> Self {
        self.snapshotter = snapshotter.to_owned();
        self
    }
}

/// A containerd started by the test, with its own root, state directory, gRPC socket (which
/// CRI serves too) and config, all under one temporary directory; stopped on drop, with every
/// shim it started, their containers and every mount under its directories.
///
/// Containerd gets SIGKILL when the thread that started it ends (a parent-death signal), so
/// start and drop it on one thread, as a plain `#[test]` function does. Should the test process
/// die without dropping it, a watchdog kills its shims and their containers; mounts are then
/// left for the next boot.
#[derive(Debug)]
pub struct TestContainerd {
    child: Child,
    /// `sh` that kills this containerd's shims and their children once its stdin, held by this
    /// process only, closes: when the test process exits without dropping this.
    shim_watchdog: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    namespace: String,
    snapshotter: String,
}

impl TestContainerd {
    /// Writes a config as `options` say, starts containerd and waits until it answers
    /// `ctr version`.
    pub fn start(options: &ContainerdOptions) -> Result<Self> {
        // Short: the socket's path must fit a sockaddr_un (108 bytes), and so must the
        // `.ttrpc` socket beside it.
        let dir = tempfile::Builder::new()
            .prefix("gctr-")
            .tempdir_in("/tmp")?;
        let suffix = dir
            .path()
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix("gctr-"))
            .context("tempdir name")?
            .to_ascii_lowercase();
        // A namespace of its own: runc keeps container state in /run/containerd/runc/<ns> and
        // ctr puts containers in cgroups /<ns>/<id>, both shared with every other containerd.
        let namespace = format!("gantry-{suffix}");
        let socket = dir.path().join("c.sock");
        for sub in [
            "root", "state", "cni-bin", "cni-conf", "pods", "opt", "fifo",
        ] {
            std::fs::create_dir(dir.path().join(sub))?;
        }
        let config = config_toml(dir.path(), &socket, options)?;
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)?;

        let log = std::fs::File::create(dir.path().join("containerd.log"))?;
        let mut path = std::env::join_paths(&options.path_prepend)?;
        if let Some(inherited) = std::env::var_os("PATH") {
            if !path.is_empty() {
                path.push(":");
            }
            path.push(inherited);
        }
        let mut command = Command::new("containerd");
        command
            .arg("--config")
            .arg(&config_path)
            .env("PATH", path)
            .envs(options.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: between fork and exec the closure only calls prctl(2), which is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command
            .spawn()
            .context("starting containerd (apt-get install containerd; qemu/setup-host.sh does)")?;
        let shim_watchdog = shim_watchdog(&socket).context("starting the shims' watchdog")?;
        let mut containerd = Self {
            child,
            shim_watchdog,
            dir,
            socket,
            namespace,
            snapshotter: options.snapshotter.clone(),
        };
        containerd.wait_until_serving()?;
        Ok(containerd)
    }

    /// Polls `ctr version` until it succeeds; fails with the log's tail if containerd exits or
    /// does not answer within [`START_TIMEOUT`].
    fn wait_until_serving(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "containerd exited with {status} at start:\n{}",
                    self.log_tail(40)
                );
            }
            if self.socket.exists() {
                let mut version = Command::new("ctr");
                version.arg("--address").arg(&self.socket).arg("version");
                if output_within(&mut version, Duration::from_secs(5), || {})
                    .is_ok_and(|output| output.status.success())
                {
                    return Ok(());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "containerd did not answer `ctr version` within {START_TIMEOUT:?}:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Containerd's gRPC socket (CRI is served on it too).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The temporary directory holding everything of this containerd.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Containerd's root (content store, snapshots, metadata).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Containerd's state directory (shim bundles, rootfs mounts, CRI's sandbox state).
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A directory for CRI pods' logs (`log_directory`), empty at start.
    pub fn pod_log_root(&self) -> PathBuf {
        self.dir.path().join("pods")
    }

    /// The config file containerd runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The `ctr` namespace of this instance (its own, see [`TestContainerd::start`]).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Containerd's log (its stdout and stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The log's last `lines` lines, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        last_lines(&self.log(), lines)
    }

    /// `ctr --address SOCK --namespace NS ARGS` in this instance's namespace, bounded by
    /// [`CTR_TIMEOUT`]. The output is returned whatever the exit status.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_within(args, CTR_TIMEOUT)
    }

    /// [`Self::ctr`] killed (and failed, with containerd's log tail) after `timeout`.
    pub fn ctr_within(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        self.ctr_in(&self.namespace, args, timeout)
    }

    /// [`Self::ctr_within`] in `namespace` (e.g. [`CRI_NAMESPACE`]).
    pub fn ctr_in(&self, namespace: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut command = self.ctr_command(namespace, args);
        output_within(&mut command, timeout, || {}).with_context(|| self.failed_ctr(args))
    }

    /// [`Self::ctr_within`] with standard input read from the file `input` (ctr copies it
    /// into the task's stdin FIFO and closes that at its end).
    pub fn ctr_with_input(&self, args: &[&str], input: &Path, timeout: Duration) -> Result<Output> {
        let ctr = self.ctr_command(&self.namespace, args);
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("exec \"$@\" < \"$GANTRY_CTR_INPUT\"")
            .arg("sh")
            .arg(ctr.get_program())
            .args(ctr.get_args())
            .env("GANTRY_CTR_INPUT", input)
            .env("CONTAINERD_SNAPSHOTTER", &self.snapshotter);
        output_within(&mut command, timeout, || {}).with_context(|| self.failed_ctr(args))
    }

    /// [`Self::ctr_within`] on a pseudo-terminal (`script`), for `ctr run -t`, which wants its
    /// standard input to be a terminal. The output is what the terminal showed; the exit
    /// status is ctr's.
    pub fn ctr_on_terminal(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let ctr = self.ctr_command(&self.namespace, args);
        let quote =
            |word: &std::ffi::OsStr| format!("'{}'", word.to_string_lossy().replace('\'', "'\\''"));
        let line: Vec<String> = std::iter::once(ctr.get_program())
            .chain(ctr.get_args())
            .map(quote)
            .collect();
        let mut command = Command::new("script");
        command
            .args(["--quiet", "--return", "--command"])
            .arg(line.join(" "))
            .arg("/dev/null")
            .env("CONTAINERD_SNAPSHOTTER", &self.snapshotter);
        output_within(&mut command, timeout, || {}).with_context(|| self.failed_ctr(args))
    }

    /// Runs `ctr ARGS` (e.g. `run --rm …`) in this instance's namespace; returns how long after
    /// spawning `ctr` its first byte of standard output arrived, and its output. Fails if it
    /// prints nothing or takes longer than `timeout`.
    pub fn ctr_first_output(&self, args: &[&str], timeout: Duration) -> Result<(Duration, Output)> {
        let first: Arc<Mutex<Option<Instant>>> = Arc::default();
        let seen = Arc::clone(&first);
        let mut command = self.ctr_command(&self.namespace, args);
        let started = Instant::now();
        let output = output_within(&mut command, timeout, move || {
            if let Ok(mut first) = seen.lock() {
                *first = Some(Instant::now());
            }
        })
        .with_context(|| self.failed_ctr(args))?;
        let first = first
            .lock()
            .ok()
            .and_then(|first| *first)
            .with_context(|| {
                format!(
                    "`ctr {}` printed nothing (exit {}): {}",
                    args.join(" "),
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                )
            })?;
        Ok((first - started, output))
    }

    /// `ctr … ARGS`; `ctr run` gets `--fifo-dir` in this instance's directory, so the FIFOs
    /// of a detached container (`run -d`) go with it instead of staying in
    /// /run/containerd/fifo.
    fn ctr_command(&self, namespace: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace);
        match args.split_first() {
            Some((&"run", rest)) => {
                command
                    .arg("run")
                    .arg("--fifo-dir")
                    .arg(self.dir.path().join("fifo"))
                    .args(rest);
            }
            _ => {
                command.args(args);
            }
        }
        command
            // `ctr images import` unpacks, and `ctr run` prepares, for this snapshotter.
            .env("CONTAINERD_SNAPSHOTTER", &self.snapshotter);
        command
    }

    fn failed_ctr(&self, args: &[&str]) -> String {
        format!(
            "`ctr {}`\n--- containerd log tail ---\n{}",
            args.join(" "),
            self.log_tail(30)
        )
    }

    /// Imports the OCI archive `archive` (as [`pause_image_archive`] writes) into `namespace`
    /// as image `name`, a full reference `HOST/PATH:TAG` as CRI names images, unpacked for
    /// the snapshotter.
    pub fn import_image(&self, namespace: &str, archive: &Path, name: &str) -> Result<()> {
        let (repository, _) = split_tag(name)?;
        let archive = archive.to_str().context("archive path is not UTF-8")?;
        let output = self.ctr_in(
            namespace,
            &["images", "import", "--base-name", repository, archive],
            CTR_TIMEOUT,
        )?;
        ensure!(
            output.status.success(),
            "ctr images import {archive} as {name}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let listed = self.ctr_in(namespace, &["images", "ls", "-q"], CTR_TIMEOUT)?;
        ensure!(
            String::from_utf8_lossy(&listed.stdout)
                .lines()
                .any(|line| line.trim() == name),
            "after importing {archive}, `ctr images ls` does not list {name}:\n{}",
            String::from_utf8_lossy(&listed.stdout)
        );
        Ok(())
    }

    /// Builds the pause image ([`pause_image_archive`]) in this instance's directory and
    /// imports it into CRI's namespace as `name` (the `sandbox_image` of its config).
    pub fn import_pause_image(&self, name: &str) -> Result<()> {
        let archive = pause_image_archive(self.dir.path(), name)?;
        self.import_image(CRI_NAMESPACE, &archive, name)
    }

    /// Builds the busybox image ([`busybox_image_archive`]) in this instance's directory and
    /// imports it into CRI's namespace as `name`.
    pub fn import_busybox_image(&self, name: &str) -> Result<()> {
        let archive = busybox_image_archive(self.dir.path(), name)?;
        self.import_image(CRI_NAMESPACE, &archive, name)
    }

    /// The shims serving this containerd now.
    pub fn shim_pids(&self) -> Vec<Pid> {
        shims_serving(&self.socket)
    }

    /// The shims serving this containerd and every process under them (containers'
    /// processes), deepest first.
    pub fn shim_process_tree(&self) -> Vec<Pid> {
        let mut tree = Vec::new();
        for shim in self.shim_pids() {
            tree.extend(descendants(shim));
            tree.push(shim);
        }
        tree
    }

    /// Stops containerd: SIGTERM, SIGKILL after [`STOP_GRACE`].
    fn stop_containerd(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        // While containerd runs, let it clean up as it does for a kubelet: deleting the tasks
        // makes their shims unmount, remove cgroups and runc state, and exit.
        self.delete_all_tasks();
        // The shims are killed below; the watchdog must not act on pids that may be reused.
        let _ = self.shim_watchdog.kill();
        let _ = self.shim_watchdog.wait();
        self.stop_containerd();
        // What is left is a broken shim's (or one still exiting). Shims outlive containerd,
        // and containers their shims (a container's init is the shim's child, reparented on
        // the shim's death): kill each shim with everything under it, bottom up, wait for them
        // to be gone, then remove the sockets they listened on.
        let mut doomed = Vec::new();
        let mut sockets = Vec::new();
        let shims = shims_serving(&self.socket);
        if !shims.is_empty() {
            eprintln!("TestContainerd: shims still serving after task deletion, killed: {shims:?}");
        }
        for shim in shims {
            sockets.extend(listening_sockets(shim));
            doomed.extend(descendants(shim));
            doomed.push(shim);
        }
        for pid in &doomed {
            let _ = kill(*pid, Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while doomed.iter().any(|pid| process_alive(pid.as_raw() as u32)) {
            if Instant::now() > deadline {
                eprintln!("TestContainerd: processes still alive after SIGKILL: {doomed:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for socket in sockets {
            let _ = std::fs::remove_file(socket);
        }
        // Rootfs mounts of killed tasks, overlay snapshots, sandboxes' /dev/shm.
        if let Err(error) = unmount_all_under(self.dir.path()) {
            eprintln!("TestContainerd: {error:#}");
        }
        self.remove_host_state();
        // The temporary directory itself goes when `self.dir` drops.
    }
}

impl TestContainerd {
    /// Kills and deletes every task, then deletes every container (and its snapshot), in every
    /// namespace, each `ctr` call bounded; failures are left to the forceful cleanup after.
    fn delete_all_tasks(&self) {
        let timeout = Duration::from_secs(15);
        let ids = |namespace: &str, args: &[&str]| -> Vec<String> {
            self.ctr_in(namespace, args, timeout)
                .map(|output| {
                    String::from_utf8_lossy(&output.stdout)
                        .lines()
                        .map(|line| line.trim().to_owned())
                        .filter(|line| !line.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        for namespace in ids("default", &["namespaces", "ls", "-q"]) {
            for task in ids(&namespace, &["tasks", "ls", "-q"]) {
                let _ = self.ctr_in(&namespace, &["tasks", "rm", "-f", &task], timeout);
            }
            for container in ids(&namespace, &["containers", "ls", "-q"]) {
                let _ = self.ctr_in(&namespace, &["containers", "rm", &container], timeout);
            }
        }
    }

    /// Removes what this containerd's runc containers keep outside its directory once their
    /// shims are gone without deleting them: each task's cgroups (`/<ns>/<id>` in every
    /// hierarchy, as ctr and CRI without a `cgroup_parent` name them, empty once its processes
    /// are dead), then the own namespace's cgroup parent and runc state directory
    /// (`/run/containerd/runc/<ns>`; CRI's runc keeps its state in the state directory).
    fn remove_host_state(&self) {
        let hierarchies: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
            .unwrap_or_default();
        let tasks = self.state().join("io.containerd.runtime.v2.task");
        for namespace in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            for task in std::fs::read_dir(namespace.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                for hierarchy in &hierarchies {
                    let _ = std::fs::remove_dir(
                        hierarchy.join(namespace.file_name()).join(task.file_name()),
                    );
                }
            }
        }
        for hierarchy in &hierarchies {
            let _ = std::fs::remove_dir(hierarchy.join(&self.namespace));
        }
        let _ = std::fs::remove_dir_all(Path::new("/run/containerd/runc").join(&self.namespace));
    }
}

/// The paths of the Unix sockets `pid` listens on (its socket fds' inodes, named in
/// /proc/net/unix): a killed shim leaves its socket in /run/containerd/s behind.
fn listening_sockets(pid: Pid) -> Vec<PathBuf> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    // `Num RefCount Protocol Flags Type St Inode Path`: a listening socket has a path.
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (inode, path) = (fields.get(6)?, fields.get(7)?);
            (inodes.iter().any(|wanted| wanted == inode) && path.starts_with('/'))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

/// The config (version 2) for a containerd whose every directory is under `dir`.
fn config_toml(dir: &Path, socket: &Path, options: &ContainerdOptions) -> Result<String> {
    let path = |sub: &str| dir.join(sub);
    let mut config = String::new();
    write!(
        config,
        r#"version = 2
root = {root:?}
state = {state:?}
# Snapshotters that cannot work here (no aufs module, no btrfs/zfs filesystem, devmapper
# unconfigured): disabled, so containerd does not probe them (modprobe aufs) at every start.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {socket:?}

# Its default, /opt/containerd, is outside the test's directory.
[plugins."io.containerd.internal.v1.opt"]
  path = {opt:?}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {sandbox_image:?}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # CRI gives sandbox containers oom_score_adj -998, and lowering it needs CAP_SYS_RESOURCE,
  # which this sandbox's root lacks (runc's init fails: "can't get final child's PID from
  # pipe"). Restricted, CRI keeps no container below containerd's own score.
  restrict_oom_score_adj = true

# No CNI: the tests' pods use the host's network. Empty directories let CRI start.
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = {cni_bin:?}
  conf_dir = {cni_conf:?}

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = {snapshotter:?}
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

# runc's container state under this containerd's state directory, not the shared
# /run/containerd/runc/k8s.io.
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  Root = {runc_root:?}
"#,
        root = path("root"),
        state = path("state"),
        socket = socket,
        opt = path("opt"),
        sandbox_image = options.sandbox_image,
        cni_bin = path("cni-bin"),
        cni_conf = path("cni-conf"),
        snapshotter = options.snapshotter,
        runc_root = path("state").join("runc"),
    )?;
    for runtime in &options.runtimes {
        ensure!(
            runtime.handler != "runc",
            "the runc handler is always registered"
        );
        write!(
            config,
            "\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{handler}]\n  \
             runtime_type = {runtime_type:?}\n",
            handler = runtime.handler,
            runtime_type = runtime.runtime_type,
        )?;
    }
    Ok(config)
}

/// A `sh` that, once its stdin closes, kills (SIGKILL) every shim serving `socket` and the
/// shims' children (containers' init processes): for a test process that exits without
/// dropping its [`TestContainerd`] (see [`gantry_testkit::watchdog`]).
fn shim_watchdog(socket: &Path) -> std::io::Result<Child> {
    // A shim's command line holds `-address SOCKET` (NUL-separated in /proc/PID/cmdline).
    let script = r#"read _
for cmdline in /proc/[0-9]*/cmdline; do
    pid=${cmdline#/proc/}; pid=${pid%/cmdline}
    address=$(tr '\0' '\n' < "$cmdline" | grep -A1 -xF -- -address | tail -n1)
    if [ "$address" = "$1" ]; then
        kill -KILL $(ps -o pid= --ppid "$pid") "$pid"
    fi
done 2>/dev/null"#;
    Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// The processes whose command line holds `-address SOCKET`: the shims containerd started
/// for the containerd serving `socket` (they keep serving after containerd exits).
pub fn shims_serving(socket: &Path) -> Vec<Pid> {
    let wanted = socket.as_os_str().as_encoded_bytes();
    processes()
        .into_iter()
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
            args.windows(2)
                .any(|pair| pair[0] == b"-address" && pair[1] == wanted)
        })
        .filter(|pid| process_alive(pid.as_raw() as u32))
        .collect()
}

/// Every process's pid (a snapshot of /proc).
fn processes() -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .map(Pid::from_raw)
        .collect()
}

/// The parent of `pid`, from /proc/PID/stat (the field after the parenthesised name and state).
fn parent_of(pid: Pid) -> Option<Pid> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace()
        .nth(1)?
        .parse()
        .ok()
        .map(Pid::from_raw)
}

/// Every descendant of `root`, deepest first.
fn descendants(root: Pid) -> Vec<Pid> {
    let parents: Vec<(Pid, Pid)> = processes()
        .into_iter()
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, _) in parents.iter().filter(|(_, of)| *of == parent) {
            found.push(*pid);
            frontier.push(*pid);
        }
    }
    found.reverse();
    found
}

/// The mount points at or under `dir`, as /proc/self/mountinfo lists them (a point mounted
/// over twice is listed twice).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mountinfo(point)))
        .filter(|point| point.starts_with(dir))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and tab, newline, backslash).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything mounted at or under `dir`, deepest first, until nothing is left (a
/// busy mount is detached).
pub fn unmount_all_under(dir: &Path) -> Result<()> {
    use nix::mount::{MntFlags, umount2};
    // Each round takes off the top mount of every point; stacked mounts need more rounds.
    for _ in 0..16 {
        let mut points = mounts_under(dir);
        if points.is_empty() {
            return Ok(());
        }
        points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
        points.dedup();
        for point in points {
            if umount2(&point, MntFlags::empty()).is_err() {
                let _ = umount2(&point, MntFlags::MNT_DETACH);
            }
        }
    }
    let left = mounts_under(dir);
    ensure!(
        left.is_empty(),
        "mounts left under {}: {left:?}",
        dir.display()
    );
    Ok(())
}

/// `HOST/PATH:TAG` as (`HOST/PATH`, `TAG`).
fn split_tag(name: &str) -> Result<(&str, &str)> {
    name.rsplit_once(':')
        .filter(|(repository, tag)| !tag.contains('/') && !repository.is_empty())
        .with_context(|| format!("image name {name:?} has no tag (HOST/PATH:TAG)"))
}

/// The entrypoint of the pause image: a sleep long enough for any test (CRI stops a sandbox
/// with SIGKILL, so PID 1 ignoring SIGTERM does not matter).
pub const PAUSE_ENTRYPOINT: [&str; 3] = ["/bin/busybox", "sleep", "2147483647"];

/// Writes a pause image named `name` (`HOST/PATH:TAG`) as an OCI archive in `dir`; returns
/// its path. Its one layer is the agent's default-image layer (Debian's static busybox and
/// its applets, so it runs under runc and in Gantry's guests alike); its entrypoint
/// [`PAUSE_ENTRYPOINT`].
pub fn pause_image_archive(dir: &Path, name: &str) -> Result<PathBuf> {
    let config = ImageConfigSpec {
        entrypoint: PAUSE_ENTRYPOINT.map(str::to_owned).to_vec(),
        env: vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".into()],
        ..Default::default()
    };
    image_archive(dir, name, &config)
}

/// Writes a busybox image named `name` (`HOST/PATH:TAG`) as an OCI archive in `dir`, for
/// CreateContainer: the agent's default image (busybox, `sh` as its command, a `PATH`).
pub fn busybox_image_archive(dir: &Path, name: &str) -> Result<PathBuf> {
    image_archive(dir, name, &default_image::default_image_config())
}

/// An OCI image layout of the busybox layer with `config`, tarred as `ctr images import`
/// reads it (`oci-layout`, `index.json` and `blobs/` at the archive's top). The layout names
/// the image by its tag; [`TestContainerd::import_image`] gives the repository.
fn image_archive(dir: &Path, name: &str, config: &ImageConfigSpec) -> Result<PathBuf> {
    let (_, tag) = split_tag(name)?;
    let layer = default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX))?;
    let stem: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let layout = dir.join(format!("{stem}.oci"));
    let _ = std::fs::remove_dir_all(&layout);
    builder::write_image(&layout, tag, &[layer], config)?;
    let archive_path = dir.join(format!("{stem}.tar"));
    let mut archive = tar::Builder::new(std::fs::File::create(&archive_path)?);
    archive.mode(tar::HeaderMode::Deterministic);
    archive.append_path_with_name(layout.join("oci-layout"), "oci-layout")?;
    archive.append_path_with_name(layout.join("index.json"), "index.json")?;
    archive.append_dir_all("blobs", layout.join("blobs"))?;
    archive.into_inner()?.sync_all()?;
    std::fs::remove_dir_all(&layout)?;
    Ok(archive_path)
}

/// The last `lines` lines of `text` (a log, for error messages).
pub fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Unpacks the busybox layer into `dir/rootfs` for `ctr run --rootfs`; returns that path.
/// Without an image config the container has no `PATH`: give commands by absolute path
/// (`/bin/sh`).
pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let layer = default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX))?;
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    tar::Archive::new(layer.to_tar()?.as_slice())
        .unpack(&rootfs)
        .with_context(|| format!("unpacking busybox into {}", rootfs.display()))?;
    Ok(rootfs)
}
