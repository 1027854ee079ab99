//! Replaying the paper's tables: [`tables`] holds them as data (rows with typed columns and the
//! paper's numbers), [`profiles`] how big their runs are, [`plan`] turns a table and a profile
//! into runs (a teacher trained once per profile and seed and shared by every row that needs
//! it), [`execute`] trains them through at-trainer (a finished run is reused, an interrupted one
//! resumed: killing `repro` loses at most the batch in flight), [`report`] writes the table
//! beside the paper's numbers from whatever finished runs exist, and [`figures`] draws their
//! curves and attention maps.
#![deny(missing_docs)]

pub mod figures;
pub mod plan;
pub mod profiles;
pub mod report;
pub mod tables;

use std::path::Path;

use anyhow::{Context, Result, bail};

pub use plan::{Options, Plan, PlannedRun};
pub use profiles::{PROFILES, Profile};
pub use tables::{Column, Method, Row, Table};

use at_trainer::config::RunConfig;
use at_trainer::train::{RunOptions, RunResult, resume, train};

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
    same_config(&dir, &run.config)?;
    let result = dir.join("result.json");
    if result.exists() {
        let text = std::fs::read_to_string(&result)?;
        let result = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", result.display()))?;
        return Ok(Outcome::Reused(result));
    }
    // The plan's device is this invocation's: a run started elsewhere continues on it.
    let options = &RunOptions { device: Some(run.config.device), ..options.clone() };
    let trained = if dir.join("checkpoints/latest").exists() {
        resume(&dir, options)
    } else {
        train(&run.config, &dir, options)
    }
    .with_context(|| format!("run {} ({})", run.key, dir.display()))?;
    Ok(if trained.interrupted { Outcome::Interrupted } else { Outcome::Trained(trained) })
}

