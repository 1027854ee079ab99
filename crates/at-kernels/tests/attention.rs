//! The channel reduction of attention maps against candle's ops: `scale * sum_c x^2`, values and
//! input gradient (f32, 1e-5); other powers and dtypes are left to the caller.

use at_kernels::channel_power;
use candle_core::{DType, Device, Tensor, Var};

fn values(shape: &[usize], seed: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> =
        (0..n).map(|i| (((i as f64 + 1.0) * (seed + 0.618)).sin() * 1.7) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30)
}

#[test]
fn channel_sum_of_squares_matches_candle_ops_and_its_gradient() {
    let x = Var::from_tensor(&values(&[3, 5, 4, 6], 1.0)).unwrap();
    let ours = channel_power(x.as_tensor(), 2.0, 0.2).unwrap().expect("p = 2 in f32 on the CPU");
    let theirs = (x.as_tensor().sqr().unwrap().sum(1).unwrap() * 0.2).unwrap();
    assert_eq!(ours.dims(), &[3, 4, 6]);
    assert!(max_rel(&ours, &theirs) < 1e-5);
    let r = values(&[3, 4, 6], 2.0);
    let a = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let b = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_rel(a.get(&x).unwrap(), b.get(&x).unwrap()) < 1e-5);
}

#[test]
fn other_powers_and_dtypes_are_left_to_the_caller() {
    let x = values(&[2, 3, 4, 4], 1.0);
    assert!(channel_power(&x, 1.0, 1.0).unwrap().is_none());
    assert!(channel_power(&x.to_dtype(DType::F64).unwrap(), 2.0, 1.0).unwrap().is_none());
}
