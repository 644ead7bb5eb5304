//! Harness for Gantry's end-to-end tests: a real agent process, real QEMU guests under TCG.
//!
//! The test command (`tests/run.sh`) builds the guest (`qemu/build-guest.sh`) and the workspace's
//! binaries before `cargo test`, so the harness only finds them here and says what to run if they
//! are missing. Every agent a test starts is stopped (and its QEMUs with it) when dropped, or,
//! for an agent held in a `static` (never dropped), when the test process exits.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

pub mod containerd;
pub mod cri;

/// The repository's root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

/// The cargo target directory this test binary was built into.
fn target_profile_dir() -> PathBuf {
    // A test binary runs from <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in <target>/<profile>/deps")
        .to_owned()
}

/// The `gantry-agent` binary built alongside the tests.
pub fn agent_binary() -> PathBuf {
    let path = target_profile_dir().join("gantry-agent");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (tests/run.sh does)",
        path.display()
    );
    path
}

/// Runs `command` (standard input closed, output captured); kills it and fails, with what it
/// wrote to standard error, if it takes longer than `timeout`. `on_first_stdout` is called as
/// soon as its first bytes of standard output arrive. The pipes are drained meanwhile, so a
/// chatty command cannot block on a full pipe.
pub fn output_within(
    command: &mut Command,
    timeout: Duration,
    on_first_stdout: impl FnOnce() + Send + 'static,
) -> Result<Output> {
    use std::io::Read;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let mut stdout_pipe = child.stdout.take().context("stdout is piped")?;
    let mut stderr_pipe = child.stderr.take().context("stderr is piped")?;
    let stdout = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut on_first = Some(on_first_stdout);
        let mut buffer = [0u8; 8192];
        while let Ok(n @ 1..) = stdout_pipe.read(&mut buffer) {
            if let Some(on_first) = on_first.take() {
                on_first();
            }
            bytes.extend_from_slice(&buffer[..n]);
        }
        bytes
    });
    let stderr = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            bail!(
                "did not finish within {timeout:?}\nstderr: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    })
}

/// `skopeo inspect --raw` of `docker://REFERENCE` (a plain-HTTP registry): the manifest or
/// index as the registry serves it.
pub fn raw_manifest(reference: &str) -> Result<serde_json::Value> {
    let output = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .context("running skopeo inspect")?;
    ensure!(
        output.status.success(),
        "skopeo inspect {reference}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).context("skopeo printed no JSON manifest")
}

/// The layer descriptors of an image in a registry (of the first manifest of an index).
pub fn image_layers(reference: &str) -> Result<Vec<gantry_oci::manifest::Descriptor>> {
    let mut document = raw_manifest(reference)?;
    if let Some(digest) = document["manifests"][0]["digest"].as_str() {
        let name = reference
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map_or(reference, |(name, _)| name);
        document = raw_manifest(&format!("{name}@{digest}"))?;
    }
    serde_json::from_value(document["layers"].clone()).context("layer descriptors")
}

/// A guest built by `qemu/build-guest.sh`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs whose `/init` is the shim.
    pub initrd: PathBuf,
}

/// The guest built for this checkout (`$GANTRY_GUEST_DIR` or `target/guest`).
pub fn guest_image() -> GuestImage {
    let dir = std::env::var_os("GANTRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest"));
    let image = GuestImage {
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initramfs.img"),
    };
    assert!(
        image.kernel.exists() && image.initrd.exists(),
        "no guest in {}: run qemu/build-guest.sh first (tests/run.sh does)",
        dir.display()
    );
    image
}

