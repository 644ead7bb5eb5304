//! A container's cgroup v2 directory: limits, membership, statistics, removal.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gantry_proto::{ContainerStats, Resources};

/// Where cgroup2 is mounted, by the shim as PID 1 or by another init.
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// As PID 1, the containers' cgroups go under this child of the root.
const PID1_CONTAINERS: &str = "gantry";
/// Under another init, the shim moves itself into this leaf of the cgroup it was given…
const SUPERVISOR_LEAF: &str = "supervisor";
/// …and puts its containers' cgroups under this sibling.
const DELEGATED_CONTAINERS: &str = "containers";
/// The controllers containers get.
const CONTROLLERS: &str = "+cpu +memory +pids";
/// `cpu.max` period when only a quota is given.
const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// Errors of cgroup handling.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be written or read.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Processes stayed in the cgroup after it was killed.
    #[error("cgroup {0} still has processes after being killed")]
    Busy(PathBuf),
    /// A limit is impossible.
    #[error("invalid resource limit: {0}")]
    Invalid(String),
    /// The device filter could not be installed (the container would get every device).
    #[error(transparent)]
    Devices(#[from] super::device_filter::DeviceFilterError),
    /// `/proc/self/cgroup` has no cgroup2 line.
    #[error("/proc/self/cgroup names no cgroup v2 path (is cgroup2 mounted at {CGROUP_MOUNT}?)")]
    NoUnifiedCgroup,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io(path))
}

/// Checks limits before anything is created.
pub fn validate(resources: &Resources) -> Result<(), CgroupError> {
    if resources.memory_max_bytes == Some(0) {
        return Err(CgroupError::Invalid("memory limit of 0 bytes".into()));
    }
    if resources.pids_max == Some(0) {
        return Err(CgroupError::Invalid("pids limit of 0".into()));
    }
    let period = resources.cpu_period_us.unwrap_or(DEFAULT_CPU_PERIOD_US);
    // The kernel's bounds for cpu.max.
    if !(1_000..=1_000_000).contains(&period) {
        return Err(CgroupError::Invalid(format!(
            "cpu period {period} µs is outside 1000..=1000000"
        )));
    }
    if let Some(quota) = resources.cpu_quota_us
        && quota < 1_000
    {
        return Err(CgroupError::Invalid(format!(
            "cpu quota {quota} µs is below 1000"
        )));
    }
    Ok(())
}

/// The cgroup v2 path of this process: the `0::PATH` line of `/proc/self/cgroup`.
fn parse_own_cgroup(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim_end)
}

/// Where the shim puts its containers' cgroups, decided once at start.
///
/// As PID 1 the shim owns the whole hierarchy and uses `/sys/fs/cgroup/gantry`. Under another
/// init (systemd with `Delegate=yes`) it owns only the cgroup that init gave it: a cgroup can
/// enable controllers for its children only while it holds no process itself (cgroup v2's "no
/// internal processes" rule), so the shim moves itself into a `supervisor` leaf and puts
/// containers under a `containers` sibling, never outside the subtree it was delegated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupTree {
    /// Cgroups whose `cgroup.subtree_control` must enable [`CONTROLLERS`], top down.
    enable_in: Vec<PathBuf>,
    /// The containers' cgroups' parent (the last of `enable_in`).
    parent: PathBuf,
}

impl CgroupTree {
    /// The layout for a shim at cgroup `own` (its `/proc/self/cgroup` path) under `mount`.
    /// A shim in the root cgroup (PID 1, or started by hand outside any service) owns the
    /// hierarchy; one anywhere else was delegated `own`.
    fn plan(mount: &Path, own: &str) -> Self {
        let own = own.trim_start_matches('/');
        if own.is_empty() {
            let parent = mount.join(PID1_CONTAINERS);
            return Self {
                enable_in: vec![mount.to_owned(), parent.clone()],
                parent,
            };
        }
        let delegated = mount.join(own);
        let parent = delegated.join(DELEGATED_CONTAINERS);
        Self {
            enable_in: vec![delegated, parent.clone()],
            parent,
        }
    }

    /// The supervisor leaf this process must move into first, for a delegated tree.
    fn supervisor_leaf(&self) -> Option<PathBuf> {
        let delegated = self.parent.parent()?;
        (self.parent.file_name()? == DELEGATED_CONTAINERS).then(|| delegated.join(SUPERVISOR_LEAF))
    }

