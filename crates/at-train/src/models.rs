//! `at-train models`: the registered models with their exact parameter counts, as a table to
//! paste.

use at_models::{ModelOptions, parameter_count, registry};
use candle_core::{DType, Device, Result};
use candle_nn::{VarBuilder, VarMap};

/// One row of the model table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ModelRow {
    /// The registered name.
    pub name: &'static str,
    /// Trainable parameters (batch-norm statistics excluded).
    pub parameters: usize,
    /// What the model is for.
    pub about: &'static str,
}

/// Every registered model with its exact parameter count under `options`, built on the CPU.
pub(crate) fn model_rows(options: &ModelOptions) -> Result<Vec<ModelRow>> {
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
pub(crate) fn model_table(rows: &[ModelRow], num_classes: usize) -> String {
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
