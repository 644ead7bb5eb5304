//! The root file system benchmarks measure: debootstrap's, or (no package mirror reachable, or
//! asked for) the same packages copied from the host's installed files by `qemu/host-root.sh`.
//! Shared by the agent's pull benchmark and the end-to-end benchmarks, so that they read
//! `GANTRY_BENCH_ROOT` and describe a host root the same way.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Which root file system the benchmarks use (`GANTRY_BENCH_ROOT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootChoice {
    /// Unset or `auto`: debootstrap, and the host's files when that fails (no mirror reachable).
    DebootstrapFirst,
    /// `debootstrap`: debootstrap or nothing, for figures that must be about the Debian root.
    Debootstrap,
    /// `host`: the host's files (`qemu/host-root.sh`), without trying a mirror.
    Host,
}

impl RootChoice {
    /// The choice `GANTRY_BENCH_ROOT` makes.
    pub fn from_env() -> Result<RootChoice, String> {
        match std::env::var("GANTRY_BENCH_ROOT").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(RootChoice::DebootstrapFirst),
            Ok("debootstrap") => Ok(RootChoice::Debootstrap),
            Ok("host") => Ok(RootChoice::Host),
            Ok(other) => Err(format!(
                "GANTRY_BENCH_ROOT must be auto, debootstrap or host (got {other:?})"
            )),
        }
    }
}

/// The last non-empty line of `text` (what a failed debootstrap says last is why).
pub fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or(text)
}

/// `debootstrap --variant=minbase [--include=PACKAGES] bookworm DEST MIRROR`, into a fresh
/// `dest`. On failure it prints debootstrap's log, removes `dest` and says why in one line
/// (debootstrap's last), which a benchmark prints when it falls back to the host's files.
pub fn debootstrap_minbase(dest: &Path, include: &[&str], mirror: &str) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dest);
    let mut command = Command::new("debootstrap");
    command.arg("--variant=minbase");
    if !include.is_empty() {
        command.arg(format!("--include={}", include.join(",")));
    }
    let output = command
        .arg("bookworm")
        .arg(dest)
        .arg(mirror)
        .output()
        .map_err(|e| format!("running debootstrap: {e}"))?;
    if !output.status.success() {
        let log = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        eprintln!("debootstrap failed ({}):\n{log}", output.status);
        let _ = std::fs::remove_dir_all(dest);
        return Err(format!(
            "debootstrap {}: {}",
            output.status,
            last_line(&log)
        ));
    }
    Ok(())
}

/// Copies the host's files for `packages` into `dir` with `qemu/host-root.sh` (which keeps the
/// tree and only describes it again on later runs); returns its description ("host files: N
/// packages (…), N MB").
pub fn host_root(dir: &Path, packages: &[&str]) -> Result<String, String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qemu/host-root.sh");
    let output = Command::new(&script)
        .arg(dir)
        .args(packages)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} {} {} failed ({})",
            script.display(),
            dir.display(),
            packages.join(" "),
            output.status
        ));
    }
    Ok(last_line(&String::from_utf8_lossy(&output.stdout)).to_owned())
}

#[cfg(test)]
mod tests {
    // Paths, not `use super::*`: the benchmark that includes this file by path compiles the
    // module without its test functions, and the import would be unused there.
    #[test]
    fn the_last_line_is_the_last_one_with_text() {
        assert_eq!(
            super::last_line("I: a\nE: no release file\n\n"),
            "E: no release file"
        );
        assert_eq!(super::last_line(""), "");
    }
}
