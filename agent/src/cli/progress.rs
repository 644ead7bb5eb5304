//! How `run` and `image convert` show their progress: on a terminal, one live line per layer
//! being downloaded (bytes, rate, time left) with the step lines printed above them; piped or
//! redirected, the step lines only, plain, with no escape codes.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use gantry_api::{LayerProgress, RunUpdate};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The display of one `run` or `image convert`.
#[derive(Debug)]
pub struct RunDisplay {
    quiet: bool,
    live: Option<MultiProgress>,
    bars: HashMap<usize, ProgressBar>,
}

impl RunDisplay {
    /// A display on stderr; live only when stderr is a terminal.
    pub fn new(quiet: bool) -> Self {
        let live = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        RunDisplay {
            quiet,
            live,
            bars: HashMap::new(),
        }
    }

    /// Shows one update (not the final `Started`/`Failed`, which the caller acts on).
    pub fn show(&mut self, update: &RunUpdate) {
        if self.quiet {
            return;
        }
        match update {
            RunUpdate::Progress(line) => match &self.live {
                Some(live) => {
                    let _ = live.println(line);
                }
                None => eprintln!("{line}"),
            },
            RunUpdate::Layer(progress) => self.layer(progress),
            RunUpdate::Started(_) | RunUpdate::Created(_) | RunUpdate::Failed(_) => {}
        }
    }

    fn layer(&mut self, progress: &LayerProgress) {
        let Some(live) = &self.live else {
            return;
        };
        let bar = self.bars.entry(progress.index).or_insert_with(|| {
            let bar = live.add(ProgressBar::new(progress.size));
            bar.set_style(
                ProgressStyle::with_template(
                    "layer {prefix:>3} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(progress.index.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        bar.set_position(progress.received);
        if progress.received >= progress.size {
            bar.finish_and_clear();
        }
    }

    /// Removes the live lines.
    pub fn finish(self) {
        for bar in self.bars.into_values() {
            bar.finish_and_clear();
        }
        if let Some(live) = self.live {
            let _ = live.clear();
        }
    }
}
