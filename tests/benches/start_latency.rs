//! Warm container start latency: from the create request to the container's first output, p50
//! and p95 over 20 runs in a booted TCG guest, beside the floor measured in the same run: the same
//! command spawned by the shim directly (no namespaces, no mounts), through the same API and vsock.
//!
//! Run: `qemu/build-guest.sh && cargo build --release -p gantry-agent && cargo bench -p gantry-e2e
//! --bench start_latency` (benches run in the release profile and use the agent built beside them).

use std::time::{Duration, Instant};

use gantry_api::records::LogItem;
use gantry_api::stream::BodyStream;
use gantry_api::{ApiClient, RunOptions, RunUpdate};
use gantry_e2e::{TestAgent, TestVm};
use hyper::Method;

const RUNS: usize = 20;
const COMMAND: [&str; 2] = ["echo", "hello"];

/// Creates and starts a container; returns the time to its first output.
async fn container_start(client: &ApiClient, name: &str) -> Duration {
    let started = Instant::now();
    let options = RunOptions {
        image: "default".into(),
        name: Some(name.into()),
        command: COMMAND.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let body = client
        .open(
            Method::POST,
            "/v1/vms/bench/containers",
            serde_json::to_vec(&options).unwrap(),
        )
        .await
        .expect("run");
    let mut updates = BodyStream::new(body);
    loop {
        let line = updates.line().await.unwrap().expect("a run result");
        match serde_json::from_slice::<RunUpdate>(&line).unwrap() {
            RunUpdate::Progress(_) | RunUpdate::Layer(_) => {}
            RunUpdate::Created(id) => panic!("{id} was only created"),
            RunUpdate::Started(_) => break,
            RunUpdate::Failed(error) => panic!("run failed: {error}"),
        }
    }
    let logs = client
        .open(
            Method::GET,
            &format!("/v1/vms/bench/containers/{name}/logs?follow=true"),
            Vec::new(),
        )
        .await
        .expect("logs");
    let mut records = BodyStream::new(logs);
    let first = loop {
        match records
            .record()
            .await
            .unwrap()
            .expect("output before the end")
        {
            LogItem::Output(_, data) if !data.is_empty() => break started.elapsed(),
            LogItem::Output(..) => {}
            LogItem::Exit(exit) => panic!("exited without output: {exit:?}"),
        }
    };
    while let Some(item) = records.record().await.unwrap() {
        if matches!(item, LogItem::Exit(_)) {
            break;
        }
    }
    let _: serde_json::Value = client
        .delete(&format!("/v1/vms/bench/containers/{name}"))
        .await
        .expect("rm");
    first
}

/// The same command spawned by the shim directly; returns the time to its output.
async fn baseline(client: &ApiClient) -> Duration {
    let started = Instant::now();
    let answer: serde_json::Value = client
        .post_json(
            "/v1/vms/bench/baseline",
            &serde_json::json!({ "args": COMMAND }),
        )
        .await
        .expect("baseline");
    assert_eq!(answer["output"], "hello\n");
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

fn main() {
    let agent = TestAgent::start_with(
        &[TestVm::new("bench", 3).memory(512)],
        "enable_baseline = true",
    )
    .expect("agent starts");
    agent
        .wait_guest_info("bench", Duration::from_secs(180))
        .expect("guest boots");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = ApiClient::new(agent.api_socket());
    let (mut starts, mut floors) = runtime.block_on(async {
        // Warm up: build and convert the default image, map its layer, fault in the shim's paths.
        container_start(&client, "warmup").await;
        baseline(&client).await;
        let mut starts = Vec::new();
        let mut floors = Vec::new();
        for run in 0..RUNS {
            starts.push(container_start(&client, &format!("bench-{run}")).await);
            floors.push(baseline(&client).await);
        }
        (starts, floors)
    });
    starts.sort();
    floors.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "warm start, create → first output, {RUNS} runs each, `{}` in a TCG guest",
        COMMAND.join(" ")
    );
    println!("{:<40} {:>10} {:>10}", "", "p50 ms", "p95 ms");
    println!(
        "{:<40} {:>10.1} {:>10.1}",
        "container (layers, namespaces, cgroup)",
        ms(percentile(&starts, 50)),
        ms(percentile(&starts, 95))
    );
    println!(
        "{:<40} {:>10.1} {:>10.1}",
        "floor: plain spawn by the shim",
        ms(percentile(&floors, 50)),
        ms(percentile(&floors, 95))
    );
    println!(
        "{:<40} {:>10.2} {:>10.2}",
        "ratio container / floor",
        ms(percentile(&starts, 50)) / ms(percentile(&floors, 50)),
        ms(percentile(&starts, 95)) / ms(percentile(&floors, 95))
    );
}
