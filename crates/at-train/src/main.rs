//! `at-train`: train, evaluate and inspect attention-transfer models, replay the paper's tables,
//! publish to the Hub. The one program of the workspace: it alone parses arguments, installs the
//! signal handler, sets up logging and draws progress; the libraries get those as values.

mod models;
mod progress;
mod ranks;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use at_data::hub::HubOptions;
use at_losses::second_order::SecondOrder;
use at_models::ModelOptions;
use at_repro::{PROFILES, Profile, Table};
use at_trainer::bench::Step;
use at_trainer::config;
use at_trainer::train::{self, Interrupt, RunOptions};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};

/// What `repro` is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    /// Plan, train and report one table.
    Table(Table),
    /// Every table of the profile.
    All,
    /// The report alone, from the finished runs.
    Report,
    /// The figures alone, from the finished runs.
    Figures,
}

/// `table1` ... `table5`, from at-repro's list (one place to add a table).
fn table_parser() -> impl TypedValueParser<Value = Table> {
    PossibleValuesParser::new(Table::ALL.map(Table::name))
        .map(|name| Table::parse(&name).expect("a listed table"))
}

/// A table, `all`, `report` or `figures`.
fn what_parser() -> impl TypedValueParser<Value = What> {
    let names = Table::ALL.map(Table::name).into_iter().chain(["all", "report", "figures"]);
    PossibleValuesParser::new(names).map(|name| match name.as_str() {
        "all" => What::All,
        "report" => What::Report,
        "figures" => What::Figures,
        table => What::Table(Table::parse(table).expect("a listed table")),
    })
}

/// A profile of at-repro's table, each shown in `--help` with what it is.
fn profile_parser() -> impl TypedValueParser<Value = &'static Profile> {
    PossibleValuesParser::new(PROFILES.iter().map(|p| PossibleValue::new(p.name).help(p.about)))
        .map(|name| Profile::named(&name).expect("a listed profile"))
}

/// A model backend.
fn backend_parser() -> impl TypedValueParser<Value = at_models::Backend> {
    use at_models::Backend;
    PossibleValuesParser::new(["kernels", "candle", "device"]).map(|name| match name.as_str() {
        "candle" => Backend::Candle,
        "device" => Backend::Device,
        _ => Backend::Kernels,
    })
}

/// A step of the bench.
fn step_parser() -> impl TypedValueParser<Value = Step> {
    PossibleValuesParser::new(Step::ALL.map(Step::name))
        .map(|name| Step::parse(&name).expect("a listed step"))
}

/// `m` minutes.
fn minutes(m: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(m * 60.0)
}

/// A positive, finite number of minutes.
fn positive_minutes(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(m) if m > 0.0 && m.is_finite() => Ok(m),
        _ => Err(format!("`{s}` is not a positive number of minutes (e.g. 5 or 0.5)")),
    }
}

