//! The cluster manifest end to end, against a real `docker-registry` and an agent without VMs
//! (prefetch needs no guest): `manifest apply` of three lazy images prefetches them in priority
//! order; a malformed manifest is refused with its line and the one in force stays; a changed
//! manifest drops, adds and keeps images without refetching the kept ones.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gantry_agent::images::default_image;
use gantry_e2e::{TestAgent, agent_binary};
use gantry_oci::builder::{self, ImageConfigSpec, LayerBuilder};
use gantry_testkit::{FaultProxy, Registry, RegistryOptions, noise, tools_available};
use serde_json::Value;

/// Pushes image `name` (busybox and 3 MiB of its own data), converts it to the lazy format,
/// and returns the converted reference.
fn lazy_image(registry: &Registry, work: &Path, name: &str, seed: u64) -> String {
    let busybox = default_image::busybox_layer(Path::new(default_image::DEFAULT_BUSYBOX))
        .expect("busybox layer");
    let mut data = LayerBuilder::new();
    data.file("data/blob.bin", 0o644, noise(3 << 20, seed))
        .unwrap();
    let config = ImageConfigSpec {
        cmd: vec!["true".into()],
        ..Default::default()
    };
    let layout = work.join(name);
    builder::write_image(&layout, "v1", &[busybox, data], &config).expect("write image");
    registry.push(&layout, "v1", &format!("cluster/{name}:v1"));
    let original = format!("{}/cluster/{name}:v1", registry.host());
    let converted = format!("{}/cluster/{name}:lazy", registry.host());
    let convert = Command::new(agent_binary())
        .args(["image", "convert", &original, &converted])
        .output()
        .expect("image convert runs");
    assert!(
        convert.status.success(),
        "image convert: {}",
        String::from_utf8_lossy(&convert.stderr)
    );
    converted
}

fn status(agent: &TestAgent) -> Value {
    agent
        .cli_json(&["manifest", "status", "--json"])
        .expect("manifest status")
}

fn image<'a>(status: &'a Value, reference: &str) -> &'a Value {
    status["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|image| image["reference"] == reference)
        .unwrap_or_else(|| panic!("{reference} not in {status}"))
}

/// The status once no image is queued or fetching any more (within `timeout`).
fn settled(agent: &TestAgent, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = status(agent);
        let images = status["images"].as_array().expect("images");
        if images
            .iter()
            .all(|image| image["state"] != "queued" && image["state"] != "fetching")
        {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "not settled after {timeout:?}: {status}\n--- agent log ---\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn chunks(image: &Value) -> (u64, u64) {
    image["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .fold((0, 0), |(present, all), layer| {
            (
                present + layer["present_chunks"].as_u64().unwrap(),
                all + layer["chunks"].as_u64().unwrap(),
            )
        })
}

fn apply(agent: &TestAgent, dir: &Path, name: &str, text: &str) -> std::process::Output {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    agent
        .cli(&["manifest", "apply", path.to_str().unwrap()])
        .expect("manifest apply runs")
}

