//! The layer store seen by a real guest: QEMU (TCG) with `vhost-user-blk-pci` attached to
//! Gantry's backend, Debian's 6.1 kernel and a busybox initramfs built here whose init checks
//! the disk and prints what it found on the serial console:
//! - the disk's serial is `gantry-layers`, its size the configured capacity, it is read-only
//!   with 4 KiB logical blocks and two hardware queues, and booting logged no I/O error (the
//!   partition probes read the zero ranges);
//! - the header at 4 KiB carries the magic; a mapped layer's bytes have the file's SHA-256;
//! - an unmapped range fails with EIO; a write fails;
//! - a layer mapped while the guest runs becomes readable (and the header lists it).
//!
//! Skips (with a message) when QEMU, the 6.1 kernel or busybox-static is missing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_agent::blk::{FileSource, LayerStoreConfig, LayerStoreDevice};
use gantry_agent::qemu::{LayerStoreDisk, QemuConfig, QemuProcess};
use gantry_agent::vsock::{VsockDevice, VsockDeviceConfig};
use sha2::{Digest, Sha256};

const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

/// First layer: 3 MiB + 12 KiB (not a whole number of MiB).
const FIRST_LEN: usize = (3 << 20) + 12 * 1024;
/// Second layer, mapped while the guest runs.
const SECOND_LEN: usize = 256 * 1024;
/// Where the layers land: the first after the 1 MiB header region, the second at the next
/// 1 MiB boundary after the first.
const FIRST_OFFSET: u64 = 1 << 20;
const SECOND_OFFSET: u64 = 5 << 20;
/// An unmapped range: between the first layer's last block and the second layer.
const UNMAPPED_OFFSET: u64 = (4 << 20) + (1 << 19);

fn find_kernel() -> Option<(PathBuf, PathBuf)> {
    let kernel = fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with("vmlinuz-6.1.") && name.ends_with("-amd64")
        })?;
    let version = kernel
        .file_name()?
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let modules = PathBuf::from("/lib/modules").join(version);
    modules.is_dir().then_some((kernel, modules))
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
        } else if path.file_name()?.to_str()? == format!("{name}.ko") {
            return Some(path);
        }
    }
    None
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The guest's init: load virtio-blk, check the disk, print `KEY=value` lines, power off.
fn init_script() -> String {
    let mut insmods = String::new();
    for name in MODULES {
        insmods.push_str(&format!("insmod /modules/{name}.ko\n"));
    }
    let first_blocks = FIRST_LEN.div_ceil(4096);
    let second_blocks = SECOND_LEN / 4096;
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmods}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "GANTRY-SERIAL=$(cat /sys/block/vda/serial)"
echo "GANTRY-SIZE=$(blockdev --getsize64 /dev/vda)"
echo "GANTRY-RO=$(cat /sys/block/vda/ro)"
echo "GANTRY-LBS=$(cat /sys/block/vda/queue/logical_block_size)"
echo "GANTRY-HWQ=$(ls /sys/block/vda/mq | wc -l)"
echo "GANTRY-BOOT-IO-ERRORS=$(dmesg | grep -c 'I/O error')"
echo "GANTRY-ZEROS=$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)"
echo "GANTRY-MAGIC=$(dd if=/dev/vda bs=4096 skip=1 count=1 iflag=direct 2>/dev/null | head -c 8)"
echo "GANTRY-FIRST-SHA=$(dd if=/dev/vda bs=4096 skip={first_skip} count={first_blocks} iflag=direct 2>/dev/null | head -c {FIRST_LEN} | sha256sum | cut -d' ' -f1)"
dd if=/dev/vda of=/dev/null bs=4096 skip={unmapped_skip} count=1 iflag=direct 2>/tmp/eio
echo "GANTRY-EIO-RC=$?"
echo "GANTRY-EIO-MSG=$(grep -c 'Input/output error' /tmp/eio)"
echo "GANTRY-EIO-TEXT=$(cat /tmp/eio)"
echo hello | dd of=/dev/vda bs=4096 seek={first_skip} count=1 conv=sync oflag=direct 2>/tmp/write
echo "GANTRY-WRITE-RC=$?"
echo "GANTRY-AFTER-WRITE-SHA=$(dd if=/dev/vda bs=4096 skip={first_skip} count={first_blocks} iflag=direct 2>/dev/null | head -c {FIRST_LEN} | sha256sum | cut -d' ' -f1)"
echo GANTRY-READY
i=0
count=0
while [ $i -lt 600 ]; do
  count=$(dd if=/dev/vda bs=4096 skip=1 count=1 iflag=direct 2>/dev/null | od -An -tu4 -j 12 -N 4 | tr -d ' ')
  [ "$count" = 2 ] && break
  sleep 0.1
  i=$((i+1))
done
echo "GANTRY-LIVE-COUNT=$count"
echo "GANTRY-SECOND-SHA=$(dd if=/dev/vda bs=4096 skip={second_skip} count={second_blocks} iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo GANTRY-DONE
poweroff -f
"#,
        first_skip = FIRST_OFFSET / 4096,
        unmapped_skip = UNMAPPED_OFFSET / 4096,
        second_skip = SECOND_OFFSET / 4096,
    )
}

