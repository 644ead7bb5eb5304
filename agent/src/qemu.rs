//! The QEMU launch recipe for a guest attached to this agent.
//!
//! In production the host VMM is started by whoever owns the host; in development and tests the
//! agent (or a test) starts QEMU itself with this recipe. The guest is the kernel and initramfs
//! built by `qemu/build-guest.sh`; its devices are vhost-user devices whose backends are the agent:
//!
//! - `vhost-user-vsock-pci`: the control channel to the shim (the guest's CID is configured in the
//!   backend, not on the QEMU command line),
//! - optionally `vhost-user-blk-pci`: the read-only layer store.
//!
//! vhost-user backends map the guest's memory, so the memory must be a shareable memfd: the recipe
//! always uses `-object memory-backend-memfd,share=on` with a single NUMA node on top of it.
//!
//! [`QemuConfig::command`] only builds the command line (pure, unit tested); [`QemuProcess`] runs
//! it and makes sure the VM dies with its owner.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Environment variable overriding where the built guest (`vmlinuz`, `initramfs.img`) lives.
pub const GUEST_DIR_ENV: &str = "GANTRY_GUEST_DIR";
/// Compressed kernel image (bzImage) inside a guest directory built by `qemu/build-guest.sh`.
pub const GUEST_KERNEL_FILE: &str = "vmlinuz";
/// The same kernel uncompressed (ELF with a PVH entry point) in a built guest directory. QEMU
/// boots it directly, skipping the bzImage's own decompression (about 3 s under TCG), so it is
/// preferred when present.
pub const GUEST_PVH_KERNEL_FILE: &str = "vmlinux";
/// Initramfs file name inside a guest directory built by `qemu/build-guest.sh`.
pub const GUEST_INITRD_FILE: &str = "initramfs.img";
/// QEMU binary used when none is configured.
pub const DEFAULT_QEMU_BINARY: &str = "qemu-system-x86_64";
/// Guest memory used when none is configured.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Number of vCPUs used when none is configured.
pub const DEFAULT_CPUS: u32 = 1;
/// Kernel command line every guest gets, before [`QemuConfig::extra_cmdline`].
///
/// - `console=ttyS0`: kernel and shim logs go to the serial log file.
/// - `panic=-1`: a kernel panic reboots at once, and with `-no-reboot` QEMU then exits instead of
///   hanging, so a broken guest is seen as a dead process.
/// - `rdinit=/init`: the shim is the initramfs' `/init` (the default, spelled out for readers).
/// - `i8042.*`, `8250.nr_uarts=1`, `cryptomgr.notests`: skip probes that cost seconds under TCG
///   and that a headless guest never needs.
pub const BASE_KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 rdinit=/init \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 cryptomgr.notests";
/// Number of request queues of the layer-store device when none is configured.
pub const DEFAULT_LAYER_STORE_QUEUES: u16 = 1;

/// Errors of the launch recipe.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The configuration cannot describe a VM.
    #[error("invalid QEMU configuration: {0}")]
    InvalidConfig(String),
    /// The built guest directory lacks a file.
    #[error("guest file {path} is missing (run qemu/build-guest.sh)")]
    MissingGuestFile {
        /// The file that was expected.
        path: PathBuf,
    },
    /// QEMU could not be started.
    #[error("failed to start {binary}: {source}")]
    Spawn {
        /// The QEMU binary that was run.
        binary: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Waiting on or signalling the QEMU process failed.
    #[error("QEMU process (pid {pid}): {source}")]
    Process {
        /// QEMU's process id.
        pid: u32,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// How QEMU executes guest code. In configuration files: `"tcg"` or `"kvm"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Software emulation: slow but works everywhere (and is what the development machines need).
    #[default]
    Tcg,
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
}

impl Accel {
    /// The value of QEMU's `-accel` option.
    pub fn as_qemu_arg(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// How QEMU attaches the layer store: a `vhost-user-blk-pci` disk whose backend is the agent's
/// [`crate::blk::LayerStoreDevice`] on `socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStoreDisk {
    /// The vhost-user socket of the agent's block backend.
    pub socket: PathBuf,
    /// Number of request queues the guest driver may use (at most what the backend offers).
    pub num_queues: u16,
}

impl LayerStoreDisk {
    /// A layer-store device on `socket` with [`DEFAULT_LAYER_STORE_QUEUES`] queues.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            num_queues: DEFAULT_LAYER_STORE_QUEUES,
        }
    }
}

