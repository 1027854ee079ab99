//! Weights and batch-norm statistics as safetensors under PyTorch state-dict names.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Result, Tensor, bail};
use candle_nn::VarMap;

/// Whether a state-dict entry is a batch-norm buffer (running statistics), not a parameter:
/// it is saved and loaded, but neither counted, trained nor decayed.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

/// The number of trainable parameters in `varmap` (batch-norm buffers excluded).
pub fn parameter_count(varmap: &VarMap) -> usize {
    let data = varmap.data().lock().expect("the VarMap lock is not poisoned");
    data.iter().filter(|(name, _)| !is_buffer(name)).map(|(_, var)| var.elem_count()).sum()
}

/// Writes every tensor of `varmap` (weights and batch-norm statistics) to `path`, atomically:
/// a crash leaves either the old file or the new one.
pub fn save(varmap: &VarMap, path: &Path) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    varmap.save(tmp).map_err(|e| e.context(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(tmp, path).map_err(|e| {
        candle_core::Error::Msg(format!("cannot move {} to {}: {e}", tmp.display(), path.display()))
    })
}

/// What [`load`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors read from the file.
    pub loaded: Vec<String>,
    /// Tensors of the model left as they were because their name starts with a skipped prefix.
    pub kept: Vec<String>,
    /// Entries of the file that were ignored: `num_batches_tracked` and skipped prefixes.
    pub ignored: Vec<String>,
}

/// Loads `path` into `varmap`, strictly: every tensor of the model must be in the file with the
/// same shape, and every entry of the file must belong to the model, except PyTorch's
/// `num_batches_tracked` and names starting with one of `skip` (e.g. `["fc."]` to keep a new
/// classifier head when fine-tuning).
pub fn load(varmap: &VarMap, path: &Path, skip: &[&str]) -> Result<LoadReport> {
    if !path.exists() {
        bail!("no weights file at {}", path.display())
    }
    let file: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| e.context(format!("cannot read {} as safetensors", path.display())))?;
    let skipped = |name: &str| skip.iter().any(|p| name.starts_with(p));
    let data = varmap.data().lock().expect("the VarMap lock is not poisoned");

    let mut report = LoadReport::default();
    let mut missing = vec![];
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        if skipped(name) {
            report.kept.push(name.clone());
            continue;
        }
        let Some(tensor) = file.get(name) else {
            missing.push(name.clone());
            continue;
        };
        if tensor.dims() != var.dims() {
            bail!(
                "{}: tensor `{name}` has shape {:?} in the file but {:?} in the model",
                path.display(),
                tensor.dims(),
                var.dims()
            )
        }
        var.set(&tensor.to_dtype(var.dtype())?.to_device(var.device())?)?;
        report.loaded.push(name.clone());
    }
    let mut unexpected = BTreeSet::new();
    for name in file.keys() {
        if skipped(name) || name.ends_with("num_batches_tracked") {
            report.ignored.push(name.clone());
        } else if !data.contains_key(name) {
            unexpected.insert(name.clone());
        }
    }
    report.ignored.sort();
    if !missing.is_empty() || !unexpected.is_empty() {
        bail!(
            "{} does not fit the model: missing {missing:?}, unexpected {unexpected:?} \
             (is it a checkpoint of another architecture?)",
            path.display()
        )
    }
    Ok(report)
}
