//! The shim as a service of the guest's own init. A Debian bookworm guest
//! (`qemu/build-distro-guest.sh`) boots its own kernel and initrd with its root file system on a
//! plain virtio disk; its systemd starts the packaged shim (`gantry-shim.service`); the agent
//! serves the layer store as the second disk and runs the lifecycle essentials there, confined as
//! under Gantry's initramfs. Then systemd restarts a killed shim, and the agent reconnects.
//!
//! One distribution guest, booted once and driven in order by one test: the restart at the end
//! would disturb anything running beside it. Afterwards Gantry's initramfs guest is attached and
//! booted too, so that the boot figure has its reference from the same run. The guest's serial console is a root shell (the test image logs root in),
//! reached through the agent's console socket: it shows what the guest's systemd sees.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use gantry_e2e::{DistroGuest, TestAgent, TestVm, distro_guest, vm_template};

const VM: &str = "distro";
/// systemd under TCG, from a compressed kernel and a zstd initrd.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(60);
const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// The shim's cgroup under systemd (`Delegate=yes`).
const SHIM_CGROUP: &str = "/sys/fs/cgroup/system.slice/gantry-shim.service";

/// Root's shell on the guest's serial console.
///
/// A thread reads the console all the time: a console nobody reads stalls the guest (QEMU stops
/// taking bytes from the UART, and the kernel waits on it, printing an OOM report for instance).
struct Console {
    stream: UnixStream,
    /// Everything read so far, and a signal for each arrival.
    seen: Arc<(Mutex<String>, Condvar)>,
    commands: u32,
}

impl Console {
    fn attach(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to the console socket {}", socket.display()))?;
        let seen = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let (mut reader, sink) = (stream.try_clone()?, Arc::clone(&seen));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends when the socket closes (QEMU exits).
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                let (text, arrived) = &*sink;
                text.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                arrived.notify_all();
            }
        });
        Ok(Self {
            stream,
            seen,
            commands: 0,
        })
    }

    /// How much has been read so far.
    fn position(&self) -> usize {
        self.seen.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Waits until `done` holds for the text read since `from`, or `timeout`; returns that text.
    fn read_until(
        &self,
        from: usize,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (text, arrived) = &*self.seen;
        let mut text = text.lock().unwrap_or_else(|e| e.into_inner());
        while !done(&text[from..]) {
            let now = Instant::now();
            ensure!(
                now < deadline,
                "the console did not answer within {timeout:?}; it showed:\n{}",
                &text[from..]
            );
            text = arrived
                .wait_timeout(text, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(text[from..].to_owned())
    }

    /// Waits for the autologin shell: asks it for arithmetic until the answer comes back (the
    /// echo of the question holds the expression, not its value).
    fn wait_for_shell(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let from = self.position();
            self.stream.write_all(b"\necho shell-$((40+2))\n")?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.read_until(from, Duration::from_secs(3).min(remaining), |seen| {
                seen.contains("shell-42")
            }) {
                Ok(_) => return Ok(()),
                Err(_) if Instant::now() < deadline => continue,
                Err(err) => return Err(err.context("no root shell on the serial console")),
            }
        }
    }

    /// Runs `command` in the shell; returns its output (and whatever the guest logged on the
    /// console meanwhile) and its exit status.
    fn run(&mut self, command: &str) -> Result<(String, i32)> {
        self.commands += 1;
        let marker = format!("done-{}", 100_000 + self.commands);
        let from = self.position();
        // The echoed line shows `$((…))`; only the shell's answer shows the marker itself.
        writeln!(
            self.stream,
            "{command}; echo \"done-$((100000+{})) rc=$?\"",
            self.commands
        )?;
        let seen = self.read_until(from, CONSOLE_TIMEOUT, |seen| {
            seen.contains(&marker) && seen[seen.find(&marker).unwrap_or(0)..].contains('\n')
        })?;
        let at = seen.find(&marker).unwrap_or(0);
        let rc = seen[at + marker.len()..]
            .trim_start()
            .strip_prefix("rc=")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|code| code.parse().ok())
            .context("no exit status after the marker")?;
        // Drop the echoed command line, and the terminal's control sequences (bash switches
        // bracketed paste on and off around each command).
        let output = seen[..at].split_once('\n').map_or("", |(_, rest)| rest);
        Ok((without_control_sequences(output), rc))
    }

    /// Runs `command`, which must succeed; returns its output.
    fn ok(&mut self, command: &str) -> Result<String> {
        let (output, rc) = self.run(command)?;
        ensure!(rc == 0, "`{command}` failed with {rc}:\n{output}");
        Ok(output)
    }
}

/// `text` without ANSI CSI sequences (`ESC [ … final byte`) and carriage returns.
fn without_control_sequences(text: &str) -> String {
    let mut clean = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' if chars.peek() == Some(&'[') => {
                chars.next();
                // Parameter and intermediate bytes, then one final byte in @..=~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            '\r' => {}
            c => clean.push(c),
        }
    }
    clean
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the CLI, bounded: a hung guest fails the test instead of stalling it.
fn cli(agent: &TestAgent, args: &[&str]) -> Result<Output> {
    Ok(agent.cli_within(args, CLI_TIMEOUT))
}

