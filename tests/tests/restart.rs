//! Restarting the agent disturbs no guest: while one container reads a lazy image's big file
//! over and over (checking its digest each time) and another sleeps, the agent is killed with
//! SIGKILL and started again, repeatedly, then upgraded (SIGTERM, start again). The guest keeps
//! its QEMU (held by the VM's keeper), the layer store's requests in flight are resumed by the
//! next agent (the first crash lands while the reader still fetches chunks from a slowed
//! registry, so some are parked), and the containers run on, listed and signalled by agents
//! that did not start them. A third container writes numbered lines all along: its log, kept
//! by four agents in turn, holds every line once, in order (the shim keeps output until an
//! agent holds it, and resends it to the next one); an exec into a container an earlier agent
//! started works.
//!
//! `cargo test -p gantry-e2e --test restart -- --nocapture` prints how long each restart took
//! until the guest's shim was connected again.

use std::path::Path;
use std::time::{Duration, Instant};

use gantry_agent::images::default_image;
use gantry_agent::keeper::client::process_alive;
use gantry_e2e::{TestAgent, TestVm, convert_image};
use gantry_oci::Digest;
use gantry_oci::builder::{self, ImageConfigSpec, LayerBuilder};
use gantry_testkit::shaping::{Shaping, ShapingProxy};
use gantry_testkit::{Registry, noise};

