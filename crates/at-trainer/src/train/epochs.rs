//! The epoch loop: batches, the schedule, stops (Ctrl-C, the test options), the metrics line,
//! a checkpoint after each epoch, and the final weights and `result.json`.

use std::time::Instant;

use super::checkpoint::previous_seconds;
use super::metrics::{DeviceSums, Sums};
use super::*;

impl Run {
    /// Trains from `position` to the end of the run or to a stop. In a data-parallel run every
    /// rank returns only once rank 0 has written what it writes on the way out (the last
    /// checkpoint, the weights, `result.json`): the next run of a `repro` job may read them
    /// (a student its teacher's weights), on any rank.
    pub(super) fn go(self, position: Position, options: &RunOptions) -> Result<RunResult> {
        let parallel = self.parallel.clone();
        let result = self.epochs(position, options)?;
        if let Some(parallel) = parallel {
            at_dist::barrier(parallel.world.as_ref())?;
        }
        Ok(result)
    }

    fn epochs(mut self, mut position: Position, options: &RunOptions) -> Result<RunResult> {
        self.second_order = options.second_order.clone();
        if self.gradient.is_some() && self.second_order.is_none() {
            bail!(
                "loss.gradient = \"{}\" needs second-order gradients: the caller must pass \
                 RunOptions::second_order (SecondOrder::start, first thing in main)",
                self.config.loss.gradient
            )
        }
        if let Some(parallel) = self.parallel.clone() {
            self.start_parallel(&parallel)?;
        }
        let (train_loader, test_loader) = self.loaders()?;
        let observer: &dyn Observer = options.observer.as_deref().unwrap_or(&LogObserver);
        let schedule = self.config.schedule()?;
        let epochs = self.config.epochs;
        let mut batches_this_call = 0usize;
        let mut total_seconds = previous_seconds(&self.dir)?;
        let mut last: Option<EpochMetrics> = None;
        let every = options.checkpoint_every.unwrap_or(CHECKPOINT_EVERY);
        let mut checkpointed = Instant::now();
        while position.epoch < epochs {
            let epoch = position.epoch;
            let lr = schedule.lr(self.config.optim.lr, epoch);
            // Attention transfer from `loss.at_start_epoch` on (Table 5 adds it at epoch 60).
            self.loss.beta =
                if epoch >= self.config.loss.at_start_epoch { self.config.loss.beta } else { 0.0 };
            self.sgd.set_lr(lr);
            let n_batches = train_loader.batches_per_epoch();
            observer.epoch_started(epoch + 1, epochs, n_batches, position.batch);
            let started = Instant::now();
            let start_batch = position.batch;
            let mut sums = std::mem::take(&mut position.sums);
            let mut on_device = DeviceSums::default();
            // How often the sums are read back from the device (and the loss shown): a tenth of
            // an epoch, as the log lines.
            let read_every = (n_batches / 10).max(1);
            let share = self.parallel.as_ref().map_or(at_data::Share::WHOLE, |p| p.share());
            let batches =
                train_loader.share_from(epoch as u64, position.batch, &self.device, share);
            for batch in batches {
                let batch = batch?;
                self.step(&batch, (&mut on_device, &mut sums))?;
                position.batch += 1;
                batches_this_call += 1;
                let rate = (position.batch - start_batch) as f64
                    / started.elapsed().as_secs_f64().max(1e-9);
                let loss = match position.batch.is_multiple_of(read_every) {
                    true => Some(read_sums(&on_device, &mut sums)?),
                    false => None,
                };
                observer.batch_done(epoch + 1, position.batch, n_batches, loss, rate);
                let stop_here = options.stop_after_batches == Some(batches_this_call)
                    && position.batch < n_batches;
                let due = checkpointed.elapsed() >= every && position.batch < n_batches;
                let (stop, due) = self.after_batch(options, due)?;
                if stop || stop_here {
                    read_sums(&on_device, &mut sums)?;
                    sums.seconds += started.elapsed().as_secs_f64();
                    position.sums = sums;
                    self.checkpoint(&position)?;
                    observer.epoch_batches_done();
                    observer.stopped(epoch + 1, position.batch, &self.dir);
                    return self.result(last.as_ref(), total_seconds, true);
                }
                if due {
                    read_sums(&on_device, &mut sums)?;
                    let mut sums = sums.clone();
                    sums.seconds += started.elapsed().as_secs_f64();
                    self.checkpoint(&Position { epoch, batch: position.batch, sums })?;
                    checkpointed = Instant::now();
                }
            }
            read_sums(&on_device, &mut sums)?;
            observer.epoch_batches_done();
            let (test_loss, test_top1, test_top5) = match self.parallel.clone() {
                None => evaluate(self.student.as_ref(), &test_loader, &self.device)?,
                Some(parallel) => {
                    // Rank 0's batch-norm statistics, on every rank (and in the checkpoint).
                    self.broadcast_vars(&parallel, true)?;
                    self.parallel_evaluate(&parallel, &test_loader)?
                }
            };
            sums.seconds += started.elapsed().as_secs_f64();
            let seen = sums.seen.max(1) as f64;
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                lr,
                train_loss: sums.loss / seen,
                train_ce: sums.ce / seen,
                train_kd: (self.loss.alpha > 0.0).then(|| sums.kd / seen),
                train_at: sums.at.iter().map(|a| a / seen).collect(),
                train_gradient: self.gradient.is_some().then(|| sums.gradient / seen),
                train_top1: 100.0 * sums.correct as f64 / seen,
                test_loss,
                test_top1,
                test_top5,
                seconds: sums.seconds,
                images_per_second: sums.seen as f64 / sums.seconds.max(1e-9),
            };
            total_seconds += sums.seconds;
            observer.epoch_finished(&metrics, epochs);
            position = Position { epoch: epoch + 1, batch: 0, sums: Sums::default() };
            self.append_metrics(&metrics)?;
            self.checkpoint(&position)?;
            checkpointed = Instant::now();
            last = Some(metrics);
            if options.stop_after_epochs == Some(position.epoch) && position.epoch < epochs
                || self.stop_requested(options)?
            {
                return self.result(last.as_ref(), total_seconds, true);
            }
        }
        let last = match last {
            Some(m) => m,
            None => read_metrics(&self.dir)?
                .pop()
                .context("the run has no metrics: was it trained at all?")?,
        };
        let result = self.result(Some(&last), total_seconds, false)?;
        if self.leader() {
            at_models::save(&self.varmap, &self.dir.join("model.safetensors"))?;
            write_atomically(
                &self.dir.join("result.json"),
                serde_json::to_string_pretty(&result)?.as_bytes(),
            )?;
        }
        Ok(result)
    }

    /// Whether the run is to stop after this batch: an [`Interrupt`] here, or on any rank of
    /// a data-parallel run (agreed on, so that every rank stops after the same batch).
    fn stop_requested(&self, options: &RunOptions) -> Result<bool> {
        Ok(self.after_batch(options, false)?.0)
    }

    /// After a batch: whether to stop ([`Self::stop_requested`]) and whether to checkpoint,
    /// `due` being this rank's clock. A data-parallel run agrees on both in one collective:
    /// a checkpoint is collective too (rank 0's batch-norm statistics go to every rank), and
    /// the ranks' clocks pass the interval after different batches.
    fn after_batch(&self, options: &RunOptions, due: bool) -> Result<(bool, bool)> {
        let here = [options.interrupt.is_requested(), due];
        let [stop, due] = match &self.parallel {
            None => here,
            Some(parallel) => at_dist::any_each(parallel.world.as_ref(), here)?,
        };
        Ok((stop, due))
    }
}

/// Reads the device's sums into `sums` and returns the epoch's mean loss so far; a loss that is
/// not finite stops the run (found at most a read interval after the step that made it).
fn read_sums(on_device: &DeviceSums, sums: &mut Sums) -> Result<f64> {
    on_device.read(sums)?;
    if !sums.loss.is_finite() {
        bail!("the training loss is not finite (NaN or infinite): lower the learning rate or beta")
    }
    Ok(sums.loss / sums.seen.max(1) as f64)
}
