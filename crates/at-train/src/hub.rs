//! The trainer's side of the Hugging Face Hub: `at-train download` (datasets and the
//! ImageNet-pretrained ResNets), and `hf://owner/name` references in configs. The network itself
//! is reached through at-data's hub module only.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use at_data::hub::{self, HubOptions, OnProgress, Source};

/// The names `at-train download` (and `cargo xtask download`) takes.
pub const DOWNLOADS: &[&str] = &[
    "cifar10",
    "fashion-mnist",
    "cub",
    "scenes",
    "imagenet",
    "resnet18-imagenet",
    "resnet34-imagenet",
];

/// The source `name` downloads: `repo` is the mirror repository CUB and Scenes need, `files`
/// the ImageNet files.
pub fn source(name: &str, repo: Option<&str>, files: &[String]) -> Result<Source> {
    let mirror = |what: &str, archive: &str| -> Result<&str> {
        repo.with_context(|| {
            format!(
                "{what} has no official copy on the Hugging Face Hub: pass --repo OWNER/NAME, \
                 a dataset repository holding {archive}"
            )
        })
    };
    if let Some(source) = Source::named(name) {
        return Ok(source);
    }
    Ok(match name {
        "cub" => Source::cub(mirror("CUB-200-2011", "CUB_200_2011.tgz")?),
        "scenes" => Source::scenes(mirror(
            "MIT Indoor 67",
            "indoorCVPR_09.tar, TrainImages.txt and TestImages.txt",
        )?),
        "imagenet" if files.is_empty() => bail!(
            "name the ImageNet files to fetch with --files, e.g. --files data/val_images.tar.gz"
        ),
        "imagenet" => Source::imagenet(&files.iter().map(String::as_str).collect::<Vec<_>>()),
        other => bail!("unknown download `{other}`; known: {}", DOWNLOADS.join(", ")),
    })
}

/// Downloads `source` into the Hub cache (or finds it there), with a progress bar per file on a
/// terminal and a line per file otherwise; the folder to point `data.root` (or `--data-dir`) at.
pub fn download(source: &Source, options: &HubOptions) -> Result<PathBuf> {
    let fetched = hub::fetch(source, options, progress_display(&source.repo))?;
    Ok(fetched.unpacked.unwrap_or(fetched.snapshot))
}

/// A progress display for the files of `repo`.
pub fn progress_display(repo: &str) -> OnProgress {
    let terminal = std::io::stderr().is_terminal();
    let repo = repo.to_owned();
    // The file being fetched, its bar (on a terminal), and whether its first bytes were told.
    type Current = Option<(String, Option<indicatif::ProgressBar>, bool)>;
    let current: Mutex<Current> = Mutex::new(None);
    Arc::new(move |file: &str, done: u64, total: u64| {
        let mut current = current.lock().expect("the progress lock is not poisoned");
        if current.as_ref().is_none_or(|(name, ..)| name != file) {
            if let Some((_, Some(bar), _)) = current.take() {
                bar.finish();
            }
            eprintln!("fetching {file} from {repo}");
            *current = Some((file.to_owned(), None, false));
        }
        let Some((_, bar, started)) = current.as_mut() else { return };
        if total == 0 {
            return;
        }
        if !std::mem::replace(started, true) && done > 0 && done < total {
            // A download cut short before goes on from the bytes it has.
            let (done, total) = (indicatif::HumanBytes(done), indicatif::HumanBytes(total));
            eprintln!("  going on from the {done} of {total} already here");
        }
        if !terminal {
            return;
        }
        let bar = bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(total).with_position(done);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "  [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta} left)",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        bar.set_position(done);
    })
}

/// The scheme of a reference to a Hub model repository in a config (`hf://owner/name`).
pub const HF_SCHEME: &str = "hf://";

/// The repository `path` names when it is `hf://owner/name`.
pub fn hub_repo(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix(HF_SCHEME).filter(|r| !r.is_empty())
}

