//! `at-train`: train, evaluate and inspect attention-transfer models.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, bail};
use at_data::hub::{self, HubOptions, Source};
use at_losses::second_order::SecondOrder;
use at_models::ModelOptions;
use at_train::config;
use at_train::train::{self, RunOptions};
use clap::{Parser, Subcommand};

static INTERRUPTED_TWICE: AtomicBool = AtomicBool::new(false);

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
        /// Continue the run in this directory from its last checkpoint.
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// Evaluate a finished run's model (or its last checkpoint) on its test set.
    Eval {
        /// The run directory.
        run_dir: PathBuf,
    },
    /// Replay a table of the paper: train (or resume, or reuse) every run it needs, then write
    /// docs/results/<table>-<profile>.md and .csv beside the paper's numbers.
    Repro {
        /// table1 ... table5, all, report (the report alone, from the finished runs) or figures
        /// (training curves and attention maps of the finished runs, into <report-dir>/figures).
        what: String,
        /// paper (the paper's recipes; for a GPU), fmnist (full Fashion-MNIST) or quick.
        #[arg(long, default_value = "quick")]
        profile: String,
        /// Seeds per cell [default: the profile's: paper 5, fmnist and quick 3; Table 3: 1].
        #[arg(long)]
        seeds: Option<usize>,
        /// Only this seed (spread cells over machines by hand).
        #[arg(long)]
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
        #[arg(long)]
        table: Option<String>,
        /// Where the reports go.
        #[arg(long, default_value = "docs/results")]
        report_dir: PathBuf,
        /// Print every run, its config, the command that makes it by hand and the estimated
        /// time (from step times measured here), and train nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The README's main job, `repro table1 --profile quick` by another name: Table 1's
    /// WRN-16-1 <- WRN-16-2 pair on the embedded Fashion-MNIST subset, 3 seeds, about 8 minutes
    /// on a 2-core CPU, reported in docs/results/table1-quick.md.
    Quick {
        /// Where the runs go; finished runs are reused, interrupted ones resumed.
        #[arg(long, default_value = "runs/repro/quick")]
        out: PathBuf,
    },
    /// Write the attention maps of a run's model, each group's beside its image, as PNGs.
    Maps {
        /// The run directory.
        run_dir: PathBuf,
        /// Image files (JPEG, PNG), resized to the training images' size.
        #[arg(long, num_args = 1..)]
        images: Vec<PathBuf>,
        /// Test-set items, by index (when no --images are given; default: the first 4).
        #[arg(long, num_args = 1..)]
        test_items: Vec<usize>,
        /// Where the PNGs go (default: RUN_DIR/maps).
        #[arg(long)]
        out: Option<PathBuf>,
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
        #[arg(long, default_value_t = 10)]
        classes: usize,
        /// Input channels (3 for colour images, 1 for Fashion-MNIST).
        #[arg(long, default_value_t = 3)]
        in_channels: usize,
    },
    /// Time training steps on random CIFAR-shaped batches, on any device (what `cargo xtask
    /// bench` measures on the CPU; `xtask/bench/gpu.sh` on a GPU). Prints one JSON line.
    BenchStep {
        /// The student model.
        student: String,
        /// student, teacher (its forward alone), at or at-kd.
        step: String,
        /// The teacher model (for teacher, at and at-kd).
        #[arg(long, default_value = "wrn-16-2")]
        teacher: String,
        /// Images per batch.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// cpu, cuda:N or metal.
        #[arg(long, default_value = "cpu")]
        device: config::DeviceSpec,
    },
    /// Download a dataset from the Hugging Face Hub into its cache (HF_TOKEN, HF_ENDPOINT and
    /// HF_HUB_OFFLINE are honoured).
    Download {
        /// cifar10, cub, scenes or imagenet.
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
    match run(Cli::parse(), second_order) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, second_order: SecondOrder) -> anyhow::Result<()> {
    match cli.command {
        Command::Train { config, preset, sets, run_dir, resume } => {
            set_interrupt_handler()?;
            let options = RunOptions { second_order: Some(second_order), ..RunOptions::default() };
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
            if !result.interrupted {
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
        } => {
            let profile = at_train::repro::Profile::parse(&profile)?;
            let options = at_train::repro::Options {
                seeds,
                seed,
                only,
                device,
                data_dir,
                out: out.unwrap_or_else(|| at_train::repro::Options::new(profile).out),
                ..at_train::repro::Options::new(profile)
            };
            repro(&what, table, options, &report_dir, dry_run, second_order)?
        }
        Command::Quick { out } => {
            let profile = at_train::repro::Profile::Quick;
            let options =
                at_train::repro::Options { out, ..at_train::repro::Options::new(profile) };
            repro("table1", None, options, Path::new("docs/results"), false, second_order)?
        }
        Command::Maps { run_dir, images, test_items, out } => {
            let source = if !images.is_empty() {
                at_train::maps::Source::Files(images)
            } else if !test_items.is_empty() {
                at_train::maps::Source::TestItems(test_items)
            } else {
                at_train::maps::Source::TestItems(vec![0, 1, 2, 3])
            };
            let out = out.unwrap_or_else(|| run_dir.join("maps"));
            for path in at_train::maps::write_maps(&run_dir, source, &out)? {
                println!("{}", path.display());
            }
        }
        Command::Eval { run_dir } => {
            let (loss, top1, top5) = train::evaluate_run(&run_dir)?;
            println!(
                "{}: test loss {loss:.4}, top-1 {top1:.2}%, top-5 {top5:.2}%",
                run_dir.display()
            );
        }
        Command::Config { list_presets: true, .. } => {
            for config::Preset { name, about, .. } in config::PRESETS {
                println!("{name:<16} {about}");
            }
        }
        Command::Config { preset, sets, .. } => {
            print!("{}", config::resolve(None, preset.as_deref(), &sets)?.to_toml())
        }
        Command::Models { classes, in_channels } => {
            if classes == 0 || in_channels == 0 {
                bail!(
                    "--classes and --in-channels must be at least 1, got {classes} and {in_channels}"
                )
            }
            let options =
                ModelOptions { num_classes: classes, in_channels, ..ModelOptions::default() };
            let rows = at_train::model_rows(&options)?;
            print!("{}", at_train::model_table(&rows, classes));
        }
        Command::BenchStep { student, step, teacher, batch, warmup, steps, device } => {
            let kind = at_train::bench::Step::parse(&step)?;
            let dev = train::device(device)?;
            let times = at_train::bench::time_steps(
                (&student, kind, &teacher),
                batch,
                (warmup, steps),
                at_models::Backend::Kernels,
                &dev,
            )?;
            println!(
                "{}",
                at_train::bench::json_line(
                    &student,
                    kind,
                    &teacher,
                    batch,
                    &device.to_string(),
                    &times
                )
            );
        }
        Command::Download { dataset, repo, files, offline } => {
            download(&dataset, repo, &files, offline)?
        }
    }
    Ok(())
}

fn download(
    dataset: &str,
    repo: Option<String>,
    files: &[String],
    offline: bool,
) -> anyhow::Result<()> {
    let mirror = |name: &str, archive: &str| -> anyhow::Result<String> {
        repo.clone().with_context(|| {
            format!("{name} has no official copy on the Hugging Face Hub: pass --repo OWNER/NAME, a dataset repository holding {archive}")
        })
    };
    let source = match dataset {
        "cifar10" => Source::cifar10(),
        "cub" => Source::cub(&mirror("CUB-200-2011", "CUB_200_2011.tgz")?),
        "scenes" => Source::scenes(&mirror(
            "MIT Indoor 67",
            "indoorCVPR_09.tar, TrainImages.txt and TestImages.txt",
        )?),
        "imagenet" if files.is_empty() => bail!(
            "name the ImageNet files to fetch with --files, e.g. --files data/val_images.tar.gz"
        ),
        "imagenet" => Source::imagenet(&files.iter().map(String::as_str).collect::<Vec<_>>()),
        other => bail!("unknown dataset `{other}`; known: cifar10, cub, scenes, imagenet"),
    };
    let options =
        HubOptions { offline: offline || HubOptions::from_env().offline, ..HubOptions::from_env() };
    let fetched =
        hub::fetch(&source, &options, |file| eprintln!("fetching {file} from {}", source.repo))?;
    println!("{}", fetched.unpacked.as_ref().unwrap_or(&fetched.snapshot).display());
    Ok(())
}

/// `at-train repro`: plans, trains and reports the tables `what` names.
fn repro(
    what: &str,
    table: Option<String>,
    options: at_train::repro::Options,
    report_dir: &Path,
    dry_run: bool,
    second_order: SecondOrder,
) -> anyhow::Result<()> {
    use at_train::repro::{self, Profile, Table};
    let profile = options.profile;
    // Without a table, the tables the profile has (Tables 4 and 5 only in the paper's).
    let profile_tables =
        if profile == Profile::Paper { Table::ALL.to_vec() } else { Table::ALL[..3].to_vec() };
    let tables: Vec<Table> = match (what, table) {
        ("report" | "figures", Some(t)) => vec![Table::parse(&t)?],
        ("report", None) => bail!("`repro report` needs --table TABLE"),
        ("figures", None) | ("all", _) => profile_tables,
        (name, _) => vec![Table::parse(name)?],
    };
    let trains = !dry_run && !matches!(what, "report" | "figures");
    if trains {
        // Once for the whole command: ctrlc takes one handler per process.
        set_interrupt_handler()?;
    }
    // One timer for every table of a dry run, so that each step is measured once.
    let mut timer = match dry_run {
        true => Some(repro::StepTimer::new(train::device(options.device)?)),
        false => None,
    };
    let provenance = repro::report::Provenance::here();
    for table in tables {
        let plan = repro::plan::plan(table, &options)?;
        if let Some(timer) = &mut timer {
            print!("{}", repro::plan::dry_run(&plan, &mut |c| timer.seconds(c)));
            continue;
        }
        if what == "figures" {
            let written = repro::figures::write(&plan, &report_dir.join("figures"))?;
            for file in written {
                println!("written: {}", file.display());
            }
            continue;
        }
        if trains {
            let run_options =
                RunOptions { second_order: Some(second_order.clone()), ..RunOptions::default() };
            let finished = repro::execute(&plan, &run_options)?;
            if !finished {
                let (md, _) = repro::report::write(&plan, report_dir, &provenance)?;
                println!("stopped; the report so far: {}", md.display());
                return Ok(());
            }
        }
        let (md, csv) = repro::report::write(&plan, report_dir, &provenance)?;
        println!("{}", std::fs::read_to_string(&md)?);
        println!("written: {} and {}", md.display(), csv.display());
        if what == "all" {
            for file in repro::figures::write(&plan, &report_dir.join("figures"))? {
                println!("written: {}", file.display());
            }
        }
    }
    Ok(())
}

/// Ctrl-C asks the training loop to checkpoint and stop; a second Ctrl-C aborts at once.
fn set_interrupt_handler() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("interrupted: writing a checkpoint after this batch (press again to abort)");
        if INTERRUPTED_TWICE.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        train::interrupt();
    })?;
    Ok(())
}
