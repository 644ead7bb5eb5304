//! The agent's memory while it serves 4 VMs with 10 containers each, beside the same agent's
//! memory serving no VM, measured in the same run: resident set (`VmRSS`) and its peak
//! (`VmHWM`) from `/proc`, once the containers have run for a while. Each VM's keeper (its vsock
//! device and QEMU's parent, a process of its own) is shown apart; QEMU's own memory is the
//! guest's and is left out.
//!
//! Input: TCG guests of 256 MiB booted from `[vm_template]` (attached at run time, as an
//! orchestrator would), each running 10 containers of the embedded default image (`sleep`) and
//! one container printing 1 MiB of output, so that the logs and output windows are in use. No
//! network.
//!
//! Run: `qemu/build-guest.sh && cargo build --release -p gantry-agent && flock
//! /tmp/gantry-guests.lock cargo bench -p gantry-e2e --bench agent_footprint`.

use std::time::Duration;

use gantry_e2e::{TestAgent, vm_template};

const VMS: u64 = 4;
const CONTAINERS: usize = 10;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn cli_ok(agent: &TestAgent, args: &[&str]) {
    let output = agent.cli_within(args, Duration::from_secs(120));
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn main() {
    let agent = TestAgent::start_with(&[], &vm_template(256)).expect("agent starts");
    // The reference: the same agent, API up, default image built, no VM.
    cli_ok(&agent, &["prefetch", "default"]);
    std::thread::sleep(Duration::from_secs(2));
    let (idle_rss, idle_peak) = memory_kib(agent.pid());

    for vm in 0..VMS {
        let name = format!("vm{vm}");
        cli_ok(
            &agent,
            &[
                "vm",
                "attach",
                &name,
                "--cid",
                &(10 + vm).to_string(),
                "--launch",
            ],
        );
    }
    for vm in 0..VMS {
        let name = format!("vm{vm}");
        agent
            .wait_guest_info(&name, BOOT_TIMEOUT)
            .unwrap_or_else(|err| panic!("{name} boots: {err:#}"));
        for container in 0..CONTAINERS {
            let id = format!("c{container}");
            cli_ok(
                &agent,
                &[
                    "run", "--vm", &name, "-d", "--name", &id, "default", "sleep", "100000",
                ],
            );
        }
        cli_ok(
            &agent,
            &[
                "run",
                "--vm",
                &name,
                "--name",
                "talker",
                "default",
                "sh",
                "-c",
                "head -c 1048576 /dev/zero | od -v",
            ],
        );
    }
    std::thread::sleep(Duration::from_secs(5));
    let (busy_rss, busy_peak) = memory_kib(agent.pid());
    let keepers: Vec<(u64, u64)> = agent
        .keeper_pids()
        .into_iter()
        .map(|pid| memory_kib(pid.as_raw() as u32))
        .collect();
    assert_eq!(keepers.len() as u64, VMS, "one keeper per VM");
    let keeper_rss: u64 = keepers.iter().map(|(rss, _)| rss).sum();

    let served = VMS as usize * (CONTAINERS + 1);
    println!(
        "agent_footprint: {VMS} TCG guests × {CONTAINERS} sleeping containers + 1 that printed 1 MiB each"
    );
    println!(
        "  agent, no VM (reference):   RSS {:7.1} MiB   peak {:7.1} MiB",
        mib(idle_rss),
        mib(idle_peak)
    );
    println!(
        "  agent, {VMS} VMs, {served} containers: RSS {:7.1} MiB   peak {:7.1} MiB   ({:.2}× the reference)",
        mib(busy_rss),
        mib(busy_peak),
        busy_rss as f64 / idle_rss as f64
    );
    println!(
        "  added per VM: {:.1} MiB; per container: {:.2} MiB",
        mib(busy_rss.saturating_sub(idle_rss)) / VMS as f64,
        mib(busy_rss.saturating_sub(idle_rss)) / served as f64
    );
    println!(
        "  keepers: {:.1} MiB in all, {:.1} MiB each (own processes, beside the agent)",
        mib(keeper_rss),
        mib(keeper_rss) / VMS as f64
    );
}
