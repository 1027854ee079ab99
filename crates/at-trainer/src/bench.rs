//! Timing of the trainer's step on random CIFAR-shaped batches: what `at-train bench-step`, the
//! `step_bench` example and `cargo xtask bench` measure against PyTorch
//! (`xtask/bench/torch_step.py` runs the same steps).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use at_losses::{GroupMaps, LossConfig, student_loss_with_maps};
use at_models::{AttentionModel, Backend, ModelOptions};
use at_ops::{AtBackend, AtConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::init::seeded_var_builder;
use crate::optim::{Sgd, SgdConfig};

/// What one benchmark step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Cross-entropy, backward, SGD.
    Student,
    /// The teacher's forward alone (evaluation mode, no gradient).
    Teacher,
    /// Student step plus the teacher's forward and attention transfer on every group (beta 1e3).
    At,
    /// `At` plus distillation (alpha 0.9, T 4).
    AtKd,
}

impl Step {
    /// Every step.
    pub const ALL: [Step; 4] = [Step::Student, Step::Teacher, Step::At, Step::AtKd];

    /// `student`, `teacher`, `at` or `at-kd`.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "student" => Self::Student,
            "teacher" => Self::Teacher,
            "at" => Self::At,
            "at-kd" => Self::AtKd,
            other => bail!("unknown step `{other}`: student, teacher, at or at-kd"),
        })
    }

    /// The name [`Step::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Student => "student",
            Self::Teacher => "teacher",
            Self::At => "at",
            Self::AtKd => "at-kd",
        }
    }
}

/// The time of each phase of one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phases {
    /// The student's forward.
    pub forward: Duration,
    /// The teacher's forward and the loss.
    pub loss: Duration,
    /// The backward pass.
    pub backward: Duration,
    /// The optimiser.
    pub sgd: Duration,
}

/// Runs `warmup + steps` steps of `step` for `student` (and `teacher`) at `batch` on `device` and
/// returns the wall-clock time of each timed step, with its phases. The result is read back to
/// the host at the end of each step, so that asynchronous devices are timed in full. `backend`
/// chooses at-kernels' ops (what the trainer runs) or candle's own (the reference), for the
/// models and the attention maps alike.
pub fn time_steps(
    names: (&str, Step, &str),
    batch: usize,
    rounds: (usize, usize),
    backend: Backend,
    device: &Device,
) -> Result<Vec<(Duration, Phases)>> {
    time_steps_sized(names, (batch, 32), rounds, backend, device)
}

/// [`time_steps`] on `side`x`side` images (224 for the ImageNet-sized datasets).
pub fn time_steps_sized(
    (student_name, step, teacher_name): (&str, Step, &str),
    (batch, side): (usize, usize),
    (warmup, steps): (usize, usize),
    backend: Backend,
    device: &Device,
) -> Result<Vec<(Duration, Phases)>> {
    let options = ModelOptions { backend, ..ModelOptions::default() };
    let varmap = VarMap::new();
    let student = at_models::build(student_name, &options, seeded_var_builder(&varmap, 1, device))?;
    let teacher: Option<Box<dyn AttentionModel>> = match step {
        Step::Student => None,
        _ => Some(seeded_teacher(teacher_name, &options, 2, device)?),
    };
    let loss = LossConfig {
        alpha: if step == Step::AtKd { 0.9 } else { 0.0 },
        beta: if teacher.is_some() { 1e3 } else { 0.0 },
        at: AtConfig { backend: at_backend(backend), ..AtConfig::default() },
        pairs: if teacher.is_some() { vec![(0, 0), (1, 1), (2, 2)] } else { vec![] },
        ..LossConfig::default()
    };
    let mut sgd = Sgd::new(&varmap, SgdConfig::default());
    let (x, labels) = random_batch(batch, side, device)?;
    let mut times = vec![];
    for i in 0..warmup + steps {
        let started = Instant::now();
        let mut phases = Phases::default();
        if step == Step::Teacher {
            let t = teacher.as_ref().expect("a teacher").forward_t(&x, false)?;
            t.logits.to_vec2::<f32>()?;
        } else {
            let (maps_s, maps_t) = crate::train::wanted_maps(&loss, teacher.is_some());
            let deferred = at_models::ParamGrads::new();
            let out = student.forward_deferred(&x, &maps_s, &deferred)?;
            phases.forward = started.elapsed();
            let teacher_out =
                teacher.as_ref().map(|t| t.forward_with_maps(&x, false, &maps_t)).transpose()?;
            let t = teacher_out.as_ref().map(|o| (&o.logits, &o.groups[..]));
            let maps = GroupMaps {
                student: &out.maps,
                teacher: teacher_out.as_ref().map_or(&[], |t| &t.maps),
            };
            let parts = student_loss_with_maps(&out.logits, &labels, &out.groups, t, &loss, maps)?;
            phases.loss = started.elapsed() - phases.forward;
            let grads = crate::train::backward_merged(&parts.total, &deferred)?;
            phases.backward = started.elapsed() - phases.forward - phases.loss;
            sgd.step(&grads)?;
            parts.total.to_dtype(DType::F32)?.to_vec0::<f32>()?;
            phases.sgd = started.elapsed() - phases.forward - phases.loss - phases.backward;
        }
        if i >= warmup {
            times.push((started.elapsed(), phases));
        }
    }
    Ok(times)
}

