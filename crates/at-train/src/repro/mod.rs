//! Replaying the paper's tables: [`tables`] holds them as data (rows with the paper's numbers),
//! [`plan`] turns a table and a profile into runs (a teacher trained once per profile and seed
//! and shared by every row that needs it), [`execute`] trains them (a finished run is reused, an
//! interrupted one resumed: killing `repro` loses at most the batch in flight), and [`report`]
//! writes the table beside the paper's numbers from whatever finished runs exist.

pub mod figures;
pub mod plan;
pub mod report;
pub mod tables;

use std::path::Path;

use anyhow::{Context, Result};

pub use plan::{Options, Plan, PlannedRun, Profile};
pub use tables::{Method, Row, Table};

use crate::train::{RunOptions, RunResult, resume, train};

/// How a run of the plan ended in this call.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// It had finished before: its `result.json` was read.
    Reused(RunResult),
    /// It was trained (or resumed) to its end now.
    Trained(RunResult),
    /// It stopped early (Ctrl-C or a stop option): `repro` stops here too.
    Interrupted,
}

/// Trains, resumes or reuses one run of a plan.
pub fn execute_run(out: &Path, run: &PlannedRun, options: &RunOptions) -> Result<Outcome> {
    let dir = out.join(&run.key);
    let result = dir.join("result.json");
    if result.exists() {
        let text = std::fs::read_to_string(&result)?;
        let result = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", result.display()))?;
        return Ok(Outcome::Reused(result));
    }
    let trained = if dir.join("checkpoints/latest").exists() {
        resume(&dir, options)
    } else {
        train(&run.config, &dir, options)
    }
    .with_context(|| format!("run {} ({})", run.key, dir.display()))?;
    Ok(if trained.interrupted { Outcome::Interrupted } else { Outcome::Trained(trained) })
}

/// Trains every run of `plan` in order (teachers first), printing a line per run; stops at the
/// first interrupted one. Returns whether every run finished.
pub fn execute(plan: &Plan, options: &RunOptions) -> Result<bool> {
    let n = plan.runs.len();
    for (i, run) in plan.runs.iter().enumerate() {
        let started = std::time::Instant::now();
        match execute_run(&plan.out, run, options)? {
            Outcome::Reused(r) => {
                println!("[{}/{n}] {}: finished before, error {:.2}%", i + 1, run.key, r.test_error)
            }
            Outcome::Trained(r) => println!(
                "[{}/{n}] {}: error {:.2}% ({:.1} min)",
                i + 1,
                run.key,
                r.test_error,
                started.elapsed().as_secs_f64() / 60.0
            ),
            Outcome::Interrupted => {
                println!(
                    "[{}/{n}] {}: interrupted; run the same command to continue",
                    i + 1,
                    run.key
                );
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Seconds per training step of `config` on `device`, measured here with the bench's step (two
/// steps after one warm-up at the config's batch, up to 128, on CIFAR-sized inputs) and cached per
/// (network, step, teacher). `None` where it would not mean much: 224-pixel datasets (CUB,
/// Scenes, ImageNet) and gradient-based penalties.
pub struct StepTimer {
    device: candle_core::Device,
    cache: std::collections::HashMap<(String, String, String), Option<f64>>,
}

impl StepTimer {
    /// A timer on `device`.
    pub fn new(device: candle_core::Device) -> Self {
        Self { device, cache: Default::default() }
    }

    /// See [`StepTimer`].
    pub fn seconds(&mut self, config: &crate::config::RunConfig) -> Option<f64> {
        use crate::bench::{Step, time_steps};
        use crate::config::{DatasetName, GradientKind};
        let small = matches!(
            config.data.dataset,
            DatasetName::FashionMnistSubset
                | DatasetName::FashionMnist
                | DatasetName::Cifar10
                | DatasetName::Cifar10Parquet
        );
        if !small || config.loss.gradient != GradientKind::None {
            return None;
        }
        let teacher = config.teacher.as_ref().map_or(String::new(), |t| t.model.clone());
        let step = match (config.loss.beta > 0.0, config.loss.alpha > 0.0) {
            (false, false) => Step::Student,
            (true, false) => Step::At,
            // KD alone: the teacher's forward and the student's step, timed as AT+KD.
            (_, true) => Step::AtKd,
        };
        // At the run's own batch (up to 128): a smaller one, scaled up, overestimated the step
        // 2.6x (WRN-16-1 on Fashion-MNIST: 4.8 minutes an epoch estimated, 1.8 measured).
        let batch = config.batch_size.clamp(1, 128);
        let key = (config.student.clone(), step.name().to_owned(), format!("{teacher}@{batch}"));
        let device = self.device.clone();
        let per_image = *self.cache.entry(key).or_insert_with(|| {
            let times = time_steps(
                (&config.student, step, &teacher),
                batch,
                (1, 2),
                at_models::Backend::Kernels,
                &device,
            )
            .ok()?;
            let mut s: Vec<f64> = times.iter().map(|(d, _)| d.as_secs_f64()).collect();
            s.sort_by(f64::total_cmp);
            Some(s[s.len() / 2] / batch as f64)
        });
        per_image.map(|p| p * config.batch_size as f64)
    }
}
