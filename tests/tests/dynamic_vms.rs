//! VMs attached and detached at run time (`POST /v1/vms`, `DELETE /v1/vms/{name}`), as an
//! orchestrator does when pods come and go: ten VMs in a row, each booted from the config's
//! `[vm_template]`, running a container (which maps and pins the default image's layer), then
//! detached, leave no process, socket, state directory, pin or metric series behind. One VM
//! attached at run time lives through an agent crash (adopted, not booted twice) until it is
//! detached. Bad requests are refused with their reason and change nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gantry_agent::keeper::client::process_alive;
use gantry_e2e::{TestAgent, TestVm, qemu_serving, vm_template};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const ROUNDS: u64 = 10;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What one attached VM holds on the card, found from the outside.
#[derive(Debug)]
struct Footprint {
    qemu: u32,
    keeper: u32,
    sockets: [PathBuf; 2],
    dir: PathBuf,
}

impl Footprint {
    fn of(agent: &TestAgent, vm: &str) -> Self {
        let status = agent.vm_status(vm).expect("listed");
        let socket = |key: &str| PathBuf::from(status[key].as_str().expect("socket path"));
        let sockets = [socket("vsock_socket"), socket("layer_socket")];
        let dir = agent.state_dir().join("vms").join(vm);
        let keeper = std::fs::read_to_string(dir.join("keeper.pid"))
            .expect("keeper pid file")
            .trim()
            .parse()
            .expect("keeper pid");
        let qemu = qemu_serving(&sockets[0])
            .expect("a QEMU serves the VM")
            .as_raw() as u32;
        Self {
            qemu,
            keeper,
            sockets,
            dir,
        }
    }

    /// Waits until nothing of it is left; says what is.
    fn wait_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut left = Vec::new();
            for (what, pid) in [("QEMU", self.qemu), ("keeper", self.keeper)] {
                if process_alive(pid) {
                    left.push(format!("{what} {pid}"));
                }
            }
            for path in self.sockets.iter().chain([&self.dir]) {
                if std::fs::symlink_metadata(path).is_ok() {
                    left.push(path.display().to_string());
                }
            }
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "left behind: {left:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The cache's layers that someone holds pinned (a shared lock on their `layer.json`): an
/// exclusive lock that cannot be had right now.
fn pinned_layers(agent: &TestAgent) -> Vec<String> {
    use nix::fcntl::{Flock, FlockArg};
    let Ok(layers) = std::fs::read_dir(agent.state_dir().join("cache/layers")) else {
        return Vec::new();
    };
    layers
        .flatten()
        .filter_map(|layer| {
            let file = std::fs::File::open(layer.path().join("layer.json")).ok()?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(_unlocked_on_drop) => None,
                Err(_) => Some(layer.file_name().to_string_lossy().into_owned()),
            }
        })
        .collect()
}

/// The metric samples that name `vm`, from the API socket's `/metrics`.
fn series_of(agent: &TestAgent, vm: &str) -> usize {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(agent.api_socket()).expect("API");
    // HTTP/1.0: the body comes whole, not in chunks, and the server closes.
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: gantry-agent\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let needle = format!("vm=\"{vm}\"");
    answer.lines().filter(|line| line.contains(&needle)).count()
}

