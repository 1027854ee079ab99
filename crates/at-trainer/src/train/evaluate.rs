//! Evaluation: top-k accuracy, the test loss, and a finished (or checkpointed) run's model.

use std::path::Path;

use anyhow::{Context, Result};
use at_data::Loader;
use at_models::AttentionModel;
use candle_core::{DType, Device, Tensor};

use super::{Purpose, Run};
use crate::config::RunConfig;
use crate::data::Data;

/// (top-1, top-5) correct predictions of `logits` against `labels`.
pub fn top_k_correct(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    let labels: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
    let (mut top1, mut top5) = (0, 0);
    for (row, &label) in rows.iter().zip(&labels) {
        let target = row[label as usize];
        let above = row.iter().filter(|&&v| v > target).count();
        top1 += (above == 0) as usize;
        top5 += (above < 5) as usize;
    }
    Ok((top1, top5))
}

/// Test cross-entropy and top-1/top-5 accuracy (%) of `model` in evaluation mode.
pub fn evaluate(
    model: &dyn AttentionModel,
    loader: &Loader,
    device: &Device,
) -> Result<(f64, f64, f64)> {
    let (mut loss, mut top1, mut top5, mut seen) = (0.0, 0, 0, 0);
    for batch in loader.epoch(0, device) {
        let batch = batch?;
        let logits = model.forward_t(&batch.images, false)?.logits.detach();
        let n = batch.indices.len();
        loss += at_losses::cross_entropy(&logits, &batch.labels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            * n as f64;
        let (c1, c5) = top_k_correct(&logits, &batch.labels)?;
        top1 += c1;
        top5 += c5;
        seen += n;
    }
    let seen = seen.max(1) as f64;
    Ok((loss / seen, 100.0 * top1 as f64 / seen, 100.0 * top5 as f64 / seen))
}

/// A run's trained student, ready for evaluation or inspection: its final `model.safetensors`,
/// else its last checkpoint.
pub struct RunModel {
    run: Run,
}

impl RunModel {
    /// Opens the run in `dir`, whose config is `config`.
    pub fn open(config: RunConfig, dir: &Path) -> Result<Self> {
        let run = Run::new(config, dir, Purpose::Inspect)?;
        let weights = dir.join("model.safetensors");
        let weights = if weights.exists() {
            weights
        } else {
            let tag =
                std::fs::read_to_string(dir.join("checkpoints/latest")).with_context(|| {
                    format!("{} has neither model.safetensors nor a checkpoint", dir.display())
                })?;
            dir.join("checkpoints").join(tag.trim()).join("model.safetensors")
        };
        at_models::load(&run.varmap, &weights, &[])?;
        Ok(Self { run })
    }

    /// The student network.
    pub fn model(&self) -> &dyn AttentionModel {
        self.run.student.as_ref()
    }

    /// The run's datasets and pipelines.
    pub fn data(&self) -> &Data {
        &self.run.data
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.run.device
    }

    /// (side, channels) of the dataset's images before their pipeline.
    pub fn input_shape(&self) -> Result<(usize, usize)> {
        let (image, _) = self.run.data.test.get(0)?;
        Ok((image.height, image.channels))
    }

    /// Test cross-entropy, top-1 % and top-5 %.
    pub fn evaluate(&self) -> Result<(f64, f64, f64)> {
        let (_, test) = self.run.loaders()?;
        evaluate(self.model(), &test, &self.run.device)
    }
}
