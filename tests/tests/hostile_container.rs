//! A hostile container: root inside a busybox container tries what Docker's confinement
//! forbids, and each attempt fails the specific way Docker's would, while the guest, the shim
//! and a neighbour container stay healthy.
//!
//! One agent and one guest serve every case. The cases run in order inside a single test, so the
//! agent (and with it QEMU) is owned by the test and stopped when it ends, pass or fail: a
//! `static` fixture would never be dropped. Every CLI call has a deadline, so a case that hangs
//! fails instead of holding the suite.

use std::process::Output;
use std::time::{Duration, Instant};

use gantry_e2e::{TestAgent, TestVm};

const VM: &str = "vm-hostile";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const NEIGHBOUR: &str = "neighbour";
/// The fork bomb's cgroup limit.
const PIDS_LIMIT: u64 = 24;

struct Guest {
    agent: TestAgent,
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Guest {
    /// The CLI with `args`, killed after [`CALL_TIMEOUT`].
    fn cli(&self, args: &[&str]) -> Output {
        self.agent.cli_within(args, CALL_TIMEOUT)
    }

    /// `run --vm VM -q --rm [EXTRA…] default sh -c SCRIPT`.
    fn sh(&self, extra: &[&str], script: &str) -> Output {
        let mut args = vec!["run", "--vm", VM, "-q", "--rm"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["default", "sh", "-c", script]);
        self.cli(&args)
    }

    /// The guest, its shim and the neighbour answer.
    fn healthy(&self) -> Result<(), String> {
        let ping = self.cli(&["ping", VM, "--count", "2"]);
        if !ping.status.success() {
            return Err(format!(
                "the guest stopped answering: {}",
                text(&ping.stderr)
            ));
        }
        let exec = self.cli(&["exec", "--vm", VM, NEIGHBOUR, "cat", "/proc/1/cmdline"]);
        let cmdline = text(&exec.stdout).replace('\0', " ");
        if !exec.status.success() || !cmdline.starts_with("sleep 100000") {
            return Err(format!(
                "the neighbour does not answer exec (exit {:?}): {cmdline:?} {}",
                exec.status.code(),
                text(&exec.stderr)
            ));
        }
        Ok(())
    }
}

/// What a case saw, for messages.
fn describe(output: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    )
}

/// Requires exit code `code` and `needle` in stdout or stderr.
fn expect(output: &Output, code: i32, needle: &str) -> Result<(), String> {
    let all = format!("{}{}", text(&output.stdout), text(&output.stderr));
    if output.status.code() == Some(code) && all.contains(needle) {
        Ok(())
    } else {
        Err(format!(
            "expected exit {code} and {needle:?}; got {}",
            describe(output)
        ))
    }
}

/// A minimal static x86_64 ELF executable that calls `keyctl(KEYCTL_GET_KEYRING_ID,
/// KEY_SPEC_SESSION_KEYRING, 0)` and exits with the errno (0 on success). busybox has no
/// `keyctl`, so the test brings its own nine instructions.
fn keyctl_probe() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xb8, 0xfa, 0x00, 0x00, 0x00, // mov eax, 250 (SYS_keyctl)
        0x31, 0xff,                   // xor edi, edi (KEYCTL_GET_KEYRING_ID)
        0xbe, 0xfd, 0xff, 0xff, 0xff, // mov esi, -3 (KEY_SPEC_SESSION_KEYRING)
        0x31, 0xd2,                   // xor edx, edx (do not create)
        0x0f, 0x05,                   // syscall
        0x31, 0xff,                   // xor edi, edi
        0x48, 0x85, 0xc0,             // test rax, rax
        0x79, 0x04,                   // jns exit
        0xf7, 0xd8,                   // neg eax
        0x89, 0xc7,                   // mov edi, eax
        0xb8, 0x3c, 0x00, 0x00, 0x00, // exit: mov eax, 60 (SYS_exit)
        0x0f, 0x05,                   // syscall
    ];
    let headers = 64 + 56;
    let size = (headers + code.len()) as u64;
    let mut elf = Vec::new();
    // ELF header.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&(BASE + headers as u64).to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    // One PT_LOAD, R+X, the whole file at BASE.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&size.to_le_bytes());
    elf.extend_from_slice(&size.to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// A shell `printf` format that writes `bytes` (octal escapes: busybox printf has no `\x`).
fn printf_octal(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:03o}")).collect()
}