/// The local weights file of `path`: itself, or for `hf://owner/name` the repository's
/// `model.safetensors`, downloaded into the Hub cache (or found there; offline with
/// `HF_HUB_OFFLINE=1`).
pub fn weights_file(path: &Path) -> Result<PathBuf> {
    let Some(repo) = hub_repo(path) else { return Ok(path.to_path_buf()) };
    let source = Source::model(repo, &["model.safetensors"]);
    let fetched = hub::fetch(&source, &HubOptions::from_env(), progress_display(repo))
        .with_context(|| format!("cannot fetch the weights of {}", path.display()))?;
    Ok(fetched.files[0].clone())
}

/// A model published with `at-train publish` (or `cargo xtask publish`), loaded from the Hub.
pub struct Published {
    /// The network, built from `config.json`, with the published weights.
    pub model: Box<dyn at_models::AttentionModel>,
    /// Its weights.
    pub varmap: candle_nn::VarMap,
    /// Its `config.json`.
    pub config: crate::publish::ModelConfig,
    /// The local copy of the repository (the Hub cache's snapshot).
    pub dir: PathBuf,
}

/// Builds the model `config.json` of the Hub repository `repo` names and loads its
/// `model.safetensors` strictly (every tensor present, no other), on `device`. The files come
/// from the Hub cache when they are there; with `HF_HUB_OFFLINE=1` only from there.
pub fn from_hub(repo: &str, device: &candle_core::Device) -> Result<Published> {
    from_hub_with(repo, &HubOptions::from_env(), device)
}

/// [`from_hub`] with explicit Hub options (endpoint, token, cache, offline).
pub fn from_hub_with(
    repo: &str,
    options: &HubOptions,
    device: &candle_core::Device,
) -> Result<Published> {
    let source = Source::model(repo, &["config.json", "model.safetensors"]);
    let fetched = hub::fetch(&source, options, hub::silent())
        .with_context(|| format!("cannot fetch {repo} from the Hub"))?;
    let config_path = &fetched.files[0];
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: crate::publish::ModelConfig = serde_json::from_str(&text).with_context(|| {
        format!("{repo}'s config.json is not an attention-transfer model config")
    })?;
    let options = at_models::ModelOptions {
        num_classes: config.num_classes,
        in_channels: config.in_chans,
        ..at_models::ModelOptions::default()
    };
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, device);
    let model = at_models::build(&config.at_model, &options, vb)?;
    at_models::load(&varmap, &fetched.files[1], &[])
        .with_context(|| format!("{repo}'s weights do not fit a {}", config.at_model))?;
    Ok(Published { model, varmap, config, dir: fetched.snapshot })
}

/// A published model as a run the trainer can evaluate or inspect: the run config it was
/// trained with (`training/config.toml`, on the CPU, reading its data from `data_root` when
/// given) and the local folder holding its `model.safetensors`.
pub fn published_run(
    repo: &str,
    options: &HubOptions,
    data_root: Option<&Path>,
) -> Result<(crate::config::RunConfig, PathBuf)> {
    let source = Source::model(repo, &["model.safetensors", "training/config.toml"]);
    let fetched = hub::fetch(&source, options, hub::silent())
        .with_context(|| format!("cannot fetch {repo} from the Hub"))?;
    let mut config = crate::config::RunConfig::load(&fetched.files[1])?;
    config.device = crate::config::DeviceSpec::Cpu;
    if let Some(root) = data_root {
        config.data.root = root.to_path_buf();
    }
    Ok((config, fetched.snapshot))
}

/// The run `run` names, for evaluation or inspection: a run directory (its `config.toml`), or
/// `hf://owner/name` for a published model ([`published_run`]); its data read from `data_root`
/// when given.
pub fn open_run(
    run: &Path,
    data_root: Option<&Path>,
) -> Result<(crate::config::RunConfig, PathBuf)> {
    if let Some(repo) = hub_repo(run) {
        return published_run(repo, &HubOptions::from_env(), data_root);
    }
    let mut config = crate::config::RunConfig::load(&run.join("config.toml"))?;
    if let Some(root) = data_root {
        config.data.root = root.to_path_buf();
    }
    Ok((config, run.to_path_buf()))
}
