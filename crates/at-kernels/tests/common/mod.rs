//! Helpers of the block kernels' tests (`block.rs`, `basic_block.rs`).

use candle_core::{Device, Tensor, Var};

/// A tracked tensor of `shape` with values from a sine of the index (`seed` and `scale` vary it).
pub fn values(shape: &[usize], seed: f64, scale: f64) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as f64 + 1.0) * (seed + 0.618)).sin() * scale + 0.1 * scale) as f32)
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

/// `max |a - b| / max |b|`, the shapes checked.
pub fn max_rel(what: &str, a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30)
}
