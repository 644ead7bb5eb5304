//! A container's cgroup v2 directory: limits, membership, statistics, removal.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gantry_proto::{ContainerStats, Resources};

/// Where the shim keeps its containers' cgroups.
const GANTRY_CGROUP: &str = "/sys/fs/cgroup/gantry";
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

/// One container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the cgroup for `container_id` with `resources`.
    pub fn create(container_id: &str, resources: &Resources) -> Result<Self, CgroupError> {
        validate(resources)?;
        let parent = Path::new(GANTRY_CGROUP);
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        // Controllers must be enabled on every level above the container's cgroup.
        write(
            Path::new("/sys/fs/cgroup/cgroup.subtree_control"),
            CONTROLLERS,
        )?;
        write(&parent.join("cgroup.subtree_control"), CONTROLLERS)?;
        let path = parent.join(container_id);
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

/// The container cgroups that exist now.
pub fn existing() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(GANTRY_CGROUP)
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
}