/// A guest's own boot disk (a tenant's distribution image): a raw image attached as a plain
/// QEMU `virtio-blk-pci` disk, besides the layer store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootDisk {
    /// The raw disk image.
    pub path: PathBuf,
    /// The guest's writes go to a temporary overlay QEMU drops when it exits, and the image is
    /// left as it was (needed when several VMs boot one image).
    #[serde(default)]
    pub snapshot: bool,
}

/// Everything needed to start one guest VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// The QEMU system emulator to run.
    pub qemu_binary: PathBuf,
    /// The guest kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The guest initramfs holding the shim (`-initrd`).
    pub initrd: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// The vhost-user socket of the vsock backend (the agent's control channel to the shim).
    pub vsock_socket: PathBuf,
    /// The layer-store block device, if the VM gets one.
    pub layer_store: Option<LayerStoreDisk>,
    /// File receiving the guest's serial console (kernel log and shim log).
    pub serial_log: PathBuf,
    /// Also offer the serial console on this Unix socket (QEMU listens; whoever connects can
    /// type at the guest's console, as at a physical one), still logged to `serial_log`.
    pub console_socket: Option<PathBuf>,
    /// The guest's own boot disk, if it has one.
    pub root_disk: Option<RootDisk>,
    /// Kernel command-line words appended after [`BASE_KERNEL_CMDLINE`].
    pub extra_cmdline: Vec<String>,
}