/// The attention-map backend that goes with a model's: at-kernels' where the model runs them
/// (they fall back to candle's ops off the CPU by themselves), candle's for the reference and for
/// a device's op mix run on the CPU.
pub fn at_backend(backend: Backend) -> AtBackend {
    match backend {
        Backend::Kernels => AtBackend::Kernels(&at_kernels::AT_OPS_KERNELS),
        Backend::Candle | Backend::Device => AtBackend::Candle,
    }
}

/// `name` with weights seeded by `seed`, held as the trainer holds a teacher: the weights as
/// constants (plain tensors, no gradient).
pub fn seeded_teacher(
    name: &str,
    options: &ModelOptions,
    seed: u64,
    device: &Device,
) -> candle_core::Result<Box<dyn AttentionModel>> {
    let varmap = VarMap::new();
    at_models::build(name, options, seeded_var_builder(&varmap, seed, device))?;
    let tensors = varmap
        .data()
        .lock()
        .expect("the teacher's weights")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    at_models::build(name, options, VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// A batch of random `side`x`side` RGB images and labels `0..10` in turn.
fn random_batch(batch: usize, side: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let x = Tensor::randn(0f32, 1.0, (batch, 3, side, side), device)?;
    let labels =
        Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, device)?;
    Ok((x, labels))
}

/// The wall-clock time of each of `steps` steps (after `warmup`) of a gradient-based penalty's
/// step (`config`, in `chunks`), as the trainer takes it: `student` on 32x32 images at `batch`,
/// learning from `teacher` when the penalty needs one, the double backpropagation on
/// `second_order`'s thread.
pub fn time_gradient_steps(
    (student_name, teacher_name): (&str, Option<&str>),
    (config, chunks): (&at_losses::gradient::GradientConfig, usize),
    batch: usize,
    (warmup, steps): (usize, usize),
    (device, second_order): (&Device, &at_losses::second_order::SecondOrder),
) -> Result<Vec<Duration>> {
    let options = ModelOptions::default();
    let varmap = VarMap::new();
    let student = at_models::build(student_name, &options, seeded_var_builder(&varmap, 1, device))?;
    let teacher_map = VarMap::new();
    let teacher = match teacher_name {
        Some(name) => {
            Some(at_models::build(name, &options, seeded_var_builder(&teacher_map, 2, device))?)
        }
        None => None,
    };
    let mut sgd = Sgd::new(&varmap, SgdConfig::default());
    let (x, labels) = random_batch(batch, 32, device)?;
    let mut times = vec![];
    for i in 0..warmup + steps {
        let started = Instant::now();
        let (parts, grads) = crate::train::gradient_step(
            student.as_ref(),
            teacher.as_deref(),
            (&x, &labels),
            config,
            chunks,
            second_order,
        )?;
        sgd.step(&grads)?;
        parts.total.to_dtype(DType::F32)?.to_vec0::<f32>()?;
        if i >= warmup {
            times.push(started.elapsed());
        }
    }
    Ok(times)
}

/// One JSON line, as `xtask/bench/torch_step.py` prints it (the teacher is blank for a
/// student step, which has none).
pub fn json_line(
    student: &str,
    step: Step,
    teacher: &str,
    batch: usize,
    device: &str,
    times: &[(Duration, Phases)],
) -> String {
    // Milliseconds to a tenth, as the PyTorch side rounds them.
    let ms: Vec<f64> = times.iter().map(|(t, _)| (t.as_secs_f64() * 1e4).round() / 10.0).collect();
    let teacher = if step == Step::Student { "" } else { teacher };
    let mut line = serde_json::json!({
        "model": student,
        "step": step.name(),
        "teacher": teacher,
        "batch": batch,
        "device": device,
        "ms": ms,
        // The path at-kernels takes on this CPU (`AT_KERNELS_ISA` caps it).
        "isa": at_kernels::isa().name(),
    });
    if let Some(peak) = peak_resident_kib() {
        line["peak_kib"] = peak.into();
    }
    line.to_string()
}

/// The process's peak resident size so far in KiB (`VmHWM`; Linux only).
pub fn peak_resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_parse_back_to_their_step() {
        for step in Step::ALL {
            assert_eq!(Step::parse(step.name()).unwrap(), step);
        }
        assert!(Step::parse("kd").unwrap_err().to_string().contains("unknown step `kd`"));
    }
}
