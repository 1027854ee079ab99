//! From a table, a profile and options to the runs that fill it: one run per (row, seed), a
//! teacher being the baseline run of its model under the same profile and seed, so a run that
//! several rows need (a student baseline, a teacher) is planned and trained once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use at_trainer::config::{
    DatasetName, DeviceSpec, GradientKind, LossSection, MapReduce, RunConfig, TeacherConfig,
    recipes,
};

pub use crate::profiles::Profile;
use crate::tables::{Column, MapFunction, Method, Row, Table, rows};

/// What `repro` was asked.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// The profile.
    pub profile: &'static Profile,
    /// Seeds per cell (`None`: the profile's).
    pub seeds: Option<usize>,
    /// One seed only (to spread cells over machines by hand).
    pub seed: Option<u64>,
    /// One row only (its id, or a prefix of it).
    pub only: Option<String>,
    /// The device every run trains on.
    pub device: DeviceSpec,
    /// Data already on disk (e.g. Fashion-MNIST's IDX folder), instead of the default place.
    pub data_dir: Option<PathBuf>,
    /// Where the runs go (`runs/repro/<profile>` by default).
    pub out: PathBuf,
}

impl Options {
    /// The defaults for `profile`.
    pub fn new(profile: &'static Profile) -> Self {
        Self {
            profile,
            seeds: None,
            seed: None,
            only: None,
            device: DeviceSpec::Cpu,
            data_dir: None,
            out: Path::new("runs/repro").join(profile.name),
        }
    }
}

/// One training run of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedRun {
    /// Its directory under the plan's `out`, which also names it (e.g.
    /// `wrn-16-1/at-t-wrn-16-2/seed0`).
    pub key: String,
    /// Its config (the teacher checkpoint points into the teacher run's directory).
    pub config: RunConfig,
    /// The key of the run that trains its teacher.
    pub teacher: Option<String>,
}

/// Everything `repro` will train for one table, teachers first.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The table.
    pub table: Table,
    /// The profile.
    pub profile: &'static Profile,
    /// The seeds of every cell.
    pub seeds: Vec<u64>,
    /// The rows planned (all, or `--only`'s), with the rows the profile leaves out.
    pub rows: Vec<Row>,
    /// Rows of the table this profile does not run, with why.
    pub skipped: Vec<(Row, &'static str)>,
    /// The runs, each once, a teacher before its students.
    pub runs: Vec<PlannedRun>,
    /// `(row id, seed) -> run key`; a row whose runs are shared across seeds (the quick
    /// profile's one teacher) has one cell per distinct run.
    pub cells: BTreeMap<(String, u64), String>,
    /// Where the runs go.
    pub out: PathBuf,
}

/// The plan for `table` under `options`.
pub fn plan(table: Table, options: &Options) -> Result<Plan> {
    let profile = options.profile;
    if !profile.tables.contains(&table) {
        let with: Vec<&str> = crate::profiles::PROFILES
            .iter()
            .filter(|p| p.tables.contains(&table))
            .map(|p| p.name)
            .collect();
        bail!(
            "{} ({}) is not in the {} profile ({}): run it with --profile {}",
            table.name(),
            table.title(),
            profile.name,
            profile.about,
            with.join(" or --profile ")
        )
    }
    if options.seeds == Some(0) {
        bail!(
            "--seeds 0 plans no run: give at least 1 (the {} profile's default is {})",
            profile.name,
            profile.seeds
        )
    }
    let seeds: Vec<u64> = match (options.seed, table) {
        (Some(seed), _) => vec![seed],
        // Table 3: "deterministic algorithms and sampling with fixed seed ... single run".
        (None, Table::Table3) => vec![1],
        (None, _) => (0..options.seeds.unwrap_or(profile.seeds) as u64).collect(),
    };
    let mut planned = vec![];
    let mut skipped = vec![];
    for row in rows(table) {
        if let Some(only) = &options.only
            && !row.id.starts_with(only.as_str())
        {
            continue;
        }
        match profile.skips(table, &row) {
            Some(why) => skipped.push((row, why)),
            None => planned.push(row),
        }
    }
    if planned.is_empty() {
        let ids: Vec<String> = rows(table).into_iter().map(|r| r.id).collect();
        bail!(
            "no row of {} to run with --only {} in the {} profile; its rows: {}",
            table.name(),
            options.only.as_deref().unwrap_or("(none)"),
            profile.name,
            ids.join(", ")
        )
    }
    let mut runs: Vec<PlannedRun> = vec![];
    let mut cells = BTreeMap::new();
    for row in &planned {
        for &seed in &seeds {
            let teacher = match row.teacher.filter(|_| row.column.needs_teacher()) {
                Some(t) => {
                    let teacher_row = Row {
                        model: t,
                        teacher: None,
                        column: Column::Teacher,
                        at_start_epoch: 0,
                        ..row.clone()
                    };
                    Some(add_teacher_run(&mut runs, table, &teacher_row, seed, options)?)
                }
                None => None,
            };
            // The teacher column reports the teachers the other columns learned from.
            let key = if row.is_teacher() {
                add_teacher_run(&mut runs, table, row, seed, options)?
            } else {
                add_run(&mut runs, table, row, seed, teacher, options)?
            };
            if !cells.iter().any(|((id, _), k)| id == &row.id && k == &key) {
                cells.insert((row.id.clone(), seed), key);
            }
        }
    }
    Ok(Plan {
        table,
        profile,
        seeds,
        rows: planned,
        skipped,
        runs,
        cells,
        out: options.out.clone(),
    })
}

