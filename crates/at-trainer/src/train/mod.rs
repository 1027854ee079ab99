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
mod parallel;
mod step;
mod teacher;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use at_data::{Loader, LoaderConfig};
use at_losses::LossConfig;
use at_losses::gradient::GradientConfig;
use at_losses::second_order::SecondOrder;
use at_models::{AttentionModel, Backend, ModelOptions};
use candle_core::Device;
use candle_nn::VarMap;

use crate::config::{DeviceSpec, RunConfig};
use crate::data::{self, Data};
use crate::init::seeded_var_builder;
use crate::optim::Sgd;

pub use checkpoint::write_atomically;
pub use evaluate::{RunModel, evaluate, top_k_correct};
pub use metrics::{EpochMetrics, RunResult, read_metrics};
pub use parallel::Parallel;
pub use step::{backward_merged, detach_all, gradient_step, student_loss, wanted_maps};
pub use teacher::load_teacher;

use checkpoint::Position;

/// A request to stop training after the batch in flight, with a checkpoint, shared between the
/// training loop and whoever asks (a signal handler, another thread, a test). Cloning shares it.
/// A value, not a process-wide flag: two runs in one process stop independently.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// A handle nobody has set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every loop holding this handle to checkpoint and stop after its current batch.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where a run's progress goes: the `at-train` binary draws a bar on a terminal; the default
/// ([`LogObserver`]) writes a few `tracing` lines. Every method has a default that does that.
pub trait Observer: Send + Sync {
    /// An epoch (from 1) of `epochs` starts, with `batches` batches, `start_batch` of them done
    /// before (a resumed epoch).
    fn epoch_started(&self, epoch: usize, epochs: usize, batches: usize, start_batch: usize) {
        let _ = (epoch, epochs, batches, start_batch);
    }

    /// `done` batches of `batches` of epoch `epoch` are done, at `rate` batches per second in
    /// this call; the epoch's mean loss so far where the sums were read back from the device
    /// (every tenth of an epoch), `None` between.
    fn batch_done(&self, epoch: usize, done: usize, batches: usize, loss: Option<f64>, rate: f64) {
        if let Some(loss) = loss
            && batches >= 10
        {
            tracing::info!(
                "epoch {epoch}: batch {done}/{batches}, loss {loss:.4}, {rate:.2} batches/s"
            );
        }
    }

    /// The epoch's batches are done (before its evaluation).
    fn epoch_batches_done(&self) {}

    /// An epoch finished and was evaluated; `epochs` is the run's total.
    fn epoch_finished(&self, metrics: &EpochMetrics, epochs: usize) {
        tracing::info!("{}", epoch_line(metrics, epochs));
    }

    /// The run stopped early (an [`Interrupt`] or a stop option) after `batch` batches of epoch
    /// `epoch` (from 1), with a checkpoint in `dir`.
    fn stopped(&self, epoch: usize, batch: usize, dir: &Path) {
        tracing::warn!(
            "stopped at epoch {epoch}, batch {batch}, checkpointed in {}",
            dir.display()
        );
    }
}

/// The default [`Observer`]: `tracing` lines only.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogObserver;

impl Observer for LogObserver {}

/// An epoch's metrics in one line, as the binary prints them.
pub fn epoch_line(m: &EpochMetrics, epochs: usize) -> String {
    format!(
        "epoch {}/{epochs}: lr {:.4}, train loss {:.4}, train top-1 {:.2}%, test top-1 {:.2}%, top-5 {:.2}%, {:.0} images/s",
        m.epoch, m.lr, m.train_loss, m.train_top1, m.test_top1, m.test_top5, m.images_per_second
    )
}

/// Turns a weights reference of a config (`pretrained`, `teacher.checkpoint`) into a local
/// file: at-hub's resolver fetches `hf://owner/name`; without one such a reference is refused.
pub type ResolveWeights = Arc<dyn Fn(&Path) -> Result<PathBuf> + Send + Sync>;

/// The scheme of a reference to a Hub model repository in a config (`hf://owner/name`).
pub const HF_SCHEME: &str = "hf://";

/// The repository `path` names when it is `hf://owner/name`.
pub fn hub_repo(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix(HF_SCHEME).filter(|r| !r.is_empty())
}

/// Opens the device a config names: the one place a device is chosen.
pub fn device(spec: DeviceSpec) -> Result<Device> {
    // What a build without the device's feature says, with the fix (candle's own error, that
    // it was not compiled with the feature, follows in the chain).
    let missing = |feature: &str| {
        format!(
            "cannot open {spec}: this build has no {feature} support or no such device; build \
             with `cargo build --release -p at-train --features {feature}`, or pick another \
             --device"
        )
    };
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Metal => Device::new_metal(0).with_context(|| missing("metal")),
        DeviceSpec::Cuda(ordinal) => Device::new_cuda(ordinal).with_context(|| missing("cuda")),
    }
}

