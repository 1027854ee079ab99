//! Double backpropagation through the max pool, against PyTorch's
//! `autograd.grad(..., create_graph=True)`.
//!
//! Second-order gradients need the process's second-order thread, which must start before any
//! other thread: this binary runs without libtest's harness, and its `main` starts it.

mod common;

use at_models::max_pool2d;
use candle_core::Var;
use common::{assert_close, golden};

fn second_order_gradients_through_max_pools_match_torch() {
    let f = golden("max_pool.safetensors");
    let x = Var::from_tensor(&f["dbp.x"]).unwrap();
    let w1 = Var::from_tensor(&f["dbp.w1"]).unwrap();
    let w2 = Var::from_tensor(&f["dbp.w2"]).unwrap();

    let h = max_pool2d(&x.conv2d(&w1, 1, 1, 1, 1).unwrap().relu().unwrap(), 3, 2, 1).unwrap();
    let y = max_pool2d(&h.conv2d(&w2, 1, 1, 1, 1).unwrap(), 2, 2, 0).unwrap();
    let first = (y * &f["dbp.g"]).unwrap().sum_all().unwrap().backward().unwrap();
    let jacobian = first.get(&x).unwrap();
    let loss = jacobian.sqr().unwrap().sum_all().unwrap();
    assert_close("sum J^2", &loss.reshape(1).unwrap(), &f["dbp.loss"], 1e-10);

    let second = loss.backward().unwrap();
    assert_close("d sum(J^2) / d w1", second.get(&w1).unwrap(), &f["dbp.dw1"], 1e-10);
    assert_close("d sum(J^2) / d w2", second.get(&w2).unwrap(), &f["dbp.dw2"], 1e-10);
}

/// On the second-order thread the parallel pool (the path a GPU takes) gives the flat one's
/// second-order gradients.
fn the_parallel_pools_second_order_gradients_are_the_flat_ones() {
    use at_models::nn::max_pool2d_flat;
    let f = golden("max_pool.safetensors");
    let run = |pool: fn(
        &candle_core::Tensor,
        usize,
        usize,
        usize,
    ) -> candle_core::Result<candle_core::Tensor>| {
        let x = Var::from_tensor(&f["dbp.x"]).unwrap();
        let w1 = Var::from_tensor(&f["dbp.w1"]).unwrap();
        let w2 = Var::from_tensor(&f["dbp.w2"]).unwrap();
        let h = pool(&x.conv2d(&w1, 1, 1, 1, 1).unwrap().relu().unwrap(), 3, 2, 1).unwrap();
        let y = pool(&h.conv2d(&w2, 1, 1, 1, 1).unwrap(), 2, 2, 0).unwrap();
        let first = (y * &f["dbp.g"]).unwrap().sum_all().unwrap().backward().unwrap();
        let loss = first.get(&x).unwrap().sqr().unwrap().sum_all().unwrap();
        let second = loss.backward().unwrap();
        let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        (v(&loss.reshape(1).unwrap()), v(second.get(&w1).unwrap()), v(second.get(&w2).unwrap()))
    };
    // The path a GPU takes (`Backend::Device`; on the CPU the flat one is kept, as faster).
    fn device_path(
        x: &candle_core::Tensor,
        k: usize,
        s: usize,
        p: usize,
    ) -> candle_core::Result<candle_core::Tensor> {
        at_models::max_pool2d_on(x, (k, s, p), at_models::Backend::Device)
    }
    let (ours, flat) = (run(device_path), run(max_pool2d_flat));
    let close = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).all(|(p, q)| (p - q).abs() <= 1e-12 * q.abs().max(1.0))
    };
    assert!(close(&ours.0, &flat.0) && close(&ours.1, &flat.1) && close(&ours.2, &flat.2));
}

/// The second-order gradient through the GPU's pool path is the finite difference of the
/// first-order quantity it differentiates: `d sum(J^2) / d w1` along a direction, in f64.
fn the_gpu_pools_second_order_gradient_is_its_finite_difference() {
    let f = golden("max_pool.safetensors");
    let pool = |t: &candle_core::Tensor, k, s, p| {
        at_models::max_pool2d_on(t, (k, s, p), at_models::Backend::Device).unwrap()
    };
    let x = Var::from_tensor(&f["dbp.x"]).unwrap();
    let w2 = f["dbp.w2"].clone();
    // `sum J^2` at `w1`, and its gradient with respect to `w1`.
    let at = |w1: &candle_core::Tensor| {
        let w1 = Var::from_tensor(w1).unwrap();
        let h = pool(&x.conv2d(&w1, 1, 1, 1, 1).unwrap().relu().unwrap(), 3, 2, 1);
        let y = pool(&h.conv2d(&w2, 1, 1, 1, 1).unwrap(), 2, 2, 0);
        let first = (y * &f["dbp.g"]).unwrap().sum_all().unwrap().backward().unwrap();
        let loss = first.get(&x).unwrap().sqr().unwrap().sum_all().unwrap();
        let grad = loss.backward().unwrap().get(&w1).unwrap().clone();
        (loss.to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>().unwrap(), grad)
    };
    let w1 = f["dbp.w1"].clone();
    let direction = w1.ones_like().unwrap().affine(1e-3, 0.0).unwrap(); // a small, even push
    let (_, grad) = at(&w1);
    let analytic = (grad * &direction).unwrap().sum_all().unwrap();
    let analytic = analytic.to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let h = 1e-3;
    let (up, _) = at(&(&w1 + direction.affine(h, 0.0).unwrap()).unwrap());
    let (down, _) = at(&(&w1 - direction.affine(h, 0.0).unwrap()).unwrap());
    let numeric = (up - down) / (2.0 * h);
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