/// Checks a guest's `vm resources` report after its containers are gone: no layer mount in use,
/// at most [`gantry_proto::IDLE_LAYER_MOUNTS_KEPT`] kept idle for the next start (one loop device
/// each), no overlay, no container cgroup. Returns how many idle layer mounts there are.
pub fn assert_no_container_resources(resources: &serde_json::Value, context: &str) -> usize {
    let mounts = resources["layer_mounts"]
        .as_array()
        .unwrap_or_else(|| panic!("{context}: no layer_mounts in {resources}"));
    assert!(
        mounts.iter().all(|mount| mount["users"] == 0),
        "{context}: a layer is still in use: {resources}"
    );
    assert!(
        mounts.len() <= gantry_proto::IDLE_LAYER_MOUNTS_KEPT,
        "{context}: more idle layer mounts than kept: {resources}"
    );
    assert_eq!(
        resources["loop_devices"].as_array().map(Vec::len),
        Some(mounts.len()),
        "{context}: a loop device per kept mount and none else: {resources}"
    );
    assert_eq!(resources["overlay_mounts"], 0, "{context}: {resources}");
    assert_eq!(
        resources["container_cgroups"],
        serde_json::json!([]),
        "{context}: {resources}"
    );
    mounts.len()
}

/// A distribution guest built by `qemu/build-distro-guest.sh`: Debian bookworm on a root disk,
/// whose systemd starts the packaged shim.
#[derive(Debug, Clone)]
pub struct DistroGuest {
    /// The image's own kernel.
    pub kernel: PathBuf,
    /// The image's own initrd (initramfs-tools).
    pub initrd: PathBuf,
    /// The raw ext4 root disk.
    pub disk: PathBuf,
    /// The kernel command-line words that boot it (`root=UUID=… ro`).
    pub cmdline: Vec<String>,
    /// The release of its kernel.
    pub kernel_release: String,
}

/// The distribution guest built for this checkout (`$GANTRY_DISTRO_GUEST_DIR` or
/// `target/distro-guest`).
pub fn distro_guest() -> DistroGuest {
    let dir = std::env::var_os("GANTRY_DISTRO_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/distro-guest"));
    let cmdline = std::fs::read_to_string(dir.join("cmdline")).unwrap_or_default();
    let guest = DistroGuest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        disk: dir.join("disk.img"),
        cmdline: cmdline.split_whitespace().map(str::to_owned).collect(),
        kernel_release: std::fs::read_to_string(dir.join("kernel-release"))
            .unwrap_or_default()
            .trim()
            .to_owned(),
    };
    assert!(
        guest.kernel.exists()
            && guest.initrd.exists()
            && guest.disk.exists()
            && !guest.cmdline.is_empty(),
        "no distribution guest in {}: run qemu/build-distro-guest.sh first (tests/run.sh does)",
        dir.display()
    );
    guest
}

/// The release of the kernel Debian's `linux-image-amd64` installs, asked of dpkg directly (not of
/// the guest build), so a test can compare what the guest reports with what the host installed.
pub fn installed_debian_kernel_release() -> Result<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Depends}", "linux-image-amd64"])
        .output()
        .context("running dpkg-query")?;
    ensure!(
        output.status.success(),
        "linux-image-amd64 is not installed"
    );
    // e.g. "linux-image-6.1.0-56-amd64 (= 6.1.158-1)"
    let depends = String::from_utf8(output.stdout)?;
    let package = depends
        .split(',')
        .map(str::trim)
        .find_map(|dep| dep.strip_prefix("linux-image-"))
        .context("linux-image-amd64 depends on no linux-image-* package")?;
    Ok(package
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Converts image `src` to the lazy format at `dst` with `gantry-agent image convert`, failing
/// the test with its message if it fails.
pub fn convert_image(src: &str, dst: &str) {
    let convert = Command::new(agent_binary())
        .args(["image", "convert", src, dst])
        .output()
        .expect("image convert runs");
    assert!(
        convert.status.success(),
        "image convert {src} {dst}: {}",
        String::from_utf8_lossy(&convert.stderr)
    );
}

/// `agent.toml`'s `[vm_template]` for this checkout's guest with `memory_mib` MiB: give it last
/// in a test agent's settings (a table ends the top-level lines).
pub fn vm_template(memory_mib: u32) -> String {
    let guest = guest_image();
    format!(
        "[vm_template]\nkernel = {:?}\ninitrd = {:?}\nmemory_mib = {memory_mib}\n",
        guest.kernel, guest.initrd
    )
}

/// The QEMU process whose command line names `vsock_socket`.
pub fn qemu_serving(vsock_socket: &Path) -> Option<nix::unistd::Pid> {
    let needle = vsock_socket.display().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.starts_with("qemu-system") && cmdline.contains(&needle))
                .then(|| nix::unistd::Pid::from_raw(pid))
        })
}

