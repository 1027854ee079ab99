//! The progress display: a bar on a terminal, a few log lines otherwise.

use std::io::IsTerminal;
use std::time::Instant;

use super::metrics::Sums;

/// A progress bar on a terminal, a few plain lines otherwise.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    total: usize,
    started: Instant,
    start_batch: usize,
}

impl Progress {
    pub(super) fn new(
        epoch: usize,
        epochs: usize,
        total: usize,
        start_batch: usize,
        quiet: bool,
    ) -> Self {
        let label = format!("epoch {epoch}/{epochs}");
        let bar = (!quiet && std::io::stdout().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} batches, {msg} ({eta} left)",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            bar.set_position(start_batch as u64);
            bar
        });
        Self { bar, label, total, started: Instant::now(), start_batch }
    }

    pub(super) fn update(&self, done: usize, sums: &Sums) {
        let loss = sums.loss / sums.seen.max(1) as f64;
        let rate =
            (done - self.start_batch) as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        match &self.bar {
            Some(bar) => {
                bar.set_position(done as u64);
                bar.set_message(format!("loss {loss:.4}, {rate:.2} batches/s"));
            }
            None if self.total >= 10 && done.is_multiple_of((self.total / 10).max(1)) => {
                tracing::info!(
                    "{}: batch {done}/{}, loss {loss:.4}, {rate:.2} batches/s",
                    self.label,
                    self.total
                );
            }
            None => {}
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
