//! What an operator sees: errors that say what happened (JSON with a stable code, for every kind
//! of bad request), progress that never drops a step, output that ends quietly in a pipe, a dead
//! QEMU reported as dead, containers of a guest that restarted listed as lost until `rm`, and
//! metrics a Prometheus server scrapes (the API socket's `/metrics` and `metrics_listen`) that
//! move as containers run, with the run's phases as spans in the agent's JSON log.
//!
//! One agent with one guest serves every case; they run in order inside one test, which owns the
//! agent (and its QEMU) and stops it when it ends, pass or fail.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gantry_agent::images::default_image;
use gantry_api::{ApiClient, RunUpdate};
use gantry_e2e::{TestAgent, TestVm, agent_binary};
use gantry_oci::builder::{self, ImageConfigSpec, LayerBuilder};
use gantry_testkit::Registry;
use prometheus_parse::{Scrape, Value};

const VM: &str = "vm-ops";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// One raw HTTP/1.1 exchange on the API socket: (status, body).
fn raw(socket: &Path, request: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{request}\r\nHost: gantry-agent\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    // A server that refuses early (413) may close before the whole body is sent.
    let _ = stream.write_all(body);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body.trim())
        .unwrap_or_else(|err| panic!("{request}: body is not JSON ({err}): {body:?}"));
    (status, json)
}

fn errors_are_json_with_a_code(agent: &TestAgent) {
    let socket = agent.api_socket();
    let json = "Content-Type: application/json";
    let run = format!("POST /v1/vms/{VM}/containers HTTP/1.1");
    let cases: Vec<(String, Vec<u8>, u16, &str, &str)> = vec![
        (
            format!("{run}\r\n{json}"),
            b"{not json".to_vec(),
            400,
            "invalid_argument",
            "",
        ),
        (
            format!("{run}\r\n{json}"),
            br#"{"image": 42}"#.to_vec(),
            422,
            "invalid_argument",
            "image",
        ),
        (
            format!("{run}\r\n{json}"),
            br#"{"image": "default", "comand": ["true"]}"#.to_vec(),
            422,
            "invalid_argument",
            "comand",
        ),
        (
            run.clone(),
            br#"{"image": "default"}"#.to_vec(),
            415,
            "unsupported_media_type",
            "",
        ),
        (
            format!("{run}\r\n{json}"),
            format!(
                r#"{{"image": "default", "env": ["{}"]}}"#,
                "x".repeat(3 << 20)
            )
            .into_bytes(),
            413,
            "payload_too_large",
            "",
        ),
        (
            format!("{run}\r\n{json}"),
            br#"{"image": "UPPER/Case:x"}"#.to_vec(),
            400,
            "invalid_argument",
            "bad image name",
        ),
        (
            "GET /v1/nowhere HTTP/1.1".into(),
            Vec::new(),
            404,
            "not_found",
            "/v1/nowhere",
        ),
        (
            format!("PUT /v1/vms/{VM} HTTP/1.1"),
            Vec::new(),
            405,
            "method_not_allowed",
            "PUT",
        ),
        (
            format!("GET /v1/vms/{VM}/guest-info?wait_ms=soon HTTP/1.1"),
            Vec::new(),
            400,
            "invalid_argument",
            "wait_ms",
        ),
        (
            "GET /v1/vms/nope HTTP/1.1".into(),
            Vec::new(),
            404,
            "not_found",
            "nope",
        ),
    ];
    for (request, body, status, code, mentions) in cases {
        let (got, answer) = raw(socket, &request, &body);
        let first_line = request.lines().next().unwrap_or_default();
        assert_eq!(got, status, "{first_line}: {answer}");
        assert_eq!(answer["code"], code, "{first_line}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            !error.is_empty() && error.contains(mentions),
            "{first_line}: {answer}"
        );
    }
}

/// A 30-layer image: the run stream carries more updates than a small channel holds.
fn many_layers(dir: &Path) -> String {
    let mut layers =
        vec![default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX)).unwrap()];
    for i in 1..30 {
        let mut layer = LayerBuilder::new();
        layer
            .dir("layers", 0o755)
            .unwrap()
            .file(&format!("layers/{i}"), 0o644, format!("{i}\n"))
            .unwrap();
        layers.push(layer);
    }
    builder::write_image(dir, "many", &layers, &default_image::default_image_config()).unwrap();
    format!("oci:{}:many", dir.display())
}