/// Adds the teacher run of `row`'s model for students of `seed` (the profile says which seed and
/// how many epochs) and returns its key.
fn add_teacher_run(
    runs: &mut Vec<PlannedRun>,
    table: Table,
    row: &Row,
    seed: u64,
    options: &Options,
) -> Result<String> {
    let (seed, epochs) = options.profile.teacher(seed);
    let mut run = make_run(table, row, seed, None, options)?;
    if let Some(epochs) = epochs
        && run.config.epochs != epochs
    {
        // Trained longer than the students: a run of its own.
        run.key = run.key.replace(&format!("/seed{seed}"), &format!("-{epochs}-epochs/seed{seed}"));
        run.config.epochs = epochs;
    }
    Ok(add(runs, run))
}

/// Adds the run of `row` at `seed` (once) and returns its key.
fn add_run(
    runs: &mut Vec<PlannedRun>,
    table: Table,
    row: &Row,
    seed: u64,
    teacher: Option<String>,
    options: &Options,
) -> Result<String> {
    Ok(add(runs, make_run(table, row, seed, teacher, options)?))
}

/// Adds `run` unless a run of its key is planned already; its key.
fn add(runs: &mut Vec<PlannedRun>, run: PlannedRun) -> String {
    let key = run.key.clone();
    if !runs.iter().any(|r| r.key == key) {
        runs.push(run);
    }
    key
}

/// The run of `row` at `seed`, learning from the run `teacher`.
fn make_run(
    table: Table,
    row: &Row,
    seed: u64,
    teacher: Option<String>,
    options: &Options,
) -> Result<PlannedRun> {
    let dataset = dataset_tag(table, row);
    let method = match row.at_start_epoch {
        0 => row.column.slug(),
        e => format!("{}-from-epoch-{e}", row.column.slug()),
    };
    let method = match row.teacher.filter(|_| row.column.needs_teacher()) {
        Some(t) => format!("{method}-t-{t}"),
        None => method,
    };
    let key = match dataset {
        Some(d) => format!("{d}/{}/{method}/seed{seed}", row.model),
        None => format!("{}/{method}/seed{seed}", row.model),
    };
    let mut config = options.profile.base(table, row)?;
    config.student = row.model.into();
    config.teacher = None;
    if let Some(dir) = &options.data_dir {
        config.data.root = dir.clone();
    }
    config.seed = seed;
    config.device = options.device;
    apply_method(&mut config, row);
    if let Some(t) = &teacher {
        config.teacher = Some(TeacherConfig {
            model: row.teacher.expect("a teacher run has a teacher").into(),
            checkpoint: options.out.join(t).join("model.safetensors"),
        });
    }
    Ok(PlannedRun { key, config, teacher })
}

/// Table 4's dataset (its rows' ids start with it).
pub(crate) fn dataset_tag(table: Table, row: &Row) -> Option<&'static str> {
    match table {
        Table::Table4 if row.label.contains("CUB") => Some("cub"),
        Table::Table4 => Some("scenes"),
        _ => None,
    }
}

/// The loss of `row`'s method, from the trainer's recipes (the presets' own).
fn apply_method(config: &mut RunConfig, row: &Row) {
    let loss = std::mem::take(&mut config.loss);
    let pairs = recipes::at_pairs(row.model);
    config.loss = match row.column.method() {
        None => loss,
        Some(Method::Kd) => recipes::kd(loss),
        Some(Method::AtKd) => recipes::kd(recipes::at(loss, pairs)),
        Some(Method::At { map, group }) => {
            let pairs = match group {
                Some(g) => vec![[g, g]],
                None => pairs,
            };
            let (map_reduce, map_p) = match map {
                // The authors' mean: the same map as the sum after normalisation.
                MapFunction::Sum { p } if p == 2.0 => (MapReduce::Mean, 2.0),
                MapFunction::Sum { p } => (MapReduce::Sum, p),
                MapFunction::Max { p } => (MapReduce::Max, p),
            };
            LossSection { map_reduce, map_p, ..recipes::at(loss, pairs) }
        }
        Some(Method::Gradient { kind }) => recipes::gradient(loss, kind),
    };
    config.loss.at_start_epoch = row.at_start_epoch;
}

