//! The convolution kernels against candle's own `conv2d`: values and both gradients, for every
//! geometry the models use and a few they do not, in f64 (1e-10) and f32 (1e-4).

use at_kernels::conv2d;
use candle_core::{DType, Device, Result, Tensor, Var};

/// Deterministic values in [-1, 1).
fn values(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-30);
    diff / scale
}

/// (input [N, C, H, W], weight [O, C, k, k], stride, padding)
const GEOMETRIES: &[([usize; 4], [usize; 4], usize, usize)] = &[
    ([2, 3, 8, 8], [4, 3, 3, 3], 1, 1),
    ([3, 4, 9, 7], [5, 4, 3, 3], 2, 1),
    ([2, 6, 8, 8], [3, 6, 1, 1], 1, 0),
    ([2, 6, 9, 9], [3, 6, 1, 1], 2, 0),
    ([1, 2, 11, 10], [3, 2, 5, 5], 1, 2),
    ([2, 3, 7, 7], [2, 3, 3, 3], 1, 0),
    ([2, 2, 6, 6], [3, 2, 3, 3], 3, 2),
    ([5, 1, 4, 4], [2, 1, 3, 3], 1, 1),
    // "Same" 3x3 convolutions (computed from shifted copies): one column, one row, not square.
    ([2, 2, 5, 1], [3, 2, 3, 3], 1, 1),
    ([2, 2, 1, 6], [3, 2, 3, 3], 1, 1),
    ([3, 4, 6, 9], [2, 4, 3, 3], 1, 1),
    // Batches larger than the thread count, with an odd number of images (one GEMM per image,
    // images spread over the threads), and a strided one.
    ([37, 3, 8, 8], [4, 3, 3, 3], 1, 1),
    ([20, 5, 6, 6], [3, 5, 1, 1], 1, 0),
    ([19, 2, 9, 9], [3, 2, 3, 3], 2, 1),
];

fn compare(dtype: DType, tolerance: f64) -> Result<()> {
    for (i, &(xs, ws, stride, pad)) in GEOMETRIES.iter().enumerate() {
        let x = Var::from_tensor(&values(&xs, 1 + i as u64, dtype))?;
        let w = Var::from_tensor(&values(&ws, 100 + i as u64, dtype))?;
        let ours = conv2d(x.as_tensor(), w.as_tensor(), stride, pad)?;
        let reference = x.as_tensor().conv2d(w.as_tensor(), pad, stride, 1, 1)?;
        assert_eq!(ours.dims(), reference.dims(), "geometry {i}");
        let err = max_rel(&ours, &reference);
        assert!(err < tolerance, "geometry {i}: forward relative error {err:e}");
        // A weighting that is not all ones, so that every output's gradient differs.
        let r = values(reference.dims(), 7 + i as u64, dtype);
        let g_ours = (ours * &r)?.sum_all()?.backward()?;
        let g_ref = (reference * &r)?.sum_all()?.backward()?;
        for (name, v) in [("input", &x), ("weight", &w)] {
            let err = max_rel(g_ours.get(v).unwrap(), g_ref.get(v).unwrap());
            assert!(err < tolerance, "geometry {i}: {name} gradient relative error {err:e}");
        }
    }
    Ok(())
}

#[test]
fn forward_and_gradients_match_candle_in_f64() {
    compare(DType::F64, 1e-10).unwrap();
}

#[test]
fn forward_and_gradients_match_candle_in_f32() {
    compare(DType::F32, 1e-4).unwrap();
}

#[test]
fn half_precision_falls_back_to_candle() {
    let x = values(&[1, 2, 5, 5], 3, DType::F16);
    let w = values(&[2, 2, 3, 3], 4, DType::F16);
    let y = conv2d(&x, &w, 1, 1).unwrap();
    assert_eq!((y.dims(), y.dtype()), (&[1, 2, 5, 5][..], DType::F16));
}

#[test]
fn mismatched_channels_are_an_error_naming_both() {
    let x = values(&[1, 3, 5, 5], 3, DType::F32);
    let w = values(&[2, 4, 3, 3], 4, DType::F32);
    let err = conv2d(&x, &w, 1, 1).unwrap_err().to_string();
    assert!(err.contains("3 channels") && err.contains("expects 4"), "{err}");
}
