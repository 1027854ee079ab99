//! The training loop: a student, optionally a frozen teacher, the losses of at-losses, SGD;
//! metrics per epoch, atomic checkpoints, exact resume.
//!
//! A run directory holds `config.toml` (the resolved config), `metrics.jsonl` (a line per epoch),
//! `checkpoints/<tag>/` (weights with batch-norm statistics, optimiser state, position and partial
//! metrics) with `checkpoints/latest` naming the newest, and, at the end, `model.safetensors` and
//! `result.json`. The data order and augmentations are functions of `(seed, epoch)`, so a resumed
//! run ends with the same weights and metrics as an uninterrupted one.

mod checkpoint;
mod epochs;
mod evaluate;
mod metrics;
mod progress;
mod step;
mod teacher;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use at_data::{Loader, LoaderConfig};
use at_losses::LossConfig;
use at_losses::gradient::GradientConfig;
use at_losses::second_order::SecondOrder;
use at_models::{AttentionModel, ModelOptions};
use candle_core::Device;
use candle_nn::VarMap;

use crate::config::{DeviceSpec, RunConfig};
use crate::data::{self, Data};
use crate::init::seeded_var_builder;
use crate::optim::Sgd;

pub use checkpoint::write_atomically;
pub use evaluate::{RunModel, evaluate, top_k_correct};
pub use metrics::{EpochMetrics, RunResult, read_metrics};
pub use step::{detach_all, gradient_step, wanted_maps};
pub use teacher::load_teacher;

use checkpoint::Position;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks a running training loop to checkpoint and stop after its current batch (the handler of
/// [`install_interrupt_handler`] calls this).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes Ctrl-C, `kill` (SIGTERM) and a closed terminal (SIGHUP) stop training after the batch
/// in flight, with a checkpoint, so that running the same command again loses nothing else; a
/// second signal exits at once. Once per process (the signal handler is process-wide).
pub fn install_interrupt_handler() -> Result<()> {
    static TWICE: AtomicBool = AtomicBool::new(false);
    ctrlc::set_handler(|| {
        eprintln!("interrupted: writing a checkpoint after this batch (press again to abort)");
        if TWICE.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        interrupt();
    })
    .context("cannot install the interrupt handler")
}

/// Opens the device a config names: the one place a device is chosen.
pub fn device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Metal => Device::new_metal(0)
            .context("cannot open the Metal device (build with --features metal)"),
        DeviceSpec::Cuda(ordinal) => Device::new_cuda(ordinal)
            .with_context(|| format!("cannot open {spec} (build with --features cuda)")),
    }
}

/// How often a run checkpoints inside an epoch by default: 10 minutes.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// What happens on top of training, for tests and the command line.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop (with a checkpoint, as Ctrl-C does) once this many epochs are complete.
    pub stop_after_epochs: Option<usize>,
    /// Stop (with a checkpoint) after this many batches of the first epoch run in this call.
    pub stop_after_batches: Option<usize>,
    /// No progress bar, even on a terminal (tests, and runs started by another tool).
    pub quiet: bool,
    /// A checkpoint inside an epoch this often, so that a crash or `kill -9` (which no
    /// handler sees) loses at most this much training; `None` is [`CHECKPOINT_EVERY`].
    pub checkpoint_every: Option<std::time::Duration>,
    /// The process's second-order thread (`SecondOrder::start`, first thing in `main`), which
    /// a run with `loss.gradient` needs; `None` refuses such runs with an error that says so.
    pub second_order: Option<SecondOrder>,
}

/// Trains `config` in `dir`, a new directory (created; an existing non-empty one is refused).
pub fn train(config: &RunConfig, dir: &Path, options: &RunOptions) -> Result<RunResult> {
    if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false) {
        bail!(
            "run directory {} already exists; pass `--resume {}` to continue it, or choose another",
            dir.display(),
            dir.display()
        )
    }
    config.validate()?;
    std::fs::create_dir_all(dir.join("checkpoints"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomically(&dir.join("config.toml"), config.to_toml().as_bytes())?;
    Run::new(config.clone(), dir, Purpose::Train)?.go(Position::default(), options)
}

/// Continues the run in `dir` from its last checkpoint, with the config it was started with.
pub fn resume(dir: &Path, options: &RunOptions) -> Result<RunResult> {
    let config = RunConfig::load(&dir.join("config.toml"))?;
    let mut run = Run::new(config, dir, Purpose::Train)?;
    let position = run.restore()?;
    run.go(position, options)
}

/// What a [`Run`] is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// Training: the pretrained start and the teacher are read.
    Train,
    /// Evaluation or attention maps of trained weights, loaded next.
    Inspect,
}

