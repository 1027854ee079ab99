//! The README's main job: a short real experiment on the embedded Fashion-MNIST subset. A
//! WRN-16-2 teacher is trained, then a WRN-16-1 student alone and a WRN-16-1 student with
//! attention transfer from it (the paper's recipe: beta = 1e3, the three groups, the authors'
//! distance), and the three test accuracies are printed as a table.
//!
//! Each run lives in its own directory under the output directory; a finished run (with its
//! `result.json`) is not trained again, and an interrupted one is resumed, so the command can be
//! stopped and restarted.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use crate::config::{DataConfig, LossSection, RunConfig, TeacherConfig};
use crate::train::{RunOptions, RunResult, resume, train};

/// How much of the embedded data and how many epochs each run uses.
#[derive(Clone, Copy, Debug)]
pub struct QuickScale {
    /// Training images per run (of the subset's 10,000).
    pub train_images: usize,
    /// Test images (of 2,000).
    pub test_images: usize,
    /// Epochs per run.
    pub epochs: usize,
}

impl Default for QuickScale {
    /// The `quick` preset's: the one place these numbers live.
    fn default() -> Self {
        let preset = RunConfig::preset("quick").expect("the quick preset exists");
        Self {
            train_images: preset.data.train_limit,
            test_images: preset.data.test_limit,
            epochs: preset.epochs,
        }
    }
}

/// The `quick` preset with this scale and student.
fn base(scale: QuickScale, model: &str) -> RunConfig {
    let preset = RunConfig::preset("quick").expect("the quick preset exists");
    RunConfig {
        student: model.into(),
        data: DataConfig {
            train_limit: scale.train_images,
            test_limit: scale.test_images,
            ..preset.data.clone()
        },
        epochs: scale.epochs,
        ..preset
    }
}

/// Trains (or resumes, or reuses) the run `name` under `out`.
fn run(out: &Path, name: &str, config: &RunConfig) -> Result<RunResult> {
    let dir = out.join(name);
    let result = dir.join("result.json");
    if result.exists() {
        println!("{name}: already trained in {}", dir.display());
        return Ok(serde_json::from_str(&std::fs::read_to_string(result)?)?);
    }
    println!("{name}: training {} in {}", config.student, dir.display());
    let options = RunOptions::default();
    if dir.join("checkpoints/latest").exists() {
        resume(&dir, &options)
    } else {
        train(config, &dir, &options)
    }
}

/// Runs the three trainings and returns the table of results.
pub fn quick_experiment(out: &Path, scale: QuickScale) -> Result<String> {
    let started = Instant::now();
    let teacher = run(out, "teacher-wrn-16-2", &base(scale, "wrn-16-2"))?;
    let student = run(out, "student-wrn-16-1", &base(scale, "wrn-16-1"))?;
    let at_config = RunConfig {
        teacher: Some(TeacherConfig {
            model: "wrn-16-2".into(),
            checkpoint: out.join("teacher-wrn-16-2/model.safetensors"),
        }),
        loss: LossSection { beta: 1e3, ..LossSection::default() },
        ..base(scale, "wrn-16-1")
    };
    let at = run(out, "student-wrn-16-1-at", &at_config)?;
    let mut table = format!(
        "Fashion-MNIST subset ({} train / {} test images, {} epochs each), test top-1 accuracy:\n\n\
         | run | model | top-1 % | error % | minutes |\n|---|---|---:|---:|---:|\n",
        scale.train_images, scale.test_images, scale.epochs
    );
    for (name, r) in [("teacher", &teacher), ("student", &student), ("student + AT", &at)] {
        table.push_str(&format!(
            "| {name} | {} | {:.2} | {:.2} | {:.1} |\n",
            r.student,
            r.test_top1,
            r.test_error,
            r.seconds / 60.0
        ));
    }
    table.push_str(&format!(
        "\nWall-clock time of this command: {:.1} minutes.\n",
        started.elapsed().as_secs_f64() / 60.0
    ));
    Ok(table)
}
