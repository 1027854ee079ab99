//! `at-train check-device`: one training step on the CPU (at-kernels) and on a device, from the
//! same weights and the same batch, compared: the loss, every parameter's gradient, the
//! batch-norm running statistics after the step and the logits in evaluation mode. What a GPU
//! session runs first, so that a device whose numbers are wrong is found in seconds, not after
//! an hour of training (`xtask/bench/gpu_smoke.sh`). With `cpu` as the device the other side is
//! the op mix a GPU runs ([`Backend::Device`]) executed on the CPU, which is how the tests check
//! that mix on every CPU.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use at_losses::LossConfig;
use at_losses::gradient::{GradientConfig, GradientPenalty};
use at_losses::second_order::SecondOrder;
use at_models::{AttentionModel, Backend, ModelOptions};
use at_ops::AtConfig;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

use crate::bench::{at_backend, seeded_teacher};
use crate::init::seeded_var_builder;
use crate::train::{gradient_step, student_loss};

/// What a checked step trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CheckedStep {
    /// Cross-entropy alone.
    Student,
    /// Attention transfer on every group and distillation, from a teacher (beta 1e3, alpha 0.9).
    AtKd,
    /// A gradient-based penalty (double backpropagation on the second-order thread).
    Gradient(GradientPenalty),
}

/// One checked step: the networks, what the step trains, and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Check {
    /// The student.
    pub student: &'static str,
    /// Its teacher, for the steps that need one.
    pub teacher: Option<&'static str>,
    /// What the step trains.
    pub step: CheckedStep,
    /// Fine-tuning's frozen batch norm and first group (ResNets).
    pub frozen: bool,
}

impl Check {
    const fn new(student: &'static str, teacher: Option<&'static str>, step: CheckedStep) -> Self {
        Self { student, teacher, step, frozen: false }
    }
}

/// The checks `check-device` runs: a WRN-16-1 step, an AT+KD step from a WRN-16-2, and NIN's
/// gradient attention transfer (Table 3's second-order step, through max pooling).
pub const CHECKS: [Check; 3] = [
    Check::new("wrn-16-1", None, CheckedStep::Student),
    Check::new("wrn-16-1", Some("wrn-16-2"), CheckedStep::AtKd),
    Check::new(
        "nin-thin-nobn",
        Some("nin-wide-nobn"),
        CheckedStep::Gradient(GradientPenalty::Transfer),
    ),
];

/// How far the two sides may differ, relative: a value (the loss, the running statistics, the
/// evaluation logits) and a gradient, each tensor's `||a - b|| / ||a||`.
///
/// Measured on the CPU (2026-12-06): the op mix of a device against the kernels agrees to 1e-5
/// on values; gradients differ by up to 4e-3 at batch 32, because candle's own f32 ops (batch
/// norm's reductions over the batch) are that sensitive to the order of a sum: the same candle
/// ops on the same 32 images in reverse order differ by 7.5e-3, where the kernels (f64 merges)
/// differ by 3e-7; and a max-pool or ReLU near-tie that rounding flips sends a gradient
/// elsewhere (NIN's second-order step, 2e-3). cuDNN may also run f32 convolutions in TF32 on
/// recent GPUs. Hence the defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// For values.
    pub value: f64,
    /// For gradients.
    pub gradient: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self { value: 1e-3, gradient: 5e-2 }
    }
}

/// The two sides of one checked step.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceCheck {
    /// `student`, `student <- teacher` and the step.
    pub name: String,
    /// The loss on the CPU and on the device.
    pub loss: (f64, f64),
    /// The largest difference of a gradient, `||a - b|| / ||a||` of a tensor, and the
    /// parameter it is in.
    pub gradient: (f64, String),
    /// The same for the running statistics after the step (`0` for networks without batch norm).
    pub running_stats: (f64, String),
    /// The same for the logits of the images in evaluation mode, after the step.
    pub eval_logits: f64,
    /// Parameters compared.
    pub parameters: usize,
    /// Seconds of the step on the CPU and on the device (the first step: it includes the
    /// device's warm-up).
    pub seconds: (f64, f64),
}

impl DeviceCheck {
    /// The loss's difference relative to its value on the CPU.
    pub fn loss_difference(&self) -> f64 {
        (self.loss.0 - self.loss.1).abs() / self.loss.0.abs().max(1e-12)
    }

    /// Whether every difference is within `tolerance`.
    pub fn agrees(&self, tolerance: Tolerance) -> bool {
        self.loss_difference() <= tolerance.value
            && self.running_stats.0 <= tolerance.value
            && self.eval_logits <= tolerance.value
            && self.gradient.0 <= tolerance.gradient
    }