/// A run's state: its config, data, networks, optimiser and losses. Its jobs live in the
/// submodules: the epoch loop (`epochs`), one step (`step`), checkpoints (`checkpoint`),
/// metrics (`metrics`), the progress display (`progress`), evaluation (`evaluate`) and the
/// teacher (`teacher`).
struct Run {
    config: RunConfig,
    dir: PathBuf,
    device: Device,
    data: Data,
    varmap: VarMap,
    student: Box<dyn AttentionModel>,
    teacher: Option<Box<dyn AttentionModel>>,
    sgd: Sgd,
    loss: LossConfig,
    gradient: Option<GradientConfig>,
    /// From [`RunOptions::second_order`], for `loss.gradient`.
    second_order: Option<SecondOrder>,
}

impl Run {
    /// Builds the run. For [`Purpose::Inspect`] (evaluation, maps) the trained weights are
    /// loaded next, so neither the pretrained start nor the teacher is read.
    fn new(config: RunConfig, dir: &Path, purpose: Purpose) -> Result<Self> {
        let training = purpose == Purpose::Train;
        let device = device(config.device)?;
        let data = data::load(&config.data)?;
        let options = ModelOptions {
            in_channels: data.in_channels,
            num_classes: data.train.num_classes(),
            ..ModelOptions::default()
        };
        let student_options = ModelOptions {
            freeze_bn: config.freeze_bn,
            freeze_first_group: config.freeze_first_group,
            ..options
        };
        let varmap = VarMap::new();
        let student = at_models::build(
            &config.student,
            &student_options,
            seeded_var_builder(&varmap, config.seed, &device),
        )?;
        if training && !config.pretrained.as_os_str().is_empty() {
            let skip: Vec<&str> = config.pretrained_skip.iter().map(String::as_str).collect();
            let weights = crate::hub::weights_file(&config.pretrained)?;
            at_models::load(&varmap, &weights, &skip).with_context(|| {
                format!("cannot start {} from {}", config.student, config.pretrained.display())
            })?;
        }
        let teacher = match &config.teacher {
            Some(t) if training => Some(load_teacher(&t.model, &t.checkpoint, &options, &device)?),
            _ => None,
        };
        // Without explicit pairs, every group is paired with its namesake; counting the groups
        // takes a forward pass of each network, so it is done only when it is needed.
        let pairs = match &teacher {
            Some(t) if config.loss.pairs.is_empty() && config.loss.beta > 0.0 => {
                let n = student.group_count().min(t.group_count());
                (0..n).map(|i| (i, i)).collect()
            }
            _ => config.loss.pairs.iter().map(|p| (p[0], p[1])).collect(),
        };
        let loss = LossConfig {
            alpha: config.loss.alpha,
            temperature: config.loss.temperature,
            beta: config.loss.beta,
            // The one place the trainer chooses how attention maps are computed: at-kernels'
            // channel reduction and distance where they apply, candle's ops elsewhere.
            at: at_ops::AtConfig {
                backend: at_ops::AtBackend::Kernels(&at_kernels::AT_OPS_KERNELS),
                ..config.at_config()?
            },
            pairs,
        };
        let gradient = config.gradient_config()?;
        if gradient.is_some() && config.loss.gradient_chunks > 1 {
            let bn = varmap
                .data()
                .lock()
                .expect("the student's weights")
                .keys()
                .find(|n| n.ends_with("running_var"))
                .cloned();
            if let Some(bn) = bn {
                bail!(
                    "loss.gradient_chunks = {} splits each batch, which would change batch-norm \
                     statistics, and {} has batch norm (`{bn}`): set loss.gradient_chunks = 1",
                    config.loss.gradient_chunks,
                    config.student
                )
            }
        }
        let sgd = Sgd::new(&varmap, config.sgd());
        Ok(Self {
            config,
            dir: dir.to_path_buf(),
            device,
            data,
            varmap,
            student,
            teacher,
            sgd,
            loss,
            gradient,
            second_order: None,
        })
    }

    fn loaders(&self) -> Result<(Loader, Loader)> {
        let threads = if self.config.threads == 0 {
            LoaderConfig::default().threads
        } else {
            self.config.threads
        };
        let train = LoaderConfig {
            batch_size: self.config.batch_size,
            shuffle: true,
            drop_last: false,
            seed: self.config.seed,
            threads,
            prefetch: 2,
        };
        let test = LoaderConfig { shuffle: false, ..train.clone() };
        Ok((
            Loader::new(self.data.train.clone(), self.data.train_pipeline.clone(), train)?,
            Loader::new(self.data.test.clone(), self.data.test_pipeline.clone(), test)?,
        ))
    }
}