/// One VM in a test agent's configuration.
#[derive(Debug, Clone)]
pub struct TestVm {
    /// Its name.
    pub name: String,
    /// Its vsock CID.
    pub guest_cid: u64,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Boots this distribution guest (its root disk as a snapshot, its serial console on a
    /// socket: [`TestAgent::console_socket`]) instead of Gantry's initramfs.
    pub distro: Option<DistroGuest>,
}

impl TestVm {
    /// A VM with 256 MiB of memory.
    pub fn new(name: &str, guest_cid: u64) -> Self {
        Self {
            name: name.to_owned(),
            guest_cid,
            memory_mib: 256,
            distro: None,
        }
    }

    /// The same, booting `guest`.
    pub fn booting(mut self, guest: &DistroGuest) -> Self {
        self.distro = Some(guest.clone());
        self
    }

    /// The same with `memory_mib` MiB.
    pub fn memory(mut self, memory_mib: u32) -> Self {
        self.memory_mib = memory_mib;
        self
    }
}

/// A `gantry-agent serve` process launching its guests, stopped (with its guests) on drop.
#[derive(Debug)]
pub struct TestAgent {
    child: Child,
    /// `sh` waiting for its stdin, held open by this process only, to close; then it stops the
    /// agent. That happens when the test process exits, however it exits.
    watchdog: Child,
    /// The same for the VM keepers, which outlive the agent: kills them (and so their QEMUs)
    /// when the test process exits, however it exits.
    keeper_watchdog: Child,
    dir: tempfile::TempDir,
    api_socket: PathBuf,
    /// Environment variables the agent runs with (besides `RUST_LOG`).
    env: Vec<(String, String)>,
}

impl TestAgent {
    /// Writes a config for `vms`, starts the agent and waits for its API socket.
    pub fn start(vms: &[TestVm]) -> Result<Self> {
        Self::start_with(vms, "")
    }

    /// The same, with `settings` (top-level `agent.toml` lines, e.g. `enable_baseline = true`
    /// or a `[logs]` table) added to the config.
    pub fn start_with(vms: &[TestVm], settings: &str) -> Result<Self> {
        Self::start_with_env(vms, settings, &[])
    }