type Case = (&'static str, Box<dyn Fn(&Guest) -> Result<(), String>>);

fn cases() -> Vec<Case> {
    vec![
        (
            "write /proc/sys/kernel/core_pattern",
            Box::new(|g: &Guest| {
                let out = g.sh(
                    &[],
                    "echo '|/bin/sh -c reboot' > /proc/sys/kernel/core_pattern",
                );
                expect(
                    &out,
                    1,
                    "can't create /proc/sys/kernel/core_pattern: Read-only file system",
                )?;
                let after = g.sh(&[], "cat /proc/sys/kernel/core_pattern");
                if text(&after.stdout).contains("reboot") {
                    return Err(format!("core_pattern changed: {}", describe(&after)));
                }
                Ok(())
            }),
        ),
        (
            "write /proc/sysrq-trigger",
            Box::new(|g: &Guest| {
                // 'c' would crash the guest; the write must never reach the kernel.
                expect(
                    &g.sh(&[], "echo c > /proc/sysrq-trigger"),
                    1,
                    "can't create /proc/sysrq-trigger: Read-only file system",
                )
            }),
        ),
        (
            "mknod the layer disk and read it",
            Box::new(|g: &Guest| {
                // Find the layer store's major:minor through sysfs (read-only, but visible).
                let script = r#"
                    for d in /sys/block/vd*; do
                        [ "$(cat $d/serial 2>/dev/null)" = gantry-layers ] && dev=$(cat $d/dev)
                    done
                    [ -n "$dev" ] || { echo "no layer disk in /sys/block"; exit 90; }
                    echo "layer disk $dev"
                    mknod /tmp/disk b ${dev%:*} ${dev#*:} || echo "mknod refused"
                    head -c 4096 /tmp/disk | wc -c
                    mknod /tmp/loop b 7 0 || echo "mknod refused"
                    head -c 4096 /tmp/loop | wc -c
                    ls /dev | grep -E '^(vd|loop|sd|nvme)' && exit 91
                    exit 0
                "#;
                let out = g.sh(&[], script);
                expect(&out, 0, "mknod: /tmp/disk: Operation not permitted")?;
                expect(&out, 0, "mknod: /tmp/loop: Operation not permitted")?;
                expect(&out, 0, "head: /tmp/disk: No such file or directory")?;
                if text(&out.stdout)
                    .lines()
                    .any(|l| l.trim() != "0" && l.trim().parse::<u64>().is_ok())
                {
                    return Err(format!(
                        "bytes were read from a block device: {}",
                        describe(&out)
                    ));
                }
                Ok(())
            }),
        ),
        (
            "mount -t tmpfs",
            Box::new(|g: &Guest| {
                expect(
                    &g.sh(&[], "mount -t tmpfs none /tmp"),
                    1,
                    "mount: permission denied (are you root?)",
                )
            }),
        ),
        (
            "unshare -U, then mount",
            Box::new(|g: &Guest| {
                // With a user namespace the mount would be allowed: unshare itself must fail.
                expect(
                    &g.sh(
                        &[],
                        "unshare -U -m -r sh -c 'mount -t tmpfs none /tmp && echo mounted'",
                    ),
                    1,
                    "unshare(0x10020000): Operation not permitted",
                )
            }),
        ),
        (
            "read /proc/kcore and /proc/keys",
            Box::new(|g: &Guest| {
                // Masked with /dev/null (1:3), as in Docker: they read as empty.
                let out = g.sh(
                    &[],
                    "stat -c '%t:%T' /proc/kcore /proc/keys; \
                     echo kcore $(head -c 65536 /proc/kcore | wc -c) keys $(wc -c < /proc/keys)",
                );
                expect(&out, 0, "1:3\n1:3\nkcore 0 keys 0")
            }),
        ),
        (
            "keyctl",
            Box::new(|g: &Guest| {
                let script = format!(
                    "printf '{}' > /tmp/keyctl && chmod +x /tmp/keyctl && /tmp/keyctl; echo errno $?",
                    printf_octal(&keyctl_probe())
                );
                // EPERM (1) from the seccomp profile; without it the call succeeds (0).
                expect(&g.sh(&[], &script), 0, "errno 1\n")
            }),
        ),
        (
            "insmod a module",
            Box::new(|g: &Guest| {
                // Without the filter and capability the kernel would answer ENOEXEC ("Exec
                // format error") for this non-module; EPERM means it never got that far.
                expect(
                    &g.sh(&[], "echo notamodule > /tmp/evil.ko && insmod /tmp/evil.ko"),
                    1,
                    "Operation not permitted",
                )
            }),
        ),
        (
            "reboot -f",
            Box::new(|g: &Guest| {
                // busybox names no call ("reboot: (null): ..."): the errno is what counts, and
                // that the guest still answers afterwards.
                expect(&g.sh(&[], "reboot -f"), 1, "Operation not permitted")
            }),
        ),
        (
            "a fork bomb under --pids-limit",
            Box::new(|g: &Guest| {
                let limit = PIDS_LIMIT.to_string();
                let out = g.cli(&[
                    "run",
                    "--vm",
                    VM,
                    "-q",
                    "--detach",
                    "--name",
                    "bomb",
                    "--pids-limit",
                    &limit,
                    "--cpus",
                    "0.5",
                    "default",
                    "sh",
                    "-c",
                    "bomb() { bomb | bomb & }; bomb; sleep 100000",
                ]);
                if !out.status.success() {
                    return Err(format!("the bomb did not start: {}", describe(&out)));
                }
                // Let it hit the limit, then look while it still runs.
                let deadline = Instant::now() + Duration::from_secs(60);
                let result = loop {
                    std::thread::sleep(Duration::from_secs(2));
                    let logs = g.cli(&["logs", "--vm", VM, "bomb"]);
                    let stats = g.cli(&["stats", "--vm", VM, "bomb"]);
                    let stats: serde_json::Value =
                        serde_json::from_slice(&stats.stdout).unwrap_or_default();
                    let pids = stats["pids_current"].as_u64().unwrap_or(u64::MAX);
                    if pids > PIDS_LIMIT {
                        break Err(format!("{pids} processes, over the limit of {PIDS_LIMIT}"));
                    }
                    let all = format!("{}{}", text(&logs.stdout), text(&logs.stderr));
                    if all.contains("can't fork: Resource temporarily unavailable") {
                        break g.healthy().map_err(|e| format!("during the bomb: {e}"));
                    }
                    if Instant::now() > deadline {
                        break Err(format!(
                            "the bomb never hit the limit ({pids} pids): {all:?}"
                        ));
                    }
                };
                let _ = g.cli(&["kill", "--vm", VM, "-s", "KILL", "bomb"]);
                let removed = g.cli(&["rm", "--vm", VM, "-f", "bomb"]);
                result?;
                if !removed.status.success() {
                    return Err(format!("rm -f bomb: {}", describe(&removed)));
                }
                Ok(())
            }),
        ),
    ]
}

#[test]
fn a_hostile_container_is_refused_and_its_neighbours_live_on() {
    let started = Instant::now();
    let agent = TestAgent::start(&[TestVm::new(VM, 20).memory(512)]).expect("agent starts");
    agent
        .wait_guest_info(VM, BOOT_TIMEOUT)
        .expect("the guest boots");
    let guest = Guest { agent };
    let neighbour = guest.cli(&[
        "run", "--vm", VM, "-q", "--detach", "--name", NEIGHBOUR, "default", "sleep", "100000",
    ]);
    assert!(
        neighbour.status.success(),
        "neighbour: {}",
        describe(&neighbour)
    );
    guest.healthy().expect("healthy before the first case");

    let mut failures = Vec::new();
    for (name, case) in cases() {
        let case_started = Instant::now();
        let outcome =
            case(&guest).and_then(|()| guest.healthy().map_err(|e| format!("after: {e}")));
        eprintln!(
            "case {name:?}: {} in {:.1?}",
            if outcome.is_ok() {
                "refused as expected"
            } else {
                "FAILED"
            },
            case_started.elapsed()
        );
        if let Err(message) = outcome {
            failures.push(format!("{name}: {message}"));
        }
    }
    let state = guest.cli(&["ps", "--vm", VM, "--json"]);
    let running = text(&state.stdout);
    if !running.contains(NEIGHBOUR) {
        failures.push(format!("the neighbour is no longer listed: {running}"));
    }
    let _ = guest.cli(&["kill", "--vm", VM, "-s", "KILL", NEIGHBOUR]);
    let _ = guest.cli(&["rm", "--vm", VM, "-f", NEIGHBOUR]);
    eprintln!("hostile container suite took {:.1?}", started.elapsed());
    if !failures.is_empty() {
        panic!(
            "{} case(s) failed:\n{}\n--- console ---\n{}",
            failures.len(),
            failures.join("\n"),
            guest.agent.console(VM)
        );
    }
    // Dropping the agent stops QEMU; the next line makes the order explicit.
    drop(guest);
}