impl QemuConfig {
    /// A configuration with the defaults (TCG, [`DEFAULT_MEMORY_MIB`], [`DEFAULT_CPUS`], no layer
    /// store, QEMU from `PATH`).
    pub fn new(
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
        vsock_socket: impl Into<PathBuf>,
        serial_log: impl Into<PathBuf>,
    ) -> Self {
        Self {
            qemu_binary: PathBuf::from(DEFAULT_QEMU_BINARY),
            kernel: kernel.into(),
            initrd: initrd.into(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            accel: Accel::default(),
            vsock_socket: vsock_socket.into(),
            layer_store: None,
            serial_log: serial_log.into(),
            console_socket: None,
            root_disk: None,
            extra_cmdline: Vec::new(),
        }
    }

    /// A configuration booting the guest built into `guest_dir` by `qemu/build-guest.sh`: the
    /// uncompressed [`GUEST_PVH_KERNEL_FILE`] if present, else [`GUEST_KERNEL_FILE`], and
    /// [`GUEST_INITRD_FILE`].
    ///
    /// Fails if no kernel or no initramfs is there.
    pub fn from_guest_dir(
        guest_dir: &Path,
        vsock_socket: impl Into<PathBuf>,
        serial_log: impl Into<PathBuf>,
    ) -> Result<Self, QemuError> {
        let pvh_kernel = guest_dir.join(GUEST_PVH_KERNEL_FILE);
        let kernel = if pvh_kernel.is_file() {
            pvh_kernel
        } else {
            guest_dir.join(GUEST_KERNEL_FILE)
        };
        let initrd = guest_dir.join(GUEST_INITRD_FILE);
        for path in [&kernel, &initrd] {
            if !path.is_file() {
                return Err(QemuError::MissingGuestFile { path: path.clone() });
            }
        }
        Ok(Self::new(kernel, initrd, vsock_socket, serial_log))
    }

    /// The directory holding the built guest: `$GANTRY_GUEST_DIR` if set, else `default`
    /// (callers pass `<workspace>/target/guest`, where `qemu/build-guest.sh` puts it).
    pub fn guest_dir_from_env(default: &Path) -> PathBuf {
        std::env::var_os(GUEST_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| default.to_path_buf())
    }

    /// The full kernel command line passed with `-append`.
    pub fn kernel_cmdline(&self) -> String {
        let mut cmdline = String::from(BASE_KERNEL_CMDLINE);
        for word in &self.extra_cmdline {
            cmdline.push(' ');
            cmdline.push_str(word);
        }
        cmdline
    }

    /// Checks what QEMU would reject late or misread.
    pub fn validate(&self) -> Result<(), QemuError> {
        if self.memory_mib == 0 {
            return Err(QemuError::InvalidConfig(
                "memory must be at least 1 MiB".into(),
            ));
        }
        if self.cpus == 0 {
            return Err(QemuError::InvalidConfig(
                "at least one vCPU is needed".into(),
            ));
        }
        if let Some(layer_store) = &self.layer_store
            && layer_store.num_queues == 0
        {
            return Err(QemuError::InvalidConfig(
                "the layer store needs at least one queue".into(),
            ));
        }
        if let Some(word) = self
            .extra_cmdline
            .iter()
            .find(|word| word.contains(char::is_whitespace))
        {
            return Err(QemuError::InvalidConfig(format!(
                "kernel command-line word {word:?} contains whitespace: pass separate words"
            )));
        }
        Ok(())
    }

    /// The arguments passed to QEMU (without the binary), in order.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));

        push(&["-accel", self.accel.as_qemu_arg()]);
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&["-smp", &self.cpus.to_string()]);
        // vhost-user backends map guest memory through a file descriptor: it must be a shared memfd.
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                self.memory_mib
            ),
        ]);
        push(&["-numa", "node,memdev=mem"]);

        push(&[
            "-chardev",
            &format!(
                "socket,id=vsock0,path={}",
                qemu_option_value(&self.vsock_socket)
            ),
        ]);
        push(&["-device", "vhost-user-vsock-pci,chardev=vsock0"]);
        if let Some(layer_store) = &self.layer_store {
            // reconnect=1: when the agent restarts, QEMU reconnects to the next one within a
            // second (the vsock chardev cannot: its device lives in the VM's keeper instead).
            push(&[
                "-chardev",
                &format!(
                    "socket,id=layers0,path={},reconnect=1",
                    qemu_option_value(&layer_store.socket)
                ),
            ]);
            push(&[
                "-device",
                &format!(
                    "vhost-user-blk-pci,chardev=layers0,num-queues={}",
                    layer_store.num_queues
                ),
            ]);
        }

        if let Some(root_disk) = &self.root_disk {
            // The guest tells this disk from the layer store by serial (the shim) or by file
            // system UUID (its init), never by probe order. A snapshot's overlay is thrown away
            // anyway, so it need not reach the disk in order.
            push(&[
                "-drive",
                &format!(
                    "file={},if=none,id=root0,format=raw{}",
                    qemu_option_value(&root_disk.path),
                    if root_disk.snapshot {
                        ",snapshot=on,cache=unsafe"
                    } else {
                        ""
                    }
                ),
            ]);
            push(&["-device", "virtio-blk-pci,drive=root0,serial=root"]);
        }

        args.push("-kernel".into());
        args.push(self.kernel.clone().into_os_string());
        args.push("-initrd".into());
        args.push(self.initrd.clone().into_os_string());
        args.push("-append".into());
        args.push(self.kernel_cmdline().into());

        if let Some(socket) = &self.console_socket {
            args.push("-chardev".into());
            args.push(
                format!(
                    "socket,id=console0,path={},server=on,wait=off,logfile={}",
                    qemu_option_value(socket),
                    qemu_option_value(&self.serial_log)
                )
                .into(),
            );
            args.push("-serial".into());
            args.push("chardev:console0".into());
        } else {
            // `file:` takes the rest of the string verbatim, so the path needs no escaping here.
            let mut serial = OsString::from("file:");
            serial.push(&self.serial_log);
            args.push("-serial".into());
            args.push(serial);
        }
        for flag in ["-nographic", "-nodefaults", "-no-reboot", "-no-user-config"] {
            args.push(flag.into());
        }
        args.push("-monitor".into());
        args.push("none".into());
        args
    }

    /// The complete QEMU command (stdin closed; stdout and stderr inherited).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.qemu_binary);
        command.args(self.args()).stdin(Stdio::null());
        command
    }
}

