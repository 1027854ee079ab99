//! Metrics: a line of `metrics.jsonl` per epoch, the sums behind them, and `result.json`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Run;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// The epoch, from 1.
    pub epoch: usize,
    /// Its learning rate.
    pub lr: f64,
    /// Mean total training loss.
    pub train_loss: f64,
    /// Mean cross-entropy.
    pub train_ce: f64,
    /// Mean distillation term (before alpha), when distilling.
    pub train_kd: Option<f64>,
    /// Mean attention distance of each pair (before beta).
    pub train_at: Vec<f64>,
    /// Mean gradient-based penalty (before its beta), with `loss.gradient`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_gradient: Option<f64>,
    /// Training top-1 accuracy, %.
    pub train_top1: f64,
    /// Test cross-entropy.
    pub test_loss: f64,
    /// Test top-1 accuracy, %.
    pub test_top1: f64,
    /// Test top-5 accuracy, %.
    pub test_top5: f64,
    /// Wall-clock seconds of the epoch (training and evaluation).
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
}

/// The sums behind an epoch's training metrics, kept across a mid-epoch checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Sums {
    pub(super) loss: f64,
    pub(super) ce: f64,
    pub(super) kd: f64,
    pub(super) at: Vec<f64>,
    #[serde(default)]
    pub(super) gradient: f64,
    pub(super) correct: usize,
    pub(super) seen: usize,
    pub(super) seconds: f64,
}

/// The step sums of an epoch kept on the device, so that a step does not wait for the device to
/// read its losses back: one vector `[loss, ce, kd, gradient, correct, at...]` (each loss times
/// its batch's images, in f64), started from the host's sums and added to as the host did, in
/// the same order and precision, so that the numbers read are the host's to the bit. Read back
/// ([`DeviceSums::read`]) at the log interval, a checkpoint and the epoch's end.
#[derive(Default)]
pub(super) struct DeviceSums {
    acc: Option<candle_core::Tensor>,
}

/// The fields before the attention pairs in a [`DeviceSums`] vector.
pub(super) const FIXED: usize = 5;

/// One step's parts as the vector [`DeviceSums`] adds, on the device: `[loss, ce, kd, gradient,
/// correct, at...]`, each loss times the step's images (`labels`), in f64.
pub(super) fn step_vector(
    parts: &at_losses::LossParts,
    labels: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{DType, Tensor};
    let n = labels.dim(0)?;
    let dev = parts.total.device();
    // A loss times the batch's images, as the host computed `loss as f64 * n`.
    let times_n = |t: &Tensor| t.to_dtype(DType::F64)?.reshape(1)?.affine(n as f64, 0.0);
    let zero = || Tensor::zeros(1, DType::F64, dev);
    let mut parts_n = vec![
        times_n(&parts.total)?,
        times_n(&parts.ce)?,
        parts.kd.as_ref().map_or_else(zero, times_n)?,
        parts.gradient.as_ref().map_or_else(zero, times_n)?,
        correct(&parts.logits, labels)?,
    ];
    for at in &parts.at {
        parts_n.push(times_n(at)?);
    }
    Tensor::cat(&parts_n, 0)
}

impl DeviceSums {
    /// Adds one step's parts (`n` images) to the sums, on the device; `sums` gives the start
    /// (its attention pairs grown to the step's) and counts the images.
    pub(super) fn add(
        &mut self,
        sums: &mut Sums,
        parts: &at_losses::LossParts,
        labels: &candle_core::Tensor,
    ) -> candle_core::Result<()> {
        let step = step_vector(parts, labels)?;
        self.add_vector(sums, step, labels.dim(0)?)
    }

    /// Adds a vector of [`step_vector`]s' sums over `n` images (one step's, or the sum of a
    /// data-parallel step's over its parts and ranks).
    pub(super) fn add_vector(
        &mut self,
        sums: &mut Sums,
        step: candle_core::Tensor,
        n: usize,
    ) -> candle_core::Result<()> {
        use candle_core::Tensor;
        if self.acc.is_none() {
            sums.at.resize(step.dim(0)?.saturating_sub(FIXED), 0.0);
            let mut start = vec![sums.loss, sums.ce, sums.kd, sums.gradient, sums.correct as f64];
            start.extend(&sums.at);
            self.acc = Some(Tensor::from_vec(start, FIXED + sums.at.len(), step.device())?);
        }
        let acc = self.acc.take().expect("started above");
        if acc.dim(0)? != step.dim(0)? {
            candle_core::bail!("the step's attention pairs changed within an epoch")
        }
        self.acc = Some((acc + step)?);
        sums.seen += n;
        Ok(())
    }

    /// Reads the sums back into `sums` (one transfer); nothing to read before the first step.
    pub(super) fn read(&self, sums: &mut Sums) -> candle_core::Result<()> {
        let Some(acc) = &self.acc else { return Ok(()) };
        let v: Vec<f64> = acc.to_vec1()?;
        (sums.loss, sums.ce, sums.kd, sums.gradient) = (v[0], v[1], v[2], v[3]);
        sums.correct = v[4] as usize;
        sums.at = v[FIXED..].to_vec();
        Ok(())
    }
}

