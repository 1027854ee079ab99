//! What the user sees while work goes on: a progress bar per epoch on a terminal (a few log lines
//! otherwise) with a line per finished epoch, and a bar per downloaded file. The libraries tell
//! their progress to the trait and callbacks these implement; only the binary draws.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Arc, Mutex};

use at_data::hub::OnProgress;
use at_trainer::train::{EpochMetrics, LogObserver, Observer, epoch_line};

/// The training display: a bar on a terminal, the library's log lines otherwise; a line per
/// epoch on stdout; where to continue from after a stop.
#[derive(Default)]
pub struct TrainingBar {
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Observer for TrainingBar {
    fn epoch_started(&self, epoch: usize, epochs: usize, batches: usize, start_batch: usize) {
        if !std::io::stdout().is_terminal() {
            return;
        }
        let bar = indicatif::ProgressBar::new(batches as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} batches, {msg} ({eta} left)",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        bar.set_position(start_batch as u64);
        *self.bar.lock().expect("the bar's lock") = Some(bar);
    }

    fn batch_done(&self, epoch: usize, done: usize, batches: usize, loss: Option<f64>, rate: f64) {
        match &*self.bar.lock().expect("the bar's lock") {
            Some(bar) => {
                bar.set_position(done as u64);
                if let Some(loss) = loss {
                    bar.set_message(format!("loss {loss:.4}, {rate:.2} batches/s"));
                }
            }
            None => LogObserver.batch_done(epoch, done, batches, loss, rate),
        }
    }

    fn epoch_batches_done(&self) {
        if let Some(bar) = self.bar.lock().expect("the bar's lock").take() {
            bar.finish_and_clear();
        }
    }

    fn epoch_finished(&self, metrics: &EpochMetrics, epochs: usize) {
        println!("{}", epoch_line(metrics, epochs));
    }

    fn stopped(&self, epoch: usize, batch: usize, dir: &Path) {
        eprintln!(
            "stopped at epoch {epoch}, batch {batch}: continue with `at-train train --resume {}`",
            dir.display()
        );
    }
}

/// A progress display for the files fetched from the Hub repository `repo`: a line per file,
/// and on a terminal a bar.
pub fn download_display(repo: &str) -> OnProgress {
    transfer_display(repo, false)
}

/// A progress display for the files sent to LFS storage of the Hub repository `repo`: a line
/// per file, and on a terminal a bar.
pub fn upload_display(repo: &str) -> OnProgress {
    transfer_display(repo, true)
}

fn transfer_display(repo: &str, upload: bool) -> OnProgress {
    let terminal = std::io::stderr().is_terminal();
    let repo = repo.to_owned();
    // The file being fetched, its bar (on a terminal), and whether its first bytes were told.
    type Current = Option<(String, Option<indicatif::ProgressBar>, bool)>;
    let current: Mutex<Current> = Mutex::new(None);
    Arc::new(move |file: &str, done: u64, total: u64| {
        let mut current = current.lock().expect("the progress lock is not poisoned");
        if current.as_ref().is_none_or(|(name, ..)| name != file) {
            if let Some((_, Some(bar), _)) = current.take() {
                bar.finish();
            }
            if upload && total > 0 && done == total {
                eprintln!(
                    "{file} is in the LFS storage of {repo} already (same SHA-256): not sent again"
                );
                *current = Some((file.to_owned(), None, true));
                return;
            }
            match upload {
                true => eprintln!("sending {file} to the LFS storage of {repo}"),
                false => eprintln!("fetching {file} from {repo}"),
            }
            *current = Some((file.to_owned(), None, false));
        }
        let Some((_, bar, started)) = current.as_mut() else { return };
        if total == 0 {
            return;
        }
        if !std::mem::replace(started, true) && !upload && done > 0 && done < total {
            // A download cut short before goes on from the bytes it has.
            let (done, total) = (indicatif::HumanBytes(done), indicatif::HumanBytes(total));
            eprintln!("  going on from the {done} of {total} already here");
        }
        if !terminal {
            return;
        }
        let bar = bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(total).with_position(done);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "  [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta} left)",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        bar.set_position(done);
    })
}
