//! The attention-transfer trainer: a run described by a TOML config ([`config`]), trained with
//! the losses of at-losses and SGD ([`optim`]), observed through `metrics.jsonl`, checkpointed
//! atomically and resumable exactly ([`train`]).
#![deny(missing_docs)]

pub mod bench;
pub mod config;
pub mod data;
pub mod hub;
pub mod init;
pub mod maps;
pub mod optim;
pub mod publish;
pub mod repro;
pub mod train;

use at_models::{ModelOptions, parameter_count, registry};
use candle_core::{DType, Device, Result};
use candle_nn::{VarBuilder, VarMap};

/// This machine in words: its CPU model and core count.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// One row of the model table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRow {
    /// The registered name.
    pub name: &'static str,
    /// Trainable parameters (batch-norm statistics excluded).
    pub parameters: usize,
    /// What the model is for.
    pub about: &'static str,
}

/// Every registered model with its exact parameter count under `options`, built on the CPU.
pub fn model_rows(options: &ModelOptions) -> Result<Vec<ModelRow>> {
    registry()
        .iter()
        .map(|spec| {
            let varmap = VarMap::new();
            spec.build(options, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
            Ok(ModelRow {
                name: spec.name,
                parameters: parameter_count(&varmap),
                about: spec.about,
            })
        })
        .collect()
}

/// The rows as a Markdown table, ready to paste.
pub fn model_table(rows: &[ModelRow], num_classes: usize) -> String {
    let mut out =
        format!("| model | parameters ({num_classes} classes) | about |\n|---|---:|---|\n");
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            row.name,
            thousands(row.parameters),
            row.about
        ));
    }
    out
}

/// `1234567` as `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(175_066), "175,066");
        assert_eq!(thousands(11_689_512), "11,689,512");
    }

    #[test]
    fn the_table_lists_every_registered_model_with_its_count() {
        let rows = model_rows(&ModelOptions::default()).unwrap();
        let table = model_table(&rows, 10);
        assert_eq!(table.lines().count(), 2 + registry().len());
        assert!(table.contains("| wrn-16-1 | 175,066 |"), "{table}");
        assert!(table.contains("| resnet18 | 11,181,642 |"), "{table}");
    }
}
