//! Double backpropagation through the max pool, against PyTorch's
//! `autograd.grad(..., create_graph=True)`, and the pool a GPU runs against the flat one and
//! finite differences.
//!
//! Second-order gradients need the process's second-order thread, which must start before any
//! other thread: this binary runs without libtest's harness, and its `main` starts it.

mod common;

use std::collections::HashMap;

use at_models::max_pool2d;
use at_models::nn::max_pool2d_flat;
use candle_core::{Result, Tensor, Var};
use common::{assert_close, golden};

/// A max pool: `(input, kernel, stride, padding)`.
type Pool = fn(&Tensor, usize, usize, usize) -> Result<Tensor>;

/// The pool a GPU runs (`Backend::Device`; on the CPU the flat one is kept, as faster there).
fn device_pool(x: &Tensor, k: usize, s: usize, p: usize) -> Result<Tensor> {
    at_models::max_pool2d_on(x, (k, s, p), at_models::Backend::Device)
}

/// The golden two-layer network through `pool`, with `w1` as its first weight: `sum J^2`, where
/// `J` is the input gradient of `sum(y * g)`, and its gradients with respect to `w1` and `w2`.
fn sum_j2(f: &HashMap<String, Tensor>, pool: Pool, w1: &Tensor) -> (Tensor, Tensor, Tensor) {
    let x = Var::from_tensor(&f["dbp.x"]).unwrap();
    let w1 = Var::from_tensor(w1).unwrap();
    let w2 = Var::from_tensor(&f["dbp.w2"]).unwrap();
    let h = pool(&x.conv2d(&w1, 1, 1, 1, 1).unwrap().relu().unwrap(), 3, 2, 1).unwrap();
    let y = pool(&h.conv2d(&w2, 1, 1, 1, 1).unwrap(), 2, 2, 0).unwrap();
    let first = (y * &f["dbp.g"]).unwrap().sum_all().unwrap().backward().unwrap();
    let loss = first.get(&x).unwrap().sqr().unwrap().sum_all().unwrap();
    let second = loss.backward().unwrap();
    let (dw1, dw2) = (second.get(&w1).unwrap().clone(), second.get(&w2).unwrap().clone());
    (loss, dw1, dw2)
}

fn second_order_gradients_through_max_pools_match_torch() {
    let f = golden("max_pool.safetensors");
    let (loss, dw1, dw2) = sum_j2(&f, max_pool2d, &f["dbp.w1"]);
    assert_close("sum J^2", &loss.reshape(1).unwrap(), &f["dbp.loss"], 1e-10);
    assert_close("d sum(J^2) / d w1", &dw1, &f["dbp.dw1"], 1e-10);
    assert_close("d sum(J^2) / d w2", &dw2, &f["dbp.dw2"], 1e-10);
}

/// On the second-order thread the parallel pool (the path a GPU takes) gives the flat one's
/// second-order gradients.
fn the_parallel_pools_second_order_gradients_are_the_flat_ones() {
    let f = golden("max_pool.safetensors");
    let values = |(loss, dw1, dw2): (Tensor, Tensor, Tensor)| {
        [loss, dw1, dw2].map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
    };
    let ours = values(sum_j2(&f, device_pool, &f["dbp.w1"]));
    let flat = values(sum_j2(&f, max_pool2d_flat, &f["dbp.w1"]));
    for (a, b) in ours.iter().zip(&flat) {
        assert!(a.iter().zip(b).all(|(p, q)| (p - q).abs() <= 1e-12 * q.abs().max(1.0)));
    }
}

/// The second-order gradient through the GPU's pool path is the finite difference of the
/// first-order quantity it differentiates: `d sum(J^2) / d w1` along a direction, in f64.
fn the_gpu_pools_second_order_gradient_is_its_finite_difference() {
    let f = golden("max_pool.safetensors");
    let scalar = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>();
    let w1 = f["dbp.w1"].clone();
    let direction = w1.ones_like().unwrap().affine(1e-3, 0.0).unwrap(); // a small, even push
    let (_, grad, _) = sum_j2(&f, device_pool, &w1);
    let analytic = scalar(&(grad * &direction).unwrap().sum_all().unwrap()).unwrap();
    let h = 1e-3;
    let step = direction.affine(h, 0.0).unwrap();
    let (up, _, _) = sum_j2(&f, device_pool, &(&w1 + &step).unwrap());
    let (down, _, _) = sum_j2(&f, device_pool, &(&w1 - &step).unwrap());
    let numeric = (scalar(&up).unwrap() - scalar(&down).unwrap()) / (2.0 * h);
    assert!(
        (numeric - analytic).abs() <= 1e-4 * analytic.abs().max(1e-12),
        "finite difference {numeric} against {analytic}"
    );
}

fn main() -> std::process::ExitCode {
    at_kernels::second_order::run_tests(&[
        ("second_order_gradients_through_max_pools_match_torch", |so| {
            so.run(second_order_gradients_through_max_pools_match_torch)
        }),
        ("the_gpu_pools_second_order_gradient_is_its_finite_difference", |so| {
            so.run(the_gpu_pools_second_order_gradient_is_its_finite_difference)
        }),
        ("the_parallel_pools_second_order_gradients_are_the_flat_ones", |so| {
            so.run(the_parallel_pools_second_order_gradients_are_the_flat_ones)
        }),
    ])
}