/// Fails, naming the keys that differ, where `dir` holds a run made by another config than
/// `planned` (a plan changed by an update, or `--out` pointed at another profile's runs): its
/// result would otherwise be reported as this plan's. Where things are and what runs them
/// ([`LOCATION_KEYS`]: the data folder, the teacher's file under `--out`, device, threads) may
/// differ: the same experiment moved to another folder or machine is still the same.
fn same_config(dir: &Path, planned: &RunConfig) -> Result<()> {
    let path = dir.join("config.toml");
    if !path.exists() {
        return Ok(());
    }
    let stored = RunConfig::load(&path)?;
    if &stored == planned {
        return Ok(());
    }
    let (stored, planned) = (plan::flat_config(&stored), plan::flat_config(planned));
    let absent = "(absent)".to_string();
    let keys: std::collections::BTreeSet<&String> = stored.keys().chain(planned.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter_map(|key| {
            let (there, here) =
                (stored.get(key).unwrap_or(&absent), planned.get(key).unwrap_or(&absent));
            let location = LOCATION_KEYS.contains(&key.as_str());
            (there != here && !location)
                .then(|| format!("{key} = {there} there, {here} in this plan"))
        })
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    bail!(
        "{} was made by another config than this plan's ({}): its result is not this plan's. \
         Move or delete that directory to train it again, or give another --out",
        dir.display(),
        differ.join("; ")
    )
}

/// The config keys that say where a run's inputs are and what runs it, not what it is.
const LOCATION_KEYS: [&str; 4] = ["data.root", "teacher.checkpoint", "device", "threads"];

/// Trains every run of `plan` in order (teachers first), printing a line per run; stops at the
/// first interrupted one. Returns whether every run finished.
pub fn execute(plan: &Plan, options: &RunOptions) -> Result<bool> {
    let n = plan.runs.len();
    // In a data-parallel job rank 0 speaks for every rank.
    let speaks = options.parallel.as_ref().is_none_or(|p| p.is_leader());
    for (i, run) in plan.runs.iter().enumerate() {
        let started = std::time::Instant::now();
        let outcome = execute_run(&plan.out, run, options)?;
        if !speaks {
            if let Outcome::Interrupted = outcome {
                return Ok(false);
            }
            continue;
        }
        match outcome {
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

impl Plan {
    /// The runs of the plan's student cells (every column but [`Column::Teacher`]), split into
    /// the finished ones (with a `result.json`) and the directories of the others: what
    /// `publish --table` offers. A network that is a teacher in one row and a student in
    /// another (Table 1's WRN-16-2) is offered by its student cell.
    pub fn finished_students(&self) -> (Vec<&PlannedRun>, Vec<std::path::PathBuf>) {
        let students: std::collections::BTreeSet<&String> = self
            .cells
            .iter()
            .filter(|((row, _), _)| self.rows.iter().any(|r| &r.id == row && !r.is_teacher()))
            .map(|(_, key)| key)
            .collect();
        let (mut finished, mut unfinished) = (vec![], vec![]);
        for run in self.runs.iter().filter(|r| students.contains(&r.key)) {
            let dir = self.out.join(&run.key);
            if dir.join("result.json").is_file() {
                finished.push(run);
            } else {
                unfinished.push(dir);
            }
        }
        (finished, unfinished)
    }
}

/// Seconds per training step of `config` on `device`, measured here with the bench's step (two
/// steps after one warm-up, on random images of the run's size) and cached per (network, step,
/// teacher, batch). The step is timed at the run's batch up to a cap (128 on 32x32 images, 32
/// for gradient-based penalties, 8 on 224x224 images) and scaled per image beyond it; a
/// gradient-based penalty is timed only with a second-order thread.
pub struct StepTimer {
    device: candle_core::Device,
    second_order: Option<at_losses::second_order::SecondOrder>,
    cache: std::collections::HashMap<String, Option<f64>>,
}

impl StepTimer {
    /// The caps on the timed batch: 32x32 images, gradient-based penalties, 224x224 images.
    pub const BATCH_CAPS: (usize, usize, usize) = (128, 32, 8);

    /// A timer on `device`; `second_order` times the runs with a gradient-based penalty.
    pub fn new(
        device: candle_core::Device,
        second_order: Option<at_losses::second_order::SecondOrder>,
    ) -> Self {
        Self { device, second_order, cache: Default::default() }
    }

    /// See [`StepTimer`].
    pub fn seconds(&mut self, config: &RunConfig) -> Option<f64> {
        use at_trainer::bench::{Step, time_gradient_steps, time_steps_sized};
        let side = at_trainer::data::input_side(&config.data);
        let (small, gradient, large) = Self::BATCH_CAPS;
        let gradient_config = config.gradient_config().ok()?;
        let cap = match (&gradient_config, side) {
            (Some(_), _) => gradient,
            (None, 224) => large,
            _ => small,
        };
        let batch = config.batch_size.clamp(1, cap);
        let teacher = config.teacher.as_ref().map(|t| t.model.clone());
        let step = match (config.loss.beta > 0.0, config.loss.alpha > 0.0) {
            (false, false) => Step::Student,
            (true, false) => Step::At,
            // KD alone: the teacher's forward and the student's step, timed as AT+KD.
            (_, true) => Step::AtKd,
        };
        let key = format!(
            "{} {} {:?} {:?} @{batch}x{side}",
            config.student,
            step.name(),
            teacher,
            gradient_config.as_ref().map(|g| (g.penalty, config.loss.gradient_chunks))
        );
        let device = self.device.clone();
        let second_order = self.second_order.clone();
        let per_image = *self.cache.entry(key).or_insert_with(|| {
            let times: Vec<f64> = match &gradient_config {
                Some(g) => time_gradient_steps(
                    (&config.student, teacher.as_deref()),
                    (g, config.loss.gradient_chunks),
                    batch,
                    (1, 2),
                    (&device, second_order.as_ref()?),
                )
                .ok()?
                .iter()
                .map(|d| d.as_secs_f64())
                .collect(),
                None => time_steps_sized(
                    (&config.student, step, teacher.as_deref().unwrap_or_default()),
                    (batch, side),
                    (1, 2),
                    at_models::Backend::Kernels,
                    &device,
                )
                .ok()?
                .iter()
                .map(|(d, _)| d.as_secs_f64())
                .collect(),
            };
            let mut s = times;
            s.sort_by(f64::total_cmp);
            Some(s[s.len() / 2] / batch as f64)
        });
        per_image.map(|p| p * config.batch_size as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory made by another config (an older plan, another profile's `--out`) is
    /// refused before its result is reused, the differing keys named with both values; the
    /// plan's own config passes.
    #[test]
    fn a_run_made_by_another_config_is_refused_naming_the_keys_that_differ() {
        let out = tempfile::tempdir().unwrap();
        let planned = RunConfig::preset("quick").unwrap();
        let run = PlannedRun {
            key: "wrn-16-1/baseline/seed0".into(),
            config: planned.clone(),
            teacher: None,
        };
        let dir = out.path().join(&run.key);
        std::fs::create_dir_all(&dir).unwrap();
        let mut older = planned.clone();
        (older.optim.lr, older.epochs) = (0.2, 9);
        std::fs::write(dir.join("config.toml"), older.to_toml()).unwrap();
        std::fs::write(dir.join("result.json"), "{}").unwrap();
        let err =
            format!("{:#}", execute_run(out.path(), &run, &RunOptions::default()).unwrap_err());
        for want in [
            "was made by another config than this plan's",
            "epochs = 9 there, 4 in this plan",
            "optim.lr = 0.2 there, 0.05 in this plan",
            "Move or delete that directory",
        ] {
            assert!(err.contains(want), "missing `{want}`: {err}");
        }
        std::fs::write(dir.join("config.toml"), planned.to_toml()).unwrap();
        assert!(same_config(&dir, &planned).is_ok());
        // The same experiment with its data elsewhere and another thread count is the same.
        let mut moved = planned.clone();
        (moved.data.root, moved.threads) = ("/elsewhere/fashion-mnist".into(), 7);
        assert!(same_config(&dir, &moved).is_ok());
    }
}
