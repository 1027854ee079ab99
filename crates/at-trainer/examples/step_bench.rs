//! Times the trainer's step (forward, loss, backward, SGD) on random CIFAR-shaped batches on the
//! CPU: what `cargo xtask bench` runs against PyTorch (`at-train bench-step` does the same on any
//! device).
//!
//! ```text
//! cargo run --release -p at-trainer --example step_bench -- STUDENT STEP [TEACHER] [BATCH] [WARMUP] [STEPS] [SIDE]
//! ```
//!
//! `SIDE` is the images' side, 32 by default (224 for the ResNets of Tables 4 and 5).
//!
//! `STEP` is `student` (cross-entropy), `at` (plus attention transfer from `TEACHER` on every
//! group, beta 1e3, the teacher's forward included), `at-kd` (plus distillation, alpha 0.9, T 4)
//! or `teacher` (the teacher's forward alone). `AT_REFERENCE=1` uses candle's own ops instead of
//! at-kernels; `AT_PHASES=1` prints each step's phases on stderr. Prints one JSON line with every
//! timed step in milliseconds.

use anyhow::Result;
use at_trainer::bench::{Step, json_line, time_steps_sized};
use candle_core::Device;

fn main() -> Result<()> {
    at_kernels::tune_allocator();
    // The one choice of ops for the whole benchmark, made here and passed down.
    let backend = if std::env::var_os("AT_REFERENCE").is_some_and(|v| v != "0") {
        at_models::Backend::Candle
    } else {
        at_models::Backend::Kernels
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let (student, step, teacher) = (arg(0, "wrn-16-1"), arg(1, "student"), arg(2, "wrn-16-2"));
    let batch: usize = arg(3, "128").parse()?;
    let warmup: usize = arg(4, "2").parse()?;
    let steps: usize = arg(5, "5").parse()?;
    let side: usize = arg(6, "32").parse()?;
    let kind = Step::parse(&step)?;
    let names = (student.as_str(), kind, teacher.as_str());
    let times = time_steps_sized(names, (batch, side), (warmup, steps), backend, &Device::Cpu)?;
    if std::env::var_os("AT_PHASES").is_some() {
        for (_, p) in &times {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            eprintln!(
                "forward {:.0} ms, teacher + loss {:.0} ms, backward {:.0} ms, sgd {:.0} ms",
                ms(p.forward),
                ms(p.loss),
                ms(p.backward),
                ms(p.sgd)
            );
        }
    }
    println!("{}", json_line(&student, kind, &teacher, batch, "cpu", &times));
    Ok(())
}
