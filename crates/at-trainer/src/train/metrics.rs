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
            machine: format!("{} ({})", crate::machine(), self.config.device),
        })
    }
}
