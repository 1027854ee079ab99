//! The training loop: a student, optionally a frozen teacher, the losses of at-losses, SGD;
//! metrics per epoch, atomic checkpoints, exact resume.
//!
//! A run directory holds `config.toml` (the resolved config), `metrics.jsonl` (a line per epoch),
//! `checkpoints/<tag>/` (weights with batch-norm statistics, optimiser state, position and partial
//! metrics) with `checkpoints/latest` naming the newest, and, at the end, `model.safetensors` and
//! `result.json`. The data order and augmentations are functions of `(seed, epoch)`, so a resumed
//! run ends with the same weights and metrics as an uninterrupted one.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use at_data::{Loader, LoaderConfig};
use at_losses::gradient::{
    GradientConfig, GradientPenalty, TeacherBatch, gradient_student_loss, teacher_outputs,
};
use at_losses::second_order::SecondOrder;
use at_losses::{GroupMaps, LossConfig, LossParts, student_loss_with_maps};
use at_models::{AttentionModel, ModelOptions};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::data::{self, Data};
use crate::init::seeded_var_builder;
use crate::optim::Sgd;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks a running training loop to checkpoint and stop after its current batch (the Ctrl-C
/// handler of the binary calls this).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The device a config names: `cpu`, `cuda:N` or `metal`.
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0)
            .context("cannot open the Metal device (build with --features metal)"),
        cuda if cuda.starts_with("cuda") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse)
                .context("device cuda:N needs a number N")?;
            Device::new_cuda(ordinal)
                .with_context(|| format!("cannot open {cuda} (build with --features cuda)"))
        }
        other => bail!("unknown device `{other}`: use cpu, cuda:N or metal"),
    }
}

/// What happens on top of training, for tests and the command line.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop (with a checkpoint, as Ctrl-C does) once this many epochs are complete.
    pub stop_after_epochs: Option<usize>,
    /// Stop (with a checkpoint) after this many batches of the first epoch run in this call.
    pub stop_after_batches: Option<usize>,
    /// No progress bar, even on a terminal (tests, and runs started by another tool).
    pub quiet: bool,
    /// The process's second-order thread (`SecondOrder::start`, first thing in `main`), which
    /// a run with `loss.gradient` needs; `None` refuses such runs with an error that says so.
    pub second_order: Option<std::sync::Arc<SecondOrder>>,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// The epoch, from 1.
    pub epoch: usize,
    /// Its learning rate.
    pub lr: f64,
    /// Mean total training loss.
    pub train_loss: f64,
    /// Mean cross-entropy.
    pub train_ce: f64,
    /// Mean distillation term (before alpha), when distilling.
    pub train_kd: Option<f64>,
    /// Mean attention distance of each pair (before beta).
    pub train_at: Vec<f64>,
    /// Mean gradient-based penalty (before its beta), with `loss.gradient`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_gradient: Option<f64>,
    /// Training top-1 accuracy, %.
    pub train_top1: f64,
    /// Test cross-entropy.
    pub test_loss: f64,
    /// Test top-1 accuracy, %.
    pub test_top1: f64,
    /// Test top-5 accuracy, %.
    pub test_top5: f64,
    /// Wall-clock seconds of the epoch (training and evaluation).
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
}

/// The sums behind an epoch's training metrics, kept across a mid-epoch checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Sums {
    loss: f64,
    ce: f64,
    kd: f64,
    at: Vec<f64>,
    #[serde(default)]
    gradient: f64,
    correct: usize,
    seen: usize,
    seconds: f64,
}

/// Where a run stands: saved with each checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Position {
    /// The epoch in progress (or the next one when `batch == 0`), from 0.
    epoch: usize,
    /// Batches of it already done.
    batch: usize,
    sums: Sums,
}

/// `result.json`: how the run ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The student's name.
    pub student: String,
    /// The teacher's name, if any.
    pub teacher: Option<String>,
    /// Epochs trained.
    pub epochs: usize,
    /// Final test top-1 accuracy, %.
    pub test_top1: f64,
    /// Final test top-5 accuracy, %.
    pub test_top5: f64,
    /// Final test error (100 - top-1), %, as the paper reports.
    pub test_error: f64,
    /// Seconds of training and evaluation over the whole run.
    pub seconds: f64,
    /// Whether the run stopped before its last epoch (Ctrl-C or a stop option).
    pub interrupted: bool,
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
    Run::new(config.clone(), dir, true)?.go(Position::default(), options)
}