async fn a_slow_reader_misses_no_progress(agent: &TestAgent, image: &str) {
    let client = ApiClient::new(agent.api_socket());
    let options = gantry_api::RunOptions {
        image: image.to_owned(),
        name: Some("layered".into()),
        command: vec!["ls".into(), "/layers".into()],
        ..Default::default()
    };
    let body = client
        .open(
            hyper::Method::POST,
            &format!("/v1/vms/{VM}/containers"),
            serde_json::to_vec(&options).unwrap(),
        )
        .await
        .unwrap();
    // Read nothing until the run is surely over.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut stream = gantry_api::stream::BodyStream::new(body);
    let mut mapped = 0;
    let outcome = loop {
        let line = stream.line().await.unwrap().expect("a result line");
        match serde_json::from_slice::<RunUpdate>(&line).unwrap() {
            RunUpdate::Progress(message) if message.contains("mapped") => mapped += 1,
            RunUpdate::Started(id) => break Ok(id),
            RunUpdate::Failed(error) => break Err(error),
            _ => {}
        }
    };
    assert_eq!(outcome, Ok("layered".to_owned()));
    assert_eq!(mapped, 30, "every layer's mapped line arrives");
    let rm = agent.cli(&["rm", "-f", "--vm", VM, "layered"]).unwrap();
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
}

fn piped_output_is_plain_and_ends_quietly(agent: &TestAgent) {
    let run = agent
        .cli(&[
            "run", "--vm", VM, "--name", "counter", "default", "seq", "1", "200000",
        ])
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!run.stderr.contains(&0x1b), "escape codes in piped stderr");
    assert!(
        !agent.log().contains('\u{1b}'),
        "escape codes in the agent's log"
    );
    // `logs | head`: the pipe closes early; the CLI ends without a word.
    let piped = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "{} --api-socket {} logs --vm {VM} counter | head -n 2",
            agent_binary().display(),
            agent.api_socket().display()
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&piped.stdout), "1\n2\n");
    assert!(
        piped.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&piped.stderr)
    );
}