    /// The layout of a shim that owns the whole hierarchy (PID 1).
    pub fn whole_hierarchy() -> Self {
        Self::plan(Path::new(CGROUP_MOUNT), "/")
    }

    /// The layout for this process (`pid1`: the shim is init), from `/proc/self/cgroup`.
    pub fn for_this_process(pid1: bool) -> Result<Self, CgroupError> {
        if pid1 {
            return Ok(Self::whole_hierarchy());
        }
        let mount = Path::new(CGROUP_MOUNT);
        let path = Path::new("/proc/self/cgroup");
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let own = parse_own_cgroup(&text).ok_or(CgroupError::NoUnifiedCgroup)?;
        Ok(Self::plan(mount, own))
    }

    /// Prepares the layout: moves the shim into its supervisor leaf when it was delegated a
    /// cgroup, creates the containers' parent, enables the controllers and removes empty
    /// container cgroups a previous shim left (a restarted service's containers die with it).
    pub fn prepare(&self) -> Result<(), CgroupError> {
        if let Some(leaf) = self.supervisor_leaf() {
            std::fs::create_dir_all(&leaf).map_err(io(&leaf))?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        }
        self.ensure_parent()?;
        for name in self.existing() {
            // Fails, and is left, while a process is still in it.
            let _ = std::fs::remove_dir(self.parent.join(name));
        }
        Ok(())
    }

    /// A tree rooted at `parent` that enables nothing (unit tests of the runtime).
    #[cfg(test)]
    pub fn unprepared(parent: PathBuf) -> Self {
        Self {
            enable_in: Vec::new(),
            parent,
        }
    }

    /// Creates the containers' parent if missing and enables the controllers on every level
    /// above a container's cgroup (idempotent).
    fn ensure_parent(&self) -> Result<(), CgroupError> {
        std::fs::create_dir_all(&self.parent).map_err(io(&self.parent))?;
        for cgroup in &self.enable_in {
            write(&cgroup.join("cgroup.subtree_control"), CONTROLLERS)?;
        }
        Ok(())
    }

    /// The containers' cgroups' parent.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// The container cgroups that exist now.
    pub fn existing(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.parent)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.path().is_dir())
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// One container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the cgroup for `container_id` with `resources` in `tree`.
    pub fn create(
        tree: &CgroupTree,
        container_id: &str,
        resources: &Resources,
    ) -> Result<Self, CgroupError> {
        validate(resources)?;
        // Again at each creation, as before the tree was prepared at start: a preparation that
        // failed then (logged) is retried here, and this creation fails with its reason.
        tree.ensure_parent()?;
        let path = tree.parent().join(container_id);
        std::fs::create_dir(&path).map_err(io(&path))?;
        let cgroup = Self { path };
        // Before any process joins, and fatal: a container without it could open the layer
        // disk given a device node.
        let configured = super::device_filter::attach(&cgroup.path)
            .map_err(CgroupError::from)
            .and_then(|()| cgroup.apply(resources));
        if let Err(err) = configured {
            let _ = std::fs::remove_dir(&cgroup.path);
            return Err(err);
        }
        Ok(cgroup)
    }

    fn apply(&self, resources: &Resources) -> Result<(), CgroupError> {
        if let Some(bytes) = resources.memory_max_bytes {
            write(&self.path.join("memory.max"), &bytes.to_string())?;
            // Without swap in the guest this is moot, but a limit must not leak into swap.
            let _ = std::fs::write(self.path.join("memory.swap.max"), "0");
        }
        if resources.cpu_quota_us.is_some() || resources.cpu_period_us.is_some() {
            let quota = resources
                .cpu_quota_us
                .map_or_else(|| "max".to_owned(), |quota| quota.to_string());
            let period = resources.cpu_period_us.unwrap_or(DEFAULT_CPU_PERIOD_US);
            write(&self.path.join("cpu.max"), &format!("{quota} {period}"))?;
        }
        if let Some(pids) = resources.pids_max {
            write(&self.path.join("pids.max"), &pids.to_string())?;
        }
        Ok(())
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `oom_kill` count from `memory.events`.
    pub fn oom_kills(&self) -> u64 {
        read_keyed(&self.path.join("memory.events"), "oom_kill").unwrap_or(0)
    }

    /// Resource usage.
    pub fn stats(&self) -> Result<ContainerStats, CgroupError> {
        let read_number = |name: &str| -> Result<Option<u64>, CgroupError> {
            let path = self.path.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(text.trim().parse().ok()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(err) => Err(io(&path)(err)),
            }
        };
        Ok(ContainerStats {
            memory_current_bytes: read_number("memory.current")?.unwrap_or(0),
            memory_max_bytes: read_number("memory.max")?,
            memory_peak_bytes: read_number("memory.peak")?,
            cpu_usage_us: read_keyed(&self.path.join("cpu.stat"), "usage_usec").unwrap_or(0),
            pids_current: read_number("pids.current")?.unwrap_or(0),
            oom_kills: self.oom_kills(),
        })
    }

    /// Kills everything left in the cgroup and removes it.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        if !self.path.exists() {
            return Ok(());
        }
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Busy(self.path.clone()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // rmdir can race the kernel's last bookkeeping of exiting tasks: retry briefly.
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(err)
                    if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(err) => return Err(io(&self.path)(err)),
            }
        }
    }
}

