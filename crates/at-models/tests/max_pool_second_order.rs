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

fn main() -> std::process::ExitCode {
    at_kernels::second_order::run_tests(&[
        ("second_order_gradients_through_max_pools_match_torch", |so| {
            so.run(second_order_gradients_through_max_pools_match_torch)
        }),
        ("the_parallel_pools_second_order_gradients_are_the_flat_ones", |so| {
            so.run(the_parallel_pools_second_order_gradients_are_the_flat_ones)
        }),
    ])
}
