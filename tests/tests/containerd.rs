//! The containerd harness checked against runc, before Gantry's shim exists: a test
//! containerd runs `ctr run` and a CRI pod with runc, and leaves no process and no mount
//! behind (even with a container and a pod still running at drop). Its `ctr run` figure, the
//! time from spawning `ctr run --rm --rootfs … sh -c 'echo hello; exit 3'` to its first byte of
//! output, is the reference the shim's stands beside.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_e2e::containerd::{
    CRI_NAMESPACE, ContainerdOptions, TestContainerd, busybox_rootfs, last_lines, mounts_under,
    shims_serving,
};
use gantry_e2e::cri::{ContainerSpec, CriClient, parse_cri_log};
use k8s_cri::v1::ContainerState;

const PAUSE_IMAGE: &str = "gantry.invalid/pause:1";
const BUSYBOX_IMAGE: &str = "gantry.invalid/busybox:1";
/// How long one `ctr run` of a shell may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn tools_available() -> bool {
    let missing: Vec<&str> = ["containerd", "ctr", "runc", "containerd-shim-runc-v2"]
        .into_iter()
        .filter(|tool| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIP: {missing:?} missing (apt-get install containerd; qemu/setup-host.sh does)"
        );
    }
    missing.is_empty()
}

#[test]
fn runc_reference() {
    if !tools_available() {
        return;
    }
    let options = ContainerdOptions::new().sandbox_image(PAUSE_IMAGE);
    let containerd = TestContainerd::start(&options).expect("containerd starts");
    let socket = containerd.socket().to_owned();
    let dir = containerd.dir().to_owned();
    let pid = containerd.pid();
    let namespace = containerd.namespace().to_owned();

    let work = tempfile::tempdir().expect("tempdir");
    let rootfs = busybox_rootfs(work.path()).expect("busybox rootfs");
    ctr_run_reference(&containerd, &rootfs);
    cri_pod_with_runc(&containerd);
    let left_ids = leave_running(&containerd, &rootfs);
    let processes = containerd.shim_process_tree();
    // 2 shims, the pod's pause and sleep, ctr's sleep.
    assert!(processes.len() >= 5, "shims and containers: {processes:?}");

    drop(containerd);
    let alive: Vec<_> = processes
        .iter()
        .filter(|pid| gantry_agent::keeper::client::process_alive(pid.as_raw() as u32))
        .collect();
    assert!(
        alive.is_empty(),
        "shim or container processes left after drop: {alive:?}"
    );
    assert!(
        !gantry_agent::keeper::client::process_alive(pid),
        "containerd {pid} is still running after drop"
    );
    let shims = shims_serving(&socket);
    assert!(shims.is_empty(), "shims left after drop: {shims:?}");
    let mounts = mounts_under(&dir);
    assert!(mounts.is_empty(), "mounts left after drop: {mounts:?}");
    assert!(!dir.exists(), "{} is left after drop", dir.display());
    let runc_state = Path::new("/run/containerd/runc").join(&namespace);
    assert!(!runc_state.exists(), "{} is left", runc_state.display());
    let mut cgroups = vec![PathBuf::from(&namespace)];
    cgroups.extend(left_ids.iter().map(|id| Path::new(CRI_NAMESPACE).join(id)));
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .expect("/sys/fs/cgroup")
        .flatten()
    {
        for cgroup in &cgroups {
            let path = hierarchy.path().join(cgroup);
            assert!(
                !path.exists(),
                "cgroup {} is left after drop",
                path.display()
            );
        }
    }
}

/// `ctr run --rm --rootfs` of a shell 5 times: it prints `hello` and exits 3; prints the time
/// from spawning `ctr run` to its first byte of output, each and the median.
fn ctr_run_reference(containerd: &TestContainerd, rootfs: &Path) {
    let figures = runc_first_outputs(containerd, rootfs, "ref", 5);
    for (run, first_output) in figures.iter().enumerate() {
        println!("runc reference: ctr run to first output, run {run}: {first_output:?}");
    }
    println!(
        "runc reference: ctr run to first output, median of 5: {:?}",
        median(&figures)
    );
    let left = containerd
        .ctr(&["containers", "ls", "-q"])
        .expect("ctr containers ls");
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "",
        "ctr run --rm leaves no container"
    );
}

