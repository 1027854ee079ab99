//! `cargo xtask`: project automation that is not part of any library.
//!
//! Run `cargo xtask` to list the tasks. Tasks that need PyTorch run Python from a virtual
//! environment outside the repository (see [`python`]), so the tests never need it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

mod bench;

/// What runs a task, given the arguments after its name.
type Task = fn(&[String]) -> Result<()>;

/// Every task: its name, a one-line description, and what runs it.
const TASKS: &[(&str, &str, Task)] = &[
    ("golden", "regenerate the PyTorch golden fixtures the tests compare against", golden),
    ("venv", "create the PyTorch virtual environment the golden task uses (about 5 GB)", venv),
    (
        "bench",
        "time training steps against PyTorch on this CPU; writes docs/benchmarks.{md,json}",
        bench::bench,
    ),
    (
        "repro",
        "replay a table of the paper: repro <table1..table5|all|report> --profile <paper|fmnist|quick> [--dry-run]",
        repro,
    ),
    (
        "publish",
        "publish a finished run to the Hugging Face Hub: publish RUN_DIR --repo owner/name [--dry-run], or --table table1 --profile paper --owner OWNER",
        publish,
    ),
    (
        "cuda-build",
        "build at-train for CUDA without a GPU or toolkit (PyPI wheels): cuda-build [FEATURES, default cuda,cudnn,nccl]",
        cuda_build,
    ),
    (
        "download",
        "download from the Hugging Face Hub: cifar10, fashion-mnist, cub, scenes, imagenet, resnet18-imagenet, resnet34-imagenet",
        download,
    ),
];

/// The scripts that write golden fixtures, relative to the workspace root. Each writes its
/// `.safetensors` files into the directory given as its first argument: its own directory.
const GOLDEN_SCRIPTS: &[&str] = &[
    "crates/at-ops/tests/golden/make_golden.py",
    "crates/at-models/tests/golden/make_golden.py",
    "crates/at-losses/tests/golden/make_golden.py",
    "crates/at-trainer/tests/golden/make_golden.py",
];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(name) = args.first() else {
        print_tasks();
        return ExitCode::SUCCESS;
    };
    let Some((_, _, run)) = TASKS.iter().find(|(n, ..)| n == name) else {
        eprintln!("error: unknown task `{name}`\n");
        print_tasks();
        return ExitCode::FAILURE;
    };
    match run(&args[1..]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_tasks() {
    println!("usage: cargo xtask <task>\n\ntasks:");
    for (name, about, _) in TASKS {
        println!("  {name:<10} {about}");
    }
    println!("\ncrates in this workspace:");
    let crates = root().join("crates");
    let mut names: Vec<String> = std::fs::read_dir(&crates)
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    for name in names {
        println!("  {name}");
    }
}

fn golden(_args: &[String]) -> Result<()> {
    let python = python()?;
    for script in GOLDEN_SCRIPTS {
        let script = root().join(script);
        let out_dir = script.parent().expect("a script lives in a directory");
        println!("running {}", script.display());
        run(Command::new(&python).arg(&script).arg(out_dir))?;
    }
    Ok(())
}

/// Forwards to `at-train download`, so that xtask itself stays free of candle and hf-hub.
fn download(args: &[String]) -> Result<()> {
    at_train("download", args)
}

/// Forwards to `at-train publish` (a release build, as `repro` uses).
fn publish(args: &[String]) -> Result<()> {
    at_train("publish", args)
}

/// `at-train repro` in a release build (built here first, so a fresh clone needs nothing else).
fn repro(args: &[String]) -> Result<()> {
    at_train("repro", args)
}

/// Runs `at-train <command> <args>` from a release build that cargo makes first if needed. A
/// failure has been said by at-train (or cargo) already: xtask exits with its status and adds
/// no second line.
fn at_train(command: &str, args: &[String]) -> Result<()> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root())
        .args(["run", "--release", "--quiet", "-p", "at-train", "--", command])
        .args(args)
        .status()
        .context("cannot start cargo")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn venv(_args: &[String]) -> Result<()> {
    let dir = venv_dir();
    if !dir.join("bin/python").exists() {
        println!("creating {}", dir.display());
        run(Command::new("python3").arg("-m").arg("venv").arg(&dir))?;
    }
    let pip = dir.join("bin/pip");
    run(Command::new(pip).args([
        "install",
        "--upgrade",
        "torch",
        "torchvision",
        "numpy",
        "safetensors",
    ]))?;
    println!("PyTorch is ready in {}", dir.display());
    Ok(())
}

/// The Python that has PyTorch: `$AT_PYTHON`, else the venv of [`venv_dir`].
pub(crate) fn python() -> Result<PathBuf> {
    if let Some(python) = env::var_os("AT_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    let python = venv_dir().join("bin/python");
    if !python.exists() {
        bail!(
            "no PyTorch environment at {}: run `cargo xtask venv` (downloads about 5 GB from PyPI), \
             or point AT_PYTHON at a python that has torch and safetensors",
            venv_dir().display()
        )
    }
    Ok(python)
}

/// `$AT_VENV`, else `~/.cache/attention-transfer/venv`: outside the repository on purpose.
fn venv_dir() -> PathBuf {
    if let Some(dir) = env::var_os("AT_VENV") {
        return PathBuf::from(dir);
    }
    let home = env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/attention-transfer/venv")
}

pub(crate) fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace root")
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}")
    }
    Ok(())
}

/// `cargo xtask cuda-build [FEATURES]`: xtask/cuda/build.sh, which says what it fetches and why.
fn cuda_build(args: &[String]) -> Result<()> {
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask lives in the workspace")?;
    let status = Command::new("bash")
        .arg(root.join("xtask/cuda/build.sh"))
        .args(args)
        .current_dir(root)
        .status()
        .context("cannot run bash")?;
    if !status.success() {
        bail!("the CUDA build failed ({status})")
    }
    Ok(())
}
