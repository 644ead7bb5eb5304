//! `gantry-agent manifest apply|status`: the cluster manifest of a running agent.

use std::path::Path;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use gantry_api::{ApiClient, ManifestImageStatus, ManifestStatus, PrefetchState};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

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

fn settled(state: PrefetchState) -> bool {
    !matches!(state, PrefetchState::Queued | PrefetchState::Fetching)
}

/// Present and all chunks of an image.
fn chunk_counts(image: &ManifestImageStatus) -> (u64, u64) {
    image
        .layers
        .iter()
        .fold((0, 0), |(p, c), l| (p + l.present_chunks, c + l.chunks))
}

/// One line about an image, for logs and pipes.
fn describe(image: &ManifestImageStatus) -> String {
    let (present, chunks) = chunk_counts(image);
    let mut line = format!(
        "{} {}: {present}/{chunks} chunks",
        image.reference,
        image.state.as_str()
    );
    if let Some(eta) = image.eta_ms {
        line.push_str(&format!(", about {:.0} s left", eta as f64 / 1000.0));
    }
    if let Some(error) = &image.error {
        line.push_str(&format!(" ({error})"));
    }
    line
}

/// Runs `manifest status --watch`: until every image is settled, a live bar per image on a
/// terminal (chunks present, state, time left), or a line per change when piped.
pub async fn watch(client: &ApiClient) -> anyhow::Result<()> {
    let live = std::io::stdout()
        .is_terminal()
        .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
    let style = ProgressStyle::with_template("{prefix:48} {bar:30} {pos:>5}/{len:<5} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut last_lines: HashMap<String, String> = HashMap::new();
    loop {
        let status: ManifestStatus = client.get("/v1/manifest").await?;
        if status.generation == 0 {
            println!("no cluster manifest in force");
            return Ok(());
        }
        for image in &status.images {
            let (present, chunks) = chunk_counts(image);
            match &live {
                Some(live) => {
                    let bar = bars.entry(image.reference.clone()).or_insert_with(|| {
                        let bar = live.add(ProgressBar::new(chunks.max(1)));
                        bar.set_style(style.clone());
                        bar.set_prefix(image.reference.clone());
                        bar
                    });
                    bar.set_length(chunks.max(1));
                    bar.set_position(present);
                    let eta = image
                        .eta_ms
                        .map(|eta| format!(" {:.0} s left", eta as f64 / 1000.0))
                        .unwrap_or_default();
                    let error = image
                        .error
                        .as_deref()
                        .map(|error| format!(" {error}"))
                        .unwrap_or_default();
                    bar.set_message(format!("{}{eta}{error}", image.state.as_str()));
                }
                None => {
                    // Piped: a line when the state or error changes (not every chunk).
                    let key = format!("{:?} {:?}", image.state, image.error);
                    if last_lines.get(&image.reference) != Some(&key) {
                        println!("{}", describe(image));
                        last_lines.insert(image.reference.clone(), key);
                    }
                }
            }
        }
        if status.images.iter().all(|image| settled(image.state)) {
            for bar in bars.values() {
                bar.finish();
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
        let (present, chunks) = chunk_counts(image);
        let present = if chunks == 0 {
            "-".to_string()
        } else {
            format!("{:.0}%", present as f64 * 100.0 / chunks as f64)
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
            image.prefetch.as_str(),
            image.state.as_str(),
            present,
        );
    }
    Ok(())
}
