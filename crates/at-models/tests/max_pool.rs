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
