//! Checkpoints: everything a resumed run needs to end bit-identical (weights, batch-norm
//! statistics, momentum, epoch and batch, the epoch's partial metrics), written atomically;
//! `checkpoints/latest` names the newest.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::Run;
use super::metrics::{EpochMetrics, Sums, read_metrics};

/// Where a run stands: saved with each checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Position {
    /// The epoch in progress (or the next one when `batch == 0`), from 0.
    pub(super) epoch: usize,
    /// Batches of it already done.
    pub(super) batch: usize,
    pub(super) sums: Sums,
}

impl Run {
    pub(super) fn checkpoint(&self, position: &Position) -> Result<()> {
        if let Some(parallel) = &self.parallel {
            // Every rank's batch-norm statistics are rank 0's from here on, as saved.
            self.broadcast_vars(parallel, true)?;
        }
        if !self.leader() {
            return Ok(());
        }
        let tag = format!("epoch-{:04}-batch-{:05}", position.epoch, position.batch);
        let dir = self.dir.join("checkpoints").join(&tag);
        let tmp = self.dir.join("checkpoints").join(format!("{tag}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        at_models::save(&self.varmap, &tmp.join("model.safetensors"))?;
        let optimizer: HashMap<String, Tensor> = self.sgd.state().clone();
        candle_core::safetensors::save(&optimizer, tmp.join("optimizer.safetensors"))?;
        std::fs::write(tmp.join("position.json"), serde_json::to_string_pretty(position)?)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)?;
        let previous = std::fs::read_to_string(self.dir.join("checkpoints/latest")).ok();
        write_atomically(&self.dir.join("checkpoints/latest"), tag.as_bytes())?;
        // Keep the newest checkpoint only: the previous one is gone once `latest` moved on.
        if let Some(previous) = previous.filter(|p| p.trim() != tag) {
            let _ = std::fs::remove_dir_all(self.dir.join("checkpoints").join(previous.trim()));
        }
        Ok(())
    }

    pub(super) fn restore(&mut self) -> Result<Position> {
        let latest = self.dir.join("checkpoints/latest");
        let tag = std::fs::read_to_string(&latest).with_context(|| {
            format!(
                "no checkpoint to resume from in {} (missing {})",
                self.dir.display(),
                latest.display()
            )
        })?;
        let dir = self.dir.join("checkpoints").join(tag.trim());
        at_models::load(&self.varmap, &dir.join("model.safetensors"), &[])?;
        let state =
            candle_core::safetensors::load(dir.join("optimizer.safetensors"), &self.device)?;
        self.sgd.load_state(state)?;
        let position: Position =
            serde_json::from_str(&std::fs::read_to_string(dir.join("position.json"))?)
                .with_context(|| format!("{} is damaged", dir.join("position.json").display()))?;
        if !self.leader() {
            return Ok(position);
        }
        // Metrics of epochs after the checkpoint (written before a crash) are dropped.
        let kept: Vec<EpochMetrics> =
            read_metrics(&self.dir)?.into_iter().filter(|m| m.epoch <= position.epoch).collect();
        let text: String = kept
            .iter()
            .map(|m| serde_json::to_string(m).expect("metrics serialise") + "\n")
            .collect();
        write_atomically(&self.dir.join("metrics.jsonl"), text.as_bytes())?;
        Ok(position)
    }
}

/// The seconds recorded in `metrics.jsonl` so far.
pub(super) fn previous_seconds(dir: &Path) -> Result<f64> {
    Ok(read_metrics(dir)?.iter().fold(0.0, |total, m| total + m.seconds))
}

/// Writes `bytes` to `path` through a temporary file and a rename: a crash leaves the old file
/// or the new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
