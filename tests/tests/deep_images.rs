//! Deep images end to end: images of 127 layers (Docker's limit) and 300 (far past the ~40 that
//! one page of absolute `lowerdir=` paths allowed) start in a real TCG guest, stack in the right
//! order, honour a whiteout and an opaque directory in a high layer over a low one, and leave no
//! layer mount, loop device or overlay behind once removed.
//!
//! One agent, one VM, booted once; each `run` is bounded in time, and its duration is printed
//! (`cargo test -p gantry-e2e --test deep_images -- --nocapture` shows it).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use gantry_agent::images::default_image;
use gantry_e2e::{TestAgent, TestVm};
use gantry_oci::builder::{self, LayerBuilder};

const VM: &str = "deep";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// One `run` of the deepest image: pull and convert 300 layers, map them, mount 300 loop devices
/// and EROFS file systems under TCG, run the check.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `gantry-agent ARGS…`, killed (and the test failed) after `timeout`.
fn cli(agent: &TestAgent, args: &[&str], timeout: Duration) -> Output {
    agent.cli_within(args, timeout)
}

fn guest_resources(agent: &TestAgent) -> serde_json::Value {
    let output = cli(agent, &["vm", "resources", VM], CLI_TIMEOUT);
    assert!(output.status.success(), "{}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("resources JSON")
}

fn assert_nothing_left(agent: &TestAgent, after: &str) {
    gantry_e2e::assert_no_container_resources(&guest_resources(agent), &format!("after {after}"));
}

/// An image of `depth` layers: busybox, then one layer per level adding `deep/f<level>` (its
/// content names the image, so two images share no layer but busybox). Level 1 also holds
/// `deep/gone`, `deep/shadow` and `hidden/low-*`; the level below the top whites out
/// `deep/gone` and makes `hidden` opaque; the top layer overwrites `deep/shadow`.
fn deep_image(layout: &Path, depth: usize) -> String {
    let busybox = default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX))
        .expect("busybox layer");
    let mut layers = vec![busybox];
    for level in 1..depth {
        let mut layer = LayerBuilder::new();
        layer
            .dir("deep", 0o755)
            .unwrap()
            .file(
                &format!("deep/f{level}"),
                0o644,
                format!("{depth}:{level}\n"),
            )
            .unwrap();
        if level == 1 {
            layer
                .file("deep/gone", 0o644, "low\n")
                .unwrap()
                .file("deep/shadow", 0o644, "low\n")
                .unwrap()
                .dir("hidden", 0o755)
                .unwrap()
                .file("hidden/low-a", 0o644, "a\n")
                .unwrap()
                .file("hidden/low-b", 0o644, "b\n")
                .unwrap();
        }
        if level == depth - 2 {
            layer
                .whiteout("deep/gone")
                .unwrap()
                .opaque("hidden")
                .unwrap()
                .file("hidden/high", 0o644, "high\n")
                .unwrap();
        }
        if level == depth - 1 {
            layer.file("deep/shadow", 0o644, "top\n").unwrap();
        }
        layers.push(layer);
    }
    let name = format!("deep{depth}");
    builder::write_image(
        layout,
        &name,
        &layers,
        &default_image::default_image_config(),
    )
    .expect("write image");
    format!("oci:{}:{name}", layout.display())
}

/// The container's check: shell built-ins only (a fork per file costs seconds under TCG).
fn check_script(depth: usize) -> String {
    format!(
        r#"n=0; for f in /deep/f*; do n=$((n+1)); done; echo files=$n
bad=0; i=1
while [ $i -lt {depth} ]; do
  c=missing; read -r c < /deep/f$i
  [ "$c" = "{depth}:$i" ] || {{ echo "bad f$i: $c"; bad=$((bad+1)); }}
  i=$((i+1))
done
echo bad=$bad
if [ -e /deep/gone ]; then echo gone=present; else echo gone=absent; fi
echo hidden=$(echo /hidden/*)
read -r s < /deep/shadow; echo shadow=$s
"#
    )
}

fn expected_output(depth: usize) -> String {
    format!(
        "files={}\nbad=0\ngone=absent\nhidden=/hidden/high\nshadow=top\n",
        depth - 1
    )
}

/// Cold run (pull, convert, map, mount, check) then a warm start from the cache, each timed;
/// every layer is mounted while the container exists and after `rm` only layers kept mounted for
/// the next start remain.
fn run_deep_image(agent: &TestAgent, layout: &Path, depth: usize) {
    let reference = deep_image(layout, depth);
    let name = format!("deep-{depth}");
    let script = check_script(depth);
    let started = Instant::now();
    let output = cli(
        agent,
        &[
            "run", "--vm", VM, "-q", "--name", &name, &reference, "sh", "-c", &script,
        ],
        RUN_TIMEOUT,
    );
    let cold = started.elapsed();
    assert!(
        output.status.success(),
        "{depth} layers: {}\n--- agent log ---\n{}",
        text(&output.stderr),
        agent.log()
    );
    assert_eq!(
        text(&output.stdout),
        expected_output(depth),
        "{depth} layers"
    );
    println!(
        "deep_images: {depth} layers: cold `run` (pull + convert + map + mount + start + check) took {:.2} s",
        cold.as_secs_f64()
    );

    // The stopped container still holds its layers: one mount and one loop device each (besides
    // layers an earlier image left mounted for the next start).
    let resources = guest_resources(agent);
    let mounts = resources["layer_mounts"].as_array().expect("layer_mounts");
    assert_eq!(
        mounts.iter().filter(|mount| mount["users"] == 1).count(),
        depth,
        "{resources}"
    );
    assert_eq!(
        resources["loop_devices"].as_array().map(Vec::len),
        Some(mounts.len()),
        "{resources}"
    );
    assert_eq!(resources["overlay_mounts"], 1, "{resources}");
    let rm = cli(agent, &["rm", "--vm", VM, &name], CLI_TIMEOUT);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert_nothing_left(agent, &format!("rm {name}"));

    // Warm: the layers are in the cache; the guest maps and mounts them afresh.
    let warm_name = format!("deep-{depth}-warm");
    let started = Instant::now();
    let output = cli(
        agent,
        &[
            "run", "--vm", VM, "-q", "-d", "--name", &warm_name, &reference, "sleep", "600",
        ],
        RUN_TIMEOUT,
    );
    let warm = started.elapsed();
    assert!(output.status.success(), "{}", text(&output.stderr));
    println!(
        "deep_images: {depth} layers: warm `run -d` (cached layers; map + mount + start) took {:.2} s",
        warm.as_secs_f64()
    );
    let exec = cli(
        agent,
        &["exec", "--vm", VM, &warm_name, "sh", "-c", &script],
        CLI_TIMEOUT,
    );
    assert_eq!(
        text(&exec.stdout),
        expected_output(depth),
        "{}",
        text(&exec.stderr)
    );
    let rm = cli(agent, &["rm", "--vm", VM, "-f", &warm_name], CLI_TIMEOUT);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert_nothing_left(agent, &format!("rm -f {warm_name}"));
}

#[test]
fn images_of_127_and_300_layers_start_and_give_their_layers_back() {
    let agent = TestAgent::start(&[TestVm::new(VM, 20).memory(512)]).expect("agent starts");
    agent
        .wait_guest_info(VM, BOOT_TIMEOUT)
        .expect("the guest boots");
    let images = tempfile::tempdir().expect("tempdir");
    for depth in [127, 300] {
        run_deep_image(&agent, images.path(), depth);
    }
}
