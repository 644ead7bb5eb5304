//! The agent's configuration file (`agent.toml`): where its sockets live and which VMs it serves.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::containers::logs::LogLimits;
use crate::lazy::LazyConfig;
use crate::qemu::Accel;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// The file parsed but says something impossible.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The operator API's unix socket.
    pub api_socket: PathBuf,
    /// Where the agent keeps its state: the image cache, the default image, container logs.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The card's busybox, from which the embedded default image is built.
    #[serde(default = "default_busybox")]
    pub busybox: PathBuf,
    /// Disk budget of the layer cache in bytes; 0 means unlimited. Unpinned layers are evicted
    /// least recently used first.
    #[serde(default)]
    pub cache_budget_bytes: u64,
    /// Registries: mirrors, credentials, CAs, insecure hosts, platform.
    #[serde(default)]
    pub registry: gantry_oci::registry::RegistryConfig,
    /// Group (name or number) whose members may use the API socket besides root; without it the
    /// socket is root's alone (mode 0600).
    #[serde(default)]
    pub api_group: Option<String>,
    /// Serve `POST /v1/vms/{vm}/baseline` (a command as guest root outside any container): for
    /// benchmarks only.
    #[serde(default)]
    pub enable_baseline: bool,
    /// Size caps of container logs.
    #[serde(default)]
    pub logs: LogLimits,
    /// Lazy loading: the default pull mode, timeouts, connections, bandwidth.
    #[serde(default)]
    pub lazy: LazyConfig,
    /// Where this agent serves its cache to peer agents (`10.0.0.1:7420`); unset: it does not.
    #[serde(default)]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// How peers reach this agent (`http://10.0.0.1:7420`), as the peer lists name it; default
    /// `http://` and `peer_listen` when that names one address.
    #[serde(default)]
    pub peer_url: Option<String>,
    /// A file holding the token agents present to each other (needed to serve or ask peers).
    #[serde(default)]
    pub peer_token_file: Option<PathBuf>,
    /// Where `GET /metrics` is served on TCP for a Prometheus server (`127.0.0.1:9464`);
    /// unset: on the API socket only.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Peer agents asked for chunks before the registries (a cluster manifest adds more).
    #[serde(rename = "peer", default)]
    pub peers: Vec<crate::manifest::document::PeerEntry>,
    /// The VMs this agent is the device for from its start (`POST /v1/vms` attaches more).
    #[serde(rename = "vm", default)]
    pub vms: Vec<VmConfig>,
    /// How QEMU is launched for a VM attached at run time with `"launch": true`.
    #[serde(default)]
    pub vm_template: Option<LaunchConfig>,
}

/// One VM attached to the agent (also the record of one attached at run time).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The operator's name for it; unique.
    pub name: String,
    /// The guest's vsock context id (3 or more).
    pub guest_cid: u64,
    /// The vhost-user socket that QEMU's `vhost-user-vsock-pci` connects to.
    pub vsock_socket: PathBuf,
    /// The vhost-user socket that QEMU's `vhost-user-blk-pci` (the layer store) connects to.
    pub layer_socket: PathBuf,
    /// Request queues of the layer store.
    #[serde(default = "default_layer_queues")]
    pub layer_queues: u16,
    /// If present, the agent starts QEMU for this VM itself.
    pub launch: Option<LaunchConfig>,
}

/// How the agent launches QEMU for a VM (development and tests; on a real card the host owns QEMU).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs with the shim as `/init`.
    pub initrd: PathBuf,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Guest CPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// `tcg` (default: KVM hangs on the development machines) or `kvm`.
    #[serde(default)]
    pub accel: Accel,
    /// Where the guest's serial console goes.
    pub console_log: Option<PathBuf>,
    /// Also offer the serial console on this Unix socket (`socat - UNIX-CONNECT:PATH`). A client
    /// must keep reading: while its socket is full QEMU takes no console output, and a guest
    /// kernel writing to its console (an OOM report, say) waits.
    pub console_socket: Option<PathBuf>,
    /// The guest's own boot disk (a distribution image whose init starts the shim), with
    /// `kernel` and `initrd` the ones that image boots with.
    pub root_disk: Option<crate::qemu::RootDisk>,
    /// Kernel command-line words after Gantry's own (e.g. `root=UUID=…` for a root disk).
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// The QEMU binary.
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/gantry")
}

fn default_busybox() -> PathBuf {
    PathBuf::from(crate::images::default_image::DEFAULT_BUSYBOX)
}

fn default_layer_queues() -> u16 {
    crate::blk::DEFAULT_NUM_QUEUES
}

fn default_memory_mib() -> u32 {
    512
}

fn default_cpus() -> u32 {
    1
}

fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|err| match err {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.lazy.validate().map_err(ConfigError::Invalid)?;
        if let Some(addr) = self.metrics_listen {
            // A scrape target needs a port that stays the same across restarts.
            if addr.port() == 0 {
                return Err(ConfigError::Invalid(format!(
                    "metrics_listen {addr}: name a port (Prometheus scrapes a fixed address)"
                )));
            }
            if self.peer_listen == Some(addr) {
                return Err(ConfigError::Invalid(format!(
                    "metrics_listen {addr} is peer_listen too: give each its own port"
                )));
            }
        }
        if let Some(template) = &self.vm_template {
            if template.console_log.is_some() || template.console_socket.is_some() {
                return Err(ConfigError::Invalid(
                    "vm_template.console_log/console_socket: each VM attached at run time has \
                     its console in its own state directory"
                        .to_string(),
                ));
            }
            if template
                .root_disk
                .as_ref()
                .is_some_and(|disk| !disk.snapshot)
            {
                return Err(ConfigError::Invalid(
                    "vm_template.root_disk: VMs attached at run time share the template's disk; \
                     set snapshot = true so that none writes to it"
                        .to_string(),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut cids = std::collections::HashSet::new();
        self.logs.validate().map_err(ConfigError::Invalid)?;
        for vm in &self.vms {
            // VM names name directories under the state directory, like container names.
            gantry_proto::validate_id("VM name", &vm.name)
                .map_err(|err| ConfigError::Invalid(err.to_string()))?;
            if !names.insert(vm.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "VM name {:?} appears twice",
                    vm.name
                )));
            }
            // CIDs 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
            if vm.guest_cid < 3 || vm.guest_cid >= u64::from(u32::MAX) {
                return Err(ConfigError::Invalid(format!(
                    "VM {:?}: guest_cid {} is reserved; use 3 or more",
                    vm.name, vm.guest_cid
                )));
            }
            if !cids.insert(vm.guest_cid) {
                return Err(ConfigError::Invalid(format!(
                    "guest_cid {} is used by two VMs",
                    vm.guest_cid
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_VMS: &str = r#"
        api_socket = "/run/gantry/agent.sock"

        [[vm]]
        name = "vm0"
        guest_cid = 3
        vsock_socket = "/run/gantry/vm0.vsock"
        layer_socket = "/run/gantry/vm0.blk"
        [vm.launch]
        kernel = "k"
        initrd = "i"
        accel = "kvm"

        [[vm]]
        name = "vm1"
        guest_cid = 4
        vsock_socket = "/run/gantry/vm1.vsock"
        layer_socket = "/run/gantry/vm1.blk"
    "#;

    #[test]
    fn parses_vms_and_launch_defaults() {
        let config = AgentConfig::parse(TWO_VMS).unwrap();
        assert_eq!(config.vms.len(), 2);
        let launch = config.vms[0].launch.as_ref().unwrap();
        assert_eq!(launch.memory_mib, 512);
        assert_eq!(launch.accel, Accel::Kvm);
        assert!(config.vms[1].launch.is_none());
    }

    #[test]
    fn refuses_duplicate_names_and_cids_and_reserved_cids() {
        let dup_cid = TWO_VMS.replace("guest_cid = 4", "guest_cid = 3");
        assert!(
            matches!(AgentConfig::parse(&dup_cid), Err(ConfigError::Invalid(m)) if m.contains("guest_cid 3"))
        );
        let dup_name = TWO_VMS.replace("\"vm1\"", "\"vm0\"");
        assert!(
            matches!(AgentConfig::parse(&dup_name), Err(ConfigError::Invalid(m)) if m.contains("twice"))
        );
        let reserved = TWO_VMS.replace("guest_cid = 4", "guest_cid = 2");
        assert!(
            matches!(AgentConfig::parse(&reserved), Err(ConfigError::Invalid(m)) if m.contains("reserved"))
        );
    }

    #[test]
    fn metrics_listen_needs_its_own_fixed_port() {
        let with = |line: &str| format!("{line}\n{TWO_VMS}");
        let config = AgentConfig::parse(&with("metrics_listen = \"127.0.0.1:9464\"")).unwrap();
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert!(
            AgentConfig::parse(TWO_VMS)
                .unwrap()
                .metrics_listen
                .is_none()
        );
        assert!(matches!(
            AgentConfig::parse(&with("metrics_listen = \"127.0.0.1:0\"")),
            Err(ConfigError::Invalid(m)) if m.contains("name a port")
        ));
        let shared = with(
            "metrics_listen = \"127.0.0.1:7420\"\npeer_listen = \"127.0.0.1:7420\"\n\
             peer_token_file = \"/t\"",
        );
        assert!(matches!(
            AgentConfig::parse(&shared),
            Err(ConfigError::Invalid(m)) if m.contains("own port")
        ));
        assert!(matches!(
            AgentConfig::parse(&with("metrics_listen = \"localhost\"")),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn a_vm_template_parses_and_may_not_name_a_console_log() {
        let template = "[vm_template]\nkernel = \"/k\"\ninitrd = \"/i\"\ncpus = 2\n";
        let config = AgentConfig::parse(&format!("{TWO_VMS}\n{template}")).unwrap();
        let parsed = config.vm_template.expect("a template");
        assert_eq!((parsed.cpus, parsed.memory_mib), (2, 512));
        assert!(AgentConfig::parse(TWO_VMS).unwrap().vm_template.is_none());
        let shared_console = format!("{TWO_VMS}\n{template}console_log = \"/c\"\n");
        assert!(matches!(
            AgentConfig::parse(&shared_console),
            Err(ConfigError::Invalid(m)) if m.contains("console_log")
        ));
        let shared_disk = format!("{TWO_VMS}\n{template}root_disk = {{ path = \"/d.img\" }}\n");
        assert!(matches!(
            AgentConfig::parse(&shared_disk),
            Err(ConfigError::Invalid(m)) if m.contains("snapshot = true")
        ));
        let snapshot = format!(
            "{TWO_VMS}\n{template}root_disk = {{ path = \"/d.img\", snapshot = true }}\n\
             cmdline = [\"root=UUID=x\"]\n"
        );
        let parsed = AgentConfig::parse(&snapshot).unwrap().vm_template.unwrap();
        assert_eq!(parsed.root_disk.unwrap().path, PathBuf::from("/d.img"));
        assert_eq!(parsed.cmdline, ["root=UUID=x"]);
    }

    #[test]
    fn refuses_unknown_keys() {
        let typo = TWO_VMS.replace("guest_cid = 4", "guest_cid = 4\nguest_cdi = 5");
        assert!(matches!(
            AgentConfig::parse(&typo),
            Err(ConfigError::Parse { .. })
        ));
    }
}
