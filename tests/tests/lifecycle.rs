//! Container lifecycle end to end: the agent's CLI runs containers in a real TCG guest from
//! images on the card (the embedded default, and OCI layouts built here), through the agent's
//! own layer-store and vsock devices.
//!
//! One agent, two VMs, booted once: `vm-a` for tests that may run side by side, `vm-b` for the
//! tests that count the guest's mounts, loop devices and cgroups (they take a lock, so nothing
//! else runs there meanwhile).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use gantry_agent::images::default_image;
use gantry_e2e::{TestAgent, TestVm, agent_binary};
use gantry_oci::builder::{self, ImageConfigSpec, LayerBuilder};
use gantry_testkit::Registry;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const SHARED: &str = "vm-a";
const COUNTED: &str = "vm-b";

struct Fixture {
    agent: TestAgent,
    images: tempfile::TempDir,
    counted_lock: Mutex<()>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let agent = TestAgent::start(&[
            TestVm::new(SHARED, 10).memory(512),
            TestVm::new(COUNTED, 11).memory(384),
        ])
        .expect("agent starts");
        agent
            .wait_guest_info(SHARED, BOOT_TIMEOUT)
            .expect("vm-a boots");
        agent
            .wait_guest_info(COUNTED, BOOT_TIMEOUT)
            .expect("vm-b boots");
        Fixture {
            agent,
            images: tempfile::tempdir().expect("tempdir"),
            counted_lock: Mutex::new(()),
        }
    })
}