/// [`apply`], which must succeed.
fn apply_ok(agent: &TestAgent, dir: &Path, name: &str, text: &str) {
    let output = apply(agent, dir, name, text);
    assert!(
        output.status.success(),
        "manifest apply {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_manifest_prefetches_in_priority_order_and_changes_apply_as_a_diff() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start_options(&RegistryOptions {
        access_log: true,
        ..Default::default()
    });
    let work = tempfile::tempdir().unwrap();
    let [web, db, cron, extra] = ["web", "db", "cron", "extra"]
        .map(|name| lazy_image(&registry, work.path(), name, name.len() as u64 * 7));
    let agent = TestAgent::start_with(&[], "[lazy]\nmode = \"lazy\"\ntrace_seconds = 0\n")
        .expect("agent starts");

    // Three images: db first, then web, then cron; all their data.
    let first = format!(
        "version = 1\n\n[[image]]\nref = \"{web}\"\npriority = 20\nprefetch = \"all\"\n\n\
         [[image]]\nref = \"{cron}\"\npriority = 10\nprefetch = \"all\"\n\n\
         [[image]]\nref = \"{db}\"\npriority = 30\npin = true\nprefetch = \"all\"\n"
    );
    apply_ok(&agent, work.path(), "first.toml", &first);
    // `manifest status --watch` follows it until every image is settled (piped: a line per
    // change).
    let watched = agent.cli_within(&["manifest", "status", "--watch"], Duration::from_secs(120));
    let watched_text = String::from_utf8_lossy(&watched.stdout);
    assert!(watched.status.success(), "{watched_text}");
    for reference in [&db, &web, &cron] {
        assert!(
            watched_text
                .lines()
                .any(|line| line.starts_with(&format!("{reference} complete: "))),
            "{watched_text}"
        );
    }
    let done = settled(&agent, Duration::from_secs(1));
    println!("after the first manifest: {done}");
    let completed = |reference: &str| {
        let image = image(&done, reference);
        assert_eq!(image["state"], "complete", "{image}");
        let (present, all) = chunks(image);
        assert!(all > 0 && present == all, "{reference}: {present} of {all}");
        assert!(
            image["resolved"]
                .as_str()
                .is_some_and(|resolved| resolved.contains("@sha256:")),
            "{image}"
        );
        image["completed_unix_ms"].as_u64().expect("completed")
    };
    let (db_done, web_done, cron_done) = (completed(&db), completed(&web), completed(&cron));
    assert!(
        db_done <= web_done && web_done <= cron_done,
        "priority order: db {db_done}, web {web_done}, cron {cron_done}"
    );
    let generation = done["generation"].as_u64().unwrap();

    // A malformed manifest is refused whole, with its line; the one in force stays.
    let output = apply(
        &agent,
        work.path(),
        "typo.toml",
        &format!("version = 1\n[[image]]\nref = \"{web}\"\nprioritty = 5\n"),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("line 4") && stderr.contains("prioritty"),
        "{stderr}"
    );
    assert_eq!(status(&agent)["generation"].as_u64(), Some(generation));

    // cron goes, extra comes (metadata only), web and db stay: nothing of theirs is fetched
    // again.
    let requests_before = registry.access_log().len();
    let second = format!(
        "version = 1\n\n[[image]]\nref = \"{web}\"\npriority = 20\nprefetch = \"all\"\n\n\
         [[image]]\nref = \"{db}\"\npriority = 30\npin = true\nprefetch = \"all\"\n\n\
         [[image]]\nref = \"{extra}\"\npriority = 5\nprefetch = \"metadata\"\n"
    );
    apply_ok(&agent, work.path(), "second.toml", &second);
    let after = settled(&agent, Duration::from_secs(60));
    println!("after the second manifest: {after}");
    assert_eq!(after["generation"].as_u64(), Some(generation + 1));
    let references: Vec<&str> = after["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|image| image["reference"].as_str().unwrap())
        .collect();
    assert_eq!(references, [db.as_str(), web.as_str(), extra.as_str()]);
    assert_eq!(
        image(&after, &web)["completed_unix_ms"],
        image(&done, &web)["completed_unix_ms"],
        "web was not redone"
    );
    let extra_status = image(&after, &extra);
    assert_eq!(extra_status["state"], "complete", "{extra_status}");
    let (present, all) = chunks(extra_status);
    assert!(
        all > 0 && present < all,
        "metadata only: {present} of {all} chunks"
    );
    let new_requests: Vec<String> = registry.access_log()[requests_before..].to_vec();
    for kept in [&web, &db] {
        let repository = kept
            .split_once('/')
            .and_then(|(_, rest)| rest.split_once(':'))
            .map(|(repository, _)| repository)
            .unwrap();
        assert!(
            !new_requests
                .iter()
                .any(|request| request.contains(&format!("/v2/{repository}/"))),
            "{kept} was fetched again: {new_requests:?}"
        );
    }
}