/// How often a run checkpoints inside an epoch by default: 10 minutes.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// What happens around training: stops, progress, checkpoints, the second-order thread and
/// where `hf://` weights come from. The default is a quiet run that nothing interrupts.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Stop (with a checkpoint, as Ctrl-C does) once this many epochs are complete.
    pub stop_after_epochs: Option<usize>,
    /// Stop (with a checkpoint) after this many batches of the first epoch run in this call.
    pub stop_after_batches: Option<usize>,
    /// Set to stop after the batch in flight, with a checkpoint (the binary's signal handler
    /// holds a clone).
    pub interrupt: Interrupt,
    /// Where progress goes; `None` is [`LogObserver`].
    pub observer: Option<Arc<dyn Observer>>,
    /// A checkpoint inside an epoch this often, so that a crash or `kill -9` (which no
    /// handler sees) loses at most this much training; `None` is [`CHECKPOINT_EVERY`].
    pub checkpoint_every: Option<std::time::Duration>,
    /// The process's second-order thread (`SecondOrder::start`, first thing in `main`), which
    /// a run with `loss.gradient` needs; `None` refuses such runs with an error that says so.
    pub second_order: Option<SecondOrder>,
    /// Fetches `hf://owner/name` weights (`at_hub::resolver()`); `None` refuses them.
    pub resolve_weights: Option<ResolveWeights>,
    /// The device to train on whatever the config says (`--device`): a new run records it, a
    /// resumed one continues on it. `None`: the config's `device`.
    pub device: Option<DeviceSpec>,
    /// What the networks and the attention losses run: at-kernels' ops (the default; off the
    /// CPU they fall back to the device's), or `Backend::Device`, a GPU's op mix on any device,
    /// for the tests. The same arithmetic on a resume requires the same backend.
    pub backend: Backend,
    /// Data-parallel training across the ranks of a collective (see [`Parallel`]); `None`: this
    /// process alone.
    pub parallel: Option<Parallel>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("stop_after_epochs", &self.stop_after_epochs)
            .field("stop_after_batches", &self.stop_after_batches)
            .field("interrupt", &self.interrupt)
            .field("observer", &self.observer.is_some())
            .field("checkpoint_every", &self.checkpoint_every)
            .field("second_order", &self.second_order.is_some())
            .field("resolve_weights", &self.resolve_weights.is_some())
            .field("device", &self.device)
            .field("backend", &self.backend)
            .field("parallel", &self.parallel)
            .finish()
    }
}

impl RunOptions {
    /// The local file of a weights reference: itself, or for `hf://owner/name` what
    /// [`RunOptions::resolve_weights`] fetched.
    pub fn weights_file(&self, path: &Path) -> Result<PathBuf> {
        match (hub_repo(path), &self.resolve_weights) {
            (None, _) => Ok(path.to_path_buf()),
            (Some(_), Some(resolve)) => resolve(path),
            (Some(repo), None) => bail!(
                "{} names the Hub repository {repo}, and this caller gives no way to fetch it: \
                 pass RunOptions::resolve_weights (at_hub::resolver()), or download the weights \
                 and name the file",
                path.display()
            ),
        }
    }
}

/// Trains `config` in `dir`, a new directory (created; an existing non-empty one is refused).
///
/// Nothing is written before the device is open, the data found and the networks built, so a
/// start that fails (a device this build lacks, a missing dataset) leaves no directory behind;
/// a directory holding only what such a start wrote before this rule (a `config.toml` and an
/// empty `checkpoints/`) is started again, not refused. [`RunOptions::device`], when given, is
/// the device (and is what `config.toml` records).
pub fn train(config: &RunConfig, dir: &Path, options: &RunOptions) -> Result<RunResult> {
    let leader = options.parallel.as_ref().is_none_or(Parallel::is_leader);
    if leader && has_progress(dir) {
        bail!(
            "run directory {} already exists; pass `--resume {}` to continue it, or choose another",
            dir.display(),
            dir.display()
        )
    }
    let mut config = config.clone();
    if let Some(device) = options.device {
        config.device = device;
    }
    config.validate()?;
    let run = Run::new(config.clone(), dir, Purpose::Train(options))?;
    if leader {
        std::fs::create_dir_all(dir.join("checkpoints"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomically(&dir.join("config.toml"), config.to_toml().as_bytes())?;
    }
    run.go(Position::default(), options)
}

/// Whether `dir` holds anything but what a start that failed before training wrote: a
/// `config.toml` and an empty `checkpoints/` (or nothing at all).
fn has_progress(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        match name.to_str() {
            Some("config.toml") => false,
            Some("checkpoints") => {
                std::fs::read_dir(entry.path()).map_or(true, |mut d| d.next().is_some())
            }
            _ => true,
        }
    })
}

