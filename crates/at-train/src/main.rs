//! `at-train`: train, evaluate and inspect attention-transfer models.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, bail};
use at_data::hub::{self, HubOptions, Source};
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
    /// Print a run config with every key and its value.
    Config {
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train { config, sets, run_dir, resume } => {
            ctrlc::set_handler(|| {
                eprintln!(
                    "interrupted: writing a checkpoint after this batch (press again to abort)"
                );
                if INTERRUPTED_TWICE.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    std::process::exit(130);
                }
                train::interrupt();
            })?;
            let options = RunOptions::default();
            let result = match (resume, run_dir) {
                (Some(dir), _) => train::resume(&dir, &options)?,
                (None, Some(dir)) => {
                    train::train(&config::resolve(config.as_deref(), &sets)?, &dir, &options)?
                }
                (None, None) => bail!(
                    "name a new run directory with --run-dir DIR, or continue one with --resume DIR"
                ),
            };
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Command::Eval { run_dir } => {
            let (loss, top1, top5) = train::evaluate_run(&run_dir)?;
            println!(
                "{}: test loss {loss:.4}, top-1 {top1:.2}%, top-5 {top5:.2}%",
                run_dir.display()
            );
        }
        Command::Config { sets } => print!("{}", config::resolve(None, &sets)?.to_toml()),
        Command::Models { classes, in_channels } => {
            let options =
                ModelOptions { num_classes: classes, in_channels, ..ModelOptions::default() };
            let rows = at_train::model_rows(&options)?;
            print!("{}", at_train::model_table(&rows, classes));
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