/// `rounds` runs of `ctr run --rm --rootfs ROOTFS PREFIX<n> /bin/sh -c 'echo hello; exit 3'`
/// with runc, each checked (output `hello`, exit 3); the time to first output of each.
fn runc_first_outputs(
    containerd: &TestContainerd,
    rootfs: &Path,
    prefix: &str,
    rounds: usize,
) -> Vec<Duration> {
    let rootfs = rootfs.to_str().expect("UTF-8 path");
    (0..rounds)
        .map(|run| {
            let id = format!("{prefix}{run}");
            let args = [
                "run",
                "--rm",
                "--rootfs",
                rootfs,
                &id,
                "/bin/sh",
                "-c",
                "echo hello; exit 3",
            ];
            let (first_output, output) = containerd
                .ctr_first_output(&args, RUN_TIMEOUT)
                .unwrap_or_else(|error| panic!("ctr run: {error:#}"));
            assert_eq!(
                String::from_utf8_lossy(&output.stdout),
                "hello\n",
                "ctr run's output (stderr: {})\n--- containerd log ---\n{}",
                String::from_utf8_lossy(&output.stderr),
                containerd.log_tail(30)
            );
            assert_eq!(
                output.status.code(),
                Some(3),
                "ctr run exits with the container's code: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            first_output
        })
        .collect()
}

fn median(figures: &[Duration]) -> Duration {
    let mut sorted = figures.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// A host-network pod with runc through CRI: a busybox container prints `from-cri` (into its
/// CRI log) and exits 4; then the pod is stopped and removed.
fn cri_pod_with_runc(containerd: &TestContainerd) {
    containerd
        .import_pause_image(PAUSE_IMAGE)
        .expect("pause image imported");
    containerd
        .import_busybox_image(BUSYBOX_IMAGE)
        .expect("busybox image imported");
    let cri = CriClient::connect(containerd.socket()).expect("CRI connects");
    let version = cri.version().expect("CRI Version");
    assert_eq!(version.runtime_name, "containerd", "{version:?}");
    assert!(
        cri.image_present(PAUSE_IMAGE).expect("ImageStatus"),
        "CRI sees the imported pause image"
    );

    let log_directory: PathBuf = containerd.pod_log_root().join("runc-pod");
    let (pod, sandbox_config) = cri
        .run_pod(
            "runc-pod",
            "uid-runc-1",
            "default",
            "runc",
            true,
            &log_directory,
        )
        .unwrap_or_else(|error| {
            panic!(
                "RunPodSandbox: {error:#}\n--- containerd log ---\n{}",
                containerd.log_tail(40)
            )
        });
    let spec = shell_container("hello", BUSYBOX_IMAGE, "echo from-cri; exit 4");
    let container = cri
        .create_container(&pod, &sandbox_config, &spec)
        .unwrap_or_else(|error| {
            panic!(
                "CreateContainer: {error:#}\n--- containerd log ---\n{}",
                containerd.log_tail(40)
            )
        });
    cri.start_container(&container).expect("StartContainer");
    let status = cri
        .wait_container_exited(&container, Duration::from_secs(30))
        .expect("the container exits");
    assert_eq!(status.state, ContainerState::ContainerExited as i32);
    assert_eq!(status.exit_code, 4, "{status:?}");
    let log = read_log_line(&log_directory.join("hello.log"), "from-cri");
    let lines = parse_cri_log(&log);
    assert!(
        lines
            .iter()
            .any(|(stream, line)| stream == "stdout" && line == "from-cri"),
        "the CRI log has `TIMESTAMP stdout F from-cri`:\n{log}"
    );
    assert!(
        log.lines().any(|line| line.ends_with(" stdout F from-cri")),
        "a full stdout line: {log}"
    );
    cri.remove_container(&container).expect("RemoveContainer");
    cri.stop_pod_sandbox(&pod).expect("StopPodSandbox");
    cri.remove_pod_sandbox(&pod).expect("RemovePodSandbox");
    let shims = containerd.shim_pids();
    assert!(
        shims.is_empty(),
        "the pod's shim exits with the removed sandbox: {shims:?}"
    );
    let mounts: Vec<_> = mounts_under(containerd.dir());
    assert!(
        mounts.is_empty(),
        "no mount left once the pod is removed: {mounts:?}"
    );
}

/// What a failing test leaves for drop to clean up: a detached `ctr run` container and a
/// CRI pod with a running container (their shims, processes, overlay and shm mounts, cgroups).
/// Returns the pod's and its container's ids.
fn leave_running(containerd: &TestContainerd, rootfs: &Path) -> [String; 2] {
    let rootfs = rootfs.to_str().expect("UTF-8 path");
    let detached = containerd
        .ctr(&[
            "run",
            "-d",
            "--rootfs",
            rootfs,
            "left",
            "/bin/sleep",
            "1000",
        ])
        .expect("ctr run -d");
    assert!(
        detached.status.success(),
        "ctr run -d: {}",
        String::from_utf8_lossy(&detached.stderr)
    );
    let cri = CriClient::connect(containerd.socket()).expect("CRI connects");
    let log_directory = containerd.pod_log_root().join("left-pod");
    let (pod, sandbox_config) = cri
        .run_pod(
            "left-pod",
            "uid-left-1",
            "default",
            "runc",
            true,
            &log_directory,
        )
        .expect("RunPodSandbox");
    let spec = ContainerSpec {
        name: "sleeper".into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec!["sleep".into(), "1000".into()],
        log_path: "sleeper.log".into(),
        ..Default::default()
    };
    let container = cri
        .create_container(&pod, &sandbox_config, &spec)
        .expect("CreateContainer");
    cri.start_container(&container).expect("StartContainer");
    let status = cri.container_status(&container).expect("ContainerStatus");
    assert_eq!(
        status.state,
        ContainerState::ContainerRunning as i32,
        "{status:?}"
    );
    assert_eq!(
        containerd.shim_pids().len(),
        2,
        "a shim for ctr's and the pod's"
    );
    assert!(
        !mounts_under(containerd.dir()).is_empty(),
        "the pod's rootfs and shm are mounted"
    );
    [pod, container]
}

/// A CRI container `name` of `image` running `sh -c script`, logging to `name.log`.
fn shell_container(name: &str, image: &str, script: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: image.into(),
        command: vec!["sh".into()],
        args: vec!["-c".into(), script.into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// The image the Gantry tests run, in the test registry (the agent pulls it; CRI needs it
/// imported under the same name, as it checks images exist before it creates containers).
const GANTRY_REPOSITORY: &str = "ctrd/busybox:v1";
/// The runtime `ctr run --runtime` names.
const GANTRY_RUNTIME: &str = "io.containerd.gantry.v2";
/// How long a `ctr` command that boots a VM may take under TCG on a loaded machine.
const BOOT_RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// The shim binary's directory, for containerd's PATH.
fn shim_dir() -> PathBuf {
    let dir = gantry_e2e::agent_binary()
        .parent()
        .expect("target dir")
        .to_owned();
    assert!(
        dir.join("containerd-shim-gantry-v2").is_file(),
        "build the shim first: cargo build --workspace --bins"
    );
    dir
}

/// The VMs the agent serves that a shim launched (`ctrd-…`).
fn shim_vms(agent: &gantry_e2e::TestAgent) -> Vec<String> {
    let vms = agent.cli_json(&["vm", "ls", "--json"]).expect("vm ls");
    vms.as_array()
        .expect("a list")
        .iter()
        .filter_map(|vm| vm["name"].as_str())
        .filter(|name| name.starts_with("ctrd-"))
        .map(str::to_owned)
        .collect()
}

/// Waits until no shim-launched VM is left; says which are.
fn wait_no_shim_vms(agent: &gantry_e2e::TestAgent, context: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = shim_vms(agent);
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{context}: shim VMs left: {left:?}\n--- agent log ---\n{}",
            last_lines(&agent.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `output` is a process's that printed `stdout` and exited with `code`.
fn assert_ran(output: &std::process::Output, stdout: &str, code: i32, what: &str) {
    assert_eq!(
        text(&output.stdout),
        stdout,
        "{what} (stderr: {})",
        text(&output.stderr)
    );
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: {}",
        text(&output.stderr)
    );
}

/// A temporary file holding `bytes`.
fn work_file(name: &str, bytes: &[u8]) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .prefix(name)
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), bytes).expect("write");
    file
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// containerd drives Gantry: `ctr run` (output, exit code, cold and warm start beside runc),
/// a detached task's exec, ps, metrics, kill and delete, a killed shim cleaned up after, and a
/// CRI pod whose containers share one VM; every VM a shim launched is gone at the end.
#[test]
fn gantry_runtime() {
    if !tools_available() || !gantry_testkit::registry::tools_available() {
        return;
    }
    let registry = gantry_testkit::registry::Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let layout = work.path().join("busybox.oci");
    let busybox = gantry_agent::images::default_image::busybox_layer(Path::new(
        gantry_agent::images::default_image::DEFAULT_BUSYBOX,
    ))
    .expect("busybox layer");
    gantry_oci::builder::write_image(
        &layout,
        "v1",
        &[busybox],
        &gantry_agent::images::default_image::default_image_config(),
    )
    .expect("write image");
    registry.push(&layout, "v1", GANTRY_REPOSITORY);
    let image = format!("{}/{GANTRY_REPOSITORY}", registry.host());

    // One VM of the config (for tasks that name it) and a template (for the rest).
    let agent = gantry_e2e::TestAgent::start_with(
        &[gantry_e2e::TestVm::new("vm0", 3)],
        &gantry_e2e::vm_template(256),
    )
    .expect("agent starts");
    agent
        .wait_guest_info("vm0", Duration::from_secs(180))
        .expect("vm0 boots");
    let socket = agent.api_socket().to_str().expect("UTF-8").to_owned();
    let options = ContainerdOptions::new()
        .sandbox_image(PAUSE_IMAGE)
        .env("GANTRY_API_SOCKET", &socket)
        .path_prepend(shim_dir());
    let containerd = TestContainerd::start(&options).expect("containerd starts");
    let rootfs = busybox_rootfs(work.path()).expect("busybox rootfs");
    let rootfs = rootfs.to_str().expect("UTF-8").to_owned();

    ctr_run_with_gantry(&containerd, &agent, &rootfs, &image);
    detached_task(&containerd, &agent, &rootfs, &image);
    killed_shim(&containerd, &agent, &rootfs, &image);
    cri_pod_with_gantry(&containerd, &agent, &image);

    let processes = containerd.shim_process_tree();
    assert!(processes.is_empty(), "shims left: {processes:?}");
    drop(containerd);
    wait_no_shim_vms(&agent, "after containerd stopped");
}

/// `ctr run` through the shim (flags before `--rootfs DIR ID`: ctr takes the first word that
/// is no flag as the root file system); `annotations` are `KEY=VALUE`.
fn gantry_run_args<'a>(
    detach: bool,
    annotations: &'a [String],
    rootfs: &'a str,
    id: &'a str,
) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        if detach { "-d" } else { "--rm" },
        "--runtime",
        GANTRY_RUNTIME,
    ];
    for annotation in annotations {
        args.extend(["--annotation", annotation.as_str()]);
    }
    args.extend(["--rootfs", rootfs, id]);
    args
}

