//! Kernel module loading for a guest whose kernel has its drivers as modules.
//!
//! The initramfs built by `qemu/build-guest.sh` carries the modules the shim needs (virtio PCI,
//! virtio-blk, vsock, erofs, overlay, loop and their dependencies) under
//! `/lib/modules/<release>/` and a list file, [`MODULE_LIST_PATH`], naming them in load order
//! (dependencies first), one path relative to the modules directory per line. There is no
//! `modprobe` in the guest: the shim loads each file with `finit_module(2)`.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

/// Where the initramfs keeps the ordered list of modules to load.
pub const MODULE_LIST_PATH: &str = "/etc/gantry/modules.list";
/// Parent of the per-release modules directories.
pub const MODULES_ROOT: &str = "/lib/modules";

/// Errors reading the module list (failures of single modules are reported in [`LoadReport`]).
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    /// The list file could not be read.
    #[error("cannot read module list {path}: {source}")]
    ReadList {
        /// The list file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// A line of the list is not a relative path inside the modules directory.
    #[error("module list line {line}: {reason}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// One module to load: a `.ko` file relative to the release's modules directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Path relative to `/lib/modules/<release>/`, e.g. `kernel/fs/erofs/erofs.ko`.
    pub relative_path: PathBuf,
}

impl ModuleEntry {
    /// The module's name as the kernel knows it (file stem, `-` and `_` are equivalent).
    pub fn name(&self) -> String {
        let stem = self
            .relative_path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        stem.replace('-', "_")
    }
}

/// Parses a module list: one relative `.ko` path per line; blank lines and `#` comments ignored.
pub fn parse_module_list(text: &str) -> Result<Vec<ModuleEntry>, ModulesError> {
    let mut entries = Vec::new();
    for (index, raw_line) in text.lines().enumerate() {
        let line_number = index.saturating_add(1);
        let line = raw_line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let path = Path::new(line);
        if path.is_absolute() {
            return Err(ModulesError::BadLine {
                line: line_number,
                reason: "path must be relative to the modules directory",
            });
        }
        if path
            .components()
            .any(|component| !matches!(component, std::path::Component::Normal(_)))
        {
            return Err(ModulesError::BadLine {
                line: line_number,
                reason: "path must not contain `.` or `..` components",
            });
        }
        if path.extension().is_none_or(|extension| extension != "ko") {
            return Err(ModulesError::BadLine {
                line: line_number,
                reason: "path must name an uncompressed .ko file",
            });
        }
        entries.push(ModuleEntry {
            relative_path: path.to_path_buf(),
        });
    }
    Ok(entries)
}

/// What happened to one module.
#[derive(Debug)]
pub enum ModuleOutcome {
    /// The module was inserted now.
    Loaded,
    /// The kernel already has it (built in or loaded earlier).
    AlreadyPresent,
    /// Loading failed; later modules depending on it will fail too.
    Failed(String),
}

/// The outcome of loading a whole list.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Each module's name and outcome, in list order.
    pub outcomes: Vec<(String, ModuleOutcome)>,
}

impl LoadReport {
    /// Names of the modules that failed to load.
    pub fn failed(&self) -> Vec<&str> {
        self.outcomes
            .iter()
            .filter(|(_, outcome)| matches!(outcome, ModuleOutcome::Failed(_)))
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

/// The modules directory of the running kernel (`/lib/modules/<uname -r>`).
pub fn running_kernel_modules_dir() -> PathBuf {
    let release = nix::sys::utsname::uname()
        .map(|uts| uts.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new(MODULES_ROOT).join(release)
}

/// Loads every module of the list at `list_path` from `modules_dir`, in order.
///
/// A module that fails is logged and skipped: the shim keeps going so that the console shows
/// every problem at once, and whatever needs the missing driver fails later with its own error.
pub fn load_listed_modules(
    list_path: &Path,
    modules_dir: &Path,
) -> Result<LoadReport, ModulesError> {
    let text = std::fs::read_to_string(list_path).map_err(|source| ModulesError::ReadList {
        path: list_path.to_path_buf(),
        source,
    })?;
    let entries = parse_module_list(&text)?;
    if !modules_dir.is_dir() {
        tracing::error!(
            dir = %modules_dir.display(),
            "no modules directory for the running kernel: the initramfs was built for another kernel"
        );
    }
    let mut report = LoadReport::default();
    for entry in entries {
        let name = entry.name();
        let outcome = load_module(&modules_dir.join(&entry.relative_path));
        match &outcome {
            ModuleOutcome::Loaded => tracing::debug!(module = %name, "module loaded"),
            ModuleOutcome::AlreadyPresent => {
                tracing::debug!(module = %name, "module already present")
            }
            ModuleOutcome::Failed(reason) => {
                tracing::error!(module = %name, %reason, "module failed to load")
            }
        }
        report.outcomes.push((name, outcome));
    }
    Ok(report)
}

fn load_module(path: &Path) -> ModuleOutcome {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) => return ModuleOutcome::Failed(format!("open {}: {error}", path.display())),
    };
    match finit_module(&file, c"", ModuleInitFlags::empty()) {
        Ok(()) => ModuleOutcome::Loaded,
        Err(Errno::EEXIST) => ModuleOutcome::AlreadyPresent,
        Err(errno) => ModuleOutcome::Failed(format!(
            "finit_module({}): {errno} ({})",
            path.display(),
            errno.desc()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_in_order_skipping_comments_and_blanks() {
        let text = "# virtio first\nkernel/drivers/virtio/virtio_ring.ko\n\n  kernel/fs/erofs/erofs.ko  # fs\n";
        let entries = parse_module_list(text).expect("valid list");
        let paths: Vec<_> = entries
            .iter()
            .map(|entry| entry.relative_path.clone())
            .collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("kernel/drivers/virtio/virtio_ring.ko"),
                PathBuf::from("kernel/fs/erofs/erofs.ko")
            ]
        );
        assert_eq!(entries[0].name(), "virtio_ring");
    }

    #[test]
    fn module_names_use_underscores() {
        let entry = ModuleEntry {
            relative_path: "kernel/crypto/crc32c-generic.ko".into(),
        };
        assert_eq!(entry.name(), "crc32c_generic");
    }

    #[test]
    fn rejects_paths_escaping_the_modules_dir() {
        for bad in [
            "/lib/modules/x/a.ko",
            "../a.ko",
            "kernel/../../a.ko",
            "kernel/a.ko.xz",
            "a",
        ] {
            let error = parse_module_list(bad).expect_err(bad);
            assert!(
                matches!(error, ModulesError::BadLine { line: 1, .. }),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn missing_module_file_is_a_failure_not_an_abort() {
        let dir = tempfile::tempdir().expect("tempdir");
        let list = dir.path().join("modules.list");
        std::fs::write(&list, "kernel/missing.ko\n").expect("write list");
        let report = load_listed_modules(&list, dir.path()).expect("list is readable");
        assert_eq!(report.failed(), ["missing"]);
    }

    #[test]
    fn missing_list_is_an_error() {
        let error = load_listed_modules(Path::new("/nonexistent/modules.list"), Path::new("/"))
            .expect_err("no list");
        assert!(matches!(error, ModulesError::ReadList { .. }));
    }
}
