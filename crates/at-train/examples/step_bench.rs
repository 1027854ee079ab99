//! Times the trainer's step (forward, loss, backward, SGD) on random CIFAR-shaped batches: what
//! `cargo xtask bench` runs against PyTorch.
//!
//! ```text
//! cargo run --release -p at-train --example step_bench -- STUDENT STEP [TEACHER] [BATCH] [WARMUP] [STEPS]
//! ```
//!
//! `STEP` is `student` (cross-entropy), `at` (plus attention transfer from `TEACHER` on every
//! group, beta 1e3, the teacher's forward included) or `at-kd` (plus distillation, alpha 0.9,
//! T 4) (`AT_PHASES=1` prints the time of each phase of a step on stderr); `teacher` times the teacher's forward alone (no gradient). Set `AT_REFERENCE=1` for candle's own convolutions. Prints one JSON line with every
//! timed step in milliseconds.

use std::time::Instant;

use anyhow::Result;
use at_losses::{LossConfig, student_loss};
use at_models::{AttentionModel, ModelOptions};
use at_ops::AtConfig;
use at_train::init::seeded_var_builder;
use at_train::optim::{Sgd, SgdConfig};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;

fn main() -> Result<()> {
    at_kernels::tune_allocator();
    at_train::train::use_kernels();
    if std::env::var_os("AT_REFERENCE").is_some_and(|v| v != "0") {
        at_kernels::set_reference(true);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let student_name = arg(0, "wrn-16-1");
    let step = arg(1, "student");
    let teacher_name = arg(2, "wrn-16-2");
    let batch: usize = arg(3, "128").parse()?;
    let warmup: usize = arg(4, "2").parse()?;
    let steps: usize = arg(5, "5").parse()?;
    let device = Device::Cpu;
    let options = ModelOptions::default();
    let varmap = VarMap::new();
    let student =
        at_models::build(&student_name, &options, seeded_var_builder(&varmap, 1, &device))?;
    let (teacher, loss): (Option<Box<dyn AttentionModel>>, LossConfig) = match step.as_str() {
        "student" => (None, LossConfig::default()),
        "at" | "at-kd" | "teacher" => {
            // A teacher as the trainer holds one: weights as plain tensors, no gradient.
            let teacher_map = VarMap::new();
            at_models::build(
                &teacher_name,
                &options,
                seeded_var_builder(&teacher_map, 2, &device),
            )?;
            let tensors = teacher_map
                .data()
                .lock()
                .expect("the teacher's weights")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect();
            let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &device);
            let teacher = at_models::build(&teacher_name, &options, vb)?;
            let alpha = if step == "at-kd" { 0.9 } else { 0.0 };
            let loss = LossConfig {
                alpha,
                beta: 1e3,
                at: AtConfig::default(),
                pairs: vec![(0, 0), (1, 1), (2, 2)],
                ..LossConfig::default()
            };
            (Some(teacher), loss)
        }
        other => anyhow::bail!("unknown step `{other}`: student, teacher, at or at-kd"),
    };
    let mut sgd = Sgd::new(&varmap, SgdConfig::default());
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &device)?;
    let labels =
        Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, &device)?;
    let phases = std::env::var_os("AT_PHASES").is_some();
    let mut times = vec![];
    for i in 0..warmup + steps {
        let started = Instant::now();
        if step == "teacher" {
            let t = teacher.as_ref().expect("a teacher").forward_t(&x, false)?;
            t.logits.to_vec2::<f32>()?;
            if i >= warmup {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            continue;
        }
        let out = student.forward_t(&x, true)?;
        let t_forward = started.elapsed();
        let teacher_out = teacher.as_ref().map(|t| t.forward_t(&x, false)).transpose()?;
        let t = teacher_out.as_ref().map(|o| (&o.logits, &o.groups[..]));
        let parts = student_loss(&out.logits, &labels, &out.groups, t, &loss)?;
        let t_loss = started.elapsed();
        let grads = parts.total.backward()?;
        let t_backward = started.elapsed();
        sgd.step(&grads)?;
        parts.total.to_vec0::<f32>()?;
        if phases {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            eprintln!(
                "forward {:.0} ms, teacher + loss {:.0} ms, backward {:.0} ms, sgd {:.0} ms",
                ms(t_forward),
                ms(t_loss - t_forward),
                ms(t_backward - t_loss),
                ms(started.elapsed() - t_backward)
            );
        }
        if i >= warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let list: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
    println!(
        "{{\"model\":\"{student_name}\",\"step\":\"{step}\",\"teacher\":\"{}\",\"batch\":{batch},\"ms\":[{}]}}",
        if teacher.is_some() { teacher_name.as_str() } else { "" },
        list.join(",")
    );
    Ok(())
}