/// `ctr run --rm` through the shim prints the container's output and exits with its code:
/// cold (the image not cached, a VM launched), warm (cached, a VM launched), and in the VM the
/// config names (`io.gantry.vm`); beside runc's figure from the same run.
fn ctr_run_with_gantry(
    containerd: &TestContainerd,
    agent: &gantry_e2e::TestAgent,
    rootfs: &str,
    image: &str,
) {
    let annotation = format!("io.gantry.image={image}");
    let mut figures = Vec::new();
    let runs = [
        ("cold: pull + VM boot", None),
        ("warm image, VM boot", None),
        ("warm image, running VM", Some("vm0")),
        ("warm image, running VM", Some("vm0")),
    ];
    for (round, (what, vm)) in runs.iter().enumerate() {
        let id = format!("g{round}");
        let mut annotations = vec![annotation.clone()];
        annotations.extend(vm.map(|vm| format!("io.gantry.vm={vm}")));
        let mut args = gantry_run_args(false, &annotations, rootfs, &id);
        args.extend(["sh", "-c", "echo hello-gantry; echo to-stderr >&2; exit 3"]);
        let (first_output, output) = containerd
            .ctr_first_output(&args, BOOT_RUN_TIMEOUT)
            .unwrap_or_else(|error| {
                panic!(
                    "ctr run: {error:#}\n--- containerd log ---\n{}\n--- agent log ---\n{}",
                    containerd.log_tail(40),
                    last_lines(&agent.log(), 40)
                )
            });
        assert_eq!(
            text(&output.stdout),
            "hello-gantry\n",
            "ctr run's output (stderr: {})\n--- containerd log ---\n{}\n--- agent log ---\n{}",
            text(&output.stderr),
            containerd.log_tail(40),
            last_lines(&agent.log(), 40)
        );
        assert!(
            text(&output.stderr).contains("to-stderr"),
            "stderr reaches ctr's stderr: {}",
            text(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
        println!(
            "gantry transcript:\n$ ctr run {}\n{}{}(exit {:?})",
            args[1..].join(" "),
            text(&output.stdout),
            text(&output.stderr),
            output.status.code()
        );
        println!("gantry: ctr run to first output ({what}): {first_output:?}");
        figures.push((what, first_output));
        wait_no_shim_vms(agent, "after ctr run --rm");
    }
    // Standard input: what the client writes reaches the process, and its end ends the
    // process's input.
    let input = work_file("stdin.txt", b"piped-in\nsecond line\n");
    let annotations = [annotation.clone(), "io.gantry.vm=vm0".to_owned()];
    let mut args = gantry_run_args(false, &annotations, rootfs, "g-stdin");
    args.extend(["sh", "-c", "cat; echo after-eof"]);
    let output = containerd
        .ctr_with_input(&args, input.path(), BOOT_RUN_TIMEOUT)
        .expect("ctr run with stdin");
    assert_ran(
        &output,
        "piped-in\nsecond line\nafter-eof\n",
        0,
        "stdin in, its end seen",
    );

    // A terminal: `ctr run -t` gives the process one (stdout and stderr merged on it).
    let mut args = gantry_run_args(false, &annotations, rootfs, "g-tty");
    args.insert(2, "-t");
    args.extend([
        "sh",
        "-c",
        "[ -t 0 ] && [ -t 1 ] && echo on-a-terminal; echo to-stderr-on-tty >&2; exit 7",
    ]);
    let output = containerd
        .ctr_on_terminal(&args, BOOT_RUN_TIMEOUT)
        .expect("ctr run -t");
    let shown = text(&output.stdout);
    assert!(
        shown.contains("on-a-terminal") && shown.contains("to-stderr-on-tty"),
        "the process runs on a terminal, stderr on it too: {shown:?} (stderr: {})",
        text(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(7), "{shown:?}");

    // runc on the same machine, in the same run, for the figure beside.
    let runc = runc_first_outputs(containerd, Path::new(rootfs), "r", 3);
    println!(
        "gantry vs runc: ctr run to first output: {}; runc median of 3: {:?}",
        figures
            .iter()
            .map(|(what, time)| format!("{what} {time:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(&runc)
    );
    let views = agent
        .cli_json(&["ps", "-a", "--vm", "vm0", "--json"])
        .expect("ps");
    assert_eq!(
        views.as_array().map(Vec::len),
        Some(0),
        "ctr run --rm leaves no container in the VM: {views}"
    );
}

/// `ctr run -d` of `sleep 1000` as task `id` in a VM of its own; returns the shim VMs (that one).
fn run_detached(
    containerd: &TestContainerd,
    agent: &gantry_e2e::TestAgent,
    rootfs: &str,
    image: &str,
    id: &str,
) -> Vec<String> {
    let annotations = [format!("io.gantry.image={image}")];
    let mut args = gantry_run_args(true, &annotations, rootfs, id);
    args.extend(["sleep", "1000"]);
    let run = containerd
        .ctr_within(&args, BOOT_RUN_TIMEOUT)
        .expect("ctr run -d");
    assert!(run.status.success(), "ctr run -d: {}", text(&run.stderr));
    let vms = shim_vms(agent);
    assert_eq!(vms.len(), 1, "the task got its own VM: {vms:?}");
    vms
}

/// A detached task: `ctr task exec`, `ps`, `metrics`, `kill` and `delete` reach it, and its VM
/// goes with it.
fn detached_task(
    containerd: &TestContainerd,
    agent: &gantry_e2e::TestAgent,
    rootfs: &str,
    image: &str,
) {
    let vms = run_detached(containerd, agent, rootfs, image, "d1");

    let exec = containerd
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "d1",
            "sh",
            "-c",
            "echo from-exec; cat /proc/1/cmdline | tr '\\0' ' '; exit 5",
        ])
        .expect("ctr task exec");
    assert_ran(
        &exec,
        "from-exec\nsleep 1000 ",
        5,
        "the exec runs beside the task's process",
    );

    let ps = containerd.ctr(&["task", "ps", "d1"]).expect("ctr task ps");
    assert!(ps.status.success(), "ctr task ps: {}", text(&ps.stderr));
    let guest_pid = agent
        .cli_json(&["ps", "--vm", &vms[0], "--json"])
        .expect("ps")[0]["pid"]
        .as_u64()
        .expect("the container's guest pid");
    assert!(
        text(&ps.stdout)
            .lines()
            .skip(1)
            .any(|line| line.split_whitespace().next() == Some(&guest_pid.to_string())),
        "ctr task ps lists the guest's process {guest_pid}: {}",
        text(&ps.stdout)
    );

    let metrics = containerd
        .ctr(&["task", "metrics", "d1"])
        .expect("ctr task metrics");
    let metrics_text = text(&metrics.stdout);
    assert!(
        metrics.status.success() && metrics_text.contains("pids.current"),
        "ctr task metrics: {metrics_text} {}",
        text(&metrics.stderr)
    );
    let memory = metrics_text
        .lines()
        .find(|line| line.starts_with("memory.usage_in_bytes"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse::<u64>().ok())
        .expect("memory.usage_in_bytes");
    assert!(memory > 0, "the container uses memory: {metrics_text}");

    let kill = containerd
        .ctr(&["task", "kill", "-s", "SIGKILL", "d1"])
        .expect("ctr task kill");
    assert!(
        kill.status.success(),
        "ctr task kill: {}",
        text(&kill.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ls = containerd.ctr(&["task", "ls"]).expect("ctr task ls");
        let line = text(&ls.stdout)
            .lines()
            .find(|line| line.starts_with("d1 "))
            .map(str::to_owned);
        if line.as_deref().is_some_and(|line| line.contains("STOPPED")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the killed task stops: {line:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let delete = containerd
        .ctr(&["task", "delete", "d1"])
        .expect("ctr task delete");
    assert!(
        delete.status.success(),
        "ctr task delete: {}",
        text(&delete.stderr)
    );
    let removed = containerd
        .ctr(&["containers", "rm", "d1"])
        .expect("ctr containers rm");
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    wait_no_shim_vms(agent, "after ctr task delete");
}

/// A shim killed under its running task: containerd notices, and the shim's cleanup
/// (`delete`) removes the VM it launched.
fn killed_shim(
    containerd: &TestContainerd,
    agent: &gantry_e2e::TestAgent,
    rootfs: &str,
    image: &str,
) {
    run_detached(containerd, agent, rootfs, image, "k1");
    let shims = containerd.shim_pids();
    assert_eq!(shims.len(), 1, "one shim serves the task: {shims:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", shims[0])).expect("cmdline");
    let words: Vec<String> = cmdline.split(|b| *b == 0).map(text).collect();
    let serving = words
        .iter()
        .position(|word| word == "-socket")
        .and_then(|at| words.get(at + 1))
        .and_then(|address| address.strip_prefix("unix://"))
        .map(PathBuf::from)
        .expect("the shim's -socket");
    assert!(serving.exists(), "{} is served", serving.display());
    nix::sys::signal::kill(shims[0], nix::sys::signal::Signal::SIGKILL).expect("kill the shim");
    wait_no_shim_vms(agent, "after the shim was killed");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while serving.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead shim's socket {} is removed by its cleanup",
            serving.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ls = containerd.ctr(&["task", "ls"]).expect("ctr task ls");
        let running = text(&ls.stdout)
            .lines()
            .any(|line| line.starts_with("k1 ") && line.contains("RUNNING"));
        if !running {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "containerd notices the dead shim: {}",
            text(&ls.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = containerd.ctr(&["task", "delete", "k1"]);
    let removed = containerd
        .ctr(&["containers", "rm", "k1"])
        .expect("ctr containers rm");
    assert!(removed.status.success(), "{}", text(&removed.stderr));
}

/// A host-network pod with handler `gantry` through CRI: the pod is one VM; its containers
/// print into their CRI logs and exit with their codes; removing the pod removes the VM.
fn cri_pod_with_gantry(containerd: &TestContainerd, agent: &gantry_e2e::TestAgent, image: &str) {
    containerd
        .import_pause_image(PAUSE_IMAGE)
        .expect("pause image imported");
    containerd
        .import_busybox_image(image)
        .expect("busybox image imported under the registry's name");
    let cri = CriClient::connect(containerd.socket())
        .expect("CRI connects")
        .with_timeout(BOOT_RUN_TIMEOUT);
    let log_directory: PathBuf = containerd.pod_log_root().join("gantry-pod");
    let (pod, sandbox_config) = cri
        .run_pod(
            "gantry-pod",
            "uid-gantry-1",
            "default",
            gantry_e2e::containerd::GANTRY_HANDLER,
            true,
            &log_directory,
        )
        .unwrap_or_else(|error| {
            panic!(
                "RunPodSandbox: {error:#}\n--- containerd log ---\n{}\n--- agent log ---\n{}",
                containerd.log_tail(40),
                last_lines(&agent.log(), 40)
            )
        });
    let pod_vms = shim_vms(agent);
    assert_eq!(pod_vms.len(), 1, "the pod is a VM: {pod_vms:?}");
    let mut containers = Vec::new();
    for (name, code) in [("first", 4), ("second", 0)] {
        let spec = shell_container(name, image, &format!("echo from-{name}; exit {code}"));
        let container = cri
            .create_container(&pod, &sandbox_config, &spec)
            .unwrap_or_else(|error| {
                panic!(
                    "CreateContainer: {error:#}\n--- containerd log ---\n{}\n--- agent log ---\n{}",
                    containerd.log_tail(40),
                    last_lines(&agent.log(), 40)
                )
            });
        cri.start_container(&container).expect("StartContainer");
        let status = cri
            .wait_container_exited(&container, Duration::from_secs(60))
            .expect("the container exits");
        assert_eq!(status.state, ContainerState::ContainerExited as i32);
        assert_eq!(status.exit_code, code, "{status:?}");
        let log = read_log_line(
            &log_directory.join(format!("{name}.log")),
            &format!("from-{name}"),
        );
        assert!(
            log.lines()
                .any(|line| line.ends_with(&format!(" stdout F from-{name}"))),
            "the CRI log has the container's output: {log}"
        );
        assert_eq!(
            shim_vms(agent),
            pod_vms,
            "the pod's containers share its VM"
        );
        containers.push(container);
    }
    for container in &containers {
        cri.remove_container(container).expect("RemoveContainer");
    }
    cri.stop_pod_sandbox(&pod).expect("StopPodSandbox");
    cri.remove_pod_sandbox(&pod).expect("RemovePodSandbox");
    wait_no_shim_vms(agent, "after the pod was removed");
}

/// The CRI log at `path` once it holds `needle` (containerd writes it a moment after the
/// exit may be reported), or what it holds after 10 s.
fn read_log_line(path: &Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
