//! Double backpropagation through the max pool, against PyTorch's
//! `autograd.grad(..., create_graph=True)`.
//!
//! candle builds a differentiable gradient graph only when `CANDLE_GRAD_DO_NOT_DETACH` is set, and
//! reads it once per thread: this binary holds this single test, which sets it before its first
//! backward pass.

mod common;

use at_models::max_pool2d;
use candle_core::Var;
use common::{assert_close, golden};

#[test]
fn second_order_gradients_through_max_pools_match_torch() {
    // SAFETY: the only test of this binary sets the variable before any thread reads it.
    unsafe { std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1") };
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
