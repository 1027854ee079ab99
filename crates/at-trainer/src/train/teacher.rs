//! The teacher: a registered model with trained weights, held as constants.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use at_models::{AttentionModel, ModelOptions};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// Builds `model` and loads `checkpoint` (a local file) into it strictly, then
/// keeps its weights as constants (no gradient is ever tracked through the teacher).
pub fn load_teacher(
    model: &str,
    checkpoint: &Path,
    options: &ModelOptions,
    device: &Device,
) -> Result<Box<dyn AttentionModel>> {
    let varmap = VarMap::new();
    at_models::build(model, options, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    at_models::load(&varmap, checkpoint, &[])
        .with_context(|| format!("the teacher checkpoint does not fit a {model}"))?;
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("the VarMap lock is not poisoned")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    Ok(at_models::build(model, options, VarBuilder::from_tensors(tensors, DType::F32, device))?)
}
