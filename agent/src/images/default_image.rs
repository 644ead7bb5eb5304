//! The embedded default image: busybox from the card's `busybox-static`, a minimal `/etc`, so the
//! main job runs a container with no registry at all. Written once into the state directory as
//! an OCI layout, then pulled like any other layout image.

use std::path::{Path, PathBuf};

use gantry_oci::builder::{self, BuildError, ImageConfigSpec, LayerBuilder, write_image};

/// The name of the default image inside its layout.
pub const DEFAULT_IMAGE_NAME: &str = "latest";
/// Where Debian's busybox-static installs busybox.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Errors building the default image.
#[derive(Debug, thiserror::Error)]
pub enum DefaultImageError {
    /// busybox is missing or unusable.
    #[error("cannot use {path} for the default image: {reason} (install Debian's busybox-static)")]
    Busybox {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing the layout failed.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// The default image's only layer: busybox, its applets as symlinks, and a minimal /etc.
pub fn busybox_layer(busybox: &Path) -> Result<LayerBuilder, DefaultImageError> {
    let fail = |reason: String| DefaultImageError::Busybox {
        path: busybox.to_owned(),
        reason,
    };
    let binary = std::fs::read(busybox).map_err(|err| fail(err.to_string()))?;
    let listing = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|err| fail(err.to_string()))?;
    if !listing.status.success() {
        return Err(fail("`busybox --list-full` failed".into()));
    }
    let mut layer = LayerBuilder::new();
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "home", "var", "proc", "sys",
        "dev",
    ] {
        layer.dir(dir, 0o755)?;
    }
    layer.dir("tmp", 0o1777)?;
    layer.file("bin/busybox", 0o755, binary)?;
    for applet in String::from_utf8_lossy(&listing.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        layer.symlink(applet, &target)?;
    }
    layer.file(
        "etc/passwd",
        0o644,
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    layer.file("etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(layer)
}

/// The default image's configuration.
pub fn default_image_config() -> ImageConfigSpec {
    ImageConfigSpec {
        cmd: vec!["sh".into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..Default::default()
    }
}

/// Writes the default image into `layout` unless it is there already; returns the layout path.
pub fn ensure_default_image(layout: &Path, busybox: &Path) -> Result<PathBuf, DefaultImageError> {
    if layout.join("index.json").exists() {
        return Ok(layout.to_owned());
    }
    // Build beside and rename, so a crash never leaves a half-written default image.
    let partial = layout.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    write_image(
        &partial,
        DEFAULT_IMAGE_NAME,
        &[busybox_layer(busybox)?],
        &default_image_config(),
    )?;
    std::fs::rename(&partial, layout).map_err(builder::io_at(layout))?;
    Ok(layout.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_image_holds_busybox_and_its_applets() {
        if !Path::new(DEFAULT_BUSYBOX).exists() {
            panic!(
                "{DEFAULT_BUSYBOX} is missing: install busybox-static (qemu/setup-host.sh does)"
            );
        }
        let tar = busybox_layer(Path::new(DEFAULT_BUSYBOX))
            .unwrap()
            .to_tar()
            .unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut seen = std::collections::BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            let path = entry.path().unwrap().display().to_string();
            let target = entry.link_name().unwrap().map(|t| t.display().to_string());
            seen.insert(path, (header.entry_type(), header.mode().unwrap(), target));
        }
        let (kind, _, target) = &seen["bin/sh"];
        assert!(kind.is_symlink() && target.as_deref() == Some("../bin/busybox"));
        let (kind, mode, _) = &seen["bin/busybox"];
        assert!(
            kind.is_file() && mode & 0o7777 == 0o755,
            "{kind:?} {mode:o}"
        );
        assert!(seen.contains_key("etc/passwd"));
    }
}
