//! The containerd harness checked against runc, before Gantry's shim exists: a test
//! containerd runs `ctr run` and a CRI pod with runc, and leaves no process and no mount
//! behind (even with a container and a pod still running at drop). Its `ctr run` figure, the
//! time from spawning `ctr run --rm --rootfs … sh -c 'echo hello; exit 3'` to its first byte of
//! output, is the reference the shim's stands beside.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_e2e::containerd::{
    CRI_NAMESPACE, ContainerdOptions, TestContainerd, busybox_rootfs, mounts_under, shims_serving,
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
    let rootfs = rootfs.to_str().expect("UTF-8 path");
    let mut figures = Vec::new();
    for run in 0..5 {
        let id = format!("ref{run}");
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
        println!("runc reference: ctr run to first output, run {run}: {first_output:?}");
        figures.push(first_output);
    }
    figures.sort();
    println!(
        "runc reference: ctr run to first output, median of 5: {:?}",
        figures[figures.len() / 2]
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
    let spec = ContainerSpec {
        name: "hello".into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec!["sh".into()],
        args: vec!["-c".into(), "echo from-cri; exit 4".into()],
        log_path: "hello.log".into(),
        ..Default::default()
    };
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
    let log = read_log(&log_directory.join("hello.log"));
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

/// The CRI log at `path`: containerd writes it from the container's output, which may land a
/// moment after the exit is reported; waits up to 10 s for a line.
fn read_log(path: &Path) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains("from-cri") || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
