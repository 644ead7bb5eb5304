//! A hostile operator client or tenant against the agent's own boundaries: names that would be
//! paths, who may reach the sockets, the benchmark-only `baseline`, and a guest that floods its
//! output to fill the card's disk and slow every other VM.
//!
//! One agent with two small guests serves every case; the cases run in order inside one test, so
//! the agent (and its QEMUs) is owned by the test and stopped when it ends, pass or fail.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gantry_api::{ApiClient, ApiClientError, ErrorCode, ExecRequest, RunOptions};
use gantry_e2e::{TestAgent, TestVm, agent_binary};

const FLOODER: &str = "vm-flood";
const NEIGHBOUR: &str = "vm-quiet";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The log cap the agent is configured with: two files of 1 MiB.
const LOG_FILE_BYTES: u64 = 1 << 20;
const LOG_FILES: u64 = 2;
/// What the flooding container writes to stdout.
const FLOOD_BYTES: u64 = 2 << 30;

/// Every file and directory under `dir`, as relative paths.
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            found.insert(path.strip_prefix(dir).unwrap().display().to_string());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    found
}

/// The status and message of an API error.
fn refusal<T: std::fmt::Debug>(result: Result<T, ApiClientError>) -> (u16, String) {
    match result {
        Err(ApiClientError::Status {
            status,
            code,
            message,
        }) => {
            assert_eq!(code, ErrorCode::for_status(status.as_u16()), "{message}");
            (status.as_u16(), message)
        }
        other => panic!("expected an error answer, got {other:?}"),
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

async fn bad_names_are_refused_and_touch_nothing(agent: &TestAgent, client: &ApiClient) {
    // Something outside the log tree that `rm` of `..` or `/` would have deleted.
    let sentinel = agent.state_dir().join("vms/sentinel");
    std::fs::create_dir_all(&sentinel).unwrap();
    std::fs::write(sentinel.join("keep"), "keep").unwrap();
    let before = tree(agent.dir());
    let long = "a".repeat(300);
    let bad_names = [
        "/",
        "..",
        "../x",
        "a/b",
        long.as_str(),
        "a\0b",
        "../../sentinel",
    ];
    for name in bad_names {
        let encoded = percent_encode(name);
        let base = format!("/v1/vms/{FLOODER}/containers/{encoded}");
        let answers = [
            refusal(
                client
                    .delete::<serde_json::Value>(&format!("{base}?force=true"))
                    .await,
            ),
            refusal(
                client
                    .get::<serde_json::Value>(&format!("{base}/stats"))
                    .await,
            ),
            refusal(
                client
                    .post::<serde_json::Value>(&format!("{base}/kill?signal=9"))
                    .await,
            ),
            refusal(
                client
                    .get::<serde_json::Value>(&format!("{base}/wait"))
                    .await,
            ),
            refusal(
                client
                    .post_json::<_, serde_json::Value>(
                        &format!("{base}/exec"),
                        &ExecRequest {
                            command: vec!["true".into()],
                            ..ExecRequest::default()
                        },
                    )
                    .await,
            ),
            refusal(
                client
                    .get::<serde_json::Value>(&format!(
                        "/v1/vms/{FLOODER}/containers/ok/logs?exec={encoded}"
                    ))
                    .await,
            ),
            refusal(
                client
                    .post_json::<_, serde_json::Value>(
                        &format!("/v1/vms/{FLOODER}/containers/ok/exec"),
                        &ExecRequest {
                            exec_id: Some(name.to_owned()),
                            command: vec!["true".into()],
                            ..ExecRequest::default()
                        },
                    )
                    .await,
            ),
            refusal(
                client
                    .post_json::<_, serde_json::Value>(
                        &format!("/v1/vms/{FLOODER}/containers"),
                        &RunOptions {
                            image: "default".into(),
                            name: Some(name.to_owned()),
                            command: vec!["true".into()],
                            ..RunOptions::default()
                        },
                    )
                    .await,
            ),
        ];
        for (status, message) in answers {
            assert_eq!(status, 400, "{name:?}: {message}");
            assert!(message.starts_with("invalid "), "{name:?}: {message}");
        }
    }
    assert_eq!(tree(agent.dir()), before, "a refused name changed files");
    assert_eq!(
        std::fs::read_to_string(sentinel.join("keep")).unwrap(),
        "keep"
    );
}

fn sockets_are_private_and_baseline_is_off(agent: &TestAgent) {
    for socket in [
        agent.api_socket().to_owned(),
        agent.dir().join(format!("{FLOODER}.vsock")),
        agent.dir().join(format!("{FLOODER}.blk")),
    ] {
        let mode = std::fs::metadata(&socket).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is mode {mode:o}", socket.display());
    }
    // Another user of the card cannot use the API.
    let nobody = Command::new(agent_binary())
        .arg("--api-socket")
        .arg(agent.api_socket())
        .args(["vm", "ls"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!nobody.status.success(), "uid 65534 reached the API");
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");

    let baseline = agent
        .cli(&["vm", "ls", "--json"])
        .map(|out| out.status.success())
        .unwrap();
    assert!(baseline, "root still can");
}

async fn baseline_is_refused_by_default(client: &ApiClient) {
    let (status, message) = refusal(
        client
            .post_json::<_, serde_json::Value>(
                &format!("/v1/vms/{NEIGHBOUR}/baseline"),
                &serde_json::json!({ "args": ["true"] }),
            )
            .await,
    );
    assert_eq!(status, 403, "{message}");
    assert!(message.contains("enable_baseline"), "{message}");
}

/// Wall time of `run --rm default echo hi` in the quiet VM.
fn quiet_run(agent: &TestAgent) -> Duration {
    let started = Instant::now();
    let out = agent
        .cli(&[
            "run", "--vm", NEIGHBOUR, "-q", "--rm", "default", "echo", "hi",
        ])
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    elapsed
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Lowers the CPU priority of every thread of `vm`'s QEMU.
///
/// Here one machine of 2 cores runs both guests' emulated CPUs (TCG) and the agent; on a card the
/// guests' CPUs are the host's, not the card's. Without this, a guest spinning in `dd` takes a
/// whole core from its neighbour's emulated CPU whatever the agent does. With it, what the quiet
/// VM waits for is the agent's own work for the flood (device, events, logs, credit), at normal
/// priority: the share the agent must keep fair.
fn guest_cpu_in_the_background(agent: &TestAgent, vm: &str) {
    let pid = agent.qemu_pid(vm).expect("the VM's QEMU runs");
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for task in tasks.flatten() {
        let tid: libc::id_t = task.file_name().to_str().unwrap().parse().unwrap();
        // SAFETY: setpriority takes plain integers; a vanished thread only makes it fail.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
    }
}

fn a_flood_stays_under_its_cap_and_slows_no_one_else(agent: &TestAgent) {
    guest_cpu_in_the_background(agent, FLOODER);
    let idle = median((0..5).map(|_| quiet_run(agent)).collect());
    let blocks = FLOOD_BYTES / 65536;
    let out = agent
        .cli(&[
            "run",
            "--vm",
            FLOODER,
            "-d",
            "--name",
            "flood",
            "default",
            "sh",
            "-c",
            &format!("dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null; echo done"),
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flood_started = Instant::now();
    // Measured while the flood runs at full speed (it takes minutes; these runs take seconds).
    std::thread::sleep(Duration::from_secs(2));
    let loaded = median((0..5).map(|_| quiet_run(agent)).collect());
    let status = |agent: &TestAgent| {
        agent
            .cli_json(&["ps", "-a", "--vm", FLOODER, "--json"])
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "flood")
            .cloned()
            .expect("the flood container is listed")
    };
    let still_running = status(agent)["state"] == "Running";
    let deadline = Instant::now() + Duration::from_secs(600);
    while status(agent)["state"] == "Running" {
        assert!(
            Instant::now() < deadline,
            "the flood did not finish in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let flood_time = flood_started.elapsed();
    let exit = status(agent)["exit"].clone();
    println!(
        "flood: {} MiB of output in {:.1} s ({:.0} MiB/s), exit {exit}; quiet VM run: idle {:?}, \
         during the flood {:?} ({:.2}×){}",
        FLOOD_BYTES >> 20,
        flood_time.as_secs_f64(),
        (FLOOD_BYTES >> 20) as f64 / flood_time.as_secs_f64(),
        idle,
        loaded,
        loaded.as_secs_f64() / idle.as_secs_f64(),
        if still_running {
            ""
        } else {
            " (the flood ended before the loaded runs did)"
        }
    );
    assert_eq!(
        exit,
        serde_json::json!({ "Code": 0 }),
        "the flood was never blocked"
    );
    assert!(
        still_running,
        "the flood must outlast the loaded measurement"
    );
    assert!(
        loaded <= idle * 2,
        "a flooding VM slowed another VM's run from {idle:?} to {loaded:?}"
    );

    // The log holds at most its cap, ends with the flood's last words.
    let dir = agent
        .state_dir()
        .join(format!("vms/{FLOODER}/containers/flood"));
    // Only the log's files: the container's record (`record.json`) sits beside them.
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|f| f.path().extension().is_some_and(|e| e == "log"))
        .collect();
    let kept: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    println!("flood log: {} files, {kept} bytes kept", files.len());
    assert!(files.len() as u64 <= LOG_FILES, "{files:?}");
    assert!(
        kept <= LOG_FILES * (LOG_FILE_BYTES + (256 << 10)),
        "{kept} bytes kept"
    );
    let logs = agent.cli(&["logs", "--vm", FLOODER, "flood"]).unwrap();
    assert!(logs.status.success());
    assert!(
        logs.stdout.ends_with(b"done\n"),
        "the newest output is kept"
    );
    assert!((logs.stdout.len() as u64) < kept);
    let rm = agent.cli(&["rm", "--vm", FLOODER, "flood"]).unwrap();
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert!(!dir.exists(), "rm removes the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_tenant_reaches_nothing_it_must_not() {
    let agent = TestAgent::start_with(
        &[TestVm::new(FLOODER, 31), TestVm::new(NEIGHBOUR, 32)],
        &format!("[logs]\nmax_file_bytes = {LOG_FILE_BYTES}\nmax_files = {LOG_FILES}\n"),
    )
    .expect("agent starts");
    for vm in [FLOODER, NEIGHBOUR] {
        agent
            .wait_guest_info(vm, BOOT_TIMEOUT)
            .expect("guest boots");
    }
    let client = ApiClient::new(agent.api_socket());
    bad_names_are_refused_and_touch_nothing(&agent, &client).await;
    sockets_are_private_and_baseline_is_off(&agent);
    baseline_is_refused_by_default(&client).await;
    tokio::task::block_in_place(|| a_flood_stays_under_its_cap_and_slows_no_one_else(&agent));
}
