//! Second-order gradients through the kernels equal those through candle's `conv2d` (f64): the
//! derivative with respect to the weights of the input gradient's squared norm and of the weight
//! gradient's squared norm. This binary runs without libtest's harness: `main` starts the
//! second-order thread before any other thread exists, and each test runs on it.

use at_kernels::conv2d;
use candle_core::{DType, Device, Result, Tensor, Var};

fn values(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| ((i as f64 + 1.0) * (seed as f64 + 0.37)).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

type Conv = fn(&Tensor, &Tensor, usize, usize) -> Result<Tensor>;

fn reference(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    x.conv2d(w, pad, stride, 1, 1)
}

/// `1/2 ||dL/dx||^2 + 1/2 ||dL/dw1||^2` for `L = sum(r * conv(tanh(conv(x, w1)), w2))`, and its
/// gradients with respect to x, w1 and w2.
fn penalty_grads(conv: Conv, stride: usize, pad: usize) -> Vec<Tensor> {
    let x = Var::from_tensor(&values(&[2, 3, 7, 7], 1)).unwrap();
    let w1 = Var::from_tensor(&values(&[4, 3, 3, 3], 2)).unwrap();
    let w2 = Var::from_tensor(&(values(&[2, 4, 3, 3], 3) * 0.5).unwrap()).unwrap();
    let h = conv(x.as_tensor(), w1.as_tensor(), stride, pad).unwrap().tanh().unwrap();
    let y = conv(&h, w2.as_tensor(), 1, 1).unwrap();
    let r = values(y.dims(), 4);
    let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let half_sq = |t: &Tensor| (t.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
    let penalty = (half_sq(grads.get(&x).unwrap()) + half_sq(grads.get(&w1).unwrap())).unwrap();
    let second = penalty.backward().unwrap();
    [&x, &w1, &w2].iter().map(|v| second.get(v).expect("a second-order gradient").clone()).collect()
}

fn check(stride: usize, pad: usize) {
    let ours = penalty_grads(conv2d, stride, pad);
    let theirs = penalty_grads(reference, stride, pad);
    for (name, (a, b)) in ["x", "w1", "w2"].iter().zip(ours.iter().zip(&theirs)) {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(
            a.dtype() == DType::F64 && diff <= 1e-9 * scale,
            "d/d{name}: {diff:e} of {scale:e}"
        );
    }
}

fn second_order_gradients_match_candle_stride_one() {
    check(1, 1);
}

fn second_order_gradients_match_candle_stride_two() {
    check(2, 1);
}

/// `1/2 ||dL/dx||^2` through conv, batch norm + ReLU, conv: the fused batch norm switches to its
/// differentiable backward on this thread, and matches the same network in candle's ops.
fn second_order_through_fused_batch_norm_matches_candle() {
    let run = |fused: bool| -> Vec<Tensor> {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = Var::from_tensor(&f32(values(&[3, 2, 6, 6], 5))).unwrap();
        let w1 = Var::from_tensor(&f32(values(&[4, 2, 3, 3], 6))).unwrap();
        let gamma = Var::from_tensor(&f32((values(&[4], 7) + 1.5).unwrap())).unwrap();
        let beta = Var::from_tensor(&f32(values(&[4], 8))).unwrap();
        let w2 = Var::from_tensor(&f32(values(&[2, 4, 3, 3], 9))).unwrap();
        let h = conv2d(x.as_tensor(), w1.as_tensor(), 1, 1).unwrap();
        let h = if fused {
            at_kernels::batch_norm_train(&h, gamma.as_tensor(), beta.as_tensor(), 1e-5, true)
                .unwrap()
                .unwrap()
                .0
        } else {
            let mean = h.mean_keepdim((0, 2, 3)).unwrap();
            let centred = h.broadcast_sub(&mean).unwrap();
            let var = centred.sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
            centred
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&gamma.as_tensor().reshape((1, 4, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&beta.as_tensor().reshape((1, 4, 1, 1)).unwrap())
                .unwrap()
                .relu()
                .unwrap()
        };
        let y = conv2d(&h, w2.as_tensor(), 1, 1).unwrap();
        let r = f32(values(y.dims(), 10));
        let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let j = grads.get(&x).unwrap();
        let penalty = (j.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let second = penalty.backward().unwrap();
        // The input gradient does not depend on beta (only through ReLU's mask, whose
        // derivative is zero).
        assert!(second.get(&beta).is_none_or(|g| {
            g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0
        }));
        [&w1, &gamma, &w2]
            .iter()
            .map(|v| second.get(v).expect("a second-order gradient").clone())
            .collect()
    };
    let (ours, theirs) = (run(true), run(false));
    for (name, (a, b)) in ["w1", "gamma", "w2"].iter().zip(ours.iter().zip(&theirs)) {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-3 * scale, "d/d{name}: {diff:e} of {scale:e}");
    }
}

/// The gradient of an attention map's sum of squares, differentiated again (the penalty on a
/// map's input gradient), equals candle's ops'.
fn second_order_through_channel_power_matches_candle() {
    let run = |fused: bool| -> Tensor {
        let x = Var::from_tensor(&values(&[2, 3, 4, 4], 11)).unwrap();
        let w = Var::from_tensor(&values(&[3, 3, 3, 3], 12)).unwrap();
        let h = conv2d(x.as_tensor(), w.as_tensor(), 1, 1).unwrap();
        let h32 = h.to_dtype(DType::F32).unwrap();
        let map = if fused {
            at_kernels::channel_power(&h32, 2.0, 0.5).unwrap().unwrap()
        } else {
            (h32.sqr().unwrap().sum(1).unwrap() * 0.5).unwrap()
        };
        let r = values(map.dims(), 13).to_dtype(DType::F32).unwrap();
        let grads = (map * r).unwrap().sum_all().unwrap().backward().unwrap();
        let j = grads.get(&x).unwrap();
        let penalty = (j.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        penalty.backward().unwrap().get(&w).expect("a second-order gradient").clone()
    };
    let (a, b) = (run(true), run(false));
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(diff <= 1e-4 * scale, "{diff:e} of {scale:e}");
}

fn fused_block_declines_on_a_second_order_thread() {
    let t = |shape: &[usize], seed| values(shape, seed).to_dtype(DType::F32).unwrap();
    let (x, g, b) = (t(&[2, 3, 4, 4], 1), t(&[3], 2), t(&[3], 3));
    let w = t(&[3, 3, 3, 3], 4);
    let block = at_kernels::PreactBlock {
        bn0: (&g, &b),
        conv0: &w,
        bn1: (&g, &b),
        conv1: &w,
        convdim: None,
        stride: 1,
        eps: 1e-5,
    };
    // Its backward builds no graph: the caller must build the block from separate ops here.
    assert!(at_kernels::preact_block_train(&x, &block).unwrap().is_none());
}

fn fused_basic_blocks_decline_on_a_second_order_thread() {
    let t = |shape: &[usize], seed| values(shape, seed).to_dtype(DType::F32).unwrap();
    let (x, g, b) = (t(&[2, 3, 4, 4], 1), t(&[3], 2), t(&[3], 3));
    let w = t(&[3, 3, 3, 3], 4);
    let block = at_kernels::BasicBlock {
        conv1: &w,
        bn1: (&g, &b),
        conv2: &w,
        bn2: (&g, &b),
        downsample: None,
        stride: 1,
        eps: 1e-5,
        frozen: None,
    };
    // Their backward builds no graph: the caller must build the blocks from separate ops here.
    let deferred = at_kernels::ParamGrads::new();
    assert!(at_kernels::basic_blocks_train(&x, &[block], &deferred).unwrap().is_none());
}

fn main() -> std::process::ExitCode {
    at_kernels::second_order::run_tests(&[
        ("second_order_gradients_match_candle_stride_one", |so| {
            so.run(second_order_gradients_match_candle_stride_one)
        }),
        ("second_order_gradients_match_candle_stride_two", |so| {
            so.run(second_order_gradients_match_candle_stride_two)
        }),
        ("second_order_through_fused_batch_norm_matches_candle", |so| {
            so.run(second_order_through_fused_batch_norm_matches_candle)
        }),
        ("second_order_through_channel_power_matches_candle", |so| {
            so.run(second_order_through_channel_power_matches_candle)
        }),
        ("fused_block_declines_on_a_second_order_thread", |so| {
            so.run(fused_block_declines_on_a_second_order_thread)
        }),
        ("fused_basic_blocks_decline_on_a_second_order_thread", |so| {
            so.run(fused_basic_blocks_decline_on_a_second_order_thread)
        }),
    ])
}