#[derive(Parser)]
#[command(
    name = "at-train",
    version,
    about = "Attention transfer (Zagoruyko & Komodakis, ICLR 2017) on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a student (and its attention transfer from a teacher) as a config describes.
    Train {
        /// The run's TOML config (`at-train config` prints one with every key).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start from a named preset instead of the defaults (`at-train config --list-presets`).
        #[arg(long, conflicts_with = "config")]
        preset: Option<String>,
        /// Override a config key, e.g. `--set epochs=2 --set loss.beta=1000` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// The new run directory.
        #[arg(long, conflicts_with = "resume")]
        run_dir: Option<PathBuf>,
        /// Continue the run in this directory from its last checkpoint, with the config it was
        /// started with (on --device when given).
        #[arg(long, conflicts_with_all = ["config", "preset", "sets"])]
        resume: Option<PathBuf>,
        /// cpu, cuda, cuda:N or metal: the same as `--set device=`, and for --resume the device
        /// the run continues on [default: the config's].
        #[arg(long)]
        device: Option<config::DeviceSpec>,
        /// Stop with a checkpoint once this many epochs are complete (continue with --resume).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        stop_after_epochs: Option<u64>,
        /// Stop with a checkpoint after this many batches of this invocation's first epoch, as
        /// Ctrl-C would (continue with --resume): a short smoke run on a new machine or cluster.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        stop_after_batches: Option<u64>,
        /// Checkpoint inside an epoch this often, so that a crash or `kill -9` (which no
        /// handler sees) loses at most this much training [default: 10].
        #[arg(long, value_name = "MINUTES", value_parser = positive_minutes)]
        checkpoint_minutes: Option<f64>,
    },
    /// Evaluate a finished run's model (or its last checkpoint) on its test set.
    Eval {
        /// The run directory, or hf://owner/name for a published model.
        run_dir: PathBuf,
        /// The dataset's folder, instead of the one in the run's config.
        #[arg(long)]
        data: Option<PathBuf>,
        /// cpu, cuda, cuda:N or metal [default: the run's; cpu for a published model].
        #[arg(long)]
        device: Option<config::DeviceSpec>,
    },
    /// Replay a table of the paper: train (or resume, or reuse) every run it needs, then write
    /// docs/results/<table>-<profile>.md and .csv beside the paper's numbers.
    Repro {
        /// A table, all (the profile's tables), report (the report alone, from the finished runs)
        /// or figures (training curves and attention maps of the finished runs, into
        /// <report-dir>/figures).
        #[arg(value_parser = what_parser())]
        what: What,
        /// How big the runs are.
        #[arg(long, default_value = "quick", value_parser = profile_parser())]
        profile: &'static Profile,
        /// Seeds per cell [default: the profile's (paper 5, the others 3); Table 3: 1].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        seeds: Option<u64>,
        /// Only this seed (spread cells over machines by hand).
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// Only the rows whose id starts with this (see --dry-run for the ids).
        #[arg(long)]
        only: Option<String>,
        /// cpu, cuda:N or metal.
        #[arg(long, default_value = "cpu")]
        device: config::DeviceSpec,
        /// Use the dataset files in this directory (e.g. Fashion-MNIST's IDX files).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where the runs go [default: runs/repro/<profile>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// With `report` or `figures`: the table.
        #[arg(long, value_parser = table_parser())]
        table: Option<Table>,
        /// Where the report goes [default: beside the runs, in --out]; `--report-dir
        /// docs/results` refreshes the repository's committed one.
        #[arg(long)]
        report_dir: Option<PathBuf>,
        /// Print every run, its config, the command that makes it by hand and the estimated
        /// time (from step times measured here), and train nothing.
        #[arg(long)]
        dry_run: bool,
        /// Checkpoint inside an epoch this often (each run), so that a crash or `kill -9` loses
        /// at most this much training [default: 10].
        #[arg(long, value_name = "MINUTES", value_parser = positive_minutes)]
        checkpoint_minutes: Option<f64>,
    },
    /// The README's main job, `repro table1 --profile quick` by another name: Table 1's
    /// WRN-16-1 <- WRN-16-2 pair on the embedded Fashion-MNIST subset, 3 seeds, 3.5 to 4.2
    /// minutes on a 2-core AMD EPYC, reported in <out>/table1-quick.md.
    Quick {
        /// Where the runs and the report go; finished runs are reused, interrupted ones resumed.
        #[arg(long, default_value = "runs/repro/quick")]
        out: PathBuf,
        /// Where the report goes instead (`docs/results` refreshes the committed one).
        #[arg(long)]
        report_dir: Option<PathBuf>,
        /// cpu, cuda, cuda:N or metal.
        #[arg(long, default_value = "cpu")]
        device: config::DeviceSpec,
    },
    /// Write the attention maps of a run's model, each group's beside its image, as PNGs.
    Maps {
        /// The run directory, or hf://owner/name for a published model.
        run_dir: PathBuf,
        /// The dataset's folder, instead of the one in the run's config.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Image files (JPEG, PNG), resized to the training images' size.
        #[arg(long, num_args = 1..)]
        images: Vec<PathBuf>,
        /// Test-set items, by index (default: the first 4).
        #[arg(long, num_args = 1.., conflicts_with = "images")]
        test_items: Vec<usize>,
        /// Where the PNGs go (default: RUN_DIR/maps).
        #[arg(long)]
        out: Option<PathBuf>,
        /// cpu, cuda, cuda:N or metal [default: the run's; cpu for a published model].
        #[arg(long)]
        device: Option<config::DeviceSpec>,
    },
    /// Print a run config with every key and its value.
    Config {
        /// Start from a named preset.
        #[arg(long)]
        preset: Option<String>,
        /// List the presets instead.
        #[arg(long)]
        list_presets: bool,
        /// Apply these overrides first.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// List the registered models with their exact parameter counts.
    Models {
        /// Number of classes of the classifier head.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        classes: u64,
        /// Input channels (3 for colour images, 1 for Fashion-MNIST).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
        in_channels: u64,
    },
    /// Time training steps on random CIFAR-shaped batches, on any device (what `cargo xtask
    /// bench` measures on the CPU; `xtask/bench/gpu.sh` on a GPU). Prints one JSON line.
    BenchStep {
        /// The student model.
        student: String,
        /// student, teacher (its forward alone), at or at-kd.
        #[arg(value_parser = step_parser())]
        step: Step,
        /// The teacher model (for teacher, at and at-kd).
        #[arg(long, default_value = "wrn-16-2")]
        teacher: String,
        /// Images per batch.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
        batch: u64,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
        steps: u64,
        /// kernels (what training runs), candle (candle's own ops) or device (a GPU's op mix,
        /// on any device).
        #[arg(long, default_value = "kernels", value_parser = backend_parser())]
        backend: at_models::Backend,
        /// cpu, cuda:N or metal.
        #[arg(long, default_value = "cpu")]
        device: config::DeviceSpec,
    },
    /// Run one training step on the CPU and on --device from the same weights and batch, and
    /// compare the loss, every gradient, the running statistics and the evaluation logits: a
    /// WRN-16-1 step, AT+KD from a WRN-16-2, and NIN's gradient attention transfer (second
    /// order). One JSON line per check; fails where a difference exceeds --tolerance. What a GPU
    /// session runs first.
    CheckDevice {
        /// cpu, cuda, cuda:N or metal (cpu runs the op mix of a GPU on the CPU).
        #[arg(long, default_value = "cpu")]
        device: config::DeviceSpec,
        /// Images per batch.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
        batch: u64,
        /// The largest relative difference accepted in the loss, the running statistics and the
        /// evaluation logits.
        #[arg(long, default_value_t = at_trainer::check::Tolerance::default().value)]
        tolerance: f64,
        /// The largest `||a - b|| / ||a||` accepted in a gradient (see at-trainer's
        /// `check::Tolerance` for why it is wider).
        #[arg(long, default_value_t = at_trainer::check::Tolerance::default().gradient)]
        gradient_tolerance: f64,
    },
    /// Publish a finished run to the Hugging Face Hub as a model repository (weights,
    /// config.json, a model card, the run's config and metrics), in one commit; the repository
    /// is created if it is missing. The token comes from HF_TOKEN or `hf auth login`'s file.
    Publish {
        /// The finished run's directory (not with --table).
        run_dir: Option<PathBuf>,
        /// The model repository, owner/name.
        #[arg(long)]
        repo: Option<String>,
        /// Create the repository private.
        #[arg(long)]
        private: bool,
        /// Write the folder that would be uploaded and list its files; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// The branch to commit to [default: main].
        #[arg(long)]
        revision: Option<String>,
        /// Publish every finished student of this repro table (table1 ... table5), one
        /// repository each, named after model, method and teacher (teachers are not published).
        #[arg(long, value_parser = table_parser(), conflicts_with_all = ["run_dir", "repo"])]
        table: Option<Table>,
        /// The profile of --table's runs.
        #[arg(long, default_value = "paper", value_parser = profile_parser(), requires = "table")]
        profile: &'static Profile,
        /// The owner (user or organisation) of --table's repositories.
        #[arg(long, requires = "table")]
        owner: Option<String>,
        /// Where --table's runs are [default: runs/repro/<profile>].
        #[arg(long, requires = "table")]
        runs: Option<PathBuf>,
    },
    /// Download a dataset or pretrained weights from the Hugging Face Hub into its cache, and
    /// print the folder they are in (HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are honoured). A
    /// file already in the cache is not fetched again.
    Download {
        /// What to download.
        #[arg(value_parser = PossibleValuesParser::new(at_hub::DOWNLOADS))]
        dataset: String,
        /// The dataset repository of a mirror (`owner/name`): required for cub and scenes, which
        /// have no official copy on the Hub.
        #[arg(long)]
        repo: Option<String>,
        /// ImageNet: the files of ILSVRC/imagenet-1k to fetch, e.g. data/val_images.tar.gz.
        #[arg(long, num_args = 1..)]
        files: Vec<String>,
        /// Only look in the cache.
        #[arg(long)]
        offline: bool,
    },
}

