//! `at-train`: train, evaluate and inspect attention-transfer models.

use std::process::ExitCode;

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
    }
    Ok(())
}