#[test]
fn the_disk_budget_leaves_the_lowest_priority_image_partial() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let [first, second] =
        ["first", "second"].map(|name| lazy_image(&registry, work.path(), name, name.len() as u64));
    let agent = TestAgent::start_with(&[], "[lazy]\nmode = \"lazy\"\ntrace_seconds = 0\n")
        .expect("agent starts");
    // Room for the first image (busybox + 3 MiB of data), not for the second's data too.
    let manifest = format!(
        "version = 1\n[budget]\ndisk = \"7M\"\n\n\
         [[image]]\nref = \"{second}\"\npriority = 1\nprefetch = \"all\"\n\n\
         [[image]]\nref = \"{first}\"\npriority = 2\nprefetch = \"all\"\n"
    );
    apply_ok(&agent, work.path(), "budget.toml", &manifest);
    let done = settled(&agent, Duration::from_secs(60));
    println!("with a 7 MiB budget: {done}");
    let first_status = image(&done, &first);
    assert_eq!(first_status["state"], "complete", "{first_status}");
    let (present, all) = chunks(first_status);
    assert_eq!(present, all);
    let second_status = image(&done, &second);
    assert_eq!(second_status["state"], "partial", "{second_status}");
    assert!(
        second_status["error"]
            .as_str()
            .is_some_and(|error| error.contains("disk budget")),
        "{second_status}"
    );
    let data_layer = second_status["layers"].as_array().unwrap().last().unwrap();
    assert_eq!(
        data_layer["present_chunks"], 0,
        "nothing of its own data: {second_status}"
    );
    assert!(done["not_applied"].as_array().unwrap().is_empty(), "{done}");
}

#[test]
fn the_manifest_s_registry_mirrors_are_used_in_order() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mirrored = lazy_image(&registry, work.path(), "mirrored", 11);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mirror = runtime.block_on(FaultProxy::start(&format!("http://{}", registry.host())));
    // A port nothing listens on: the first mirror fails, the second serves.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = TestAgent::start_with(&[], "[lazy]\nmode = \"lazy\"\ntrace_seconds = 0\n")
        .expect("agent starts");

    // A credentials file that does not exist refuses the manifest whole.
    let output = apply(
        &agent,
        work.path(),
        "no-credentials.toml",
        &format!(
            "version = 1\n[[registry]]\nhost = \"{}\"\ncredentials = \"/nonexistent/config.json\"\n",
            registry.host()
        ),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/config.json"), "{stderr}");
    assert_eq!(status(&agent)["generation"].as_u64(), Some(0));

    let manifest = format!(
        "version = 1\n[[registry]]\nhost = \"{}\"\nmirrors = [\"http://127.0.0.1:{dead}\", \"http://{}\"]\n\n\
         [[image]]\nref = \"{mirrored}\"\nprefetch = \"all\"\n",
        registry.host(),
        mirror.host()
    );
    apply_ok(&agent, work.path(), "mirrors.toml", &manifest);
    let done = settled(&agent, Duration::from_secs(120));
    println!("through the manifest's mirrors: {done}");
    assert!(done["not_applied"].as_array().unwrap().is_empty(), "{done}");
    let image = image(&done, &mirrored);
    assert_eq!(image["state"], "complete", "{image}");
    let data_layer: gantry_oci::Digest =
        image["layers"].as_array().unwrap().last().unwrap()["digest"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    let through_mirror = mirror.blob_ranges(&data_layer);
    assert!(
        !through_mirror.is_empty(),
        "the data came through the second mirror"
    );
}

#[test]
fn the_bandwidth_budget_limits_the_fill() {
    if !tools_available() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let slow = lazy_image(&registry, work.path(), "slow", 13);
    // One chunk per request, so that the limit spaces every chunk after the first.
    let agent = TestAgent::start_with(
        &[],
        "[lazy]\nmode = \"lazy\"\ntrace_seconds = 0\ncoalesce_bytes = 1048576\n",
    )
    .expect("agent starts");
    let manifest = format!(
        "version = 1\n[budget]\nbandwidth = \"1M\"\n\n[[image]]\nref = \"{slow}\"\nprefetch = \"all\"\n"
    );
    apply_ok(&agent, work.path(), "bandwidth.toml", &manifest);
    let done = settled(&agent, Duration::from_secs(120));
    assert!(done["not_applied"].as_array().unwrap().is_empty(), "{done}");
    let image = image(&done, &slow);
    assert_eq!(image["state"], "complete", "{image}");
    let took_ms =
        image["completed_unix_ms"].as_u64().unwrap() - done["applied_unix_ms"].as_u64().unwrap();
    let (_, chunks) = chunks(image);
    println!("{chunks} chunks (about 4 MiB) under a 1 MiB/s budget in {took_ms} ms");
    // A lower bound only (a limit cannot be beaten however fast the machine): every chunk but
    // the first waits for the budget, ~3 MiB at 1 MiB/s.
    assert!(
        took_ms >= 2_000,
        "the fill ignored the budget: {took_ms} ms"
    );
}