fn ps_state(agent: &TestAgent, name: &str) -> serde_json::Value {
    agent
        .cli_json(&["ps", "-a", "--vm", VM, "--json"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == name)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

fn a_dead_qemu_is_dead_and_lost_containers_stay_until_rm(agent: &TestAgent) {
    let detached = agent
        .cli(&[
            "run",
            "--vm",
            VM,
            "-d",
            "--name",
            "sleeper",
            "default",
            "sh",
            "-c",
            "echo before; sleep 600",
        ])
        .unwrap();
    assert!(
        detached.status.success(),
        "{}",
        String::from_utf8_lossy(&detached.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&agent.cli(&["logs", "--vm", VM, "sleeper"]).unwrap().stdout)
        .contains("before")
    {
        assert!(Instant::now() < deadline, "no output from sleeper");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Kill the guest's QEMU: the agent says it is dead, not booting.
    let qemu = agent.qemu_pid(VM).expect("the guest's QEMU runs");
    nix::sys::signal::kill(qemu, nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let run = agent
        .cli(&["run", "--vm", VM, "-q", "--rm", "default", "true"])
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("QEMU has exited") && stderr.contains("signal: 9"),
        "{stderr}"
    );

    // Boot again: the old boot's container is lost, its log and name kept until rm.
    let restart = agent.cli(&["vm", "restart", VM]).unwrap();
    assert!(
        restart.status.success(),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );
    agent.wait_guest_info(VM, BOOT_TIMEOUT).unwrap();
    let lost = ps_state(agent, "sleeper");
    assert_eq!(lost["state"], "Lost", "{lost}");
    assert!(
        lost["lost"]
            .as_str()
            .unwrap_or_default()
            .contains("restarted"),
        "{lost}"
    );
    let running_only = agent.cli_json(&["ps", "--vm", VM, "--json"]).unwrap();
    assert!(
        running_only
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["id"] != "sleeper")
    );
    let logs = agent.cli(&["logs", "--vm", VM, "sleeper"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "before\n");
    let taken = agent
        .cli(&[
            "run", "--vm", VM, "-q", "--name", "sleeper", "default", "true",
        ])
        .unwrap();
    assert!(!taken.status.success(), "the name stays taken until rm");
    let rm = agent.cli(&["rm", "--vm", VM, "sleeper"]).unwrap();
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert_eq!(ps_state(agent, "sleeper"), serde_json::Value::Null);
    let again = agent
        .cli(&[
            "run", "--vm", VM, "-q", "--rm", "--name", "sleeper", "default", "echo", "again",
        ])
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&again.stdout), "again\n");
}

/// One `GET path` over HTTP/1.1 on `stream`: (status, content type, body).
fn http_get(mut stream: impl Read + Write, path: &str) -> (u16, String, String) {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: gantry-agent\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// `/metrics` from `stream`, parsed by a Prometheus text parser.
fn scrape(stream: impl Read + Write) -> Scrape {
    let (status, content_type, body) = http_get(stream, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(body.ends_with("# EOF\n"), "a whole exposition: {body}");
    Scrape::parse(body.lines().map(|line| Ok(line.to_owned()))).expect("the exposition parses")
}

/// The sample `name` whose labels include `labels`; 0 when there is none yet.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .find(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .map_or(0.0, |sample| match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name} is not a single value: {other:?}"),
        })
}

/// Pushes a two-layer image (busybox and a file) to `registry`; returns its reference.
fn registry_image(registry: &Registry, dir: &Path) -> String {
    let busybox = default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX)).unwrap();
    let mut app = LayerBuilder::new();
    app.file("app/said.txt", 0o644, "from the registry\n")
        .unwrap();
    let config = ImageConfigSpec {
        cmd: vec!["cat".into(), "/app/said.txt".into()],
        env: vec!["PATH=/bin:/usr/bin".into()],
        ..Default::default()
    };
    builder::write_image(dir, "v1", &[busybox, app], &config).unwrap();
    registry.push(dir, "v1", "gantry/metrics:v1");
    format!("{}/gantry/metrics:v1", registry.host())
}

