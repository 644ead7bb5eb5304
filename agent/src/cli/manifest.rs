//! `gantry-agent manifest apply|status`: the cluster manifest of a running agent.

use std::path::Path;

use anyhow::Context;
use gantry_api::{ApiClient, ManifestStatus, PrefetchState};

use crate::manifest::ClusterManifest;

/// Reads and checks a manifest file (the line and reason when it is refused).
pub fn load(path: &Path) -> anyhow::Result<ClusterManifest> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the cluster manifest {}", path.display()))?;
    ClusterManifest::from_toml(&text).with_context(|| format!("{}", path.display()))
}

/// Runs `manifest apply`: checked here first, sent as JSON (the agent checks it again).
pub async fn apply(client: &ApiClient, path: &Path) -> anyhow::Result<()> {
    let manifest = load(path)?;
    let status: ManifestStatus = client.put_json("/v1/manifest", &manifest).await?;
    println!(
        "cluster manifest {} applied (generation {}): {} images",
        path.display(),
        status.generation,
        status.images.len()
    );
    if !status.not_applied.is_empty() {
        println!(
            "note: this agent checks but does not act on yet: {}",
            status.not_applied.join(", ")
        );
    }
    Ok(())
}

/// Runs `manifest status`.
pub async fn status(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let status: ManifestStatus = client.get("/v1/manifest").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    if status.generation == 0 {
        println!("no cluster manifest in force");
        return Ok(());
    }
    println!(
        "{:<48} {:>8} {:<8} {:<9} {:>8}  RESOLVED / ERROR",
        "IMAGE", "PRIORITY", "PREFETCH", "STATE", "PRESENT"
    );
    for image in &status.images {
        let (present, chunks) = image
            .layers
            .iter()
            .fold((0, 0), |(p, c), l| (p + l.present_chunks, c + l.chunks));
        let present = if chunks == 0 {
            "-".to_string()
        } else {
            format!("{:.0}%", present as f64 * 100.0 / chunks as f64)
        };
        let state = match image.state {
            PrefetchState::Queued => "queued",
            PrefetchState::Fetching => "fetching",
            PrefetchState::Complete => "complete",
            PrefetchState::Partial => "partial",
            PrefetchState::Failed => "failed",
        };
        let detail = image
            .error
            .clone()
            .or_else(|| image.resolved.clone())
            .unwrap_or_default();
        println!(
            "{:<48} {:>8} {:<8} {:<9} {:>8}  {detail}",
            image.reference,
            image.priority,
            serde_json::to_value(image.prefetch)?
                .as_str()
                .unwrap_or_default(),
            state,
            present,
        );
    }
    Ok(())
}