const VM: &str = "restart";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The reader's file: larger than the reader's memory limit, so that every pass reads most of
/// it from the layer store again instead of from the guest's page cache.
const BIG: usize = 24 << 20;
const READER_MEMORY: &str = "16m";
/// SIGKILL restarts under load, then one upgrade.
const CRASHES: usize = 10;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The state `ps -a` reports for container `name`.
fn state_of(agent: &TestAgent, name: &str) -> String {
    let listed = agent
        .cli_json(&["ps", "-a", "--vm", VM, "--json"])
        .expect("ps");
    listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["id"] == name)
        .map(|c| c["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|| format!("not listed: {listed}"))
}

/// Runs a detached container `name` in the VM: `rest` is the options, image and command.
fn run_detached(agent: &TestAgent, name: &str, rest: &[&str]) {
    let mut args = vec!["run", "--vm", VM, "-d", "--name", name];
    args.extend_from_slice(rest);
    let started = agent.cli_within(&args, Duration::from_secs(120));
    assert!(
        started.status.success(),
        "run {name}: {}",
        text(&started.stderr)
    );
}

/// Waits until container `name` no longer runs, for at most `within`.
fn wait_stopped(agent: &TestAgent, name: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while state_of(agent, name) == "Running" {
        assert!(
            Instant::now() < deadline,
            "{name} still runs after {within:?}\n--- agent log ---\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the VM's shim session is up again; returns how long that took.
fn wait_connected(agent: &TestAgent, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = agent.vm_status(VM)
            && status["connected"] == true
        {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the shim did not reconnect within 60 s\n--- agent log ---\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Builds an image with a big file, pushes it, converts it to the lazy format; returns the
/// converted reference (through `host`) and the file's digest.
fn lazy_image(registry: &Registry, work: &Path, host: &str) -> (String, String) {
    let busybox = default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX))
        .expect("busybox layer");
    let big = noise(BIG, 77);
    let mut data = LayerBuilder::new();
    data.file("data/big.bin", 0o644, big.clone()).unwrap();
    let config = ImageConfigSpec {
        cmd: vec!["true".into()],
        env: vec!["PATH=/bin:/usr/bin".into()],
        ..Default::default()
    };
    let layout = work.join("reader");
    builder::write_image(&layout, "v1", &[busybox, data], &config).expect("write image");
    registry.push(&layout, "v1", "restart/reader:v1");
    let original = format!("{}/restart/reader:v1", registry.host());
    let converted = format!("{}/restart/reader:v1-erofs", registry.host());
    convert_image(&original, &converted);
    (
        format!("{host}/restart/reader:v1-erofs"),
        Digest::of(&big).hex().to_owned(),
    )
}

/// Checks that `stream` holds the writer's lines `0, 1, 2, …` that `belongs` picks (a line's
/// first field; the rest is free), each once and in order, through to its last line; prints
/// how many.
fn check_numbered(stream: &str, belongs: impl Fn(u64) -> bool, name: &str) {
    let lines: Vec<u64> = stream
        .lines()
        .map(|line| {
            line.split(' ')
                .next()
                .and_then(|number| number.parse().ok())
                .unwrap_or_else(|| panic!("{name}: a torn or foreign line {line:?}"))
        })
        .collect();
    let last = *lines.last().unwrap_or_else(|| panic!("{name}: no output"));
    let expected: Vec<u64> = (0..=last).filter(|&i| belongs(i)).collect();
    if lines != expected {
        let first_wrong = lines
            .iter()
            .zip(&expected)
            .position(|(got, want)| got != want)
            .unwrap_or(lines.len().min(expected.len()));
        panic!(
            "{name}: {} lines, {} expected; first difference at line {first_wrong}: got {:?}, \
             expected {:?}",
            lines.len(),
            expected.len(),
            lines.get(first_wrong),
            expected.get(first_wrong)
        );
    }
    println!(
        "writer {name}: {} lines through {last}, each once and in order",
        lines.len()
    );
}

/// The pause the writer saw: the largest step in guest uptime between its consecutive stdout
/// lines (it sleeps 50 ms every 50 lines; a write that waited for the agent would show as a
/// longer step), beside the 99th percentile step.
fn print_output_gaps(stdout: &str) {
    let uptimes: Vec<f64> = stdout
        .lines()
        .filter_map(|line| line.split(' ').nth(1)?.parse().ok())
        .collect();
    let mut steps: Vec<f64> = uptimes.windows(2).map(|pair| pair[1] - pair[0]).collect();
    assert!(!steps.is_empty(), "the writer's lines carry no uptime");
    steps.sort_by(f64::total_cmp);
    println!(
        "writer output gap (guest uptime between consecutive lines): p99 {:.0} ms, max {:.0} ms",
        steps[steps.len() * 99 / 100] * 1000.0,
        steps[steps.len() - 1] * 1000.0
    );
}

#[test]
fn containers_run_on_through_agent_crashes_and_an_upgrade() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let registry = Registry::start();
    // 32 Mbit/s: the reader's first pass fetches its 24 MiB for ~6 s, long enough for the
    // first crash to land while reads are parked on chunks still on their way.
    let proxy = runtime
        .block_on(ShapingProxy::start(
            registry.host().parse().expect("registry address"),
            Shaping::link(32, Duration::ZERO),
        ))
        .expect("shaping proxy");
    let work = tempfile::tempdir().expect("work dir");
    let (image, big_sha) = lazy_image(&registry, work.path(), &proxy.host());
    let mut agent = TestAgent::start_with(
        &[TestVm::new(VM, 60).memory(384)],
        "[lazy]\nmode = \"lazy\"\n",
    )
    .expect("agent starts");
    agent
        .wait_guest_info(VM, BOOT_TIMEOUT)
        .expect("guest boots");
    let qemu = agent.qemu_pid(VM).expect("QEMU runs");

    // The reader checks the file on every pass; a wrong or failed read ends it with 3. SIGTERM
    // ends it with 10 + passes (mod 200), so its exit code tells how many passes it made.
    let reader_script = format!(
        "n=0; trap 'exit $((10 + n % 200))' TERM; \
         while :; do s=$(sha256sum /data/big.bin); [ \"${{s%% *}}\" = {big_sha} ] || exit 3; \
         n=$((n + 1)); done"
    );
    run_detached(
        &agent,
        "reader",
        &[
            "--memory",
            READER_MEMORY,
            "--pull-mode",
            "lazy",
            &image,
            "sh",
            "-c",
            &reader_script,
        ],
    );
    run_detached(&agent, "sleeper", &["default", "sleep", "100000"]);
    // Numbered lines, on both streams (every tenth to stderr), each stdout line with the
    // guest's uptime when it was written (`read` is a shell builtin: no fork per line), so the
    // log shows whether the writer ever waited for its output to be taken.
    let writer_script = "i=0; trap 'exit 0' TERM; while :; do \
         j=0; while [ $j -lt 50 ]; do \
         if [ $((i % 10)) = 0 ]; then echo $i >&2; \
         else read up idle < /proc/uptime; echo $i $up; fi; \
         i=$((i + 1)); j=$((j + 1)); done; sleep 0.05; done";
    run_detached(&agent, "writer", &["default", "sh", "-c", writer_script]);
    // Into the first pass: the reader is fetching.
    std::thread::sleep(Duration::from_secs(2));

    let mut reconnects = Vec::new();
    for round in 0..=CRASHES {
        let killed = Instant::now();
        if round < CRASHES {
            agent.crash_and_restart().expect("restart after SIGKILL");
        } else {
            agent.upgrade().expect("upgrade");
        }
        let took = wait_connected(&agent, killed);
        reconnects.push(took);
        assert_eq!(
            agent.qemu_pid(VM),
            Some(qemu),
            "round {round}: the same QEMU serves the guest (no second boot)"
        );
        for name in ["reader", "sleeper", "writer"] {
            assert_eq!(
                state_of(&agent, name),
                "Running",
                "round {round}: {name} runs on\n--- agent log ---\n{}",
                agent.log()
            );
        }
        // Let the reader read through the new agent before the next crash.
        std::thread::sleep(Duration::from_secs(2));
    }
    // The point: restarts that found block requests in flight, and finished them.
    let resumed = agent
        .log()
        .matches("resuming the requests in flight before the restart")
        .count();
    println!("{resumed} queue resumptions with requests in flight");
    assert!(resumed >= 1, "no restart caught a read in flight");
    // How long the guest waited for each block request in flight across a restart, from when
    // it was popped to when the next agent completed it.
    let mut stalls: Vec<u64> = agent
        .log()
        .lines()
        .filter(|line| line.contains("in flight across the restart completed"))
        .filter_map(|line| line.split("stall_ms=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    stalls.sort_unstable();
    assert!(!stalls.is_empty(), "resumed requests were never completed");
    println!(
        "{} block requests in flight across a restart: stall p50 {} ms, max {} ms",
        stalls.len(),
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1]
    );
    reconnects.sort();
    println!(
        "{} restarts ({CRASHES} SIGKILL, 1 upgrade): shim connected again after p50 {:?}, max {:?}",
        reconnects.len(),
        reconnects[reconnects.len() / 2],
        reconnects[reconnects.len() - 1]
    );

    // A few passes through the last agent, then: agents that did not start them still signal
    // them and learn how they ended.
    std::thread::sleep(Duration::from_secs(8));

    // An exec into a container the first agent started takes its environment from the record
    // that agent left.
    let exec = agent.cli_within(
        &[
            "exec",
            "--vm",
            VM,
            "sleeper",
            "sh",
            "-c",
            "echo exec-in-$HOSTNAME-$PATH",
        ],
        Duration::from_secs(60),
    );
    assert!(exec.status.success(), "exec: {}", text(&exec.stderr));
    assert!(
        text(&exec.stdout).starts_with("exec-in-"),
        "exec output: {}",
        text(&exec.stdout)
    );

    // The writer's log, kept by every agent in turn: each line once, in order, none missing.
    let kill = agent.cli_within(
        &["kill", "--vm", VM, "-s", "TERM", "writer"],
        Duration::from_secs(30),
    );
    assert!(kill.status.success(), "kill writer: {}", text(&kill.stderr));
    wait_stopped(&agent, "writer", Duration::from_secs(60));
    let logs = agent.cli_within(&["logs", "--vm", VM, "writer"], Duration::from_secs(60));
    assert!(logs.status.success(), "logs: {}", text(&logs.stderr));
    check_numbered(&text(&logs.stdout), |i| i % 10 != 0, "stdout");
    print_output_gaps(&text(&logs.stdout));
    check_numbered(&text(&logs.stderr), |i| i % 10 == 0, "stderr");
    // A flood while no agent runs: the shim keeps a full window (1 MiB) of it and the process
    // waits. The next agent is resent that window while it subscribes, and must acknowledge
    // it, or the process waits for ever.
    const FLOOD_LAST: u64 = 600_000;
    let flood_last = FLOOD_LAST.to_string();
    run_detached(&agent, "flooder", &["default", "seq", "0", &flood_last]);
    agent
        .crash_and_restart_after(Duration::from_secs(4))
        .expect("restart after SIGKILL");
    wait_connected(&agent, Instant::now());
    // It waits for ever if its output is not taken.
    wait_stopped(&agent, "flooder", Duration::from_secs(180));
    let logs = agent.cli_within(&["logs", "--vm", VM, "flooder"], Duration::from_secs(60));
    assert!(logs.status.success(), "logs: {}", text(&logs.stderr));
    check_numbered(&text(&logs.stdout), |_| true, "flooder");
    assert!(
        text(&logs.stdout).ends_with(&format!("\n{FLOOD_LAST}\n")),
        "the flood's last line is logged"
    );

    // `sleep` as its container's first process has no handler for TERM: it gets KILL.
    for (name, signal, expected) in [("sleeper", "KILL", None), ("reader", "TERM", Some(()))] {
        let kill = agent.cli_within(
            &["kill", "--vm", VM, "-s", signal, name],
            Duration::from_secs(30),
        );
        assert!(kill.status.success(), "kill {name}: {}", text(&kill.stderr));
        wait_stopped(&agent, name, Duration::from_secs(60));
        if expected.is_some() {
            let listed = agent
                .cli_json(&["ps", "-a", "--vm", VM, "--json"])
                .expect("ps");
            let reader = listed
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["id"] == "reader")
                .cloned()
                .expect("reader listed");
            let code = reader["exit"]["Code"].as_i64().unwrap_or(-1);
            println!(
                "reader: exit {code}: {} passes, every one correct",
                code - 10
            );
            assert!(
                code >= 13,
                "the reader ended on SIGTERM after several correct passes (exit 10 + passes), \
                 not on a bad read (3): {reader}"
            );
        }
    }
    // Nothing is left behind: the test's agent stops the keeper, and QEMU dies with it.
    let keepers = agent.keeper_pids();
    assert_eq!(keepers.len(), 1, "one keeper for one VM");
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in keepers.into_iter().chain([qemu]) {
        while process_alive(pid.as_raw() as u32) {
            assert!(
                Instant::now() < deadline,
                "process {pid} outlived the test's agent"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(proxy);
}