/// The agent's JSON log lines.
fn json_log(agent: &TestAgent) -> Vec<serde_json::Value> {
    agent
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn metrics_move_as_containers_run(agent: &TestAgent, metrics_addr: &str, images: &Path) {
    let unix = || UnixStream::connect(agent.api_socket()).unwrap();
    let before = scrape(unix());
    let registry = Registry::start();
    let reference = registry_image(&registry, &images.join("registry-image"));
    let runs = [
        ("metrics-default", "default", "counted\n"),
        (
            "metrics-registry",
            reference.as_str(),
            "from the registry\n",
        ),
    ];
    for (name, image, said) in runs {
        let mut args = vec!["run", "--vm", VM, "--rm", "-q", "--name", name, image];
        if image == "default" {
            args.extend(["echo", "counted"]);
        }
        let run = agent.cli_within(&args, Duration::from_secs(120));
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&run.stdout), said);
    }
    // The vsock device runs in the VM's keeper, whose counters the agent copies every second:
    // two copies later, everything the runs sent is in.
    std::thread::sleep(Duration::from_millis(2500));
    let after = scrape(unix());
    let over_tcp = scrape(TcpStream::connect(metrics_addr).unwrap());

    let vm = [("vm", VM)];
    let moved = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(moved("gantry_container_starts_total", &vm), 2.0);
    assert_eq!(moved("gantry_container_start_failures_total", &vm), 0.0);
    assert_eq!(moved("gantry_container_exits_total", &vm), 2.0);
    assert_eq!(
        moved("gantry_container_start_duration_seconds_count", &vm),
        2.0
    );
    assert_eq!(
        moved("gantry_container_first_output_duration_seconds_count", &vm),
        2.0
    );
    let reads = [("vm", VM), ("op", "read")];
    assert!(
        moved("gantry_blk_requests_total", &reads) > 0.0,
        "the guest read layers"
    );
    assert!(moved("gantry_blk_read_bytes_total", &vm) > 0.0);
    assert!(moved("gantry_blk_request_duration_seconds_count", &vm) > 0.0);
    assert!(
        value(&after, "gantry_vsock_connections_total", &vm) >= 1.0,
        "the shim's session"
    );
    for direction in ["to_guest", "from_guest"] {
        let labels = [("vm", VM), ("direction", direction)];
        assert!(
            moved("gantry_vsock_bytes_total", &labels) > 0.0,
            "{direction}"
        );
    }
    let source = [
        ("kind", "registry"),
        ("source", reference.split('/').next().unwrap()),
    ];
    assert!(
        moved("gantry_registry_requests_total", &source) >= 3.0,
        "manifest, config, a layer at least"
    );
    assert!(moved("gantry_registry_bytes_total", &source) > 0.0);
    assert_eq!(moved("gantry_registry_errors_total", &source), 0.0);
    assert!(
        moved("gantry_cache_misses_total", &[]) >= 1.0,
        "the registry image's file"
    );
    assert!(
        moved("gantry_cache_hits_total", &[]) >= 1.0,
        "the default image's busybox"
    );
    assert!(value(&after, "gantry_cache_bytes", &[]) > 0.0);
    assert!(
        after
            .samples
            .iter()
            .any(|s| s.metric == "gantry_blk_parked_requests" && s.labels.get("vm") == Some(VM)),
        "the parked gauge is read at scrape time"
    );
    // No container name, image or digest is a label.
    for sample in &after.samples {
        for label in sample.labels.values() {
            assert!(
                !label.starts_with("metrics-") && !label.contains("sha256"),
                "{} has label {label}",
                sample.metric
            );
        }
    }

    // The TCP listener exports the same metrics, and nothing of the API.
    for name in [
        "gantry_container_starts_total",
        "gantry_registry_requests_total",
    ] {
        let labels: &[(&str, &str)] = if name.contains("registry") {
            &source
        } else {
            &vm
        };
        assert_eq!(
            value(&over_tcp, name, labels),
            value(&after, name, labels),
            "{name}"
        );
    }
    let (status, _, _) = http_get(TcpStream::connect(metrics_addr).unwrap(), "/v1/vms");
    assert_eq!(status, 404, "the API stays on its socket");

    // The run's phases are spans in the agent's JSON log, inside a `run` span naming the VM,
    // the image and the container.
    let log = json_log(agent);
    for phase in ["pull", "map", "create", "start", "first_output"] {
        let closed = log.iter().any(|line| {
            line["fields"]["message"] == "close"
                && line["span"]["name"] == phase
                && line["spans"][0]["name"] == "run"
                && line["spans"][0]["vm"] == VM
                && line["spans"][0]["container"] == "metrics-registry"
                && line["spans"][0]["image"] == reference.as_str()
        });
        assert!(
            closed,
            "no closed {phase} span of the registry run in the JSON log"
        );
    }
    assert!(
        log.iter()
            .any(|line| line["fields"]["message"] == "first output"
                && line["fields"]["first_output_ms"].is_u64()),
        "the first output is logged with its time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_is_told_what_happened() {
    let metrics_addr = format!("127.0.0.1:{}", gantry_testkit::free_port());
    let agent = TestAgent::start_with_env(
        &[TestVm::new(VM, 40).memory(384)],
        &format!("metrics_listen = {metrics_addr:?}"),
        &[("GANTRY_LOG_FORMAT", "json")],
    )
    .expect("agent starts");
    agent
        .wait_guest_info(VM, BOOT_TIMEOUT)
        .expect("guest boots");
    let images = tempfile::tempdir().unwrap();
    let image = many_layers(&images.path().join("many"));
    tokio::task::block_in_place(|| {
        metrics_move_as_containers_run(&agent, &metrics_addr, images.path())
    });
    tokio::task::block_in_place(|| errors_are_json_with_a_code(&agent));
    a_slow_reader_misses_no_progress(&agent, &image).await;
    tokio::task::block_in_place(|| piped_output_is_plain_and_ends_quietly(&agent));
    tokio::task::block_in_place(|| a_dead_qemu_is_dead_and_lost_containers_stay_until_rm(&agent));
}
