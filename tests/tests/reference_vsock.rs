//! Boots the real guest (kernel + initramfs from `qemu/build-guest.sh`) under QEMU and talks to
//! the shim over vsock through rust-vmm's reference backend, `vhost-device-vsock`, so the guest
//! is validated independently of Gantry's own vsock backend.
//!
//! Needs: the built guest (`qemu/build-guest.sh`), `qemu-system-x86_64`, and
//! `vhost-device-vsock` (`qemu/setup-host.sh` installs it); a missing one fails the test.
//!
//! Run with `cargo test -p gantry-e2e --test reference_vsock -- --nocapture` to see the timings.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gantry_agent::qemu::{self, QemuConfig, QemuProcess};
use gantry_proto::{
    DEFAULT_MAX_FRAME_LEN, Hello, Message, Op, PROTOCOL_VERSION, ProtocolVersion, Reply, Request,
    Response, SHIM_VSOCK_PORT, read_frame, write_frame,
};

/// Guest CID given to the reference backend.
const GUEST_CID: u32 = 3;
/// Generous bound for a TCG boot on a loaded 2-core machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(90);
const MEMORY_MIB: u32 = 512;

/// Lines that must never appear on the guest console of a healthy boot.
const CONSOLE_ERROR_PATTERNS: &[&str] = &[
    "I/O error",
    "Kernel panic",
    "Call Trace",
    "failed to load",
    " ERROR ",
    "Unknown symbol",
    "unable to open an initial console",
];

struct Prerequisites {
    guest_dir: PathBuf,
    vhost_device_vsock: PathBuf,
    qemu: PathBuf,
}

/// Finds what the test needs, or explains what is missing.
fn prerequisites() -> Result<Prerequisites, String> {
    let guest_dir = QemuConfig::guest_dir_from_env(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"),
    );
    if let Err(missing) = QemuConfig::from_guest_dir(&guest_dir, "unused", "unused") {
        return Err(format!("{missing}"));
    }
    let home_cargo_bin =
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin"));
    let vhost_device_vsock = find_program("vhost-device-vsock", home_cargo_bin.as_deref())
        .ok_or("vhost-device-vsock not found: cargo install vhost-device-vsock")?;
    let qemu = find_program(qemu::DEFAULT_QEMU_BINARY, None)
        .ok_or("qemu-system-x86_64 not found: apt-get install qemu-system-x86")?;
    Ok(Prerequisites {
        guest_dir,
        vhost_device_vsock,
        qemu,
    })
}

