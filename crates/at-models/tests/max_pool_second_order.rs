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

fn main() -> std::process::ExitCode {
    at_kernels::second_order::run_tests(&[(
        "second_order_gradients_through_max_pools_match_torch",
        |so| so.run(second_order_gradients_through_max_pools_match_torch),
    )])
}
