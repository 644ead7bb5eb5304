//! Facts about the guest reported to the agent by the `GuestInfo` operation.

use std::time::Duration;

use nix::sys::sysinfo::sysinfo;
use nix::sys::utsname::uname;
use nix::time::{ClockId, clock_gettime};
use nix::unistd::{SysconfVar, sysconf};

/// Errors collecting guest facts.
#[derive(Debug, thiserror::Error)]
pub enum GuestInfoError {
    /// A system call failed.
    #[error("{call} failed: {errno}")]
    Syscall {
        /// The failing call.
        call: &'static str,
        /// Its error.
        errno: nix::errno::Errno,
    },
}

/// A snapshot of the guest, independent of the wire type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFacts {
    /// `uname -r` of the running kernel.
    pub kernel_release: String,
    /// Online CPUs.
    pub cpu_count: u32,
    /// Total RAM in bytes as the kernel sees it.
    pub memory_total_bytes: u64,
    /// The shim's own version.
    pub shim_version: String,
    /// Time since boot (including suspend), in milliseconds.
    pub uptime_ms: u64,
}

/// Collects the current [`GuestFacts`].
pub fn collect() -> Result<GuestFacts, GuestInfoError> {
    let uts = uname().map_err(|errno| GuestInfoError::Syscall {
        call: "uname",
        errno,
    })?;
    let cpus = sysconf(SysconfVar::_NPROCESSORS_ONLN)
        .map_err(|errno| GuestInfoError::Syscall {
            call: "sysconf(_SC_NPROCESSORS_ONLN)",
            errno,
        })?
        .and_then(|count| u32::try_from(count).ok())
        .unwrap_or(1);
    let memory = sysinfo().map_err(|errno| GuestInfoError::Syscall {
        call: "sysinfo",
        errno,
    })?;
    let boottime =
        clock_gettime(ClockId::CLOCK_BOOTTIME).map_err(|errno| GuestInfoError::Syscall {
            call: "clock_gettime(CLOCK_BOOTTIME)",
            errno,
        })?;
    let uptime = Duration::from(boottime);
    Ok(GuestFacts {
        kernel_release: uts.release().to_string_lossy().into_owned(),
        cpu_count: cpus,
        memory_total_bytes: memory.ram_total(),
        shim_version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_ms: u64::try_from(uptime.as_millis()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_describe_this_machine() {
        let facts = collect().expect("collect");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        assert_eq!(facts.kernel_release, release.trim());
        assert!(facts.cpu_count >= 1);
        let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
        let mem_total_kib: u64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("MemTotal");
        assert_eq!(facts.memory_total_bytes, mem_total_kib * 1024);
        assert_eq!(facts.shim_version, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn uptime_moves_forward() {
        let first = collect().expect("collect").uptime_ms;
        std::thread::sleep(Duration::from_millis(20));
        let second = collect().expect("collect").uptime_ms;
        assert!(second >= first + 20, "{first} -> {second}");
        assert!(first > 0);
    }
}
