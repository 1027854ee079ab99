//! The losses against PyTorch (`golden/make_golden.py`): values and gradients with respect to the
//! student's logits and groups, to 1e-5 relative (`max|ours - ref| / max|ref|`).

use std::collections::HashMap;
use std::path::PathBuf;

use at_losses::{LossConfig, cross_entropy, distillation, student_loss};
use candle_core::{DType, Device, Tensor, Var};

fn fixtures() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/losses.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let ours = ours.to_dtype(DType::F64).unwrap().reshape(reference.shape()).unwrap();
    let diff =
        (&ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(diff <= 1e-5 * scale, "{what}: relative error {:e}", diff / scale);
}

#[test]
fn cross_entropy_matches_torch() {
    let f = fixtures();
    let s = Var::from_tensor(&f["student"]).unwrap();
    let loss = cross_entropy(&s, &f["labels"]).unwrap();
    assert_close("ce", &loss, &f["ce.loss"]);
    assert_close("d ce / d logits", loss.backward().unwrap().get(&s).unwrap(), &f["ce.grad"]);
}

#[test]
fn distillation_is_batchmean_kl_times_t_squared_as_torch() {
    let f = fixtures();
    for t in [1, 4] {
        let s = Var::from_tensor(&f["student"]).unwrap();
        let loss = distillation(&s, &f["teacher"], t as f64).unwrap();
        assert_close(&format!("kd T={t}"), &loss, &f[&format!("kd_t{t}.loss")]);
        let grad = loss.backward().unwrap().get(&s).unwrap().clone();
        assert_close(&format!("d kd / d logits, T={t}"), &grad, &f[&format!("kd_t{t}.grad")]);
    }
}

#[test]
fn the_total_of_ce_kd_and_two_at_pairs_matches_torch() {
    let f = fixtures();
    let s = Var::from_tensor(&f["student"]).unwrap();
    let groups: Vec<Var> =
        (0..2).map(|i| Var::from_tensor(&f[&format!("student_group{i}")]).unwrap()).collect();
    let group_tensors: Vec<Tensor> = groups.iter().map(|g| g.as_tensor().clone()).collect();
    let teacher_groups: Vec<Tensor> =
        (0..2).map(|i| f[&format!("teacher_group{i}")].clone()).collect();
    let config = LossConfig {
        alpha: 0.9,
        temperature: 4.0,
        beta: 1e3,
        pairs: vec![(0, 0), (1, 1)],
        ..LossConfig::default()
    };
    let parts = student_loss(
        &s,
        &f["labels"],
        &group_tensors,
        Some((&f["teacher"], &teacher_groups)),
        &config,
    )
    .unwrap();
    assert_eq!(parts.at.len(), 2);
    assert!(parts.kd.is_some());
    assert_close("total", &parts.total, &f["total.loss"]);
    let grads = parts.total.backward().unwrap();
    assert_close("d total / d logits", grads.get(&s).unwrap(), &f["total.grad_logits"]);
    for (i, g) in groups.iter().enumerate() {
        assert_close(
            &format!("d total / d group{i}"),
            grads.get(g).unwrap(),
            &f[&format!("total.grad_group{i}")],
        );
    }
}

#[test]
fn without_alpha_and_beta_the_loss_is_cross_entropy_and_needs_no_teacher() {
    let f = fixtures();
    let parts =
        student_loss(&f["student"], &f["labels"], &[], None, &LossConfig::default()).unwrap();
    assert_close("plain ce", &parts.total, &f["ce.loss"]);
    assert!(parts.kd.is_none() && parts.at.is_empty());
}

#[test]
fn bad_configurations_are_errors() {
    let f = fixtures();
    let kd = LossConfig { alpha: 0.5, ..LossConfig::default() };
    let err = student_loss(&f["student"], &f["labels"], &[], None, &kd).unwrap_err().to_string();
    assert!(err.contains("needs a teacher"), "{err}");
    let groups = [f["student_group0"].clone()];
    let at = LossConfig { beta: 1e3, pairs: vec![(0, 3)], ..LossConfig::default() };
    let teacher = Some((&f["teacher"], &groups[..]));
    let err =
        student_loss(&f["student"], &f["labels"], &groups, teacher, &at).unwrap_err().to_string();
    assert!(err.contains("pair (0, 3) is out of range"), "{err}");
    let err = distillation(&f["student"], &f["teacher"].narrow(1, 0, 5).unwrap(), 4.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[8, 10]") && err.contains("[8, 5]"), "{err}");
}