/// Continues the run in `dir` from its last checkpoint, with the config it was started with.
pub fn resume(dir: &Path, options: &RunOptions) -> Result<RunResult> {
    let config = RunConfig::load(&dir.join("config.toml"))?;
    let mut run = Run::new(config, dir, true)?;
    let position = run.restore()?;
    run.go(position, options)
}

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
    second_order: Option<std::sync::Arc<SecondOrder>>,
}

impl Run {
    /// Builds the run. With `training` false (evaluation, maps) the trained weights are loaded
    /// next, so neither the pretrained start nor the teacher is read.
    fn new(config: RunConfig, dir: &Path, training: bool) -> Result<Self> {
        let device = device(&config.device)?;
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
            at_models::load(&varmap, &config.pretrained, &skip).with_context(|| {
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

    fn go(mut self, mut position: Position, options: &RunOptions) -> Result<RunResult> {
        self.second_order = options.second_order.clone();
        if self.gradient.is_some() && self.second_order.is_none() {
            bail!(
                "loss.gradient = \"{}\" needs second-order gradients: the caller must pass \
                 RunOptions::second_order (SecondOrder::start, first thing in main)",
                self.config.loss.gradient
            )
        }
        let (train_loader, test_loader) = self.loaders()?;
        let schedule = self.config.schedule()?;
        let epochs = self.config.epochs;
        let mut batches_this_call = 0usize;
        let mut total_seconds = previous_seconds(&self.dir)?;
        let mut last: Option<EpochMetrics> = None;
        while position.epoch < epochs {
            let epoch = position.epoch;
            let lr = schedule.lr(self.config.optim.lr, epoch);
            self.sgd.set_lr(lr);
            let n_batches = train_loader.batches_per_epoch();
            let progress =
                Progress::new(epoch + 1, epochs, n_batches, position.batch, options.quiet);
            let started = Instant::now();
            let mut sums = std::mem::take(&mut position.sums);
            for batch in train_loader.epoch_from(epoch as u64, position.batch, &self.device) {
                let batch = batch?;
                self.step(&batch.images, &batch.labels, &mut sums)?;
                position.batch += 1;
                batches_this_call += 1;
                progress.update(position.batch, &sums);
                let stop_here = options.stop_after_batches == Some(batches_this_call)
                    && position.batch < n_batches;
                if INTERRUPTED.load(Ordering::SeqCst) || stop_here {
                    sums.seconds += started.elapsed().as_secs_f64();
                    position.sums = sums;
                    self.checkpoint(&position)?;
                    progress.finish();
                    eprintln!(
                        "stopped at epoch {}, batch {}: continue with `at-train train --resume {}`",
                        epoch + 1,
                        position.batch,
                        self.dir.display()
                    );
                    return self.result(last.as_ref(), total_seconds, true);
                }
            }
            progress.finish();
            let (test_loss, test_top1, test_top5) =
                evaluate(self.student.as_ref(), &test_loader, &self.device)?;
            sums.seconds += started.elapsed().as_secs_f64();
            let seen = sums.seen.max(1) as f64;
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                lr,
                train_loss: sums.loss / seen,
                train_ce: sums.ce / seen,
                train_kd: (self.loss.alpha > 0.0).then(|| sums.kd / seen),
                train_at: sums.at.iter().map(|a| a / seen).collect(),
                train_gradient: self.gradient.is_some().then(|| sums.gradient / seen),
                train_top1: 100.0 * sums.correct as f64 / seen,
                test_loss,
                test_top1,
                test_top5,
                seconds: sums.seconds,
                images_per_second: sums.seen as f64 / sums.seconds.max(1e-9),
            };
            total_seconds += sums.seconds;
            println!(
                "epoch {}/{epochs}: lr {lr:.4}, train loss {:.4}, train top-1 {:.2}%, test top-1 {:.2}%, top-5 {:.2}%, {:.0} images/s",
                metrics.epoch,
                metrics.train_loss,
                metrics.train_top1,
                metrics.test_top1,
                metrics.test_top5,
                metrics.images_per_second
            );
            position = Position { epoch: epoch + 1, batch: 0, sums: Sums::default() };
            self.append_metrics(&metrics)?;
            self.checkpoint(&position)?;
            last = Some(metrics);
            if options.stop_after_epochs == Some(position.epoch) && position.epoch < epochs
                || INTERRUPTED.load(Ordering::SeqCst)
            {
                return self.result(last.as_ref(), total_seconds, true);
            }
        }
        let last = match last {
            Some(m) => m,
            None => read_metrics(&self.dir)?
                .pop()
                .context("the run has no metrics: was it trained at all?")?,
        };
        at_models::save(&self.varmap, &self.dir.join("model.safetensors"))?;
        let result = self.result(Some(&last), total_seconds, false)?;
        write_atomically(
            &self.dir.join("result.json"),
            serde_json::to_string_pretty(&result)?.as_bytes(),
        )?;
        Ok(result)
    }

    fn step(&mut self, images: &Tensor, labels: &Tensor, sums: &mut Sums) -> Result<()> {
        let (parts, grads) = match &self.gradient {
            Some(config) => {
                let second_order =
                    self.second_order.as_deref().context("checked when the run started")?;
                gradient_step(
                    self.student.as_ref(),
                    self.teacher.as_deref(),
                    (images, labels),
                    config,
                    self.config.loss.gradient_chunks,
                    second_order,
                )?
            }
            None => {
                let (maps_s, maps_t) = wanted_maps(&self.loss, self.teacher.is_some());
                let out = self.student.forward_with_maps(images, true, &maps_s)?;
                let teacher_out = match &self.teacher {
                    Some(t) if self.loss.alpha > 0.0 || self.loss.beta > 0.0 => {
                        Some(t.forward_with_maps(images, false, &maps_t)?)
                    }
                    _ => None,
                };
                let teacher = teacher_out.as_ref().map(|o| (&o.logits, &o.groups[..]));
                let maps = GroupMaps {
                    student: &out.maps,
                    teacher: teacher_out.as_ref().map_or(&[], |t| &t.maps),
                };
                let parts = student_loss_with_maps(
                    &out.logits,
                    labels,
                    &out.groups,
                    teacher,
                    &self.loss,
                    maps,
                )?;
                let grads = parts.total.backward()?;
                (parts, grads)
            }
        };
        self.sgd.step(&grads)?;

        let n = labels.dim(0)?;
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        sums.loss += scalar(&parts.total)? * n as f64;
        sums.ce += scalar(&parts.ce)? * n as f64;
        if let Some(kd) = &parts.kd {
            sums.kd += scalar(kd)? * n as f64;
        }
        sums.at.resize(parts.at.len(), 0.0);
        for (sum, at) in sums.at.iter_mut().zip(&parts.at) {
            *sum += scalar(at)? * n as f64;
        }
        if let Some(penalty) = &parts.gradient {
            sums.gradient += scalar(penalty)? * n as f64;
        }
        let (top1, _) = top_k_correct(&parts.logits, labels)?;
        sums.correct += top1;
        sums.seen += n;
        if !sums.loss.is_finite() {
            bail!(
                "the training loss is not finite (NaN or infinite): lower the learning rate or beta"
            )
        }
        Ok(())
    }

    fn checkpoint(&self, position: &Position) -> Result<()> {
        let tag = format!("epoch-{:04}-batch-{:05}", position.epoch, position.batch);
        let dir = self.dir.join("checkpoints").join(&tag);
        let tmp = self.dir.join("checkpoints").join(format!("{tag}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        at_models::save(&self.varmap, &tmp.join("model.safetensors"))?;
        let optimizer: HashMap<String, Tensor> = self.sgd.state().clone();
        candle_core::safetensors::save(&optimizer, tmp.join("optimizer.safetensors"))?;
        std::fs::write(tmp.join("position.json"), serde_json::to_string_pretty(position)?)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)?;
        let previous = std::fs::read_to_string(self.dir.join("checkpoints/latest")).ok();
        write_atomically(&self.dir.join("checkpoints/latest"), tag.as_bytes())?;
        // Keep the newest checkpoint only: the previous one is gone once `latest` moved on.
        if let Some(previous) = previous.filter(|p| p.trim() != tag) {
            let _ = std::fs::remove_dir_all(self.dir.join("checkpoints").join(previous.trim()));
        }
        Ok(())
    }

    fn restore(&mut self) -> Result<Position> {
        let latest = self.dir.join("checkpoints/latest");
        let tag = std::fs::read_to_string(&latest).with_context(|| {
            format!(
                "no checkpoint to resume from in {} (missing {})",
                self.dir.display(),
                latest.display()
            )
        })?;
        let dir = self.dir.join("checkpoints").join(tag.trim());
        at_models::load(&self.varmap, &dir.join("model.safetensors"), &[])?;
        let state =
            candle_core::safetensors::load(dir.join("optimizer.safetensors"), &self.device)?;
        self.sgd.load_state(state)?;
        let position: Position =
            serde_json::from_str(&std::fs::read_to_string(dir.join("position.json"))?)
                .with_context(|| format!("{} is damaged", dir.join("position.json").display()))?;
        // Metrics of epochs after the checkpoint (written before a crash) are dropped.
        let kept: Vec<EpochMetrics> =
            read_metrics(&self.dir)?.into_iter().filter(|m| m.epoch <= position.epoch).collect();
        let text: String = kept
            .iter()
            .map(|m| serde_json::to_string(m).expect("metrics serialise") + "\n")
            .collect();
        write_atomically(&self.dir.join("metrics.jsonl"), text.as_bytes())?;
        Ok(position)
    }

    fn append_metrics(&self, metrics: &EpochMetrics) -> Result<()> {
        let path = self.dir.join("metrics.jsonl");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        writeln!(file, "{}", serde_json::to_string(metrics)?)?;
        file.sync_all()?;
        Ok(())
    }

    fn result(
        &self,
        last: Option<&EpochMetrics>,
        seconds: f64,
        interrupted: bool,
    ) -> Result<RunResult> {
        let (top1, top5, epochs) =
            last.map_or((0.0, 0.0, 0), |m| (m.test_top1, m.test_top5, m.epoch));
        Ok(RunResult {
            student: self.config.student.clone(),
            teacher: self.config.teacher.as_ref().map(|t| t.model.clone()),
            epochs,
            test_top1: top1,
            test_top5: top5,
            test_error: 100.0 - top1,
            seconds,
            interrupted,
        })
    }
}

/// The seconds recorded in `metrics.jsonl` so far.
fn previous_seconds(dir: &Path) -> Result<f64> {
    Ok(read_metrics(dir)?.iter().fold(0.0, |total, m| total + m.seconds))
}

/// Every line of `dir/metrics.jsonl` (none when it does not exist).
pub fn read_metrics(dir: &Path) -> Result<Vec<EpochMetrics>> {
    let path = dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(vec![]) };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {} is damaged", path.display(), i + 1))
        })
        .collect()
}

