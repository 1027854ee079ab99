//! The max pool against PyTorch: values and gradient with kernel != stride and padding, where
//! candle 0.11's own pool has a backward that is wrong (1/k^2) or missing.

mod common;

use at_models::max_pool2d;
use candle_core::{Device, Tensor, Var};
use common::{assert_close, golden};

#[test]
fn max_pool_3x3_stride_2_pad_1_matches_torch_forward_and_backward() {
    let f = golden("max_pool.safetensors");
    let x = Var::from_tensor(&f["pool.x"]).unwrap();
    let out = max_pool2d(&x, 3, 2, 1).unwrap();
    assert_close("max pool output", &out, &f["pool.out"], 1e-12);
    let grads = (out * &f["pool.g"]).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close("max pool input gradient", grads.get(&x).unwrap(), &f["pool.dx"], 1e-12);
}

#[test]
fn the_whole_gradient_goes_to_the_window_maximum() {
    // One 2x2 window with its maximum at (1, 0): the gradient there is 1, not 1/4.
    let x =
        Var::from_tensor(&Tensor::new(&[[[[1f32, 2.], [5., 3.]]]], &Device::Cpu).unwrap()).unwrap();
    let out = max_pool2d(&x, 2, 2, 0).unwrap();
    assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [5.0]);
    let grads = out.sum_all().unwrap().backward().unwrap();
    let g: Vec<f32> = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(g, [0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn a_pool_that_does_not_fit_is_an_error() {
    let x = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = max_pool2d(&x, 5, 1, 0).unwrap_err().to_string();
    assert!(err.contains("do not fit an input of 2x2"), "{err}");
}

/// The parallel pool gives the flat one's values and gradients (the same maxima, ties and
/// padding included), and its gradient is the finite difference of its sum of squares.
#[test]
fn the_parallel_pool_matches_the_flat_one_and_finite_differences() {
    use at_models::nn::max_pool2d_flat;
    let dev = Device::Cpu;
    // Values on a coarse grid, so that windows hold ties.
    let values: Vec<f32> =
        (0..2 * 3 * 9 * 9).map(|i| ((i * 37 % 23) as f32 - 11.0) / 4.0).collect();
    let x = Var::from_vec(values.clone(), (2, 3, 9, 9), &dev).unwrap();
    for (kernel, stride, padding) in [(3, 2, 1), (2, 2, 0), (3, 1, 1)] {
        let ours = max_pool2d(x.as_tensor(), kernel, stride, padding).unwrap();
        let flat = max_pool2d_flat(x.as_tensor(), kernel, stride, padding).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&ours), v(&flat), "values, kernel {kernel} stride {stride}");
        let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_flat = flat.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let grad = v(g_ours.get(&x).unwrap());
        assert_eq!(grad, v(g_flat.get(&x).unwrap()), "gradients, kernel {kernel}");
        // Finite differences on distinct values (gaps of 1/97, steps of 1e-3: no tie crossed).
        let values: Vec<f32> =
            (0..2 * 3 * 9 * 9).map(|i| ((i * 7919) % 997) as f32 / 97.0).collect();
        let xv = Var::from_vec(values.clone(), (2, 3, 9, 9), &dev).unwrap();
        let y = max_pool2d(xv.as_tensor(), kernel, stride, padding).unwrap();
        let grad = v(y.sqr().unwrap().sum_all().unwrap().backward().unwrap().get(&xv).unwrap());
        // In f64, so that the difference quotient is not rounding.
        let loss = |xs: &[f32]| {
            let xs: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
            let t = Tensor::from_vec(xs, (2, 3, 9, 9), &dev).unwrap();
            let y = max_pool2d(&t, kernel, stride, padding).unwrap();
            y.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let i = grad.iter().position(|g| *g != 0.0).expect("some cell gets a gradient");
        let eps = 1e-3f32;
        let (mut up, mut down) = (values.clone(), values.clone());
        up[i] += eps;
        down[i] -= eps;
        let fd = (loss(&up) - loss(&down)) / (2.0 * eps as f64);
        assert!(
            (fd - grad[i] as f64).abs() < 1e-2 * grad[i].abs().max(1.0) as f64,
            "{fd} vs {}",
            grad[i]
        );
    }
}