/// Top-1 correct predictions of `logits` against `labels` as a one-element f64 tensor, on their
/// device: a prediction is correct when no logit is above the label's (as `top_k_correct`).
fn correct(
    logits: &candle_core::Tensor,
    labels: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::DType;
    let logits = logits.detach().to_dtype(DType::F32)?;
    let target = logits.gather(&labels.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?; // [b, 1]
    let above = logits.broadcast_gt(&target)?.to_dtype(DType::F32)?.sum(1)?; // [b]
    above.eq(0f64)?.to_dtype(DType::F64)?.sum_all()?.reshape(1)
}

/// `result.json`: how the run ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The student's name.
    pub student: String,
    /// The teacher's name, if any.
    pub teacher: Option<String>,
    /// Epochs trained.
    pub epochs: usize,
    /// Final test top-1 accuracy, %.
    pub test_top1: f64,
    /// Final test top-5 accuracy, %.
    pub test_top5: f64,
    /// Final test error (100 - top-1), %, as the paper reports.
    pub test_error: f64,
    /// Seconds of training and evaluation over the whole run.
    pub seconds: f64,
    /// Whether the run stopped before its last epoch (Ctrl-C or a stop option).
    pub interrupted: bool,
    /// The machine and device it trained on (empty in results written before this field).
    #[serde(default)]
    pub machine: String,
}

/// Every line of `dir/metrics.jsonl` (none when it does not exist).
pub fn read_metrics(dir: &Path) -> Result<Vec<EpochMetrics>> {
    let path = dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(vec![]) };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {} is damaged", path.display(), i + 1))
        })
        .collect()
}

impl Run {
    pub(super) fn append_metrics(&self, metrics: &EpochMetrics) -> Result<()> {
        if !self.leader() {
            return Ok(());
        }
        let path = self.dir.join("metrics.jsonl");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        writeln!(file, "{}", serde_json::to_string(metrics)?)?;
        file.sync_all()?;
        Ok(())
    }

    pub(super) fn result(
        &self,
        last: Option<&EpochMetrics>,
        seconds: f64,
        interrupted: bool,
    ) -> Result<RunResult> {
        let (top1, top5, epochs) =
            last.map_or((0.0, 0.0, 0), |m| (m.test_top1, m.test_top5, m.epoch));
        Ok(RunResult {
            student: self.config.student.clone(),
            teacher: self.config.teacher.as_ref().map(|t| t.model.clone()),
            epochs,
            test_top1: top1,
            test_top5: top5,
            test_error: 100.0 - top1,
            seconds,
            interrupted,
            machine: format!(
                "{} ({})",
                crate::job_machine(self.parallel.as_ref().map_or(1, |p| p.world.size())),
                self.config.device
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::train::top_k_correct;

    /// The sums kept on the device are the host's sums to the bit: the same f32 losses times
    /// their images, added in the same order in f64, from a resumed epoch's partial sums; and
    /// top-1 counted as `top_k_correct` counts it, ties included.
    #[test]
    fn device_sums_equal_the_hosts_bit_for_bit() {
        let dev = Device::Cpu;
        let start = Sums { loss: 12.345678901, ce: 3.25, correct: 7, seen: 9, ..Sums::default() };
        let (mut host, mut sums, mut on_device) = (start.clone(), start, DeviceSums::default());
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut value = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 1_000_003) as f32 / 997.0
        };
        for step in 0..25usize {
            let n = 3 + step % 5;
            let scalar = |v: f32| Tensor::new(v, &dev).unwrap();
            // Ties on purpose: two equal logits in every row, the label on one of them.
            let mut logits = vec![];
            for i in 0..n {
                let mut row: Vec<f32> = (0..4).map(|_| value().floor()).collect();
                row[i % 4] = row[(i + 1) % 4];
                logits.extend(row);
            }
            let logits = Tensor::from_vec(logits, (n, 4), &dev).unwrap();
            let labels: Vec<u32> = (0..n as u32).map(|i| i % 4).collect();
            let labels = Tensor::from_vec(labels, n, &dev).unwrap();
            let parts = at_losses::LossParts {
                total: scalar(value()),
                ce: scalar(value()),
                kd: (step % 2 == 0).then(|| scalar(value())),
                at: vec![scalar(value()), scalar(value())],
                gradient: None,
                logits: logits.clone(),
            };
            on_device.add(&mut sums, &parts, &labels).unwrap();
            // What the host did before.
            let f = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
            host.loss += f(&parts.total) * n as f64;
            host.ce += f(&parts.ce) * n as f64;
            if let Some(kd) = &parts.kd {
                host.kd += f(kd) * n as f64;
            }
            host.at.resize(2, 0.0);
            for (sum, at) in host.at.iter_mut().zip(&parts.at) {
                *sum += f(at) * n as f64;
            }
            host.correct += top_k_correct(&logits, &labels).unwrap().0;
            host.seen += n;
        }
        on_device.read(&mut sums).unwrap();
        assert_eq!(sums, host);
        assert!(host.correct > 7 && host.correct < host.seen, "the count is exercised: {host:?}");
    }
}