/// Reads `key value` lines (memory.events, cpu.stat) for one key.
fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_keyed(&text, key)
}

fn parse_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_parse() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_keyed(events, "oom_kill"), Some(2));
        assert_eq!(parse_keyed(events, "oom"), Some(3));
        assert_eq!(parse_keyed(events, "missing"), None);
    }

    #[test]
    fn impossible_limits_are_refused() {
        let ok = Resources {
            memory_max_bytes: Some(1 << 20),
            cpu_quota_us: Some(50_000),
            cpu_period_us: None,
            pids_max: Some(10),
        };
        assert!(validate(&ok).is_ok());
        for bad in [
            Resources {
                memory_max_bytes: Some(0),
                ..Default::default()
            },
            Resources {
                pids_max: Some(0),
                ..Default::default()
            },
            Resources {
                cpu_quota_us: Some(10),
                ..Default::default()
            },
            Resources {
                cpu_period_us: Some(10),
                ..Default::default()
            },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_unified_line_of_proc_self_cgroup_names_the_cgroup() {
        let systemd = "0::/system.slice/gantry-shim.service\n";
        assert_eq!(
            parse_own_cgroup(systemd),
            Some("/system.slice/gantry-shim.service")
        );
        let hybrid = "12:pids:/system.slice\n1:name=systemd:/init.scope\n0::/init.scope\n";
        assert_eq!(parse_own_cgroup(hybrid), Some("/init.scope"));
        assert_eq!(parse_own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn a_shim_in_the_root_cgroup_owns_the_hierarchy() {
        let tree = CgroupTree::plan(Path::new("/cg"), "/");
        assert_eq!(tree.parent(), Path::new("/cg/gantry"));
        assert_eq!(
            tree.enable_in,
            [PathBuf::from("/cg"), PathBuf::from("/cg/gantry")]
        );
        assert_eq!(tree.supervisor_leaf(), None);
    }

    #[test]
    fn a_delegated_shim_stays_inside_its_cgroup() {
        let tree = CgroupTree::plan(Path::new("/cg"), "/system.slice/gantry-shim.service");
        let own = Path::new("/cg/system.slice/gantry-shim.service");
        assert_eq!(tree.parent(), own.join("containers"));
        assert_eq!(tree.enable_in, [own.to_owned(), own.join("containers")]);
        assert_eq!(tree.supervisor_leaf(), Some(own.join("supervisor")));
        assert!(tree.enable_in.iter().all(|cgroup| cgroup.starts_with(own)));
    }

    #[test]
    fn preparing_moves_the_shim_to_its_leaf_and_clears_leftovers() {
        // A plain directory stands in for the delegated cgroup: what is written where.
        let mount = tempfile::tempdir().unwrap();
        let own = mount.path().join("system.slice/gantry-shim.service");
        let leftover = own.join("containers/old");
        let busy = own.join("containers/busy");
        std::fs::create_dir_all(&leftover).unwrap();
        std::fs::create_dir_all(&busy).unwrap();
        std::fs::write(busy.join("cgroup.procs"), "42\n").unwrap();
        let tree = CgroupTree::plan(mount.path(), "/system.slice/gantry-shim.service");
        tree.prepare().unwrap();
        assert_eq!(
            std::fs::read_to_string(own.join("supervisor/cgroup.procs")).unwrap(),
            std::process::id().to_string()
        );
        for cgroup in [&own, &own.join("containers")] {
            assert_eq!(
                std::fs::read_to_string(cgroup.join("cgroup.subtree_control")).unwrap(),
                CONTROLLERS
            );
        }
        assert!(!leftover.exists(), "an empty leftover cgroup is removed");
        assert_eq!(tree.existing(), ["busy"], "one with a process stays");
    }
}
