//! The gradient-based losses against PyTorch's `autograd.grad(..., create_graph=True)`: the
//! penalties and their derivatives with respect to every weight of a small conv net without batch
//! norm (conv, ReLU, 3x3/2 max pool, conv, ReLU, mean, linear), in f64, to 1e-4 relative
//! (`golden/gradient.safetensors`, written by `golden/make_golden.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use at_losses::distillation;
use at_losses::gradient::{
    GradientConfig, GradientLoss, GradientPenalty, TeacherBatch, gradient_student_loss,
    gradient_transfer, jacobian_norm, symmetry_norm, teacher_jacobian, teacher_outputs,
};
use at_losses::second_order::SecondOrder;
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

/// Where the final `backward` (through the graph of the first one) runs.
#[derive(Clone, Copy, PartialEq)]
enum SecondBackward {
    /// On the second-order thread, where it also builds a graph of its own.
    Inside,
    /// On the caller's first-order thread, as the trainer does: nothing is lost.
    Outside,
}

fn rel(ours: &Tensor, reference: &Tensor) -> f64 {
    let diff = (ours.reshape(reference.shape()).unwrap() - reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / reference.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

fn check(
    so: &SecondOrder,
    name: &str,
    second: SecondBackward,
    loss: impl Fn(&dyn Fn(&Tensor) -> Result<Tensor>, &Tensor, &Tensor) -> Result<GradientLoss>
    + Send
    + Sync,
) {
    let f = fixtures();
    let f = &f;
    let loss = &loss;
    let vars: Vec<Var> =
        NAMES.iter().map(|n| Var::from_tensor(&f[&format!("w.{n}")]).unwrap()).collect();
    let vars = &vars;
    let differentiate = |penalty: &Tensor| {
        let grads = penalty.backward().unwrap();
        NAMES
            .iter()
            .zip(vars)
            .map(|(n, v)| {
                grads
                    .get(v)
                    .unwrap_or_else(|| panic!("{name}: no second-order gradient for {n}"))
                    .clone()
            })
            .collect::<Vec<_>>()
    };
    let (penalty, inside) = so.run(move || {
        let params: HashMap<&str, Tensor> =
            NAMES.iter().zip(vars).map(|(n, v)| (*n, v.as_tensor().clone())).collect();
        let forward = |x: &Tensor| net(&params, x);
        let parts = loss(&forward, &f["x"], &f["y"]).unwrap();
        let grads = (second == SecondBackward::Inside).then(|| differentiate(&parts.penalty));
        (parts.penalty, grads)
    });
    let err = rel(&penalty, &f[&format!("{name}.penalty")]);
    assert!(err < 1e-4, "{name}: penalty relative error {err:e}");
    let grads = inside.unwrap_or_else(|| differentiate(&penalty));
    for (n, g) in NAMES.iter().zip(&grads) {
        let err = rel(g, &f[&format!("{name}.d{n}")]);
        assert!(err < 1e-4, "{name}: d penalty / d {n} relative error {err:e}");
    }
}

fn input_gradient_norm_matches_torch_double_backprop(so: &SecondOrder) {
    check(so, "jacobian", SecondBackward::Inside, |s, x, y| jacobian_norm(s, x, y));
}

fn symmetry_norm_matches_torch_double_backprop(so: &SecondOrder) {
    check(so, "symmetry", SecondBackward::Inside, |s, x, y| symmetry_norm(s, x, y));
}

fn gradient_attention_transfer_matches_torch_double_backprop(so: &SecondOrder) {
    let f = fixtures();
    let teacher: HashMap<&str, Tensor> =
        NAMES.iter().map(|n| (*n, f[&format!("teacher.{n}")].clone())).collect();
    let j_t = teacher_jacobian(&|x| net(&teacher, x), &f["x"], &f["y"]).unwrap();
    check(so, "transfer", SecondBackward::Inside, move |s, x, y| gradient_transfer(s, x, y, &j_t));
}

/// The trainer builds the loss on a second-order thread and calls `backward` on its own:
/// the gradients through the first backward's graph are the same.
fn second_backward_on_a_first_order_thread_matches_torch(so: &SecondOrder) {
    check(so, "jacobian", SecondBackward::Outside, |s, x, y| jacobian_norm(s, x, y));
    check(so, "symmetry", SecondBackward::Outside, |s, x, y| symmetry_norm(s, x, y));
}

fn outside_the_scope_the_losses_refuse_to_run(_: &SecondOrder) {
    let f = fixtures();
    let params: HashMap<&str, Tensor> =
        NAMES.iter().map(|n| (*n, f[&format!("w.{n}")].clone())).collect();
    let err = jacobian_norm(&|x| net(&params, x), &f["x"], &f["y"]).unwrap_err().to_string();
    assert!(
        err.contains("needs second-order gradients") && err.contains("SecondOrder::run"),
        "{err}"
    );
}

/// `(1 - alpha) CE + alpha KD + beta * penalty`, with the teacher's logits and input gradient;
/// without a teacher, transfer and distillation are refused.
fn gradient_student_loss_combines_penalty_and_distillation(so: &SecondOrder) {
    let f = fixtures();
    let teacher: HashMap<&str, Tensor> =
        NAMES.iter().map(|n| (*n, f[&format!("teacher.{n}")].clone())).collect();
    let (t_logits, t_jacobian) = teacher_outputs(&|x| net(&teacher, x), &f["x"], &f["y"]).unwrap();
    let config = GradientConfig {
        penalty: GradientPenalty::Transfer,
        beta: 7.0,
        alpha: 0.25,
        temperature: 3.0,
    };
    let f = &f;
    let (parts, err) = so.run(|| {
        let params: HashMap<&str, Tensor> = NAMES
            .iter()
            .map(|n| (*n, Var::from_tensor(&f[&format!("w.{n}")]).unwrap().as_tensor().clone()))
            .collect();
        let forward = |x: &Tensor| net(&params, x);
        let teacher = TeacherBatch { logits: &t_logits, jacobian: &t_jacobian };
        let parts = gradient_student_loss(
            &forward,
            &f["x"],
            &f["y"],
            Some(teacher),
            &config,
            f["x"].dim(0).unwrap(),
        )
        .unwrap();
        let err = gradient_student_loss(
            &forward,
            &f["x"],
            &f["y"],
            None,
            &config,
            f["x"].dim(0).unwrap(),
        )
        .unwrap_err();
        (parts, err.to_string())
    });
    assert!(err.contains("needs a teacher"), "{err}");
    let value = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
    let kd = distillation(&parts.logits, &t_logits, 3.0).unwrap();
    assert!((value(parts.kd.as_ref().unwrap()) - value(&kd)).abs() < 1e-12);
    let expected =
        0.75 * value(&parts.ce) + 0.25 * value(&kd) + 7.0 * value(parts.gradient.as_ref().unwrap());
    assert!((value(&parts.total) - expected).abs() < 1e-9, "{} vs {expected}", value(&parts.total));
    let penalty = value(parts.gradient.as_ref().unwrap());
    let reference = value(&f["transfer.penalty"]);
    assert!((penalty - reference).abs() <= 1e-4 * reference.abs(), "{penalty} vs {reference}");
}

/// Without batch norm the samples do not interact: the loss of a batch split in chunks, each
/// scaled by its share, adds up to the whole batch's, and so do the second-order gradients.
fn chunked_batches_add_up_to_the_whole_batch(so: &SecondOrder) {
    let f = fixtures();
    let teacher: HashMap<&str, Tensor> =
        NAMES.iter().map(|n| (*n, f[&format!("teacher.{n}")].clone())).collect();
    let (t_logits, t_jacobian) = teacher_outputs(&|x| net(&teacher, x), &f["x"], &f["y"]).unwrap();
    let batch = f["x"].dim(0).unwrap();
    assert!(batch >= 2, "the fixture has {batch} images");
    let f = &f;
    for penalty in [GradientPenalty::Jacobian, GradientPenalty::Symmetry, GradientPenalty::Transfer]
    {
        let config = GradientConfig { penalty, beta: 3.0, alpha: 0.5, temperature: 2.0 };
        let vars: Vec<Var> =
            NAMES.iter().map(|n| Var::from_tensor(&f[&format!("w.{n}")]).unwrap()).collect();
        let vars = &vars;
        let (t_logits, t_jacobian) = (&t_logits, &t_jacobian);
        let totals = so.run(move || {
            let params: HashMap<&str, Tensor> =
                NAMES.iter().zip(vars).map(|(n, v)| (*n, v.as_tensor().clone())).collect();
            let forward = |x: &Tensor| net(&params, x);
            let part = |start: usize, len: usize| {
                let logits = t_logits.narrow(0, start, len).unwrap();
                let jacobian = t_jacobian.narrow(0, start, len).unwrap();
                let teacher = TeacherBatch { logits: &logits, jacobian: &jacobian };
                gradient_student_loss(
                    &forward,
                    &f["x"].narrow(0, start, len).unwrap(),
                    &f["y"].narrow(0, start, len).unwrap(),
                    Some(teacher),
                    &config,
                    batch,
                )
                .unwrap()
                .total
            };
            let half = batch / 2;
            (part(0, batch), part(0, half), part(half, batch - half))
        });
        let whole = totals.0.backward().unwrap();
        let mut chunks = totals.1.backward().unwrap();
        chunks.extend(totals.2.backward().unwrap()).unwrap();
        let value = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        let sum = value(&totals.1) + value(&totals.2);
        assert!((value(&totals.0) - sum).abs() < 1e-10 * sum.abs(), "{penalty:?}: totals");
        for (n, v) in NAMES.iter().zip(vars) {
            let err = rel(chunks.get(v).unwrap(), whole.get(v).unwrap());
            assert!(err < 1e-10, "{penalty:?}: d/d{n} relative error {err:e}");
        }
    }
}

fn main() -> std::process::ExitCode {
    at_losses::second_order::run_tests(&[
        (
            "input_gradient_norm_matches_torch_double_backprop",
            input_gradient_norm_matches_torch_double_backprop,
        ),
        (
            "symmetry_norm_matches_torch_double_backprop",
            symmetry_norm_matches_torch_double_backprop,
        ),
        (
            "gradient_attention_transfer_matches_torch_double_backprop",
            gradient_attention_transfer_matches_torch_double_backprop,
        ),
        (
            "second_backward_on_a_first_order_thread_matches_torch",
            second_backward_on_a_first_order_thread_matches_torch,
        ),
        ("outside_the_scope_the_losses_refuse_to_run", outside_the_scope_the_losses_refuse_to_run),
        (
            "gradient_student_loss_combines_penalty_and_distillation",
            gradient_student_loss_combines_penalty_and_distillation,
        ),
        ("chunked_batches_add_up_to_the_whole_batch", chunked_batches_add_up_to_the_whole_batch),
    ])
}