/// Training images of the dataset `config` trains on, where the size is known without reading
/// it (for the time estimate).
pub fn train_images(config: &RunConfig) -> Option<usize> {
    let full = match config.data.dataset {
        DatasetName::FashionMnistSubset => 10_000,
        DatasetName::FashionMnist => 60_000,
        DatasetName::Cifar10 | DatasetName::Cifar10Parquet => 50_000,
        DatasetName::Cub => 5_994,
        DatasetName::Scenes => 5_360,
        DatasetName::Imagenet | DatasetName::ImagenetParquet => 1_281_167,
    };
    Some(match config.data.train_limit {
        0 => full,
        n => n.min(full),
    })
}

/// The command that makes `run` by hand: `at-train train` with the keys that differ from the
/// default config.
pub fn command(out: &Path, run: &PlannedRun) -> String {
    let (default, ours) = (flat_config(&RunConfig::default()), flat_config(&run.config));
    let mut cmd = format!("at-train train --run-dir {}", out.join(&run.key).display());
    for (key, value) in &ours {
        if default.get(key) != Some(value) {
            let _ = std::fmt::Write::write_fmt(&mut cmd, format_args!(" --set '{key}={value}'"));
        }
    }
    cmd
}

/// Every key of `config` with its value in TOML, dotted (`optim.lr`).
pub(crate) fn flat_config(config: &RunConfig) -> BTreeMap<String, String> {
    let table: toml::Table = toml::from_str(&config.to_toml()).expect("a config round-trips");
    let mut keys = BTreeMap::new();
    flatten("", &toml::Value::Table(table), &mut keys);
    keys
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        v => {
            out.insert(prefix.to_owned(), v.to_string());
        }
    }
}

/// A one-line summary of a run's method.
fn summary(run: &PlannedRun) -> String {
    let c = &run.config;
    let mut parts = vec![format!("{} on {}", c.student, c.data.dataset)];
    if let Some(t) = &c.teacher {
        parts.push(format!("teacher {}", t.model));
    }
    if c.loss.beta > 0.0 {
        let from = match c.loss.at_start_epoch {
            0 => String::new(),
            e => format!(" from epoch {e}"),
        };
        parts.push(format!(
            "AT beta {} ({} p={}){from}",
            c.loss.beta, c.loss.map_reduce, c.loss.map_p
        ));
    }
    if c.loss.alpha > 0.0 {
        parts.push(format!("KD alpha {} T {}", c.loss.alpha, c.loss.temperature));
    }
    if c.loss.gradient != GradientKind::None {
        parts.push(format!("{} penalty {}", c.loss.gradient, c.loss.gradient_beta));
    }
    parts.push(format!("{} epochs, batch {}, seed {}", c.epochs, c.batch_size, c.seed));
    parts.join(", ")
}

/// The dry run: every run, its config in a line, the command that makes it by hand, and the
/// time it would take from `step_seconds(config)` (seconds per training step, measured by the
/// caller; `None` where it has no measurement), with the total.
pub fn dry_run(plan: &Plan, step_seconds: &mut dyn FnMut(&RunConfig) -> Option<f64>) -> String {
    let mut text = format!(
        "{} — profile {}, seeds {:?}: {} runs in {}\n",
        plan.table.title(),
        plan.profile.name,
        plan.seeds,
        plan.runs.len(),
        plan.out.display()
    );
    let mut labels: Vec<(&str, &str)> =
        plan.skipped.iter().map(|(r, why)| (r.label, *why)).collect();
    labels.dedup();
    for (label, why) in labels {
        text.push_str(&format!("  not run: {label} ({why})\n"));
    }
    let (mut total, mut unknown) = (0.0, 0);
    for (i, run) in plan.runs.iter().enumerate() {
        let estimate = match (step_seconds(&run.config), train_images(&run.config)) {
            (Some(step), Some(images)) => {
                let steps = images.div_ceil(run.config.batch_size) * run.config.epochs;
                let seconds = step * steps as f64;
                total += seconds;
                format!("~{}", duration(seconds))
            }
            _ => {
                unknown += 1;
                "time not estimated".into()
            }
        };
        text.push_str(&format!(
            "[{}/{}] {} ({estimate})\n    {}\n    {}\n",
            i + 1,
            plan.runs.len(),
            run.key,
            summary(run),
            command(&plan.out, run)
        ));
    }
    text.push_str(&format!("estimated training time here: ~{}", duration(total)));
    if unknown > 0 {
        text.push_str(&format!(" for the runs estimated ({unknown} not estimated)"));
    }
    text.push_str(
        " (steps only; evaluation and data loading add to it; a step is timed at the run's batch \
         up to 128 images of 32x32, 32 with a gradient penalty, 8 of 224x224, and scaled per image \
         beyond)\n",
    );
    text
}

fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s if s < 3.0 * 86_400.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86_400.0),
    }
}