/// Runs the agent's CLI with `args`.
fn cli(args: &[&str]) -> Output {
    fixture().agent.cli(args).expect("the CLI runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `gantry-agent run --vm VM -q ARGS…`.
fn run(vm: &str, args: &[&str]) -> Output {
    let mut all = vec!["run", "--vm", vm, "-q"];
    all.extend_from_slice(args);
    cli(&all)
}

/// Starts a detached container; returns once it runs.
fn run_detached(vm: &str, name: &str, args: &[&str]) {
    let mut all = vec!["run", "--vm", vm, "-q", "--detach", "--name", name];
    all.extend_from_slice(args);
    let output = cli(&all);
    assert!(
        output.status.success(),
        "run -d {name}: {}",
        text(&output.stderr)
    );
    assert_eq!(text(&output.stdout).trim(), name);
}

/// `run` in the background, for tests that signal it while the CLI follows its output.
fn spawn_run(vm: &str, args: &[&str]) -> Child {
    Command::new(agent_binary())
        .arg("--api-socket")
        .arg(fixture().agent.api_socket())
        .args(["run", "--vm", vm, "-q"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run")
}

fn wait_child(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("poll").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`run` did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn container_state(vm: &str, name: &str) -> serde_json::Value {
    let output = cli(&["ps", "--vm", vm, "-a", "--json"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let all: serde_json::Value = serde_json::from_slice(&output.stdout).expect("ps --json");
    all.as_array()
        .and_then(|list| list.iter().find(|c| c["id"] == name))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

fn wait_for_log(vm: &str, name: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = cli(&["logs", "--vm", vm, name]);
        if text(&logs.stdout).contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never printed {needle:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn guest_resources(vm: &str) -> serde_json::Value {
    let output = cli(&["vm", "resources", vm]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("resources JSON")
}

/// An OCI layout in the fixture's image directory; returns the `oci:DIR:NAME` reference.
fn image(name: &str, layers: &[LayerBuilder], config: &ImageConfigSpec) -> String {
    let dir: PathBuf = fixture().images.path().join(name);
    builder::write_image(&dir, name, layers, config).expect("write image");
    format!("oci:{}:{name}", dir.display())
}

fn busybox() -> LayerBuilder {
    default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX)).expect("busybox layer")
}

#[test]
fn exit_codes_and_signals_come_back_as_a_shell_shows_them() {
    assert_eq!(
        run(SHARED, &["default", "sh", "-c", "exit 7"])
            .status
            .code(),
        Some(7)
    );
    assert_eq!(run(SHARED, &["default", "true"]).status.code(), Some(0));
    // Death by signal, sent from outside (PID 1 of a namespace ignores SIGKILL from inside it).
    run_detached(SHARED, "victim", &["default", "sleep", "600"]);
    assert!(cli(&["kill", "--vm", SHARED, "victim"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while container_state(SHARED, "victim")["state"] != "Stopped" {
        assert!(Instant::now() < deadline, "victim never stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        container_state(SHARED, "victim")["exit"],
        serde_json::json!({ "Signal": 9 })
    );
    assert!(cli(&["rm", "--vm", SHARED, "victim"]).status.success());
    let missing = run(SHARED, &["default", "no-such-program"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("not found in $PATH"),
        "{}",
        text(&missing.stderr)
    );
}

#[test]
fn env_cwd_and_user_follow_the_image_and_the_request() {
    let mut users = LayerBuilder::new();
    users
        .file(
            "etc/passwd",
            0o644,
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
        )
        .unwrap()
        .file("etc/group", 0o644, "root:x:0:\nalice:x:1000:\nwheel:x:10:alice\nnogroup:x:65534:\n")
        .unwrap()
        .dir("work", 0o777)
        .unwrap();
    let config = ImageConfigSpec {
        cmd: vec!["sh".into()],
        env: vec![
            "PATH=/bin:/usr/bin".into(),
            "FOO=image".into(),
            "BAR=image".into(),
        ],
        working_dir: "/work".into(),
        user: "alice".into(),
        ..Default::default()
    };
    let reference = image("users", &[busybox(), users], &config);
    let script = "echo $FOO $BAR; pwd; id -u; id -g; id -G; echo $HOME";
    let output = run(
        SHARED,
        &["-e", "BAR=request", &reference, "sh", "-c", script],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        "image request\n/work\n1000\n1000\n1000 10\n/home/alice\n"
    );

    let output = run(
        SHARED,
        &[
            "-u",
            "nobody",
            "-w",
            "/tmp",
            &reference,
            "sh",
            "-c",
            "id -u; pwd",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "65534\n/tmp\n");
}

#[test]
fn a_file_written_in_the_upper_layer_is_gone_after_rm() {
    let first = run(
        SHARED,
        &[
            "--name",
            "upper",
            "default",
            "sh",
            "-c",
            "echo data > /marker && cat /marker",
        ],
    );
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert_eq!(text(&first.stdout), "data\n");
    assert!(cli(&["rm", "--vm", SHARED, "upper"]).status.success());
    let second = run(
        SHARED,
        &["--name", "upper", "--rm", "default", "cat", "/marker"],
    );
    assert_eq!(
        second.status.code(),
        Some(1),
        "the new container must not see the old upper layer"
    );
    assert!(
        text(&second.stderr).contains("No such file"),
        "{}",
        text(&second.stderr)
    );
}

#[test]
fn whiteouts_and_opaque_directories_across_layers_behave_as_in_docker() {
    let mut base = LayerBuilder::new();
    base.dir("data", 0o755)
        .unwrap()
        .file("data/deleted", 0o644, "old")
        .unwrap()
        .file("data/kept", 0o644, "kept")
        .unwrap()
        .dir("opaque", 0o755)
        .unwrap()
        .file("opaque/lower-a", 0o644, "a")
        .unwrap()
        .file("opaque/lower-b", 0o644, "b")
        .unwrap();
    let mut top = LayerBuilder::new();
    top.whiteout("data/deleted")
        .unwrap()
        .opaque("opaque")
        .unwrap()
        .file("opaque/upper", 0o644, "u")
        .unwrap();
    let reference = image(
        "layered",
        &[busybox(), base, top],
        &default_image::default_image_config(),
    );
    let script = "ls /data; echo --; ls /opaque; echo --; cat /data/kept; test -e /data/deleted || echo deleted-is-gone";
    let output = run(SHARED, &["--rm", &reference, "sh", "-c", script]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        "kept\n--\nupper\n--\nkeptdeleted-is-gone\n"
    );
}

#[test]
fn a_memory_limit_oom_kills_and_is_reported() {
    let script = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived";
    let output = run(
        SHARED,
        &[
            "--name", "oom", "--memory", "24m", "default", "sh", "-c", script,
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(137),
        "stdout {} stderr {}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(!text(&output.stdout).contains("survived"));
    assert!(
        text(&output.stderr).contains("OOM"),
        "{}",
        text(&output.stderr)
    );
    let state = container_state(SHARED, "oom");
    assert_eq!(state["oom_killed"], true, "{state}");
    let stats = cli(&["stats", "--vm", SHARED, "oom"]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
    assert!(stats["oom_kills"].as_u64().unwrap_or(0) >= 1, "{stats}");
    assert_eq!(stats["memory_max_bytes"], 24 << 20);
    assert!(cli(&["rm", "--vm", SHARED, "oom"]).status.success());
}

#[test]
fn exec_runs_inside_the_container_pid_namespace() {
    run_detached(SHARED, "execd", &["default", "sleep", "600"]);
    let output = cli(&[
        "exec",
        "--vm",
        SHARED,
        "execd",
        "sh",
        "-c",
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; exit 5",
    ]);
    assert_eq!(output.status.code(), Some(5), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "sleep 600 \nexecd\n");
    assert!(cli(&["rm", "--vm", SHARED, "-f", "execd"]).status.success());
    assert!(
        container_state(SHARED, "execd").is_null(),
        "rm -f removes a running container"
    );
}

#[test]
fn signals_reach_the_container_process() {
    let child = spawn_run(
        SHARED,
        &[
            "--name",
            "trapper",
            "--rm",
            "default",
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while true; do sleep 1; done",
        ],
    );
    wait_for_log(SHARED, "trapper", "ready");
    assert!(
        cli(&["kill", "--vm", SHARED, "-s", "TERM", "trapper"])
            .status
            .success()
    );
    let output = wait_child(child, Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(42), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "ready\n");
}

#[test]
fn ten_mib_of_output_arrives_complete_and_in_order() {
    let expected: String = (1..=1_500_000).map(|n| format!("{n}\n")).collect();
    assert!(expected.len() > 10 << 20);
    let output = run(SHARED, &["--rm", "default", "seq", "1", "1500000"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(output.stdout.len(), expected.len());
    assert!(
        output.stdout == expected.as_bytes(),
        "the output differs from seq's"
    );
}

#[test]
fn garbage_frames_close_only_that_connection_and_containers_live_on() {
    run_detached(SHARED, "survivor", &["default", "sleep", "600"]);
    let probe = cli(&["vm", "probe", SHARED]);
    assert!(probe.status.success(), "{}", text(&probe.stderr));
    assert!(
        text(&probe.stdout).contains("bad frame"),
        "{}",
        text(&probe.stdout)
    );
    assert_eq!(container_state(SHARED, "survivor")["state"], "Running");
    let exec = cli(&["exec", "--vm", SHARED, "survivor", "echo", "still here"]);
    assert_eq!(text(&exec.stdout), "still here\n");
    assert!(
        cli(&["rm", "--vm", SHARED, "-f", "survivor"])
            .status
            .success()
    );
}

#[test]
fn containers_sharing_a_base_layer_mount_it_once() {
    let _counted = fixture()
        .counted_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    run_detached(COUNTED, "share-1", &["default", "sleep", "600"]);
    run_detached(COUNTED, "share-2", &["default", "sleep", "600"]);
    let resources = guest_resources(COUNTED);
    let mounts = resources["layer_mounts"].as_array().expect("layer_mounts");
    assert_eq!(mounts.len(), 1, "{resources}");
    assert_eq!(mounts[0]["users"], 2, "{resources}");
    assert_eq!(
        resources["loop_devices"].as_array().map(Vec::len),
        Some(1),
        "{resources}"
    );
    assert!(
        cli(&["rm", "--vm", COUNTED, "-f", "share-1", "share-2"])
            .status
            .success()
    );
    let resources = guest_resources(COUNTED);
    let idle = gantry_e2e::assert_no_container_resources(&resources, "after rm");
    assert_eq!(
        idle, 1,
        "the shared layer stays mounted for the next start: {resources}"
    );
}

#[test]
fn twenty_containers_in_a_row_leave_only_their_layer_kept_mounted() {
    let _counted = fixture()
        .counted_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mounted_before = fixture()
        .agent
        .console(COUNTED)
        .matches("layer mounted")
        .count();
    for round in 0..20 {
        let name = format!("loop-{round}");
        let output = run(
            COUNTED,
            &[
                "--rm",
                "--name",
                &name,
                "default",
                "sh",
                "-c",
                "echo $HOSTNAME",
            ],
        );
        assert!(
            output.status.success(),
            "round {round}: {}",
            text(&output.stderr)
        );
        assert_eq!(text(&output.stdout), format!("{name}\n"));
    }
    let resources = guest_resources(COUNTED);
    let idle = gantry_e2e::assert_no_container_resources(&resources, "after 20 runs");
    assert_eq!(idle, 1, "one busybox layer, kept mounted: {resources}");
    let mounted = fixture()
        .agent
        .console(COUNTED)
        .matches("layer mounted")
        .count()
        - mounted_before;
    assert!(
        mounted <= 1,
        "the 20 runs mounted the layer {mounted} times, not once"
    );
    let ps = cli(&["ps", "--vm", COUNTED, "-a", "--json"]);
    assert_eq!(text(&ps.stdout).trim(), "[]");
}

#[test]
fn run_pulls_from_a_real_registry() {
    let registry = Registry::start();
    let mut app = LayerBuilder::new();
    app.file("app/hello.txt", 0o644, "pulled from the registry\n")
        .unwrap();
    let config = ImageConfigSpec {
        cmd: vec!["cat".into(), "/app/hello.txt".into()],
        env: vec!["PATH=/bin:/usr/bin".into()],
        ..Default::default()
    };
    let layout = fixture().images.path().join("to-push");
    builder::write_image(&layout, "v1", &[busybox(), app], &config).expect("write image");
    let reference = format!("127.0.0.1:{}/gantry/hello:v1", registry.port);
    let push = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo is installed (qemu/setup-host.sh installs it)");
    assert!(push.status.success(), "skopeo copy: {}", text(&push.stderr));

    let output = cli(&["run", "--vm", SHARED, "--rm", &reference]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "pulled from the registry\n");
    assert!(
        text(&output.stderr).contains("2 layer(s)"),
        "progress shows the pull: {}",
        text(&output.stderr)
    );

    let images = cli(&["images", "--json"]);
    assert!(
        text(&images.stdout).contains(&reference),
        "{}",
        text(&images.stdout)
    );
}