    /// One JSON line.
    pub fn json(&self, device: &str) -> String {
        serde_json::json!({
            "check": self.name,
            "device": device,
            "loss_cpu": self.loss.0,
            "loss_device": self.loss.1,
            "loss_rel_diff": self.loss_difference(),
            "grad_rel_diff": self.gradient.0,
            "worst_grad": self.gradient.1,
            "stats_rel_diff": self.running_stats.0,
            "worst_stat": self.running_stats.1,
            "eval_logits_rel_diff": self.eval_logits,
            "parameters": self.parameters,
            "seconds_cpu": self.seconds.0,
            "seconds_device": self.seconds.1,
        })
        .to_string()
    }
}

/// What one side measured: the loss, each parameter's gradient and each running statistic
/// after the step (by name, on the host), and the seconds the step took.
struct Side {
    loss: f64,
    gradients: BTreeMap<String, Vec<f32>>,
    stats: BTreeMap<String, Vec<f32>>,
    eval_logits: Vec<f32>,
    seconds: f64,
}

/// The other side `check-device` compares the CPU's kernels with on `device`: the device
/// itself with the kernels' backend (which off the CPU is the device mix), or on the CPU the
/// device mix.
pub fn other_side(device: &Device) -> (Device, Backend) {
    match device {
        Device::Cpu => (Device::Cpu, Backend::Device),
        other => (other.clone(), Backend::Kernels),
    }
}

/// Runs `check`'s step on a batch of `batch` random 32x32 images on the CPU with at-kernels and
/// on `other` (a device and the backend its models run), and compares them. A gradient-based
/// step needs `second_order`.
pub fn check_step(
    check: Check,
    batch: usize,
    other: &(Device, Backend),
    second_order: Option<&SecondOrder>,
) -> Result<DeviceCheck> {
    let cpu = one_side(check, batch, &(Device::Cpu, Backend::Kernels), second_order)?;
    let dev = one_side(check, batch, other, second_order)?;
    let Check { student, teacher, step, frozen } = check;
    let frozen = if frozen { " frozen" } else { "" };
    let name = match teacher {
        Some(t) if step != CheckedStep::Student => format!("{student}{frozen} <- {t} {step:?}"),
        _ => format!("{student}{frozen} {step:?}"),
    };
    Ok(DeviceCheck {
        name,
        loss: (cpu.loss, dev.loss),
        gradient: worst(&cpu.gradients, &dev.gradients)?,
        running_stats: worst(&cpu.stats, &dev.stats)?,
        eval_logits: relative_difference(&cpu.eval_logits, &dev.eval_logits),
        parameters: cpu.gradients.len(),
        seconds: (cpu.seconds, dev.seconds),
    })
}

/// Seconds of a max pool's forward and backward (3x3, stride 2, padding 1, as NIN's and the
/// ResNets') on a `[batch, 192, 32, 32]` activation on `device` as `backend` runs it, first
/// order, read back to the host; the median of 5 after one untimed.
pub fn time_pool_backward(batch: usize, (device, backend): &(Device, Backend)) -> Result<f64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let n = batch * 192 * 32 * 32;
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let x = candle_core::Var::from_vec(values, (batch, 192, 32, 32), device)?;
    let mut times = vec![];
    for _ in 0..6 {
        let started = Instant::now();
        let y = at_models::max_pool2d_on(x.as_tensor(), (3, 2, 1), *backend)?;
        let grads = y.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).context("the pool passes a gradient")?;
        g.flatten_all()?.narrow(0, 0, 1)?.to_vec1::<f32>()?;
        times.push(started.elapsed().as_secs_f64());
    }
    let mut timed = times.split_off(1);
    timed.sort_by(f64::total_cmp);
    Ok(timed[timed.len() / 2])
}

/// `||x - y|| / ||x||`, infinite where `y` is not finite.
fn relative_difference(x: &[f32], y: &[f32]) -> f64 {
    if y.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let norm = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
    let diff = x.iter().zip(y).map(|(p, q)| (*p as f64 - *q as f64).powi(2)).sum::<f64>();
    diff.sqrt() / norm
}