fn main() -> ExitCode {
    // Before any other thread exists: it writes the environment once (see
    // at_kernels::second_order). Its thread waits idle unless a run asks for second-order
    // gradients (loss.gradient).
    let second_order = match SecondOrder::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    at_kernels::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let parallel = match ranks::join() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli, second_order, parallel.clone()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match parallel {
            // One rank's error ends every rank, which would otherwise wait for it in a
            // collective.
            Some(p) => {
                eprintln!("error: rank {} of {}: {e:#}", p.world.rank(), p.world.size());
                p.world.abort(1)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Makes Ctrl-C, `kill` (SIGTERM) and a closed terminal (SIGHUP) ask the returned handle to stop
/// training after the batch in flight, with a checkpoint, so that running the same command again
/// loses nothing else; a second signal exits at once. Called once per command (ctrlc takes one
/// handler per process).
fn interrupt_on_signals() -> anyhow::Result<Interrupt> {
    let interrupt = Interrupt::new();
    let handle = interrupt.clone();
    ctrlc::set_handler(move || {
        if handle.is_requested() {
            std::process::exit(130);
        }
        eprintln!("interrupted: writing a checkpoint after this batch (press again to abort)");
        handle.request();
    })
    .context("cannot install the interrupt handler")?;
    Ok(interrupt)
}

/// The options every training command runs with: stops on signals, the progress display, the
/// second-order thread, `hf://` weights from the Hub, and the data-parallel job (whose rank 0
/// says what it runs on, and whose other ranks show no progress).
fn run_options(
    second_order: &SecondOrder,
    parallel: Option<train::Parallel>,
) -> anyhow::Result<RunOptions> {
    let observer: Arc<dyn train::Observer> = match &parallel {
        Some(p) if !p.is_leader() => Arc::new(ranks::Quiet),
        _ => Arc::new(progress::TrainingBar::default()),
    };
    if let Some(p) = parallel.as_ref().filter(|p| p.is_leader()) {
        eprintln!("data-parallel: {}", p.world.describe());
    }
    Ok(RunOptions {
        interrupt: interrupt_on_signals()?,
        observer: Some(observer),
        second_order: Some(second_order.clone()),
        resolve_weights: Some(at_hub::resolver(progress::download_display)),
        parallel,
        ..RunOptions::default()
    })
}

fn run(
    cli: Cli,
    second_order: SecondOrder,
    parallel: Option<train::Parallel>,
) -> anyhow::Result<()> {
    if let Some(p) = &parallel {
        let parallel_job = match &cli.command {
            Command::Train { .. } | Command::Quick { .. } => true,
            Command::Repro { dry_run, .. } => !dry_run,
            _ => false,
        };
        if !parallel_job {
            bail!(
                "rank {} of {}: only `train`, `repro` and `quick` run data-parallel under a \
                 launcher; run the other commands (and dry runs) without mpirun",
                p.world.rank(),
                p.world.size()
            )
        }
    }
    match cli.command {
        Command::Train {
            config,
            preset,
            sets,
            run_dir,
            resume,
            device,
            stop_after_epochs,
            stop_after_batches,
            checkpoint_minutes,
        } => {
            let stop_after_epochs = stop_after_epochs.map(|n| n as usize);
            let stop_after_batches = stop_after_batches.map(|n| n as usize);
            let device = ranks::device_of(device, parallel.as_ref());
            let options = RunOptions {
                device,
                stop_after_epochs,
                stop_after_batches,
                checkpoint_every: checkpoint_minutes.map(minutes),
                ..run_options(&second_order, parallel)?
            };
            let result = match (resume, run_dir) {
                (Some(dir), _) => train::resume(&dir, &options)?,
                (None, Some(dir)) => train::train(
                    &config::resolve(config.as_deref(), preset.as_deref(), &sets)?,
                    &dir,
                    &options,
                )?,
                (None, None) => bail!(
                    "name a new run directory with --run-dir DIR, or continue one with --resume DIR"
                ),
            };
            if !result.interrupted && options.parallel.as_ref().is_none_or(|p| p.is_leader()) {
                println!("{}", serde_json::to_string_pretty(&result)?);
            }
        }
        Command::Repro {
            what,
            profile,
            seeds,
            seed,
            only,
            device,
            data_dir,
            out,
            table,
            report_dir,
            dry_run,
            checkpoint_minutes,
        } => {
            let defaults = at_repro::Options::new(profile);
            let options = at_repro::Options {
                seeds: seeds.map(|n| n as usize),
                seed,
                only,
                device,
                data_dir,
                out: out.unwrap_or(defaults.out.clone()),
                ..defaults
            };
            let report_dir = report_dir.unwrap_or_else(|| options.out.clone());
            let checkpoint_every = checkpoint_minutes.map(minutes);
            let how = How { dry_run, second_order, parallel, checkpoint_every };
            repro(what, table, options, &report_dir, how)?
        }
        Command::Quick { out, report_dir, device } => {
            let profile = Profile::named("quick")?;
            let report_dir = report_dir.unwrap_or_else(|| out.clone());
            let options = at_repro::Options { out, device, ..at_repro::Options::new(profile) };
            let how = How { dry_run: false, second_order, parallel, checkpoint_every: None };
            repro(What::Table(Table::Table1), None, options, &report_dir, how)?
        }
        Command::Maps { run_dir, data, images, test_items, out, device } => {
            let source = if !images.is_empty() {
                at_trainer::maps::Source::Files(images)
            } else if !test_items.is_empty() {
                at_trainer::maps::Source::TestItems(test_items)
            } else {
                at_trainer::maps::Source::TestItems(vec![0, 1, 2, 3])
            };
            let out = match (out, at_hub::hub_repo(&run_dir)) {
                (Some(out), _) => out,
                (None, Some(repo)) => Path::new("maps").join(repo.replace('/', "--")),
                (None, None) => run_dir.join("maps"),
            };
            let (mut config, dir) = at_hub::open_run(&run_dir, data.as_deref())?;
            config.device = device.unwrap_or(config.device);
            for path in at_trainer::maps::write_maps_of(config, &dir, source, &out)? {
                println!("{}", path.display());
            }
        }
        Command::Eval { run_dir, data, device } => {
            let (mut config, dir) = at_hub::open_run(&run_dir, data.as_deref())?;
            config.device = device.unwrap_or(config.device);
            let (loss, top1, top5) = train::RunModel::open(config, &dir)?.evaluate()?;
            println!(
                "{}: test loss {loss:.4}, top-1 {top1:.2}%, top-5 {top5:.2}%",
                run_dir.display()
            );
        }
        Command::Config { list_presets: true, .. } => {
            for config::Preset { name, about, .. } in config::PRESETS {
                println!("{name:<18} {about}");
            }
        }
        Command::Config { preset, sets, .. } => {
            print!("{}", config::resolve(None, preset.as_deref(), &sets)?.to_toml())
        }
        Command::Models { classes, in_channels } => {
            let (classes, in_channels) = (classes as usize, in_channels as usize);
            let options =
                ModelOptions { num_classes: classes, in_channels, ..ModelOptions::default() };
            let rows = models::model_rows(&options)?;
            print!("{}", models::model_table(&rows, classes));
        }
        Command::BenchStep { student, step, teacher, batch, warmup, steps, device, backend } => {
            let dev = train::device(device)?;
            let times = at_trainer::bench::time_steps(
                (&student, step, &teacher),
                batch as usize,
                (warmup, steps as usize),
                backend,
                &dev,
            )?;
            let line = at_trainer::bench::json_line(
                &student,
                step,
                &teacher,
                batch as usize,
                &device.to_string(),
                &times,
            );
            println!("{line}");
        }
        Command::CheckDevice { device, batch, tolerance, gradient_tolerance } => {
            let tolerance =
                at_trainer::check::Tolerance { value: tolerance, gradient: gradient_tolerance };
            let other = at_trainer::check::other_side(&train::device(device)?);
            let mut failed = vec![];
            for check in at_trainer::check::CHECKS {
                let result = at_trainer::check::check_step(
                    check,
                    batch as usize,
                    &other,
                    Some(&second_order),
                )?;
                println!("{}", result.json(&device.to_string()));
                if !result.agrees(tolerance) {
                    failed.push(result.name);
                }
            }
            // The max pool's backward (NIN, ResNet): one thread on a GPU before it was parallel.
            let cpu = at_trainer::check::time_pool_backward(
                batch as usize,
                &(candle_core::Device::Cpu, at_models::Backend::Kernels),
            )?;
            let on_device = at_trainer::check::time_pool_backward(batch as usize, &other)?;
            let line = serde_json::json!({
                "check": "max-pool 3x3/2 forward+backward, [batch, 192, 32, 32]",
                "device": device.to_string(),
                "ms_cpu": cpu * 1e3,
                "ms_device": on_device * 1e3,
            });
            println!("{line}");
            if !failed.is_empty() {
                bail!(
                    "{device} disagrees with the CPU beyond {tolerance:?} in: {}",
                    failed.join(", ")
                )
            }
            eprintln!("{device} agrees with the CPU within {tolerance:?} on every check");
        }
        Command::Publish {
            run_dir,
            repo,
            private,
            dry_run,
            revision,
            table,
            profile,
            owner,
            runs,
        } => {
            let targets = publish_targets(run_dir, repo, table, profile, owner, runs)?;
            let hub = HubOptions::from_env();
            for (run_dir, repo) in targets {
                publish(&run_dir, &repo, private, dry_run, revision.clone(), &hub)?;
            }
        }
        Command::Download { dataset, repo, files, offline } => {
            let source = at_hub::source(&dataset, repo.as_deref(), &files)?;
            let env = HubOptions::from_env();
            let options = HubOptions { offline: offline || env.offline, ..env };
            let path =
                at_hub::download(&source, &options, progress::download_display(&source.repo))?;
            println!("{}", path.display());
        }
    }
    Ok(())
}

/// The (run directory, repository) pairs a `publish` command names.
fn publish_targets(
    run_dir: Option<PathBuf>,
    repo: Option<String>,
    table: Option<Table>,
    profile: &'static Profile,
    owner: Option<String>,
    runs: Option<PathBuf>,
) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let Some(table) = table else {
        let run_dir = run_dir.context("name the run directory to publish, or --table")?;
        let repo = repo.context("name the repository to publish to: --repo owner/name")?;
        return Ok(vec![(run_dir, repo)]);
    };
    let owner =
        owner.context("--table needs --owner, the user or organisation to publish under")?;
    let mut options = at_repro::Options::new(profile);
    if let Some(runs) = runs {
        options.out = runs;
    }
    let plan = at_repro::plan::plan(table, &options)?;
    let (finished, unfinished) = plan.finished_students();
    for dir in unfinished {
        eprintln!("not published: {} has not finished", dir.display());
    }
    if finished.is_empty() {
        bail!(
            "no finished student of {} in {}: run `cargo xtask repro {} --profile {}` first",
            table.name(),
            plan.out.display(),
            table.name(),
            profile.name
        )
    }
    Ok(finished
        .into_iter()
        .map(|run| {
            let repo =
                at_hub::publish::repro_repo_name(&owner, &run.key, &run.config, profile.name);
            (plan.out.join(&run.key), repo)
        })
        .collect())
}

/// Publishes `run_dir` to `repo`, or with `dry_run` writes and lists what it would send.
fn publish(
    run_dir: &Path,
    repo: &str,
    private: bool,
    dry_run: bool,
    revision: Option<String>,
    hub: &HubOptions,
) -> anyhow::Result<()> {
    use at_data::hub::Transfer;
    use at_hub::publish::{self, PublishOptions};
    let list = |files: &[String]| match files {
        [] => "none".to_owned(),
        files => files.join(", "),
    };
    let staging = publish::default_staging(run_dir);
    let options =
        PublishOptions { repo: repo.to_owned(), private, revision, dry_run, hub: hub.clone() };
    let progress = progress::upload_display(repo);
    let publication = publish::publish_with(run_dir, &options, &staging, progress)?;
    match publication.committed {
        None => println!(
            "dry run: would publish {} to {repo} (nothing sent); the folder is {}",
            run_dir.display(),
            staging.display()
        ),
        Some(commit) => {
            let endpoint = hub.endpoint.as_deref().unwrap_or("https://huggingface.co");
            println!(
                "published {} to {}/{repo}{}",
                run_dir.display(),
                endpoint.trim_end_matches('/'),
                commit.url.as_deref().map(|u| format!(" ({u})")).unwrap_or_default()
            );
            let how = match commit.transfer {
                Transfer::Inline => "no file needed LFS storage",
                Transfer::Basic => "LFS storage through Git LFS's basic transfer",
                Transfer::Xet => "LFS storage through Xet",
            };
            println!(
                "  {how}: {} sent, {} already stored",
                list(&commit.uploaded),
                list(&commit.already_stored)
            );
        }
    }
    for f in publication.files {
        println!("  {:<40} {:>12} bytes  sha256 {}", f.path, f.size, f.sha256);
    }
    Ok(())
}

/// How `repro` runs: a dry run or not, the second-order thread, the data-parallel job, the
/// interval of checkpoints inside an epoch (`None`: the trainer's).
struct How {
    dry_run: bool,
    second_order: SecondOrder,
    parallel: Option<train::Parallel>,
    checkpoint_every: Option<std::time::Duration>,
}

/// `at-train repro`: plans, trains and reports the tables `what` names; the reports go into
/// `report_dir`.
fn repro(
    what: What,
    table: Option<Table>,
    mut options: at_repro::Options,
    report_dir: &Path,
    How { dry_run, second_order, parallel, checkpoint_every }: How,
) -> anyhow::Result<()> {
    use at_repro::report::{self, Provenance};
    let profile = options.profile;
    // Rank 0 speaks and writes for a data-parallel job; every rank trains every run.
    let leader = parallel.as_ref().is_none_or(|p| p.is_leader());
    options.device =
        ranks::device_of(Some(options.device), parallel.as_ref()).unwrap_or(options.device);
    let tables: Vec<Table> = match (what, table) {
        (What::Report | What::Figures, Some(t)) => vec![t],
        (What::Report, None) => bail!("`repro report` needs --table TABLE"),
        (What::Figures | What::All, None) => profile.tables.to_vec(),
        (What::Table(t), None) => vec![t],
        (What::Table(_) | What::All, Some(_)) => {
            bail!("--table is for `repro report` and `repro figures`; name the table instead")
        }
    };
    let trains = !dry_run && matches!(what, What::Table(_) | What::All);
    let run_options = match trains {
        true => {
            Some(RunOptions { checkpoint_every, ..run_options(&second_order, parallel.clone())? })
        }
        false => None,
    };
    // One timer for every table of a dry run, so that each step is measured once.
    let mut timer = match dry_run {
        true => Some(at_repro::StepTimer::new(
            train::device(options.device)?,
            Some(second_order.clone()),
        )),
        false => None,
    };
    let ranks = parallel.as_ref().map_or(1, |p| p.world.size());
    let provenance = Provenance { machine: at_trainer::job_machine(ranks), ..Provenance::here() };
    for table in tables {
        let plan = at_repro::plan::plan(table, &options)?;
        if let Some(timer) = &mut timer {
            print!("{}", at_repro::plan::dry_run(&plan, &mut |c| timer.seconds(c)));
            println!(
                "on several GPUs or machines (each run data-parallel, a build with --features \
                 mpi, or nccl for GPUs): mpirun -np N at-train repro {} --profile {} --device \
                 cuda",
                table.name(),
                profile.name
            );
            continue;
        }
        if !leader && run_options.is_none() {
            continue; // Reports and figures: rank 0's to write.
        }
        if what == What::Figures {
            for file in at_repro::figures::write(&plan, &report_dir.join("figures"))? {
                println!("written: {}", file.display());
            }
            continue;
        }
        if let Some(run_options) = &run_options {
            let finished = at_repro::execute(&plan, run_options)?;
            if !leader {
                // Rank 0 writes the reports.
                if !finished {
                    return Ok(());
                }
                continue;
            }
            if !finished {
                let (md, _) = report::write(&plan, report_dir, &provenance)?;
                println!("stopped; the report so far: {}", md.display());
                return Ok(());
            }
        }
        let (md, csv) = report::write(&plan, report_dir, &provenance)?;
        println!("{}", std::fs::read_to_string(&md)?);
        println!("written: {} and {}", md.display(), csv.display());
        if what == What::All {
            for file in at_repro::figures::write(&plan, &report_dir.join("figures"))? {
                println!("written: {}", file.display());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("at-train").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn enumerated_arguments_come_from_the_libraries_lists() {
        let Command::Repro { what, profile, .. } =
            parse(&["repro", "table5", "--profile", "paper"]).unwrap().command
        else {
            panic!("a repro command")
        };
        assert_eq!((what, profile.name), (What::Table(Table::Table5), "paper"));
        let err = parse(&["repro", "table9"]).err().unwrap();
        assert!(
            err.contains("table1, table2, table3, table4, table5, all, report, figures"),
            "{err}"
        );
        let err = parse(&["repro", "table1", "--profile", "huge"]).err().unwrap();
        assert!(err.contains("paper, fmnist, quick"), "{err}");
        let err = parse(&["bench-step", "wrn-16-1", "kd"]).err().unwrap();
        assert!(err.contains("student, teacher, at, at-kd"), "{err}");
    }

    #[test]
    fn checkpoint_minutes_parse_into_a_duration() {
        let Command::Repro { checkpoint_minutes, .. } =
            parse(&["repro", "table1", "--checkpoint-minutes", "2.5"]).unwrap().command
        else {
            panic!("a repro command")
        };
        let every = checkpoint_minutes.map(minutes);
        assert_eq!(every, Some(std::time::Duration::from_secs(150)));
    }

    #[test]
    fn arguments_that_cannot_mean_anything_are_refused() {
        for (args, want) in [
            (&["repro", "table1", "--seeds", "0"][..], "0 is not in 1.."),
            (&["repro", "table1", "--seeds", "2", "--seed", "1"], "cannot be used with"),
            (&["publish", "--profile", "quick"], "--table"),
            (&["publish", "runs/x", "--table", "table1"], "cannot be used with"),
            (&["maps", "runs/x", "--images", "a.png", "--test-items", "1"], "cannot be used with"),
            (&["models", "--classes", "0"], "0 is not in 1.."),
            (&["bench-step", "wrn-16-1", "student", "--steps", "0"], "0 is not in 1.."),
            (&["train", "--resume", "r", "--set", "epochs=2"], "cannot be used with"),
            (&["train", "--run-dir", "r", "--device", "gpu"], "unknown device `gpu`"),
            (&["train", "--run-dir", "r", "--checkpoint-minutes", "0"], "not a positive number"),
            (&["repro", "table1", "--checkpoint-minutes", "inf"], "not a positive number"),
        ] {
            let err = parse(args).err().unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert!(err.contains(want), "{args:?}: `{want}` in `{err}`");
        }
    }
}