/// Runs `args` through the CLI; it must succeed. Returns its standard output.
fn cli_ok(agent: &TestAgent, args: &[&str]) -> Result<String> {
    let output = cli(agent, args)?;
    ensure!(
        output.status.success(),
        "gantry-agent {} failed ({:?}): {}{}",
        args.join(" "),
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    );
    Ok(text(&output.stdout))
}

/// `gantry-agent run --vm VM -q ARGS…`, bounded.
fn run(agent: &TestAgent, args: &[&str]) -> Result<Output> {
    cli(agent, &[&["run", "--vm", VM, "-q"], args].concat())
}

/// The same; it must succeed. Returns its standard output.
fn run_ok(agent: &TestAgent, args: &[&str]) -> Result<String> {
    cli_ok(agent, &[&["run", "--vm", VM, "-q"], args].concat())
}

/// The container `name` as `ps -a --json` lists it.
fn container(agent: &TestAgent, name: &str) -> Result<Option<serde_json::Value>> {
    let listed = agent.cli_json(&["ps", "--vm", VM, "-a", "--json"])?;
    Ok(listed
        .as_array()
        .and_then(|all| all.iter().find(|c| c["id"] == name))
        .cloned())
}

/// Polls `ps -a` until `name` is in `state`.
fn wait_state(agent: &TestAgent, name: &str, state: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = container(agent, name)?;
        if let Some(found) = &found
            && found["state"] == state
        {
            return Ok(found.clone());
        }
        ensure!(
            Instant::now() < deadline,
            "{name} is not {state}: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Boot figures of `vm`: (guest uptime when the shim listened, QEMU spawn → agent connected).
fn boot_figures(agent: &TestAgent, vm: &str) -> Result<(u64, u64)> {
    let info = agent.wait_guest_info(vm, BOOT_TIMEOUT)?;
    let status = agent.vm_status(vm)?;
    Ok((
        info["guest"]["shim_ready_uptime_ms"]
            .as_u64()
            .context("guest-info has no shim_ready_uptime_ms")?,
        status["boot_to_ready_ms"]
            .as_u64()
            .context("vm ls has no boot_to_ready_ms")?,
    ))
}

#[test]
fn the_shim_under_systemd_runs_containers_and_comes_back_after_a_crash() {
    let guest = distro_guest();
    // The template boots Gantry's initramfs guest, for the boot figure beside this one.
    let agent = TestAgent::start_with(
        &[TestVm::new(VM, 30).memory(768).booting(&guest)],
        &vm_template(256),
    )
    .expect("the agent starts");
    if let Err(error) = scenario(&agent, &guest) {
        let console = agent.console(VM);
        let lines: Vec<&str> = console.lines().collect();
        let tail = lines[lines.len().saturating_sub(150)..].join("\n");
        panic!("{error:#}\n--- the guest's console (its end) ---\n{tail}");
    }
}

fn scenario(agent: &TestAgent, guest: &DistroGuest) -> Result<()> {
    let info = agent.wait_guest_info(VM, BOOT_TIMEOUT)?;
    assert_eq!(
        info["guest"]["kernel_release"], guest.kernel_release,
        "the image's own kernel booted"
    );
    let (systemd_shim_ready, systemd_boot_to_ready) = boot_figures(agent, VM)?;

    let mut console = Console::attach(&agent.console_socket(VM))?;
    console.wait_for_shell(BOOT_TIMEOUT)?;
    let init = console.ok("cat /proc/1/comm")?;
    assert!(init.contains("systemd"), "PID 1 is systemd: {init}");
    let shim_cgroup =
        console.ok("cat /proc/$(systemctl show -p MainPID --value gantry-shim)/cgroup")?;
    assert!(
        shim_cgroup.contains("0::/system.slice/gantry-shim.service/supervisor"),
        "the shim moved itself into its supervisor leaf: {shim_cgroup}"
    );

    // run: output and exit code.
    let output = run(
        agent,
        &[
            "--rm",
            "default",
            "sh",
            "-c",
            "echo hello from $(hostname); exit 3",
        ],
    )?;
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).starts_with("hello from "),
        "{}",
        text(&output.stdout)
    );

    // A detached container: logs, exec, its cgroup inside the shim's delegated subtree, kill, rm.
    run_ok(
        agent,
        &[
            "-d",
            "--name",
            "talker",
            "--memory",
            "64m",
            "default",
            "sh",
            "-c",
            "echo one; echo two; exec sleep 600",
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cli_ok(agent, &["logs", "--vm", VM, "talker"])?.contains("two") {
        ensure!(
            Instant::now() < deadline,
            "talker's output never reached its logs"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let exec = cli_ok(
        agent,
        &[
            "exec",
            "--vm",
            VM,
            "talker",
            "sh",
            "-c",
            "echo exec in $(cat /proc/1/comm)",
        ],
    )?;
    assert_eq!(exec, "exec in sleep\n");
    let in_cgroup = console.ok(&format!(
        "cat {SHIM_CGROUP}/containers/talker/memory.max {SHIM_CGROUP}/containers/talker/cgroup.procs"
    ))?;
    assert!(
        in_cgroup.contains(&(64u64 << 20).to_string()),
        "talker's limit is on its cgroup in the delegated subtree: {in_cgroup}"
    );
    cli_ok(agent, &["kill", "--vm", VM, "-s", "KILL", "talker"])?;
    let exited = wait_state(agent, "talker", "Stopped")?;
    assert_eq!(
        exited["exit"],
        serde_json::json!({ "Signal": 9 }),
        "{exited}"
    );
    cli_ok(agent, &["rm", "--vm", VM, "talker"])?;
    ensure!(
        container(agent, "talker")?.is_none(),
        "rm left talker listed"
    );
    let (_, gone) = console.run(&format!("test -e {SHIM_CGROUP}/containers/talker"))?;
    assert_eq!(gone, 1, "rm removed talker's cgroup");

    // An OOM kill inside the container's limit, reported as such.
    let oom = run(
        agent,
        &[
            "--name",
            "oom",
            "--memory",
            "24m",
            "default",
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    )?;
    assert_eq!(oom.status.code(), Some(137), "{}", text(&oom.stderr));
    assert!(!text(&oom.stdout).contains("survived"));
    assert_eq!(
        container(agent, "oom")?.context("oom listed")?["oom_killed"],
        true
    );
    cli_ok(agent, &["rm", "--vm", VM, "oom"])?;

    // The layer-store disk is out of a container's reach, as under the initramfs.
    let layer_disk = run(
        agent,
        &[
            "--rm",
            "default",
            "sh",
            "-c",
            r#"for d in /sys/block/vd*; do
                   [ "$(cat $d/serial 2>/dev/null)" = gantry-layers ] && dev=$(cat $d/dev)
               done
               [ -n "$dev" ] || { echo "no layer disk in /sys/block"; exit 90; }
               echo "layer disk $dev"
               mknod /tmp/disk b ${dev%:*} ${dev#*:}
               head -c 4096 /tmp/disk | wc -c"#,
        ],
    )?;
    let (stdout, stderr) = (text(&layer_disk.stdout), text(&layer_disk.stderr));
    assert!(stdout.contains("layer disk "), "{stdout}{stderr}");
    assert!(
        stderr.contains("mknod: /tmp/disk: Operation not permitted"),
        "{stdout}{stderr}"
    );
    assert!(
        !stdout
            .lines()
            .any(|line| line.trim().parse::<u64>().is_ok_and(|n| n > 0)),
        "the container read the layer disk: {stdout}"
    );

    // The shim crashes; systemd restarts it (Restart=always), having killed its containers with
    // it (KillMode=control-group); the agent reconnects and lists them as lost.
    run_ok(
        agent,
        &["-d", "--name", "survivor", "default", "sleep", "600"],
    )?;
    let sessions = agent.vm_status(VM)?["sessions"].as_u64().unwrap_or(0);
    let crashed = Instant::now();
    // The shim alone: systemd must kill the container left behind.
    console.ok("kill -KILL $(systemctl show -p MainPID --value gantry-shim)")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.vm_status(VM)?["sessions"].as_u64().unwrap_or(0) <= sessions {
        ensure!(
            Instant::now() < deadline,
            "the agent did not reconnect to the restarted shim: {}",
            agent.vm_status(VM)?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let reconnected = crashed.elapsed();
    let journal = console.ok(
        "journalctl -u gantry-shim -o short-monotonic --no-pager | grep -v INFO | tail -n 12",
    )?;
    println!("the shim's journal around its restart:\n{journal}");
    assert_eq!(wait_state(agent, "survivor", "Lost")?["id"], "survivor");
    let leftovers = console.ok("pgrep -x sleep | wc -l")?;
    assert!(
        leftovers.lines().any(|line| line.trim() == "0"),
        "the crashed shim's container was killed with it: {leftovers}"
    );
    cli_ok(agent, &["rm", "--vm", VM, "survivor"])?;
    let after = run_ok(agent, &["--rm", "default", "echo", "after the restart"])?;
    assert_eq!(after, "after the restart\n");
    let restarts = console.ok("systemctl show -p NRestarts --value gantry-shim")?;
    assert!(
        restarts.lines().any(|l| l.trim() == "1"),
        "systemd restarted it once: {restarts}"
    );

    // Gantry's initramfs guest on the same machine, for the boot figure beside this one.
    cli_ok(
        agent,
        &["vm", "attach", "initramfs", "--cid", "31", "--launch"],
    )?;
    let (initramfs_shim_ready, initramfs_boot_to_ready) = boot_figures(agent, "initramfs")?;
    cli_ok(agent, &["vm", "detach", "initramfs"])?;
    println!(
        "boot to shim ready (guest uptime when the shim listened / QEMU spawn to agent connected): \
         systemd (bookworm, its own kernel and initrd) {systemd_shim_ready} / \
         {systemd_boot_to_ready} ms; Gantry's initramfs {initramfs_shim_ready} / \
         {initramfs_boot_to_ready} ms; shim killed to agent reconnected {} ms",
        reconnected.as_millis()
    );
    Ok(())
}
