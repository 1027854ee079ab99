//! The gradient-based losses against PyTorch's `autograd.grad(..., create_graph=True)`: the
//! penalties and their derivatives with respect to every weight of a small conv net without batch
//! norm (conv, ReLU, 3x3/2 max pool, conv, ReLU, mean, linear), in f64, to 1e-4 relative
//! (`golden/gradient.safetensors`, written by `golden/make_golden.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use at_losses::gradient::{
    GradientLoss, gradient_transfer, jacobian_norm, symmetry_norm, teacher_jacobian,
};
use at_losses::second_order::with_second_order;
use at_models::max_pool2d;
use candle_core::{Device, Result, Tensor, Var};

fn fixtures() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gradient.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

const NAMES: [&str; 5] = ["w1", "b1", "w2", "b2", "fc"];

fn net(p: &HashMap<&str, Tensor>, x: &Tensor) -> Result<Tensor> {
    let conv = |x: &Tensor, w: &str, b: &str| -> Result<Tensor> {
        x.conv2d(&p[w], 1, 1, 1, 1)?.broadcast_add(&p[b].reshape((1, (), 1, 1))?)?.relu()
    };
    let h = max_pool2d(&conv(x, "w1", "b1")?, 3, 2, 1)?;
    conv(&h, "w2", "b2")?.mean((2, 3))?.matmul(&p["fc"].t()?)
}

fn check(
    name: &str,
    loss: impl Fn(&dyn Fn(&Tensor) -> Result<Tensor>, &Tensor, &Tensor) -> Result<GradientLoss>
    + Send
    + Sync,
) {
    let f = fixtures();
    let f = &f;
    let loss = &loss;
    with_second_order(move || {
        let vars: Vec<Var> =
            NAMES.iter().map(|n| Var::from_tensor(&f[&format!("w.{n}")]).unwrap()).collect();
        let params: HashMap<&str, Tensor> =
            NAMES.iter().zip(&vars).map(|(n, v)| (*n, v.as_tensor().clone())).collect();
        let forward = |x: &Tensor| net(&params, x);
        let parts = loss(&forward, &f["x"], &f["y"]).unwrap();
        let rel = |ours: &Tensor, reference: &Tensor| -> f64 {
            let diff = (ours.reshape(reference.shape()).unwrap() - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            diff / reference.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let err = rel(&parts.penalty, &f[&format!("{name}.penalty")]);
        assert!(err < 1e-4, "{name}: penalty relative error {err:e}");
        let grads = parts.penalty.backward().unwrap();
        for (n, v) in NAMES.iter().zip(&vars) {
            let g =
                grads.get(v).unwrap_or_else(|| panic!("{name}: no second-order gradient for {n}"));
            let err = rel(g, &f[&format!("{name}.d{n}")]);
            assert!(err < 1e-4, "{name}: d penalty / d {n} relative error {err:e}");
        }
    });
}

#[test]
fn input_gradient_norm_matches_torch_double_backprop() {
    check("jacobian", |s, x, y| jacobian_norm(s, x, y));
}

#[test]
fn symmetry_norm_matches_torch_double_backprop() {
    check("symmetry", |s, x, y| symmetry_norm(s, x, y));
}

#[test]
fn gradient_attention_transfer_matches_torch_double_backprop() {
    let f = fixtures();
    let teacher: HashMap<&str, Tensor> =
        NAMES.iter().map(|n| (*n, f[&format!("teacher.{n}")].clone())).collect();
    let j_t = teacher_jacobian(&|x| net(&teacher, x), &f["x"], &f["y"]).unwrap();
    check("transfer", move |s, x, y| gradient_transfer(s, x, y, &j_t));
}

#[test]
fn outside_the_scope_the_losses_refuse_to_run() {
    let f = fixtures();
    let params: HashMap<&str, Tensor> =
        NAMES.iter().map(|n| (*n, f[&format!("w.{n}")].clone())).collect();
    let err = jacobian_norm(&|x| net(&params, x), &f["x"], &f["y"]).unwrap_err().to_string();
    assert!(
        err.contains("needs second-order gradients") && err.contains("with_second_order"),
        "{err}"
    );
}
