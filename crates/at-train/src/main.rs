//! `at-train`: train, evaluate and inspect attention-transfer models.

use std::process::ExitCode;

use anyhow::{Context, bail};
use at_data::hub::{self, HubOptions, Source};
use at_models::ModelOptions;
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