/// Escapes a path for a QEMU `key=value,...` option: a comma is written as two commas.
fn qemu_option_value(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// A running QEMU. Dropping it kills and reaps the VM.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    spawned_at: Instant,
}

impl QemuProcess {
    /// Validates `config` and starts QEMU.
    pub fn spawn(config: &QemuConfig) -> Result<Self, QemuError> {
        config.validate()?;
        Self::spawn_command(config.command(), &config.qemu_binary)
    }

    /// Starts a command built by [`QemuConfig::command`] (possibly adjusted by the caller, for
    /// example to redirect QEMU's own stderr).
    pub fn spawn_command(mut command: Command, binary: &Path) -> Result<Self, QemuError> {
        let spawned_at = Instant::now();
        let child = command.spawn().map_err(|source| QemuError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        tracing::debug!(pid = child.id(), "QEMU started");
        Ok(Self { child, spawned_at })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When QEMU was spawned: the origin of boot-time measurements.
    pub fn spawned_at(&self) -> Instant {
        self.spawned_at
    }

    /// Time since QEMU was spawned.
    pub fn elapsed(&self) -> Duration {
        self.spawned_at.elapsed()
    }

    /// QEMU's exit status if it has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, QemuError> {
        let pid = self.pid();
        self.child
            .try_wait()
            .map_err(|source| QemuError::Process { pid, source })
    }

    /// Kills QEMU (if still running) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, QemuError> {
        let pid = self.pid();
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // The process may exit between try_wait and kill; wait() below still reaps it.
        if let Err(source) = self.child.kill()
            && source.kind() != std::io::ErrorKind::InvalidInput
        {
            return Err(QemuError::Process { pid, source });
        }
        self.child
            .wait()
            .map_err(|source| QemuError::Process { pid, source })
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Err(error) = self.kill() {
            tracing::warn!(%error, "failed to stop QEMU");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        QemuConfig::new(
            "/guest/vmlinuz",
            "/guest/initramfs.img",
            "/run/vm1/vsock.sock",
            "/run/vm1/serial.log",
        )
    }

    fn args_of(config: &QemuConfig) -> Vec<String> {
        config
            .args()
            .into_iter()
            .map(|arg| arg.into_string().expect("test args are UTF-8"))
            .collect()
    }

    /// The value following `flag`, for flags that appear once.
    fn value_of<'a>(args: &'a [String], flag: &str) -> &'a str {
        let positions: Vec<usize> = args
            .iter()
            .enumerate()
            .filter(|(_, arg)| *arg == flag)
            .map(|(index, _)| index)
            .collect();
        assert_eq!(positions.len(), 1, "{flag} should appear once in {args:?}");
        &args[positions[0] + 1]
    }

    /// All values following each occurrence of `flag`.
    fn values_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].as_str())
            .collect()
    }

    #[test]
    fn default_command_line_is_the_documented_recipe() {
        let config = config();
        let args = args_of(&config);
        assert_eq!(value_of(&args, "-accel"), "tcg");
        assert!(
            !args.iter().any(|arg| arg == "-cpu"),
            "TCG keeps QEMU's default CPU"
        );
        assert_eq!(value_of(&args, "-m"), "512M");
        assert_eq!(value_of(&args, "-smp"), "1");
        assert_eq!(
            value_of(&args, "-object"),
            "memory-backend-memfd,id=mem,size=512M,share=on"
        );
        assert_eq!(value_of(&args, "-numa"), "node,memdev=mem");
        assert_eq!(
            values_of(&args, "-chardev"),
            ["socket,id=vsock0,path=/run/vm1/vsock.sock"]
        );
        assert_eq!(
            values_of(&args, "-device"),
            ["vhost-user-vsock-pci,chardev=vsock0"]
        );
        assert_eq!(value_of(&args, "-kernel"), "/guest/vmlinuz");
        assert_eq!(value_of(&args, "-initrd"), "/guest/initramfs.img");
        assert_eq!(value_of(&args, "-append"), BASE_KERNEL_CMDLINE);
        assert_eq!(value_of(&args, "-serial"), "file:/run/vm1/serial.log");
        assert_eq!(value_of(&args, "-monitor"), "none");
        for flag in ["-nographic", "-nodefaults", "-no-reboot"] {
            assert!(
                args.iter().any(|arg| arg == flag),
                "{flag} missing from {args:?}"
            );
        }
    }

    #[test]
    fn a_root_disk_is_a_plain_virtio_disk_beside_the_layer_store() {
        let mut config = config();
        config.layer_store = Some(LayerStoreDisk::new("/run/vm1/blk.sock"));
        config.root_disk = Some(RootDisk {
            path: "/images/bookworm,1.img".into(),
            snapshot: true,
        });
        let args = args_of(&config);
        assert_eq!(
            value_of(&args, "-drive"),
            "file=/images/bookworm,,1.img,if=none,id=root0,format=raw,snapshot=on,cache=unsafe"
        );
        assert_eq!(
            values_of(&args, "-device"),
            [
                "vhost-user-vsock-pci,chardev=vsock0",
                "vhost-user-blk-pci,chardev=layers0,num-queues=1",
                "virtio-blk-pci,drive=root0,serial=root",
            ]
        );
        config.root_disk = Some(RootDisk {
            path: "/images/tenant.img".into(),
            snapshot: false,
        });
        let args = args_of(&config);
        assert_eq!(
            value_of(&args, "-drive"),
            "file=/images/tenant.img,if=none,id=root0,format=raw",
            "a persistent disk keeps QEMU's safe cache mode"
        );
    }

    #[test]
    fn a_console_socket_serves_the_serial_port_and_still_logs_it() {
        let mut config = config();
        config.console_socket = Some("/run/vm1/console.sock".into());
        let args = args_of(&config);
        assert_eq!(
            values_of(&args, "-chardev")[1],
            "socket,id=console0,path=/run/vm1/console.sock,server=on,wait=off,\
             logfile=/run/vm1/serial.log"
        );
        assert_eq!(value_of(&args, "-serial"), "chardev:console0");
    }

    #[test]
    fn base_cmdline_logs_to_serial_and_dies_on_panic() {
        let words: Vec<&str> = BASE_KERNEL_CMDLINE.split_whitespace().collect();
        assert!(words.contains(&"console=ttyS0"));
        assert!(words.contains(&"panic=-1"));
    }

    #[test]
    fn memory_size_and_cpus_reach_both_memory_options() {
        let mut config = config();
        config.memory_mib = 2048;
        config.cpus = 4;
        let args = args_of(&config);
        assert_eq!(value_of(&args, "-m"), "2048M");
        assert_eq!(value_of(&args, "-smp"), "4");
        assert_eq!(
            value_of(&args, "-object"),
            "memory-backend-memfd,id=mem,size=2048M,share=on"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let mut config = config();
        config.accel = Accel::Kvm;
        let args = args_of(&config);
        assert_eq!(value_of(&args, "-accel"), "kvm");
        assert_eq!(value_of(&args, "-cpu"), "host");
    }

    #[test]
    fn layer_store_adds_a_vhost_user_blk_device() {
        let mut config = config();
        config.layer_store = Some(LayerStoreDisk {
            socket: "/run/vm1/blk.sock".into(),
            num_queues: 2,
        });
        let args = args_of(&config);
        assert_eq!(
            values_of(&args, "-chardev"),
            [
                "socket,id=vsock0,path=/run/vm1/vsock.sock",
                "socket,id=layers0,path=/run/vm1/blk.sock,reconnect=1"
            ]
        );
        assert_eq!(
            values_of(&args, "-device"),
            [
                "vhost-user-vsock-pci,chardev=vsock0",
                "vhost-user-blk-pci,chardev=layers0,num-queues=2"
            ]
        );
    }

    #[test]
    fn commas_in_socket_paths_are_escaped() {
        let mut config = config();
        config.vsock_socket = "/tmp/a,b/vsock.sock".into();
        let args = args_of(&config);
        assert_eq!(
            values_of(&args, "-chardev"),
            ["socket,id=vsock0,path=/tmp/a,,b/vsock.sock"]
        );
    }

    #[test]
    fn extra_cmdline_words_follow_the_base() {
        let mut config = config();
        config.extra_cmdline = vec!["loglevel=7".into(), "gantry.debug".into()];
        let args = args_of(&config);
        assert_eq!(
            value_of(&args, "-append"),
            format!("{BASE_KERNEL_CMDLINE} loglevel=7 gantry.debug")
        );
    }

    #[test]
    fn command_runs_the_configured_binary() {
        let mut config = config();
        config.qemu_binary = "/opt/qemu/bin/qemu-system-x86_64".into();
        let command = config.command();
        assert_eq!(command.get_program(), "/opt/qemu/bin/qemu-system-x86_64");
        assert_eq!(command.get_args().count(), config.args().len());
    }

    #[test]
    fn validate_rejects_impossible_machines() {
        let mut config = config();
        assert!(config.validate().is_ok());
        config.memory_mib = 0;
        assert!(matches!(
            config.validate(),
            Err(QemuError::InvalidConfig(_))
        ));

        let mut config = self::config();
        config.cpus = 0;
        assert!(matches!(
            config.validate(),
            Err(QemuError::InvalidConfig(_))
        ));

        let mut config = self::config();
        config.layer_store = Some(LayerStoreDisk {
            socket: "/b.sock".into(),
            num_queues: 0,
        });
        assert!(matches!(
            config.validate(),
            Err(QemuError::InvalidConfig(_))
        ));

        let mut config = self::config();
        config.extra_cmdline = vec!["a b".into()];
        assert!(matches!(
            config.validate(),
            Err(QemuError::InvalidConfig(_))
        ));
    }

    #[test]
    fn from_guest_dir_requires_the_built_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error = QemuConfig::from_guest_dir(dir.path(), "/v.sock", "/s.log")
            .expect_err("an empty directory is no guest");
        assert!(matches!(error, QemuError::MissingGuestFile { .. }));

        std::fs::write(dir.path().join(GUEST_KERNEL_FILE), b"k").expect("write kernel");
        let error = QemuConfig::from_guest_dir(dir.path(), "/v.sock", "/s.log")
            .expect_err("a kernel alone is no guest");
        assert!(
            matches!(&error, QemuError::MissingGuestFile { path } if path.ends_with(GUEST_INITRD_FILE)),
            "{error}"
        );

        std::fs::write(dir.path().join(GUEST_INITRD_FILE), b"i").expect("write initrd");
        let config =
            QemuConfig::from_guest_dir(dir.path(), "/v.sock", "/s.log").expect("both files exist");
        assert_eq!(config.kernel, dir.path().join(GUEST_KERNEL_FILE));
        assert_eq!(config.initrd, dir.path().join(GUEST_INITRD_FILE));
    }

    #[test]
    fn from_guest_dir_prefers_the_uncompressed_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in [GUEST_KERNEL_FILE, GUEST_PVH_KERNEL_FILE, GUEST_INITRD_FILE] {
            std::fs::write(dir.path().join(file), b"x").expect("write");
        }
        let config =
            QemuConfig::from_guest_dir(dir.path(), "/v.sock", "/s.log").expect("guest exists");
        assert_eq!(config.kernel, dir.path().join(GUEST_PVH_KERNEL_FILE));
    }

    #[test]
    fn dropping_a_process_kills_it() {
        let command = {
            let mut command = Command::new("sleep");
            command.arg("600");
            command
        };
        let process = QemuProcess::spawn_command(command, Path::new("sleep")).expect("spawn sleep");
        let pid = process.pid();
        drop(process);
        // After kill + wait the pid is reaped: /proc/<pid> is gone (or reused by an unrelated
        // process, which would not be our `sleep`).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !cmdline.starts_with(b"sleep\x00600"),
            "sleep 600 still running as {pid}"
        );
    }
}
