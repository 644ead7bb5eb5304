//! `guest-info`, `ping` and `vm …`: what the agent knows of its VMs and their shims.

use std::time::Duration;

use anyhow::Context;
use gantry_api::{ApiClient, AttachVm, GuestInfoReport, PingReport, VmStatus};

use super::VmCommand;

/// `guest-info VM`: what the shim reports about its guest.
pub async fn guest_info(client: &ApiClient, vm: &str, wait: f64, json: bool) -> anyhow::Result<()> {
    let wait_ms = Duration::try_from_secs_f64(wait)
        .context("--wait takes a number of seconds")?
        .as_millis();
    let report: GuestInfoReport = client
        .get(&format!("/v1/vms/{vm}/guest-info?wait_ms={wait_ms}"))
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let guest = &report.guest;
        println!("vm:             {}", report.vm);
        println!("kernel:         {}", guest.kernel_release);
        println!("cpus:           {}", guest.cpus);
        println!("memory:         {} MiB", guest.memory_total_bytes >> 20);
        println!("shim:           {}", guest.shim_version);
        println!("uptime:         {:.3} s", guest.uptime_ms as f64 / 1000.0);
        println!(
            "shim ready at:  {:.3} s after kernel start",
            guest.shim_ready_uptime_ms as f64 / 1000.0
        );
        println!("round trip:     {} µs", report.round_trip_us);
    }
    Ok(())
}

/// `ping VM`: round trips to the shim.
pub async fn ping(client: &ApiClient, vm: &str, count: u32, size: usize) -> anyhow::Result<()> {
    let report: PingReport = client
        .post(&format!("/v1/vms/{vm}/ping?count={count}&size={size}"))
        .await?;
    let mut sorted = report.round_trips_us.clone();
    sorted.sort_unstable();
    anyhow::ensure!(!sorted.is_empty(), "the agent returned no round trips");
    let percentile = |p: usize| sorted[(sorted.len() - 1) * p / 100];
    println!(
        "{} pings of {} bytes to {}: min {} µs, p50 {} µs, p95 {} µs, max {} µs",
        sorted.len(),
        size,
        report.vm,
        sorted[0],
        percentile(50),
        percentile(95),
        sorted[sorted.len() - 1]
    );
    Ok(())
}

/// `vm …`.
pub async fn run(client: &ApiClient, command: VmCommand) -> anyhow::Result<()> {
    match command {
        VmCommand::Ls { json } => {
            let vms: Vec<VmStatus> = client.get("/v1/vms").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                println!(
                    "{:<16} {:>6} {:<10} {:>9} {:>14}  SHIM",
                    "NAME", "CID", "STATE", "SESSIONS", "BOOT→READY"
                );
                for vm in vms {
                    println!(
                        "{:<16} {:>6} {:<10} {:>9} {:>14}  {}",
                        vm.name,
                        vm.guest_cid,
                        if vm.connected { "connected" } else { "waiting" },
                        vm.sessions,
                        vm.boot_to_ready_ms
                            .map(|ms| format!("{ms} ms"))
                            .unwrap_or_else(|| "-".into()),
                        vm.shim_version.unwrap_or_else(|| "-".into()),
                    );
                }
            }
        }
        VmCommand::Attach {
            vm,
            cid,
            launch,
            vsock_socket,
            layer_socket,
            memory_mib,
            cpus,
        } => {
            let request = AttachVm {
                name: vm,
                guest_cid: cid,
                launch,
                vsock_socket,
                layer_socket,
                layer_queues: None,
                memory_mib,
                cpus,
            };
            let status: VmStatus = client.post_json("/v1/vms", &request).await?;
            println!(
                "{}: attached (cid {}, vsock {}, layers {}){}",
                status.name,
                status.guest_cid,
                status.vsock_socket,
                status.layer_socket,
                if status.launched { ", booting" } else { "" }
            );
        }
        VmCommand::Detach { vm } => {
            let _: serde_json::Value = client.delete(&format!("/v1/vms/{vm}")).await?;
            println!("{vm}: detached");
        }
        VmCommand::Restart { vm } => {
            let _: serde_json::Value = client.post(&format!("/v1/vms/{vm}/restart")).await?;
            println!("{vm}: restarting");
        }
        VmCommand::Stop { vm } => {
            let _: serde_json::Value = client.post(&format!("/v1/vms/{vm}/stop")).await?;
            println!("{vm}: stopped");
        }
        VmCommand::Resources { vm } => {
            let resources: serde_json::Value =
                client.get(&format!("/v1/vms/{vm}/resources")).await?;
            println!("{}", serde_json::to_string_pretty(&resources)?);
        }
        VmCommand::Probe { vm } => {
            let answer: serde_json::Value = client.post(&format!("/v1/vms/{vm}/probe")).await?;
            println!(
                "the shim closed the probe connection: {}",
                answer["goodbye"]
            );
        }
    }
    Ok(())
}