    /// The same, the agent run with the environment variables `env` too (e.g.
    /// `GANTRY_LOG_FORMAT=json`).
    pub fn start_with_env(vms: &[TestVm], settings: &str, env: &[(&str, &str)]) -> Result<Self> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        let guest = guest_image();
        let dir = tempfile::Builder::new().prefix("gantry-e2e-").tempdir()?;
        let api_socket = dir.path().join("agent.sock");
        let mut config = format!(
            "api_socket = {:?}\nstate_dir = {:?}\n{settings}\n",
            api_socket,
            dir.path().join("state")
        );
        for vm in vms {
            let (kernel, initrd) = match &vm.distro {
                Some(distro) => (&distro.kernel, &distro.initrd),
                None => (&guest.kernel, &guest.initrd),
            };
            write!(
                config,
                "\n[[vm]]\nname = {:?}\nguest_cid = {}\nvsock_socket = {:?}\nlayer_socket = {:?}\n\
                 [vm.launch]\nkernel = {:?}\ninitrd = {:?}\nmemory_mib = {}\nconsole_log = {:?}\n",
                vm.name,
                vm.guest_cid,
                dir.path().join(format!("{}.vsock", vm.name)),
                dir.path().join(format!("{}.blk", vm.name)),
                kernel,
                initrd,
                vm.memory_mib,
                dir.path().join(format!("{}.console.log", vm.name)),
            )?;
            if let Some(distro) = &vm.distro {
                write!(
                    config,
                    "cmdline = {:?}\nconsole_socket = {:?}\n\
                     root_disk = {{ path = {:?}, snapshot = true }}\n",
                    distro.cmdline,
                    dir.path().join(format!("{}.console.sock", vm.name)),
                    distro.disk,
                )?;
            }
        }
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, config)?;
        let (child, watchdog) = Self::spawn(dir.path(), &env)?;
        let keeper_watchdog = keeper_watchdog(&dir.path().join("state"))?;
        let mut agent = Self {
            child,
            watchdog,
            keeper_watchdog,
            dir,
            api_socket,
            env,
        };
        agent.wait_for_socket()?;
        Ok(agent)
    }

    /// Starts `gantry-agent serve` on the config in `dir` (its log appended to `agent.log`)
    /// with `env`, and its watchdog.
    fn spawn(dir: &Path, env: &[(String, String)]) -> Result<(Child, Child)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))?;
        let child = Command::new(agent_binary())
            .arg("serve")
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .env("RUST_LOG", "info,gantry_agent=debug")
            .envs(env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting gantry-agent")?;
        let watchdog = gantry_testkit::watchdog(child.id(), "TERM")
            .context("starting the agent's watchdog")?;
        Ok((child, watchdog))
    }

    /// Kills the agent with SIGKILL (no cleanup: a crash) and starts it again on the same
    /// config and state directory; waits for its API socket.
    pub fn crash_and_restart(&mut self) -> Result<()> {
        self.crash_and_restart_after(Duration::ZERO)
    }

    /// Kills the agent with SIGKILL, leaves it down for `down`, and starts it again on the same
    /// config and state directory; waits for its API socket.
    pub fn crash_and_restart_after(&mut self, down: Duration) -> Result<()> {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        self.child.kill()?;
        self.child.wait()?;
        std::thread::sleep(down);
        // A crashed agent leaves its API socket behind; the new one replaces it.
        let _ = std::fs::remove_file(&self.api_socket);
        let (child, watchdog) = Self::spawn(self.dir.path(), &self.env)?;
        self.child = child;
        self.watchdog = watchdog;
        self.wait_for_socket()
    }

    /// Stops the agent as an upgrade does (SIGTERM, waiting for it to exit) and starts the
    /// binary again on the same config and state directory; waits for its API socket.
    pub fn upgrade(&mut self) -> Result<()> {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            ensure!(
                Instant::now() < deadline,
                "the agent did not exit within 20 s of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let (child, watchdog) = Self::spawn(self.dir.path(), &self.env)?;
        self.child = child;
        self.watchdog = watchdog;
        self.wait_for_socket()
    }

    fn wait_for_socket(&mut self) -> Result<()> {
        let agent = self;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.api_socket.exists() {
            if let Some(status) = agent.child.try_wait()? {
                bail!("the agent exited with {status} at start:\n{}", agent.log());
            }
            ensure!(
                Instant::now() < deadline,
                "no API socket after 20 s:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The pids of the VM keepers the agent started (from their pid files).
    pub fn keeper_pids(&self) -> Vec<nix::unistd::Pid> {
        let Ok(vms) = std::fs::read_dir(self.state_dir().join("vms")) else {
            return Vec::new();
        };
        vms.flatten()
            .filter_map(|vm| std::fs::read_to_string(vm.path().join("keeper.pid")).ok())
            .filter_map(|pid| pid.trim().parse().ok())
            .map(nix::unistd::Pid::from_raw)
            .collect()
    }

    /// Stops every VM keeper (SIGTERM, SIGKILL after 5 s) and so every guest.
    fn stop_keepers(&self) {
        use gantry_agent::keeper::client::process_alive;
        use nix::sys::signal::{Signal, kill};
        let keepers = self.keeper_pids();
        for pid in &keepers {
            let _ = kill(*pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for pid in keepers {
            while process_alive(pid.as_raw() as u32) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = kill(pid, Signal::SIGKILL);
        }
    }

    /// The agent process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's API socket.
    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The agent's working directory (sockets, config, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The QEMU process serving `vm` (its command line names the VM's vsock socket).
    pub fn qemu_pid(&self, vm: &str) -> Option<nix::unistd::Pid> {
        qemu_serving(&self.dir.path().join(format!("{vm}.vsock")))
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The Unix socket of a distribution guest's serial console ([`TestVm::booting`]).
    pub fn console_socket(&self, vm: &str) -> PathBuf {
        self.dir.path().join(format!("{vm}.console.sock"))
    }

    /// A VM's serial console so far.
    pub fn console(&self, vm: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{vm}.console.log")))
            .unwrap_or_default()
    }

    /// Runs the agent's CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(agent_binary())
            .arg("--api-socket")
            .arg(&self.api_socket)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Runs the agent's CLI against this agent; kills it and fails the test (with the agent's
    /// log) if it takes longer than `timeout`. The pipes are drained meanwhile, so a chatty
    /// command cannot block on a full pipe.
    pub fn cli_within(&self, args: &[&str], timeout: Duration) -> Output {
        self.cli_observed(args, timeout, || {})
    }

    /// [`Self::cli_within`], calling `on_first_stdout` as soon as the command's first bytes of
    /// standard output arrive (e.g. to read a counter at a container's first output).
    pub fn cli_observed(
        &self,
        args: &[&str],
        timeout: Duration,
        on_first_stdout: impl FnOnce() + Send + 'static,
    ) -> Output {
        let mut command = Command::new(agent_binary());
        command.arg("--api-socket").arg(&self.api_socket).args(args);
        match output_within(&mut command, timeout, on_first_stdout) {
            Ok(output) => output,
            Err(error) => panic!(
                "`gantry-agent {}`: {error:#}\n--- agent log ---\n{}",
                args.join(" "),
                self.log()
            ),
        }
    }

    /// Runs the CLI, requiring success, and decodes its `--json` output.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let output = self.cli(args)?;
        ensure!(
            output.status.success(),
            "gantry-agent {} failed: {}\n--- agent log ---\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// `images --json`'s presence of the layer blob `digest`: (present chunks, chunks).
    pub fn layer_presence(&self, digest: &gantry_oci::Digest) -> Result<(u64, u64)> {
        let images = self.cli_json(&["images", "--json"])?;
        let wanted = digest.to_string();
        images
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|image| image["layer_presence"].as_array().into_iter().flatten())
            .find(|layer| layer["blob_digest"] == wanted.as_str())
            .and_then(|layer| Some((layer["present_chunks"].as_u64()?, layer["chunks"].as_u64()?)))
            .with_context(|| format!("no image lists layer {digest}"))
    }

    /// Waits until `vm`'s shim answers `GuestInfo`; returns the report.
    pub fn wait_guest_info(&self, vm: &str, timeout: Duration) -> Result<serde_json::Value> {
        let wait = format!("{}", timeout.as_secs_f64());
        self.cli_json(&["guest-info", vm, "--wait", &wait, "--json"])
            .with_context(|| format!("--- {vm} console ---\n{}", self.console(vm)))
    }

    /// The status of `vm` as `vm ls` reports it.
    pub fn vm_status(&self, vm: &str) -> Result<serde_json::Value> {
        let vms = self.cli_json(&["vm", "ls", "--json"])?;
        vms.as_array()
            .and_then(|vms| vms.iter().find(|v| v["name"] == vm))
            .cloned()
            .with_context(|| format!("vm ls does not list {vm}"))
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // The agent is stopped here: the watchdog must not signal its pid once it is free.
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        // SIGTERM lets the agent remove its sockets; SIGKILL if it hangs.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // VMs outlive the agent (their keepers hold QEMU): stop them too. A keeper's QEMU
        // dies with it (parent-death signal).
        self.stop_keepers();
        let _ = self.keeper_watchdog.kill();
        let _ = self.keeper_watchdog.wait();
    }
}

/// A `sh` that kills every VM keeper under `state_dir` once its stdin closes (see
/// [`gantry_testkit::watchdog`]).
fn keeper_watchdog(state_dir: &Path) -> Result<Child> {
    let pattern = state_dir.join("vms").join("*").join("keeper.pid");
    let script = format!(
        "read _; for f in {}; do [ -f \"$f\" ] && kill -KILL \"$(cat \"$f\")\" 2>/dev/null; done",
        pattern.display()
    );
    Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the keepers' watchdog")
}