/// Builds `model` and loads `checkpoint` into it strictly, then keeps its weights as constants
/// (no gradient is ever tracked through the teacher).
pub fn load_teacher(
    model: &str,
    checkpoint: &Path,
    options: &ModelOptions,
    device: &Device,
) -> Result<Box<dyn AttentionModel>> {
    let varmap = VarMap::new();
    at_models::build(model, options, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    at_models::load(&varmap, checkpoint, &[])
        .with_context(|| format!("the teacher checkpoint does not fit a {model}"))?;
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("the VarMap lock is not poisoned")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    Ok(at_models::build(model, options, VarBuilder::from_tensors(tensors, DType::F32, device))?)
}

/// (top-1, top-5) correct predictions of `logits` against `labels`.
pub fn top_k_correct(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    let labels: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
    let (mut top1, mut top5) = (0, 0);
    for (row, &label) in rows.iter().zip(&labels) {
        let target = row[label as usize];
        let above = row.iter().filter(|&&v| v > target).count();
        top1 += (above == 0) as usize;
        top5 += (above < 5) as usize;
    }
    Ok((top1, top5))
}

/// Test cross-entropy and top-1/top-5 accuracy (%) of `model` in evaluation mode.
pub fn evaluate(
    model: &dyn AttentionModel,
    loader: &Loader,
    device: &Device,
) -> Result<(f64, f64, f64)> {
    let (mut loss, mut top1, mut top5, mut seen) = (0.0, 0, 0, 0);
    for batch in loader.epoch(0, device) {
        let batch = batch?;
        let logits = model.forward_t(&batch.images, false)?.logits.detach();
        let n = batch.indices.len();
        loss += at_losses::cross_entropy(&logits, &batch.labels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            * n as f64;
        let (c1, c5) = top_k_correct(&logits, &batch.labels)?;
        top1 += c1;
        top5 += c5;
        seen += n;
    }
    let seen = seen.max(1) as f64;
    Ok((loss / seen, 100.0 * top1 as f64 / seen, 100.0 * top5 as f64 / seen))
}

/// Writes `bytes` to `path` through a temporary file and a rename: a crash leaves the old file
/// or the new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// A progress bar on a terminal, a few plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    total: usize,
    started: Instant,
    start_batch: usize,
}

impl Progress {
    fn new(epoch: usize, epochs: usize, total: usize, start_batch: usize, quiet: bool) -> Self {
        let label = format!("epoch {epoch}/{epochs}");
        let bar = (!quiet && std::io::stdout().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} batches, {msg} ({eta} left)",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            bar.set_position(start_batch as u64);
            bar
        });
        Self { bar, label, total, started: Instant::now(), start_batch }
    }

    fn update(&self, done: usize, sums: &Sums) {
        let loss = sums.loss / sums.seen.max(1) as f64;
        let rate =
            (done - self.start_batch) as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        match &self.bar {
            Some(bar) => {
                bar.set_position(done as u64);
                bar.set_message(format!("loss {loss:.4}, {rate:.2} batches/s"));
            }
            None if self.total >= 10 && done.is_multiple_of((self.total / 10).max(1)) => {
                tracing::info!(
                    "{}: batch {done}/{}, loss {loss:.4}, {rate:.2} batches/s",
                    self.label,
                    self.total
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A run's trained student, ready for evaluation or inspection: its final `model.safetensors`,
/// else its last checkpoint.
pub struct RunModel {
    run: Run,
}

impl RunModel {
    /// Opens the run in `dir`, whose config is `config`.
    pub fn open(config: RunConfig, dir: &Path) -> Result<Self> {
        let run = Run::new(config, dir, false)?;
        let weights = dir.join("model.safetensors");
        let weights = if weights.exists() {
            weights
        } else {
            let tag =
                std::fs::read_to_string(dir.join("checkpoints/latest")).with_context(|| {
                    format!("{} has neither model.safetensors nor a checkpoint", dir.display())
                })?;
            dir.join("checkpoints").join(tag.trim()).join("model.safetensors")
        };
        at_models::load(&run.varmap, &weights, &[])?;
        Ok(Self { run })
    }

    /// The student network.
    pub fn model(&self) -> &dyn AttentionModel {
        self.run.student.as_ref()
    }

    /// The run's datasets and pipelines.
    pub fn data(&self) -> &Data {
        &self.run.data
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.run.device
    }

    /// (side, channels) of the dataset's images before their pipeline.
    pub fn input_shape(&self) -> Result<(usize, usize)> {
        let (image, _) = self.run.data.test.get(0)?;
        Ok((image.height, image.channels))
    }

    /// Test cross-entropy, top-1 % and top-5 %.
    pub fn evaluate(&self) -> Result<(f64, f64, f64)> {
        let (_, test) = self.run.loaders()?;
        evaluate(self.model(), &test, &self.run.device)
    }
}

/// Evaluates the model of the run in `dir` on the run's test set: (loss, top-1 %, top-5 %).
pub fn evaluate_run(dir: &Path) -> Result<(f64, f64, f64)> {
    RunModel::open(RunConfig::load(&dir.join("config.toml"))?, dir)?.evaluate()
}

/// The groups whose attention maps the networks should make themselves for `loss`, as
/// `(student's, teacher's)`: the paired ones, with a teacher and attention transfer, when the
/// map is the one they make (`p = 2`, channel mean); none otherwise.
pub fn wanted_maps(loss: &LossConfig, teacher: bool) -> (Vec<usize>, Vec<usize>) {
    if !teacher || loss.beta <= 0.0 || !loss.at.map.is_mean_square() {
        return (vec![], vec![]);
    }
    loss.pairs.iter().map(|&(s, t)| (s, t)).unzip()
}

/// The loss and gradients of one step with a gradient-based penalty (`loss.gradient`): the
/// teacher's logits and input gradient on this thread (first-order, and only when distillation
/// or gradient transfer needs them), the student's double-backpropagation graph on a
/// second-order one, and its `backward` back on this thread, where gradients are detached as
/// they are built (no third graph). With `chunks > 1` the batch is processed in chunks whose
/// gradients are summed (exact for a student without batch norm).
pub fn gradient_step(
    student: &dyn AttentionModel,
    teacher: Option<&dyn AttentionModel>,
    (images, labels): (&Tensor, &Tensor),
    config: &GradientConfig,
    chunks: usize,
    second_order: &SecondOrder,
) -> Result<(LossParts, GradStore)> {
    let teacher_out = match teacher {
        Some(t) if config.alpha > 0.0 || config.penalty == GradientPenalty::Transfer => {
            let forward = |x: &Tensor| Ok(t.forward_t(x, false)?.logits);
            Some(teacher_outputs(&forward, images, labels)?)
        }
        _ => None,
    };
    let batch = images.dim(0)?;
    let size = batch.div_ceil(chunks.clamp(1, batch));
    let value = |t: &Tensor| -> Result<f64> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
    };
    let (mut total, mut ce, mut kd, mut penalty) = (0f64, 0f64, 0f64, 0f64);
    let mut logits = vec![];
    let mut grads: Option<GradStore> = None;
    for start in (0..batch).step_by(size) {
        let len = size.min(batch - start);
        let x = images.narrow(0, start, len)?;
        let y = labels.narrow(0, start, len)?;
        let chunk = match &teacher_out {
            Some((l, j)) => Some((l.narrow(0, start, len)?, j.narrow(0, start, len)?)),
            None => None,
        };
        let teacher = chunk.as_ref().map(|(logits, jacobian)| TeacherBatch { logits, jacobian });
        let parts = second_order.run(|| {
            let forward = |x: &Tensor| Ok(student.forward_t(x, true)?.logits);
            gradient_student_loss(&forward, &x, &y, teacher, config, batch)
        })?;
        // Detached: a weight's gradient (the weight-gradient op of a convolution, say) refers
        // to the chunk's activations, and would keep the whole chunk's graph alive.
        let chunk_grads = detach_all(parts.total.backward()?)?;
        match &mut grads {
            Some(sum) => sum.extend(chunk_grads)?,
            None => grads = Some(chunk_grads),
        }
        let share = len as f64 / batch as f64;
        total += value(&parts.total)?;
        ce += value(&parts.ce)? * share;
        if let Some(k) = &parts.kd {
            kd += value(k)? * share;
        }
        if let Some(p) = &parts.gradient {
            penalty += value(p)?;
        }
        logits.push(parts.logits.detach());
    }
    let device = images.device();
    let parts = LossParts {
        total: Tensor::new(total, device)?,
        ce: Tensor::new(ce, device)?,
        kd: (config.alpha > 0.0).then(|| Tensor::new(kd, device)).transpose()?,
        at: vec![],
        gradient: Some(Tensor::new(penalty, device)?),
        logits: Tensor::cat(&logits, 0)?,
    };
    Ok((parts, grads.expect("a batch has at least one chunk")))
}

/// The same gradients without the graphs they were computed through.
pub fn detach_all(mut grads: GradStore) -> candle_core::Result<GradStore> {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        let detached = grads.get_id(id).expect("listed").detach();
        grads.insert_id(id, detached);
    }
    Ok(grads)
}