fn find_program(name: &str, extra_dir: Option<&Path>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dir.map(Path::to_path_buf))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Kills and reaps a helper process when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_path(path: &Path, deadline: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A connection to the shim through the backend's unix socket (`CONNECT <port>` handshake).
struct ShimConnection {
    stream: UnixStream,
}

impl ShimConnection {
    /// Connects and reads the shim's `Hello`; `None` while the guest is not listening yet.
    fn try_connect(uds_path: &Path) -> Option<(Self, Hello)> {
        let stream = UnixStream::connect(uds_path).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        (&stream)
            .write_all(format!("CONNECT {SHIM_VSOCK_PORT}\n").as_bytes())
            .ok()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        if !line.starts_with("OK ") {
            return None;
        }
        // Bytes after the OK line may already sit in the reader's buffer: read the Hello from it.
        let hello = match read_frame(&mut reader, DEFAULT_MAX_FRAME_LEN) {
            Ok(Some(Message::Hello(hello))) => hello,
            other => panic!("the shim must speak first with a Hello, got {other:?}"),
        };
        assert!(
            reader.buffer().is_empty(),
            "the shim sent more than its Hello before ours"
        );
        Some((
            Self {
                stream: reader.into_inner(),
            },
            hello,
        ))
    }

    fn send(&mut self, message: &Message) {
        write_frame(&mut self.stream, message, DEFAULT_MAX_FRAME_LEN).expect("write frame");
    }

    fn receive(&mut self) -> Message {
        read_frame(&mut self.stream, DEFAULT_MAX_FRAME_LEN)
            .expect("read frame")
            .expect("connection open")
    }

    fn request(&mut self, id: u64, op: Op) -> Response {
        self.send(&Message::Request(Request { id, op }));
        match self.receive() {
            Message::Response(response) => {
                assert_eq!(response.id, id);
                response
            }
            other => panic!("expected a Response, got {other:?}"),
        }
    }
}

fn agent_hello() -> Message {
    Message::Hello(Hello::new("boot_guest test"))
}

#[test]
fn guest_boots_and_the_shim_answers_over_vsock() {
    let prerequisites = prerequisites().unwrap_or_else(|missing| panic!("{missing}"));
    let work = tempfile::tempdir().expect("tempdir");
    let vhost_socket = work.path().join("vhost.sock");
    let uds_path = work.path().join("vm.vsock");
    let serial_log = work.path().join("serial.log");

    let _backend = KillOnDrop(
        Command::new(&prerequisites.vhost_device_vsock)
            .arg("--vm")
            .arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                vhost_socket.display(),
                uds_path.display()
            ))
            .stdout(Stdio::null())
            .stderr(File::create(work.path().join("vhost.log")).expect("backend log"))
            .spawn()
            .expect("start vhost-device-vsock"),
    );
    wait_for_path(&vhost_socket, Duration::from_secs(10));

    let mut config =
        QemuConfig::from_guest_dir(&prerequisites.guest_dir, &vhost_socket, &serial_log)
            .expect("guest built");
    config.qemu_binary = prerequisites.qemu.clone();
    config.memory_mib = MEMORY_MIB;
    config.validate().expect("valid config");
    let mut command = config.command();
    command.stderr(File::create(work.path().join("qemu.log")).expect("qemu log"));
    let mut vm = QemuProcess::spawn_command(command, &config.qemu_binary).expect("start QEMU");

    // Boot to ready: QEMU spawn until the shim's Hello arrives.
    let (mut connection, shim_hello) = loop {
        if let Some(connected) = ShimConnection::try_connect(&uds_path) {
            break connected;
        }
        if let Some(status) = vm.try_wait().expect("poll QEMU") {
            panic!(
                "QEMU exited ({status}) before the shim answered; console:\n{}",
                std::fs::read_to_string(&serial_log).unwrap_or_default()
            );
        }
        assert!(
            vm.elapsed() < BOOT_DEADLINE,
            "no Hello within {BOOT_DEADLINE:?}; console:\n{}",
            std::fs::read_to_string(&serial_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let boot_to_ready = vm.elapsed();
    assert_eq!(shim_hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(
        shim_hello.software_version,
        format!("gantry-shim {}", env!("CARGO_PKG_VERSION"))
    );

    // Hello + GuestInfo round trip.
    let started = Instant::now();
    connection.send(&agent_hello());
    let response = connection.request(1, Op::GuestInfo);
    let hello_and_guest_info = started.elapsed();
    let Ok(Reply::GuestInfo(info)) = response.result else {
        panic!("GuestInfo failed: {:?}", response.result);
    };
    let expected_release =
        std::fs::read_to_string(prerequisites.guest_dir.join("kernel-release")).unwrap_or_default();
    if !expected_release.is_empty() {
        assert_eq!(info.kernel_release, expected_release.trim());
    }
    assert_eq!(info.cpus, 1);
    let memory_mib = info.memory_total_bytes >> 20;
    assert!(
        (MEMORY_MIB / 2..=MEMORY_MIB).contains(&u32::try_from(memory_mib).unwrap_or(u32::MAX)),
        "guest reports {memory_mib} MiB of {MEMORY_MIB} MiB"
    );
    assert_eq!(info.shim_version, env!("CARGO_PKG_VERSION"));
    assert!(info.shim_ready_uptime_ms > 0);
    assert!(info.uptime_ms >= info.shim_ready_uptime_ms);

    // Steady-state request latency.
    const PINGS: u32 = 50;
    let started = Instant::now();
    for id in 0..PINGS {
        let payload = vec![u8::try_from(id % 256).unwrap_or(0); 64];
        let response = connection.request(
            100 + u64::from(id),
            Op::Ping {
                payload: payload.clone(),
            },
        );
        assert_eq!(response.result, Ok(Reply::Pong { payload }));
    }
    let ping_average = started.elapsed() / PINGS;
    let started = Instant::now();
    assert!(connection.request(99, Op::GuestInfo).result.is_ok());
    let guest_info_steady = started.elapsed();

    // A second connection (an agent that restarted) is served while the first is still open.
    let started = Instant::now();
    let (mut second, _) = ShimConnection::try_connect(&uds_path).expect("second connection");
    let connect_to_hello = started.elapsed();
    second.send(&agent_hello());
    assert!(second.request(1, Op::GuestInfo).result.is_ok());

    // A peer speaking another major version is refused with both versions named.
    let (mut stranger, _) = ShimConnection::try_connect(&uds_path).expect("third connection");
    let mut future = Hello::new("future agent");
    future.protocol_version = ProtocolVersion {
        major: PROTOCOL_VERSION.major + 1,
        minor: 0,
    };
    stranger.send(&Message::Hello(future));
    match stranger.receive() {
        Message::Goodbye { reason } => {
            assert!(reason.contains(&PROTOCOL_VERSION.to_string()), "{reason}");
            assert!(
                reason.contains(&format!("{}.0", PROTOCOL_VERSION.major + 1)),
                "{reason}"
            );
        }
        other => panic!("expected Goodbye, got {other:?}"),
    }

    // A frame that does not decode ends only that connection.
    let (mut garbage, _) = ShimConnection::try_connect(&uds_path).expect("fourth connection");
    garbage.send(&agent_hello());
    garbage
        .stream
        .write_all(&[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
        .expect("write garbage");
    assert!(matches!(garbage.receive(), Message::Goodbye { .. }));
    assert!(connection.request(2, Op::GuestInfo).result.is_ok());

    let console = std::fs::read_to_string(&serial_log).expect("serial log");
    assert!(
        console.contains("listening on vsock"),
        "console:\n{console}"
    );
    assert!(
        console.contains("kernel modules loaded"),
        "console:\n{console}"
    );
    for pattern in CONSOLE_ERROR_PATTERNS {
        assert!(
            !console.contains(pattern),
            "console shows {pattern:?}:\n{console}"
        );
    }

    println!(
        "guest boot: QEMU spawn -> shim Hello {} ms (guest uptime when the shim listened: {} ms); \
         Hello + GuestInfo round trip {:.2} ms; later GuestInfo {:.2} ms; Ping round trip {:.2} ms \
         (average of {PINGS}); connect -> Hello on a booted guest {:.2} ms",
        boot_to_ready.as_millis(),
        info.shim_ready_uptime_ms,
        hello_and_guest_info.as_secs_f64() * 1e3,
        guest_info_steady.as_secs_f64() * 1e3,
        ping_average.as_secs_f64() * 1e3,
        connect_to_hello.as_secs_f64() * 1e3,
    );
    vm.kill().expect("stop QEMU");
}
