//! Helpers shared by the at-models tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

/// The tensors of `tests/golden/<file>`, written by `tests/golden/make_golden.py`.
pub fn golden(file: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(file);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| {
        panic!("cannot read {}: {e} (run `cargo xtask golden`)", path.display())
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The weights `make_golden.py`'s `formula_values` gives tensor number `index` (sorted by name).
fn formula_values(index: usize, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    (0..n as u64)
        .map(|j| {
            let u = (splitmix64(((index as u64) << 32) | j) >> 11) as f64 / (1u64 << 53) as f64;
            let v = if name.ends_with("running_var") {
                0.5 + u
            } else if name.ends_with("running_mean") {
                0.2 * (u - 0.5)
            } else if shape.len() == 1 && name.ends_with("weight") {
                0.5 + u
            } else if shape.len() == 1 {
                0.2 * (u - 0.5)
            } else {
                let fan_in = n / shape[0];
                (2.0 * u - 1.0) * 3f64.sqrt() * (2.0 / fan_in as f64).sqrt()
            };
            v as f32
        })
        .collect()
}

/// Sets every tensor of `varmap` as `make_golden.py` does for the PyTorch model.
pub fn formula_weights(varmap: &VarMap) {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let values = formula_values(i, name, var.dims());
        var.set(&Tensor::from_vec(values, var.shape(), var.device()).unwrap()).unwrap();
    }
}

/// `max|ours - ref| / max|ref|`.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shape of ours vs the reference");
    let ours = ours.to_dtype(DType::F64).unwrap();
    let reference = reference.to_dtype(DType::F64).unwrap();
    let diff = (ours - &reference).unwrap().abs().unwrap().max_all().unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.max(f64::MIN_POSITIVE)
}

pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) {
    let err = rel_err(ours, reference);
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}