fn attach(agent: &TestAgent, vm: &str, cid: u64) {
    let attached = agent.cli_within(
        &["vm", "attach", vm, "--cid", &cid.to_string(), "--launch"],
        Duration::from_secs(60),
    );
    assert!(
        attached.status.success(),
        "attach {vm}: {}\n--- agent log ---\n{}",
        text(&attached.stderr),
        agent.log()
    );
    let console = agent.state_dir().join(format!("vms/{vm}/{vm}.console.log"));
    agent
        .wait_guest_info(vm, BOOT_TIMEOUT)
        .unwrap_or_else(|err| {
            panic!(
                "{vm} boots: {err:#}\n--- console ---\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            )
        });
}

fn detach(agent: &TestAgent, vm: &str) {
    let detached = agent.cli_within(&["vm", "detach", vm], Duration::from_secs(60));
    assert!(
        detached.status.success(),
        "detach {vm}: {}",
        text(&detached.stderr)
    );
}

/// Asks for something the agent must refuse; the refusal's message.
fn refused(agent: &TestAgent, args: &[&str]) -> String {
    let output = agent.cli_within(args, Duration::from_secs(30));
    assert!(!output.status.success(), "{args:?} was not refused");
    text(&output.stderr)
}

#[test]
fn vms_attached_and_detached_at_run_time_leave_nothing_behind() {
    // A configured VM beside the dynamic ones: it is not disturbed, nor detachable.
    let mut agent =
        TestAgent::start_with(&[TestVm::new("fixed", 3)], &vm_template(256)).expect("agent starts");
    agent
        .wait_guest_info("fixed", BOOT_TIMEOUT)
        .expect("the configured VM boots");

    for round in 0..ROUNDS {
        let vm = format!("pod-{round}");
        let started = Instant::now();
        attach(&agent, &vm, 10 + round);
        let booted = started.elapsed();
        let run = agent.cli_within(
            &[
                "run",
                "--vm",
                &vm,
                "default",
                "echo",
                &format!("hello from {vm}"),
            ],
            Duration::from_secs(120),
        );
        assert!(run.status.success(), "run in {vm}: {}", text(&run.stderr));
        assert_eq!(text(&run.stdout), format!("hello from {vm}\n"));
        let status = agent.vm_status(&vm).unwrap();
        assert_eq!(status["attached_at_run_time"], true);
        assert!(
            !status["mapped_layers"].as_array().unwrap().is_empty(),
            "the default image's layer is mapped into {vm}"
        );
        assert!(
            !pinned_layers(&agent).is_empty(),
            "the mapped layer is pinned"
        );
        assert!(series_of(&agent, &vm) > 0, "{vm} has metrics");
        let footprint = Footprint::of(&agent, &vm);

        detach(&agent, &vm);
        footprint.wait_gone();
        assert!(agent.vm_status(&vm).is_err(), "{vm} is still listed");
        assert_eq!(pinned_layers(&agent), Vec::<String>::new(), "pins left");
        assert_eq!(series_of(&agent, &vm), 0, "metric series of {vm} left");
        println!(
            "round {round}: {vm} booted in {booted:?}, ran, detached, nothing left ({:?} in all)",
            started.elapsed()
        );
    }

    // Refusals change nothing: a bad name, a VM unknown, a CID taken, a launch without memory.
    attach(&agent, "survivor", 40);
    for (args, why) in [
        (vec!["vm", "attach", "../up", "--cid", "41"], "VM name"),
        (vec!["vm", "attach", "other", "--cid", "40"], "guest_cid 40"),
        (
            vec!["vm", "attach", "survivor", "--cid", "42"],
            "attached already",
        ),
        (
            vec![
                "vm",
                "attach",
                "small",
                "--cid",
                "43",
                "--launch",
                "--memory-mib",
                "1",
            ],
            "64 MiB",
        ),
        (vec!["vm", "detach", "nobody"], "no VM named"),
        (vec!["vm", "detach", "fixed"], "agent.toml"),
    ] {
        let message = refused(&agent, &args);
        assert!(message.contains(why), "{args:?}: {message}");
    }

    // A VM attached at run time lives through an agent crash: adopted, not booted twice.
    let sleeper = agent.cli_within(
        &[
            "run", "--vm", "survivor", "-d", "--name", "sleeper", "default", "sleep", "100000",
        ],
        Duration::from_secs(120),
    );
    assert!(sleeper.status.success(), "{}", text(&sleeper.stderr));
    let before = Footprint::of(&agent, "survivor");
    agent.crash_and_restart().expect("restart after SIGKILL");
    agent
        .wait_guest_info("survivor", Duration::from_secs(60))
        .expect("the survivor's shim is back");
    let after = Footprint::of(&agent, "survivor");
    assert_eq!(
        (after.qemu, after.keeper),
        (before.qemu, before.keeper),
        "the same QEMU and keeper serve the survivor"
    );
    let listed = agent
        .cli_json(&["ps", "--vm", "survivor", "--json"])
        .unwrap();
    assert_eq!(listed[0]["id"], "sleeper", "{listed}");
    assert_eq!(listed[0]["state"], "Running", "{listed}");
    assert_eq!(
        agent.vm_status("survivor").unwrap()["attached_at_run_time"],
        true
    );
    detach(&agent, "survivor");
    after.wait_gone();
    assert_eq!(pinned_layers(&agent), Vec::<String>::new(), "pins left");

    // Detached means detached for the next agent too.
    agent.crash_and_restart().expect("restart");
    let vms = agent.cli_json(&["vm", "ls", "--json"]).unwrap();
    let names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|vm| vm["name"].as_str())
        .collect();
    assert_eq!(names, ["fixed"], "a detached VM came back");
    assert_eq!(
        agent.keeper_pids().len(),
        1,
        "keepers left besides the configured VM's"
    );
    let fixed = agent.vm_status("fixed").unwrap();
    assert_eq!(fixed["attached_at_run_time"], false);
    agent
        .wait_guest_info("fixed", Duration::from_secs(60))
        .expect("the configured VM was not disturbed");
}
