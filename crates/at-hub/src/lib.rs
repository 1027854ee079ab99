//! Attention-transfer models on the Hugging Face Hub: the downloads `at-train download` offers
//! (datasets and the ImageNet-pretrained ResNets), `hf://owner/name` weights in configs
//! ([`resolver`], handed to the trainer as a value), models published by [`publish`] loaded
//! back ([`from_hub`], [`open_run`]). The network itself is reached through at-data's hub
//! module only; progress is told to callbacks, drawn by the binary.
#![deny(missing_docs)]

pub mod publish;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use at_data::hub::{self, HubOptions, OnProgress, Source};
use at_trainer::config::{DeviceSpec, RunConfig};
pub use at_trainer::train::{HF_SCHEME, ResolveWeights, hub_repo};

pub use publish::ModelConfig;

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
    if repo.is_some() && !matches!(name, "cub" | "scenes") {
        bail!("--repo names the mirror of cub or scenes; {name} comes from its own repository")
    }
    if !files.is_empty() && name != "imagenet" {
        bail!("--files picks ImageNet's files; {name} is fetched whole")
    }
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

/// Downloads `source` into the Hub cache (or finds it there), telling `progress` how each file
/// goes; the folder to point `data.root` (or `--data-dir`) at.
pub fn download(source: &Source, options: &HubOptions, progress: OnProgress) -> Result<PathBuf> {
    let fetched = hub::fetch(source, options, progress)?;
    Ok(fetched.unpacked.unwrap_or(fetched.snapshot))
}

/// The local weights file of `path`: itself, or for `hf://owner/name` the repository's
/// `model.safetensors`, downloaded into the Hub cache (or found there; offline with
/// `HF_HUB_OFFLINE=1`), each file's progress told to `progress(repo)`.
pub fn weights_file(path: &Path, progress: &dyn Fn(&str) -> OnProgress) -> Result<PathBuf> {
    let Some(repo) = hub_repo(path) else { return Ok(path.to_path_buf()) };
    let source = Source::model(repo, &["model.safetensors"]);
    let fetched = hub::fetch(&source, &HubOptions::from_env(), progress(repo))
        .with_context(|| format!("cannot fetch the weights of {}", path.display()))?;
    Ok(fetched.files[0].clone())
}

/// The trainer's resolver of `hf://owner/name` weights ([`weights_file`]), for
/// `RunOptions::resolve_weights`; `progress(repo)` makes the display of each repository's files.
pub fn resolver(progress: fn(&str) -> OnProgress) -> ResolveWeights {
    Arc::new(move |path: &Path| weights_file(path, &progress))
}

/// A model published with `at-train publish` (or `cargo xtask publish`), loaded from the Hub.
pub struct Published {
    /// The network, built from `config.json`, with the published weights.
    pub model: Box<dyn at_models::AttentionModel>,
    /// Its weights.
    pub varmap: candle_nn::VarMap,
    /// Its `config.json`.
    pub config: ModelConfig,
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
    let config: ModelConfig = serde_json::from_str(&text).with_context(|| {
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
) -> Result<(RunConfig, PathBuf)> {
    let source = Source::model(repo, &["model.safetensors", "training/config.toml"]);
    let fetched = hub::fetch(&source, options, hub::silent())
        .with_context(|| format!("cannot fetch {repo} from the Hub"))?;
    let mut config = RunConfig::load(&fetched.files[1])?;
    config.device = DeviceSpec::Cpu;
    if let Some(root) = data_root {
        config.data.root = root.to_path_buf();
    }
    Ok((config, fetched.snapshot))
}

/// The run `run` names, for evaluation or inspection: a run directory (its `config.toml`), or
/// `hf://owner/name` for a published model ([`published_run`]); its data read from `data_root`
/// when given.
pub fn open_run(run: &Path, data_root: Option<&Path>) -> Result<(RunConfig, PathBuf)> {
    if let Some(repo) = hub_repo(run) {
        return published_run(repo, &HubOptions::from_env(), data_root);
    }
    let mut config = RunConfig::load(&run.join("config.toml"))?;
    if let Some(root) = data_root {
        config.data.root = root.to_path_buf();
    }
    Ok((config, run.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_options_that_a_name_does_not_take_are_refused() {
        let err = |name, repo, files: &[String]| source(name, repo, files).unwrap_err().to_string();
        assert!(err("cub", None, &[]).contains("pass --repo OWNER/NAME"));
        assert!(err("cifar10", Some("me/mirror"), &[]).contains("--repo names the mirror"));
        assert!(err("cifar10", None, &["a".into()]).contains("--files picks ImageNet's files"));
        assert!(err("imagenet", None, &[]).contains("name the ImageNet files"));
        assert!(err("mnist", None, &[]).contains("unknown download `mnist`"));
        assert_eq!(source("cub", Some("me/cub"), &[]).unwrap().repo, "me/cub");
    }
}
