//! The spine end to end: an agent launching real QEMU guests (TCG), the shim answering through the
//! agent's own vhost-user-vsock device, reconnection after a guest restart, two VMs on one agent.
//!
//! All tests share one agent with three VMs, booted once: vm0 and vm1 for queries, vm2 for the
//! restart test so that it disturbs nobody.

use std::sync::OnceLock;
use std::time::Duration;

use gantry_e2e::{TestAgent, TestVm, installed_debian_kernel_release};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn agent() -> &'static TestAgent {
    static AGENT: OnceLock<TestAgent> = OnceLock::new();
    AGENT.get_or_init(|| {
        TestAgent::start(&[
            TestVm::new("vm0", 3).memory(512),
            TestVm::new("vm1", 4).memory(256),
            TestVm::new("vm2", 5).memory(256),
        ])
        .expect("agent starts")
    })
}

#[test]
fn guest_info_reports_the_installed_kernel_through_the_agent() {
    let agent = agent();
    let report = agent.wait_guest_info("vm0", BOOT_TIMEOUT).unwrap();
    let guest = &report["guest"];
    let expected = installed_debian_kernel_release().unwrap();
    assert_eq!(guest["kernel_release"], expected.as_str(), "{report}");
    assert_eq!(guest["cpus"], 1);
    assert_eq!(guest["shim_version"], env!("CARGO_PKG_VERSION"));
    let uptime = guest["uptime_ms"].as_u64().unwrap();
    let ready = guest["shim_ready_uptime_ms"].as_u64().unwrap();
    assert!(
        ready > 0 && ready <= uptime,
        "shim ready at {ready} ms, uptime {uptime} ms"
    );

    let status = agent.vm_status("vm0").unwrap();
    assert_eq!(status["connected"], true);
    let boot_to_ready = status["boot_to_ready_ms"]
        .as_u64()
        .expect("a launched VM reports boot→ready");
    println!(
        "vm0: boot to shim ready {boot_to_ready} ms, session setup {} µs, GuestInfo round trip {} µs",
        status["session_setup_us"], report["round_trip_us"]
    );
}

#[test]
fn two_vms_on_one_agent_each_reach_their_own_guest() {
    let agent = agent();
    // Each VM was given a different memory size: a reply routed to the wrong guest shows.
    let vm0 = agent.wait_guest_info("vm0", BOOT_TIMEOUT).unwrap();
    let vm1 = agent.wait_guest_info("vm1", BOOT_TIMEOUT).unwrap();
    let mib =
        |report: &serde_json::Value| report["guest"]["memory_total_bytes"].as_u64().unwrap() >> 20;
    let (vm0_mib, vm1_mib) = (mib(&vm0), mib(&vm1));
    // The kernel keeps some of it (about 55 MiB here), so the ranges are wide but do not overlap.
    assert!(
        (384..=512).contains(&vm0_mib),
        "vm0 reports {vm0_mib} MiB of its 512"
    );
    assert!(
        (128..=256).contains(&vm1_mib),
        "vm1 reports {vm1_mib} MiB of its 256"
    );
    // Both sessions stay usable side by side.
    let ping = agent
        .cli(&["ping", "vm1", "--count", "20", "--size", "4096"])
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    println!("{}", String::from_utf8_lossy(&ping.stdout).trim());
    let unknown = agent.cli(&["guest-info", "nope"]).unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no VM named \"nope\""));
}

#[test]
fn the_agent_reconnects_after_the_guest_restarts() {
    let agent = agent();
    let before = agent.wait_guest_info("vm2", BOOT_TIMEOUT).unwrap();
    let since_before = std::time::Instant::now();
    let sessions_before = agent.vm_status("vm2").unwrap()["sessions"]
        .as_u64()
        .unwrap();
    let restart = agent.cli(&["vm", "restart", "vm2"]).unwrap();
    assert!(
        restart.status.success(),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );

    let after = agent.wait_guest_info("vm2", BOOT_TIMEOUT).unwrap();
    let status = agent.vm_status("vm2").unwrap();
    assert!(
        status["sessions"].as_u64().unwrap() > sessions_before,
        "no new session after the restart: {status}"
    );
    // A fresh kernel: its uptime restarted from zero.
    let uptime_before = before["guest"]["uptime_ms"].as_u64().unwrap();
    let uptime_after = after["guest"]["uptime_ms"].as_u64().unwrap();
    assert!(
        after["guest"]["shim_ready_uptime_ms"].as_u64().unwrap() <= uptime_after,
        "{after}"
    );
    // The old kernel would now be up for `uptime_before + elapsed`; a rebooted one for less.
    let old_kernel_uptime = uptime_before + since_before.elapsed().as_millis() as u64;
    assert!(
        uptime_after + 500 < old_kernel_uptime,
        "uptime {uptime_after} ms after the restart, the old kernel would be at {old_kernel_uptime} ms"
    );
    println!(
        "vm2: reconnected after restart; boot to ready {} ms",
        status["boot_to_ready_ms"]
    );
}