/// The largest relative difference `||a - b|| / ||a||` over the tensors of `a` and `b` (matched
/// by name), and where; infinite where `b` is not finite.
fn worst(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> Result<(f64, String)> {
    let mut worst = (0.0, String::new());
    for (name, x) in a {
        let y = b.get(name).with_context(|| format!("{name} is missing on the device"))?;
        let diff = relative_difference(x, y);
        if diff > worst.0 || worst.1.is_empty() {
            worst = (diff, name.clone());
        }
    }
    Ok(worst)
}

fn one_side(
    check: Check,
    batch: usize,
    (device, backend): &(Device, Backend),
    second_order: Option<&SecondOrder>,
) -> Result<Side> {
    let Check { student: student_name, teacher: teacher_name, step, frozen } = check;
    let options = ModelOptions { backend: *backend, ..ModelOptions::default() };
    let student_options = ModelOptions { freeze_bn: frozen, freeze_first_group: frozen, ..options };
    let varmap = VarMap::new();
    let student =
        at_models::build(student_name, &student_options, seeded_var_builder(&varmap, 1, device))?;
    let teacher: Option<Box<dyn AttentionModel>> =
        teacher_name.map(|name| seeded_teacher(name, &options, 2, device)).transpose()?;
    // The same images on both sides: drawn on the host from a fixed seed.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let values: Vec<f32> = (0..batch * 3 * 32 * 32).map(|_| rng.random_range(-2.0..2.0)).collect();
    let x = Tensor::from_vec(values, (batch, 3, 32, 32), device)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let labels = Tensor::from_vec(labels, batch, device)?;
    let started = Instant::now();
    let (loss, grads): (Tensor, GradStore) = match step {
        CheckedStep::Gradient(penalty) => {
            let second_order = second_order.context("a gradient-based step needs SecondOrder")?;
            let config = GradientConfig { penalty, beta: 1e3, alpha: 0.0, temperature: 4.0 };
            let (parts, grads) = gradient_step(
                student.as_ref(),
                teacher.as_deref(),
                (&x, &labels),
                &config,
                1,
                second_order,
            )?;
            (parts.total, grads)
        }
        CheckedStep::Student | CheckedStep::AtKd => {
            let with_teacher = step == CheckedStep::AtKd;
            let loss = LossConfig {
                alpha: if with_teacher { 0.9 } else { 0.0 },
                beta: if with_teacher { 1e3 } else { 0.0 },
                at: AtConfig { backend: at_backend(*backend), ..AtConfig::default() },
                pairs: if with_teacher { vec![(0, 0), (1, 1), (2, 2)] } else { vec![] },
                ..LossConfig::default()
            };
            let teacher = teacher.as_deref().filter(|_| with_teacher);
            let parts = student_loss(student.as_ref(), teacher, (&x, &labels), &loss, None)?;
            let grads = parts.total.backward()?;
            (parts.total, grads)
        }
    };
    let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let seconds = started.elapsed().as_secs_f64();
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    };
    let (mut gradients, mut stats) = (BTreeMap::new(), BTreeMap::new());
    for (name, var) in varmap.data().lock().expect("the student's weights").iter() {
        if at_models::is_buffer(name) {
            stats.insert(name.clone(), host(var.as_tensor())?);
        } else if let Some(g) = grads.get(var.as_tensor()) {
            gradients.insert(name.clone(), host(g)?);
        }
    }
    let eval_logits = host(&student.forward_t(&x, false)?.logits)?;
    Ok(Side { loss, gradients, stats, eval_logits, seconds })
}

#[cfg(test)]
mod tests {
    use candle_nn::VarBuilder;

    use super::*;

    /// The comparison finds the tensor that differs, relative to its own scale, and calls a
    /// non-finite value on the device infinitely far off.
    #[test]
    fn the_worst_difference_is_found_relative_to_its_tensor() {
        let a = BTreeMap::from([
            ("big".to_owned(), vec![100.0f32, -200.0]),
            ("small".to_owned(), vec![0.01f32, 0.02]),
        ]);
        let mut b = a.clone();
        b.get_mut("big").unwrap()[0] = 101.0; // 1 against a norm of 223.6
        b.get_mut("small").unwrap()[1] = 0.021; // 0.001 against a norm of 0.02236
        let (diff, name) = worst(&a, &b).unwrap();
        assert_eq!(name, "small");
        assert!((diff - 0.001 / 0.0005f64.sqrt()).abs() < 1e-5, "{diff}");
        b.get_mut("big").unwrap()[1] = f32::NAN;
        assert_eq!(worst(&a, &b).unwrap(), (f64::INFINITY, "big".to_owned()));
        b.remove("small");
        assert!(worst(&a, &b).unwrap_err().to_string().contains("small is missing"));
    }

    /// On the CPU against itself every number agrees exactly, and every parameter of the network
    /// and every running statistic is compared.
    #[test]
    fn a_step_checked_against_itself_agrees_exactly_over_every_parameter() {
        let check = check_step(CHECKS[1], 4, &(Device::Cpu, Backend::Kernels), None).unwrap();
        assert!(check.agrees(Tolerance { value: 0.0, gradient: 0.0 }), "{check:?}");
        assert_eq!(check.name, "wrn-16-1 <- wrn-16-2 AtKd");
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        at_models::build("wrn-16-1", &ModelOptions::default(), vb).unwrap();
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        let parameters = names.iter().filter(|n| !at_models::is_buffer(n)).count();
        assert_eq!(check.parameters, parameters);
        assert!(
            check.running_stats.1.ends_with("running_mean")
                || check.running_stats.1.ends_with("running_var")
        );
        let json: serde_json::Value = serde_json::from_str(&check.json("cpu")).unwrap();
        assert_eq!(json["grad_rel_diff"], 0.0);
    }
}