/// Continues the run in `dir` from its last checkpoint, with the config it was started with.
/// On [`RunOptions::device`] when it is given (the invocation's device wins over the one the
/// run started on, which is said in a log line), else on the stored config's.
pub fn resume(dir: &Path, options: &RunOptions) -> Result<RunResult> {
    let mut config = RunConfig::load(&dir.join("config.toml"))?;
    if let Some(device) = options.device
        && device != config.device
    {
        tracing::info!(
            "{}: continuing on {device}; it was started on {}",
            dir.display(),
            config.device
        );
        config.device = device;
    }
    let mut run = Run::new(config, dir, Purpose::Train(options))?;
    let position = run.restore()?;
    run.go(position, options)
}

/// What a [`Run`] is built for.
#[derive(Clone, Copy, Debug)]
enum Purpose<'a> {
    /// Training: the pretrained start and the teacher are read (their `hf://` references
    /// resolved by the options).
    Train(&'a RunOptions),
    /// Evaluation or attention maps of trained weights, loaded next.
    Inspect,
}

/// A run's state: its config, data, networks, optimiser and losses. Its jobs live in the
/// submodules: the epoch loop (`epochs`), one step (`step`), checkpoints (`checkpoint`),
/// metrics (`metrics`), evaluation (`evaluate`) and the teacher (`teacher`); progress goes to
/// the caller's [`Observer`].
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
    /// From [`RunOptions::parallel`].
    parallel: Option<Parallel>,
}

impl Run {
    /// Builds the run. For [`Purpose::Inspect`] (evaluation, maps) the trained weights are
    /// loaded next, so neither the pretrained start nor the teacher is read.
    fn new(config: RunConfig, dir: &Path, purpose: Purpose) -> Result<Self> {
        let training = match purpose {
            Purpose::Train(options) => Some(options),
            Purpose::Inspect => None,
        };
        let device = device(config.device)?;
        let data = data::load(&config.data)?;
        let backend = match purpose {
            Purpose::Train(options) => options.backend,
            Purpose::Inspect => Backend::Kernels,
        };
        let options = ModelOptions {
            in_channels: data.in_channels,
            num_classes: data.train.num_classes(),
            backend,
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
        if let Some(options) = training
            && !config.pretrained.as_os_str().is_empty()
        {
            let skip: Vec<&str> = config.pretrained_skip.iter().map(String::as_str).collect();
            let weights = options.weights_file(&config.pretrained)?;
            at_models::load(&varmap, &weights, &skip).with_context(|| {
                format!("cannot start {} from {}", config.student, config.pretrained.display())
            })?;
        }
        let teacher = match &config.teacher {
            Some(t) => match training {
                Some(run_options) => {
                    let weights = run_options.weights_file(&t.checkpoint)?;
                    Some(load_teacher(&t.model, &weights, &options, &device)?)
                }
                None => None,
            },
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
        if let Some(t) = &teacher
            && config.loss.beta > 0.0
            && !config.loss.pairs.is_empty()
        {
            let (ns, nt) = (student.group_count(), t.group_count());
            if let Some(&[s, g]) = config.loss.pairs.iter().find(|&&[s, g]| s >= ns || g >= nt) {
                bail!(
                    "loss.pairs has [{s}, {g}], but {} has groups 0..{ns} and the teacher {} \
                     has 0..{nt}: pair groups that exist",
                    config.student,
                    config.teacher.as_ref().map_or("", |t| t.model.as_str())
                )
            }
        }
        let loss = LossConfig {
            alpha: config.loss.alpha,
            temperature: config.loss.temperature,
            beta: config.loss.beta,
            // The one place the trainer chooses how attention maps are computed: at-kernels'
            // channel reduction and distance where they apply, candle's ops elsewhere.
            at: at_ops::AtConfig {
                backend: crate::bench::at_backend(backend),
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
            parallel: match purpose {
                Purpose::Train(options) => options.parallel.clone(),
                Purpose::Inspect => None,
            },
        })
    }

    /// Whether this process writes the run's files: rank 0, or the only process.
    fn leader(&self) -> bool {
        self.parallel.as_ref().is_none_or(Parallel::is_leader)
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
