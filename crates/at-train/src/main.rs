//! `at-train`: train, evaluate and inspect attention-transfer models.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use at_data::hub::HubOptions;
use at_losses::second_order::SecondOrder;
use at_models::ModelOptions;
use at_train::config;
use at_train::train::{self, RunOptions};
use clap::{Parser, Subcommand};

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
        /// The run directory, or hf://owner/name for a published model.
        run_dir: PathBuf,
        /// The dataset's folder, instead of the one in the run's config.
        #[arg(long)]
        data: Option<PathBuf>,
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
    /// WRN-16-1 <- WRN-16-2 pair on the embedded Fashion-MNIST subset, 3 seeds, 7.8 minutes on
    /// a 2-core AMD EPYC, reported in docs/results/table1-quick.md.
    Quick {
        /// Where the runs go; finished runs are reused, interrupted ones resumed.
        #[arg(long, default_value = "runs/repro/quick")]
        out: PathBuf,
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
        /// repository each, named after model, method and teacher.
        #[arg(long)]
        table: Option<String>,
        /// The profile of --table's runs.
        #[arg(long, default_value = "paper")]
        profile: String,
        /// The owner (user or organisation) of --table's repositories.
        #[arg(long)]
        owner: Option<String>,
        /// Where --table's runs are [default: runs/repro/<profile>].
        #[arg(long)]
        runs: Option<PathBuf>,
    },
    /// Download a dataset or pretrained weights from the Hugging Face Hub into its cache, and
    /// print the folder they are in (HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are honoured). A
    /// file already in the cache is not fetched again.
    Download {
        /// cifar10, fashion-mnist, cub, scenes, imagenet, resnet18-imagenet or
        /// resnet34-imagenet.
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
            train::install_interrupt_handler()?;
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
        Command::Maps { run_dir, data, images, test_items, out } => {
            let source = if !images.is_empty() {
                at_train::maps::Source::Files(images)
            } else if !test_items.is_empty() {
                at_train::maps::Source::TestItems(test_items)
            } else {
                at_train::maps::Source::TestItems(vec![0, 1, 2, 3])
            };
            let out = match (out, at_train::hub::hub_repo(&run_dir)) {
                (Some(out), _) => out,
                (None, Some(repo)) => Path::new("maps").join(repo.replace('/', "--")),
                (None, None) => run_dir.join("maps"),
            };
            let (config, dir) = at_train::hub::open_run(&run_dir, data.as_deref())?;
            for path in at_train::maps::write_maps_of(config, &dir, source, &out)? {
                println!("{}", path.display());
            }
        }
        Command::Eval { run_dir, data } => {
            let (config, dir) = at_train::hub::open_run(&run_dir, data.as_deref())?;
            let (loss, top1, top5) = train::RunModel::open(config, &dir)?.evaluate()?;
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
            let targets = publish_targets(run_dir, repo, table, &profile, owner, runs)?;
            let hub = HubOptions::from_env();
            for (run_dir, repo) in targets {
                publish(&run_dir, &repo, private, dry_run, revision.clone(), &hub)?;
            }
        }
        Command::Download { dataset, repo, files, offline } => {
            download(&dataset, repo, &files, offline)?
        }
    }
    Ok(())
}

/// The (run directory, repository) pairs a `publish` command names.
fn publish_targets(
    run_dir: Option<PathBuf>,
    repo: Option<String>,
    table: Option<String>,
    profile: &str,
    owner: Option<String>,
    runs: Option<PathBuf>,
) -> anyhow::Result<Vec<(PathBuf, String)>> {
    use at_train::repro::{self, Profile, Table};
    let Some(table) = table else {
        let run_dir = run_dir.context("name the run directory to publish, or --table")?;
        let repo = repo.context("name the repository to publish to: --repo owner/name")?;
        return Ok(vec![(run_dir, repo)]);
    };
    if run_dir.is_some() || repo.is_some() {
        bail!("--table publishes a table's runs: give --owner, not a run directory or --repo")
    }
    let owner =
        owner.context("--table needs --owner, the user or organisation to publish under")?;
    let profile = Profile::parse(profile)?;
    let mut options = repro::Options::new(profile);
    if let Some(runs) = runs {
        options.out = runs;
    }
    let plan = repro::plan::plan(Table::parse(&table)?, &options)?;
    let (targets, unfinished) = at_train::publish::plan_targets(&plan, &owner);
    for dir in unfinished {
        eprintln!("not published: {} has not finished", dir.display());
    }
    if targets.is_empty() {
        bail!(
            "no finished student of {table} in {}: run `cargo xtask repro {table} --profile {}` first",
            plan.out.display(),
            profile.name()
        )
    }
    Ok(targets)
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
    use at_train::publish::{self, PublishOptions};
    let staging = publish::default_staging(run_dir);
    let options =
        PublishOptions { repo: repo.to_owned(), private, revision, dry_run, hub: hub.clone() };
    let publication = publish::publish(run_dir, &options, &staging)?;
    match publication.committed {
        None => println!(
            "dry run: would publish {} to {repo} (nothing sent); the folder is {}",
            run_dir.display(),
            staging.display()
        ),
        Some(commit) => println!(
            "published {} to https://huggingface.co/{repo}{}",
            run_dir.display(),
            commit.url.map(|u| format!(" ({u})")).unwrap_or_default()
        ),
    }
    for f in publication.files {
        println!("  {:<40} {:>12} bytes  sha256 {}", f.path, f.size, f.sha256);
    }
    Ok(())
}

fn download(
    dataset: &str,
    repo: Option<String>,
    files: &[String],
    offline: bool,
) -> anyhow::Result<()> {
    let source = at_train::hub::source(dataset, repo.as_deref(), files)?;
    let options =
        HubOptions { offline: offline || HubOptions::from_env().offline, ..HubOptions::from_env() };
    let path = at_train::hub::download(&source, &options)?;
    println!("{}", path.display());
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
        train::install_interrupt_handler()?;
    }
    // One timer for every table of a dry run, so that each step is measured once.
    let mut timer = match dry_run {
        true => {
            Some(repro::StepTimer::new(train::device(options.device)?, Some(second_order.clone())))
        }
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
