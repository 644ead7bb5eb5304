//! `gantry-agent serve --check`: a config the agent would start with passes and says what it
//! found; one it could not start with fails, naming the part; nothing is created either way.

use std::path::Path;
use std::process::{Command, Output};

fn check(config: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gantry-agent"))
        .arg("serve")
        .arg("--check")
        .arg("--config")
        .arg(config)
        .args(extra)
        .output()
        .expect("gantry-agent runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A config with one launched VM (its kernel and initrd files in `dir`), a peer endpoint and
/// `extra` lines at the top.
fn config(dir: &Path, extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
    std::fs::write(dir.join("initrd"), b"initrd").unwrap();
    std::fs::write(dir.join("token"), "a-cluster-token-0123456789\n").unwrap();
    let text = format!(
        "api_socket = {api:?}\nstate_dir = {state:?}\npeer_listen = \"127.0.0.1:7420\"\n\
         peer_token_file = {token:?}\n{extra}\n\
         [[peer]]\nurl = \"http://10.0.0.2:7420\"\n\
         [[vm]]\nname = \"vm0\"\nguest_cid = 3\nvsock_socket = {vsock:?}\nlayer_socket = {blk:?}\n\
         [vm.launch]\nkernel = {kernel:?}\ninitrd = {initrd:?}\nqemu = \"sh\"\n",
        api = dir.join("agent.sock"),
        state = dir.join("state"),
        token = dir.join("token"),
        vsock = dir.join("vm0.vsock"),
        blk = dir.join("vm0.blk"),
        kernel = dir.join("vmlinux"),
        initrd = dir.join("initrd"),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// What `dir` holds, names only, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_good_config_passes_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "");
    let before = listing(dir.path());
    let output = check(&path, &[]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    println!("{stdout}");
    assert!(stdout.contains("peer endpoint 127.0.0.1:7420"), "{stdout}");
    assert!(stdout.contains("1 peer(s)"), "{stdout}");
    assert!(stdout.contains("VM vm0 (cid 3): launched with"), "{stdout}");
    assert!(
        stdout.contains("metrics on the API socket only"),
        "{stdout}"
    );
    assert_eq!(listing(dir.path()), before, "--check created files");
}

#[test]
fn the_metrics_address_is_reported_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "metrics_listen = \"127.0.0.1:9464\"");
    let output = check(&path, &[]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        stdout.contains("metrics on http://127.0.0.1:9464/metrics"),
        "{stdout}"
    );
    assert!(!stdout.contains("warning"), "{stdout}");

    // Reachable from other hosts: allowed, with a warning (the metrics need no credentials).
    let path = config(dir.path(), "metrics_listen = \"0.0.0.0:9464\"");
    let output = check(&path, &[]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        stdout.contains("warning: metrics_listen 0.0.0.0:9464 is reachable"),
        "{stdout}"
    );

    for (line, says) in [
        ("metrics_listen = \"127.0.0.1:0\"", "name a port"),
        ("metrics_listen = \"127.0.0.1:7420\"", "peer_listen too"),
        ("metrics_listen = \"not an address\"", "metrics_listen"),
    ] {
        let path = config(dir.path(), line);
        let output = check(&path, &[]);
        assert!(!output.status.success(), "{line}");
        assert!(
            text(&output.stderr).contains(says),
            "{line}: {}",
            text(&output.stderr)
        );
    }
}

#[test]
fn a_config_the_agent_could_not_start_with_fails_naming_the_part() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "");
    let before = listing(dir.path());

    std::fs::remove_file(dir.path().join("initrd")).unwrap();
    let output = check(&path, &[]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("VM vm0: initrd"),
        "{}",
        text(&output.stderr)
    );

    config(dir.path(), "");
    std::fs::write(dir.path().join("token"), "short\n").unwrap();
    let output = check(&path, &[]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("peer token file"),
        "{}",
        text(&output.stderr)
    );

    let path = config(dir.path(), "api_group = \"no-such-group-gantry\"");
    let output = check(&path, &[]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("no-such-group-gantry"),
        "{}",
        text(&output.stderr)
    );

    let path = config(dir.path(), "");
    let manifest = dir.path().join("cluster.toml");
    std::fs::write(
        &manifest,
        "version = 1\n[[registry]]\nhost = \"reg.example\"\nca = \"/nonexistent/ca.pem\"\n",
    )
    .unwrap();
    let output = check(&path, &["--manifest", manifest.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("cluster manifest"),
        "{}",
        text(&output.stderr)
    );
    std::fs::remove_file(&manifest).unwrap();

    assert_eq!(listing(dir.path()), before, "--check created files");
}