fn build_initramfs(work: &Path, modules: &Path) -> PathBuf {
    let root = work.join("initramfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("modules")).unwrap();
    fs::create_dir_all(root.join("tmp")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for name in MODULES {
        let module = find_module(modules, name).unwrap_or_else(|| panic!("module {name}"));
        fs::copy(&module, root.join("modules").join(format!("{name}.ko"))).unwrap();
    }
    let init = root.join("init");
    fs::write(&init, init_script()).unwrap();
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    let cpio = work.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio --quiet -o -H newc > '{}'",
            root.display(),
            cpio.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "cpio");
    cpio
}

/// The value of the first `GANTRY-<key>=` line of the console log.
fn value<'a>(log: &'a str, key: &str) -> &'a str {
    let prefix = format!("GANTRY-{key}=");
    // A line may start with the firmware's terminal escapes: look for the key anywhere in it.
    log.lines()
        .find_map(|line| {
            let start = line.find(prefix.as_str())?;
            line.get(start + prefix.len()..)
        })
        .unwrap_or_else(|| panic!("no {prefix} in the console log:\n{log}"))
        .trim()
}

/// Waits until the serial log contains `marker`; returns the log.
fn wait_for(log: &Path, marker: &str, qemu: &mut QemuProcess, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) {
            return text;
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            panic!("QEMU exited ({status}) before {marker}:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "no {marker} within {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_guest_reads_layers_from_the_layer_store() {
    let Some((kernel, modules)) = find_kernel() else {
        eprintln!("SKIP: no /boot/vmlinuz-6.1.*-amd64 (apt-get install linux-image-amd64)");
        return;
    };
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
        || !Path::new("/bin/busybox").exists()
    {
        eprintln!("SKIP: needs qemu-system-x86 and busybox-static");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let initramfs = build_initramfs(work.path(), &modules);

    let first = gantry_testkit::noise(FIRST_LEN, 1);
    let second = gantry_testkit::noise(SECOND_LEN, 2);
    let first_path = work.path().join("first.img");
    let second_path = work.path().join("second.img");
    fs::write(&first_path, &first).unwrap();
    fs::write(&second_path, &second).unwrap();

    let blk_socket = work.path().join("blk.sock");
    let config = LayerStoreConfig::new(&blk_socket);
    let capacity = config.capacity;
    let device = LayerStoreDevice::start(config).expect("layer store");
    let extent = device
        .extents()
        .map_layer(
            "sha256:first",
            Arc::new(FileSource::open(&first_path).unwrap()),
        )
        .unwrap();
    assert_eq!(extent.offset, FIRST_OFFSET);
    let vsock_socket = work.path().join("vsock.sock");
    let vsock = VsockDevice::start(VsockDeviceConfig::new(&vsock_socket, 3)).expect("vsock");

    let serial = work.path().join("serial.log");
    let mut qemu_config = QemuConfig::new(&kernel, &initramfs, &vsock_socket, &serial);
    qemu_config.layer_store = Some(LayerStoreDisk {
        socket: blk_socket.clone(),
        num_queues: 2,
    });
    // Two vCPUs, so blk-mq uses both request queues (it makes min(queues, CPUs) of them).
    qemu_config.cpus = 2;
    qemu_config.extra_cmdline = vec!["loglevel=4".into()];
    let mut qemu = QemuProcess::spawn(&qemu_config).expect("start QEMU");

    let log = wait_for(&serial, "GANTRY-READY", &mut qemu, Duration::from_secs(240));
    assert_eq!(value(&log, "SERIAL"), "gantry-layers");
    assert_eq!(value(&log, "SIZE"), capacity.to_string());
    assert_eq!(value(&log, "RO"), "1");
    assert_eq!(value(&log, "LBS"), "4096");
    assert_eq!(value(&log, "HWQ"), "2");
    assert_eq!(
        value(&log, "BOOT-IO-ERRORS"),
        "0",
        "booting logged I/O errors:\n{log}"
    );
    assert_eq!(
        value(&log, "ZEROS"),
        "0",
        "non-zero bytes in the first 4 KiB"
    );
    assert_eq!(value(&log, "MAGIC"), "GANTRYLS");
    assert_eq!(value(&log, "FIRST-SHA"), sha256_hex(&first));
    assert_ne!(value(&log, "EIO-RC"), "0", "an unmapped read must fail");
    assert_eq!(
        value(&log, "EIO-MSG"),
        "1",
        "EIO expected, got: {}",
        value(&log, "EIO-TEXT")
    );
    assert_ne!(value(&log, "WRITE-RC"), "0", "a write must fail");
    assert_eq!(value(&log, "AFTER-WRITE-SHA"), sha256_hex(&first));
    assert_eq!(
        fs::read(&first_path).unwrap(),
        first,
        "the file on the card is unchanged"
    );

    // Map a second layer while the guest runs.
    let live = device
        .extents()
        .map_layer(
            "sha256:second",
            Arc::new(FileSource::open(&second_path).unwrap()),
        )
        .unwrap();
    assert_eq!(live.offset, SECOND_OFFSET);
    let log = wait_for(&serial, "GANTRY-DONE", &mut qemu, Duration::from_secs(120));
    assert_eq!(
        value(&log, "LIVE-COUNT"),
        "2",
        "the header lists the live-mapped layer"
    );
    assert_eq!(value(&log, "SECOND-SHA"), sha256_hex(&second));

    let deadline = Instant::now() + Duration::from_secs(30);
    while qemu.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(qemu);
    device.shutdown();
    vsock.shutdown();
}
