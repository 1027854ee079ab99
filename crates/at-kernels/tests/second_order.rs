//! Second-order gradients through the kernels equal those through candle's `conv2d` (f64): the
//! derivative with respect to the weights of the input gradient's squared norm and of the weight
//! gradient's squared norm. This binary switches candle's second-order gradients on for each
//! test thread before its first `backward`.

use at_kernels::conv2d;
use candle_core::{DType, Device, Result, Tensor, Var};

fn values(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| ((i as f64 + 1.0) * (seed as f64 + 0.37)).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn second_order_on() {
    // SAFETY: every test of this binary wants it on; candle reads it per thread.
    unsafe { std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1") };
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
    second_order_on();
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

#[test]
fn second_order_gradients_match_candle_stride_one() {
    check(1, 1);
}

#[test]
fn second_order_gradients_match_candle_stride_two() {
    check(2, 1);
}
