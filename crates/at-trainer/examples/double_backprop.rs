//! The cost of a double-backpropagation step against a plain one: time and peak memory of a
//! NIN (or any registered model) training step at batch 128 on random 32x32 images.
//!
//! ```text
//! cargo run --release -p at-train --example double_backprop -- MODE [MODEL] [BATCH] [STEPS] [CHUNKS]
//! ```
//!
//! `MODE` is `plain` (cross-entropy), `jacobian`, `symmetry`, `transfer` (teacher: the same
//! architecture, freshly initialised), or `jacobian-inside` (the second backward on the
//! second-order thread too, which the trainer avoids). `CHUNKS` splits the batch as
//! `loss.gradient_chunks` does. Each mode runs in its own process so that
//! the peak resident memory (`VmHWM`) is its own. Prints one JSON line.

use std::time::Instant;

use anyhow::{Context, Result};
use at_losses::gradient::{GradientConfig, GradientPenalty, gradient_student_loss};
use at_losses::second_order::SecondOrder;
use at_models::{AttentionModel, ModelOptions};
use at_trainer::init::seeded_var_builder;
use at_trainer::optim::{Sgd, SgdConfig};
use at_trainer::train::gradient_step;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<()> {
    // First, before any other thread: the process's second-order thread.
    let second_order = SecondOrder::start()?;
    if std::env::var_os("AT_NO_TUNE").is_none() {
        anyhow::ensure!(at_kernels::tune_allocator(), "mallopt refused the thresholds");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("plain").to_owned();
    let model = args.get(1).map(String::as_str).unwrap_or("nin-thin-nobn").to_owned();
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let steps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let chunks: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1).max(1);
    let device = Device::Cpu;
    let options = ModelOptions::default();
    let build = |seed: u64| -> Result<(VarMap, Box<dyn AttentionModel>)> {
        let varmap = VarMap::new();
        let net = at_models::build(&model, &options, seeded_var_builder(&varmap, seed, &device))?;
        Ok((varmap, net))
    };
    let (varmap, student) = build(1)?;
    let (_, teacher) = build(2)?;
    let mut sgd = Sgd::new(&varmap, SgdConfig { lr: 0.01, ..SgdConfig::default() });
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &device)?;
    let labels =
        Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, &device)?;
    let penalty = match mode.as_str() {
        "plain" => None,
        "jacobian" | "jacobian-inside" => Some(GradientPenalty::Jacobian),
        "symmetry" => Some(GradientPenalty::Symmetry),
        "transfer" => Some(GradientPenalty::Transfer),
        other => anyhow::bail!("unknown mode `{other}`"),
    };
    let mut times = vec![];
    for _ in 0..steps {
        let started = Instant::now();
        let grads = match penalty {
            None => {
                let logits = student.forward_t(&x, true)?.logits;
                at_losses::cross_entropy(&logits, &labels)?.backward()?
            }
            Some(penalty) if mode == "jacobian-inside" => {
                // For comparison only: the second backward on the second-order thread as well.
                let config = GradientConfig { penalty, beta: 1.0, alpha: 0.0, temperature: 4.0 };
                let student = student.as_ref();
                second_order.run(|| -> candle_core::Result<_> {
                    let forward = |x: &Tensor| Ok(student.forward_t(x, true)?.logits);
                    gradient_student_loss(&forward, &x, &labels, None, &config, batch)?
                        .total
                        .backward()
                })?
            }
            Some(penalty) => {
                // The trainer's step.
                let config = GradientConfig { penalty, beta: 1.0, alpha: 0.0, temperature: 4.0 };
                let teacher = Some(teacher.as_ref());
                gradient_step(
                    student.as_ref(),
                    teacher,
                    (&x, &labels),
                    &config,
                    chunks,
                    &second_order,
                )?
                .1
            }
        };
        sgd.step(&grads)?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let first = times[0];
    let mut rest = times[1.min(times.len() - 1)..].to_vec();
    rest.sort_by(f64::total_cmp);
    let median = rest[rest.len() / 2];
    println!(
        "{{\"mode\":\"{mode}\",\"model\":\"{model}\",\"batch\":{batch},\"chunks\":{chunks},\"steps\":{steps},\"first_ms\":{first:.0},\"median_ms\":{median:.0},\"peak_rss_mib\":{:.0}}}",
        peak_rss_mib().context("no /proc/self/status")?
    );
    Ok(())
}
