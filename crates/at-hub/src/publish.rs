//! Publishing a finished run to the Hugging Face Hub as a model repository: the weights under
//! the PyTorch state-dict names the models already use, a `config.json` that says how to build
//! the network (timm's fields too, for the ResNets), a model card with the measured accuracy,
//! and the run's own files under `training/`. The folder is written first ([`stage`]), so a dry
//! run shows exactly what would be sent; [`publish`] then sends it in one commit through
//! at-data's hub module.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use at_data::hub::{Committed, HubOptions, Upload};
use at_models::ModelOptions;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use at_trainer::config::{DatasetName, RunConfig};
use at_trainer::train::RunResult;

/// `config.json` of a published model: how to build the network and feed it. For the ResNets it
/// also holds timm's fields (`architecture`, `num_features`, `global_pool`, `pretrained_cfg`),
/// so that `timm.create_model("hf_hub:owner/name", pretrained=True)` loads the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// timm's architecture name for the ResNets (`resnet18`), else the at-models name.
    pub architecture: String,
    /// The at-models name the network is built from (`wrn-16-1`).
    pub at_model: String,
    /// Number of classes.
    pub num_classes: usize,
    /// Input channels.
    pub in_chans: usize,
    /// `[channels, height, width]` after the evaluation pipeline.
    pub input_size: [usize; 3],
    /// Per-channel mean of `x / 255`.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of `x / 255`.
    pub std: Vec<f32>,
    /// The class names in label order, where the dataset fixes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_names: Vec<String>,
    /// The attention points: the groups whose outputs attention transfer compares.
    pub attention_points: Vec<String>,
    /// The dataset it was trained on (the trainer's name).
    pub dataset: String,
    /// timm: features before the classifier (ResNets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_features: Option<usize>,
    /// timm: the global pooling (ResNets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_pool: Option<String>,
    /// timm's pretrained config (ResNets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained_cfg: Option<serde_json::Value>,
}

/// What a dataset is to a reader of the card: its number of classes, its Hub id and its name
/// (the side of its images is `data::input_side`'s).
pub fn dataset_facts(dataset: DatasetName) -> (usize, &'static str, &'static str) {
    match dataset {
        DatasetName::FashionMnistSubset => {
            (10, "zalando-datasets/fashion_mnist", "Fashion-MNIST (embedded subset)")
        }
        DatasetName::FashionMnist => (10, "zalando-datasets/fashion_mnist", "Fashion-MNIST"),
        DatasetName::Cifar10 | DatasetName::Cifar10Parquet => (10, "uoft-cs/cifar10", "CIFAR-10"),
        DatasetName::Cub => (200, "cub-200-2011", "CUB-200-2011"),
        DatasetName::Scenes => (67, "mit-indoor-67", "MIT Indoor 67"),
        DatasetName::Imagenet | DatasetName::ImagenetParquet => {
            (1000, "ILSVRC/imagenet-1k", "ImageNet-1k")
        }
    }
}

/// The `config.json` of a model trained by `config`.
pub fn model_config(config: &RunConfig) -> Result<ModelConfig> {
    let (num_classes, _, _) = dataset_facts(config.data.dataset);
    let side = at_trainer::data::input_side(&config.data);
    let (_, test, in_chans) = at_trainer::data::pipelines(&config.data);
    let options = ModelOptions { num_classes, in_channels: in_chans, ..ModelOptions::default() };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = at_models::build(&config.student, &options, vb)?;
    let resnet = config.student.starts_with("resnet");
    let input_size = [in_chans, side, side];
    let pretrained_cfg = resnet.then(|| {
        serde_json::json!({
            "tag": "attention-transfer",
            "custom_load": false,
            "input_size": input_size,
            "fixed_input_size": false,
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": test.mean,
            "std": test.std,
            "num_classes": num_classes,
            "pool_size": [side / 32, side / 32],
            "first_conv": "conv1",
            "classifier": "fc",
        })
    });
    Ok(ModelConfig {
        architecture: config.student.clone(),
        at_model: config.student.clone(),
        num_classes,
        in_chans,
        input_size,
        mean: test.mean.clone(),
        std: test.std.clone(),
        label_names: at_trainer::data::class_names(config.data.dataset)
            .map(|names| names.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default(),
        attention_points: model.group_names(),
        dataset: config.data.dataset.to_string(),
        num_features: resnet.then_some(512),
        global_pool: resnet.then(|| "avg".to_owned()),
        pretrained_cfg,
    })
}

/// One file of the folder to upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedFile {
    /// Its path in the repository.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
}

/// A finished run, as publishing reads it.
struct FinishedRun {
    config: RunConfig,
    result: RunResult,
}

/// Reads `run_dir`'s config and result, refusing a run that has not finished.
fn finished_run(run_dir: &Path) -> Result<FinishedRun> {
    let config = RunConfig::load(&run_dir.join("config.toml"))
        .with_context(|| format!("{} is not a run directory", run_dir.display()))?;
    let result_path = run_dir.join("result.json");
    let unfinished = || {
        format!(
            "{} has not finished: no result.json with its test accuracy; finish it with \
             `at-train train --resume {}`",
            run_dir.display(),
            run_dir.display()
        )
    };
    let text = std::fs::read_to_string(&result_path).with_context(unfinished)?;
    let result: RunResult = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a run result", result_path.display()))?;
    if result.interrupted || result.epochs < config.epochs {
        bail!(
            "{}: the run stopped at epoch {} of {}; finish it with `at-train train --resume {}`",
            run_dir.display(),
            result.epochs,
            config.epochs,
            run_dir.display()
        )
    }
    if !result.test_top1.is_finite() || result.epochs == 0 {
        bail!("{}: the run's test accuracy is missing", result_path.display())
    }
    if !run_dir.join("model.safetensors").is_file() {
        bail!("{}: no model.safetensors; the run has not finished", run_dir.display())
    }
    Ok(FinishedRun { config, result })
}

/// Writes into `out` the folder that publishing `run_dir` as `repo` uploads (removing what was
/// there): `model.safetensors`, `config.json`, `README.md`, `training/` (config.toml,
/// metrics.jsonl, result.json) and, where the run's test set can be read, `figures/` with the
/// attention maps of four test images. Returns the files with their sizes and hashes.
pub fn stage(run_dir: &Path, repo: &str, out: &Path) -> Result<Vec<StagedFile>> {
    let run = finished_run(run_dir)?;
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("training"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    write_pt_weights(&run_dir.join("model.safetensors"), &out.join("model.safetensors"))?;
    let config_json = serde_json::to_string_pretty(&model_config(&run.config)?)?;
    std::fs::write(out.join("config.json"), config_json + "\n")?;
    for file in ["config.toml", "metrics.jsonl", "result.json"] {
        let from = run_dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, out.join("training").join(file))?;
        }
    }
    let figures = match at_trainer::maps::write_maps_of(
        run.config.clone(),
        run_dir,
        at_trainer::maps::Source::TestItems(vec![0, 1, 2, 3]),
        &out.join("figures"),
    ) {
        Ok(files) => files,
        Err(e) => {
            tracing::warn!("no attention-map figure in the card ({e:#})");
            let _ = std::fs::remove_dir_all(out.join("figures"));
            vec![]
        }
    };
    let figures: Vec<String> = figures
        .iter()
        .filter_map(|f| f.strip_prefix(out).ok().map(|p| p.to_string_lossy().into_owned()))
        .collect();
    std::fs::write(out.join("README.md"), card(repo, &run, &figures)?)?;
    list_files(out)
}

/// Copies the weights `from` into `to` with `__metadata__ = {"format": "pt"}`, as PyTorch's and
/// timm's writers mark theirs (transformers and timm read the mark); the tensors, their names
/// and their bytes are those of `from`.
pub fn write_pt_weights(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", from.display()))?;
    let metadata = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(tensors.tensors(), Some(metadata), to)
        .with_context(|| format!("cannot write {}", to.display()))
}

/// Every file under `dir` with its size and SHA-256, sorted by path.
pub fn list_files(dir: &Path) -> Result<Vec<StagedFile>> {
    let mut files = vec![];
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).expect("walkdir stays under its root");
        files.push(StagedFile {
            path: rel.to_string_lossy().replace('\\', "/"),
            size: entry.metadata()?.len(),
            sha256: at_data::hub::sha256_hex(entry.path())?,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// How to publish.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    /// The model repository, `owner/name`.
    pub repo: String,
    /// Create it private.
    pub private: bool,
    /// The branch to commit to (`None`: main).
    pub revision: Option<String>,
    /// Write the folder and list it; send nothing (no token needed).
    pub dry_run: bool,
    /// The Hub: endpoint, token, retries.
    pub hub: HubOptions,
}

/// What [`publish`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    /// The files of the folder, as sent (or as they would be, in a dry run).
    pub files: Vec<StagedFile>,
    /// The commit; `None` in a dry run.
    pub committed: Option<Committed>,
}

/// Publishes the finished run `run_dir`: checks the token and the run before anything else,
/// writes the folder into `staging` ([`stage`]) and commits it to `options.repo` in one commit,
/// creating the repository if it is missing. Publishing again makes another commit. A dry run
/// writes the folder and stops there.
pub fn publish(run_dir: &Path, options: &PublishOptions, staging: &Path) -> Result<Publication> {
    publish_with(run_dir, options, staging, at_data::hub::silent())
}

/// [`publish`], telling `progress` `(path, bytes sent, size)` as each file the Hub keeps in LFS
/// storage goes.
pub fn publish_with(
    run_dir: &Path,
    options: &PublishOptions,
    staging: &Path,
    progress: at_data::hub::OnProgress,
) -> Result<Publication> {
    if options.dry_run {
        check_repo_name(&options.repo)?;
        let files = stage(run_dir, &options.repo, staging)?;
        return Ok(Publication { files, committed: None });
    }
    if options.hub.token.as_deref().is_none_or(|t| t.trim().is_empty()) {
        bail!(
            "no Hugging Face token: set HF_TOKEN (or log in with `hf auth login`) to a token with \
             write access from https://huggingface.co/settings/tokens; --dry-run needs none"
        )
    }
    check_repo_name(&options.repo)?;
    let files = stage(run_dir, &options.repo, staging)?;
    let upload = Upload {
        repo: options.repo.clone(),
        private: options.private,
        revision: options.revision.clone(),
        message: format!("Publish {} with attention-transfer", run_dir.display()),
        files: files.iter().map(|f| (f.path.clone(), staging.join(&f.path))).collect(),
    };
    let committed = at_data::hub::upload(&upload, &options.hub, progress)?;
    Ok(Publication { files, committed: Some(committed) })
}

/// Refuses names the Hub refuses: `owner/name`, letters, digits, `-`, `_`, `.`, at most 96
/// characters.
pub fn check_repo_name(repo: &str) -> Result<()> {
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !part.starts_with(['-', '.'])
    };
    match repo.split_once('/') {
        Some((owner, name)) if ok(owner) && ok(name) => Ok(()),
        _ => bail!(
            "`{repo}` is not a Hub repository name: `owner/name`, letters, digits, `-`, `_` and `.`, \
             at most 96 characters each"
        ),
    }
}

/// The model card: YAML front matter the Hub reads (tags, datasets, base model, the measured
/// accuracy as a model-index), then how the model was trained.
fn card(repo: &str, run: &FinishedRun, figures: &[String]) -> Result<String> {
    let (config, result) = (&run.config, &run.result);
    let (_, hub_dataset, dataset_name) = dataset_facts(config.data.dataset);
    let name = repo.rsplit('/').next().unwrap_or(repo);
    let base_model = crate::hub_repo(&config.pretrained).map(str::to_owned);
    let mut tags = vec!["image-classification", "candle", "attention-transfer"];
    if config.loss.alpha > 0.0 || config.teacher.is_some() {
        tags.push("knowledge-distillation");
    }
    let front = FrontMatter {
        library_name: "attention-transfer".into(),
        license: "mit".into(),
        pipeline_tag: "image-classification".into(),
        tags: tags.into_iter().map(String::from).collect(),
        datasets: vec![hub_dataset.into()],
        metrics: vec!["accuracy".into()],
        base_model,
        model_index: vec![ModelIndex {
            name: name.into(),
            results: vec![IndexResult {
                task: BTreeMap::from([
                    ("type".into(), "image-classification".into()),
                    ("name".into(), "Image Classification".into()),
                ]),
                dataset: BTreeMap::from([
                    ("type".into(), hub_dataset.into()),
                    ("name".into(), dataset_name.into()),
                    ("split".into(), "test".into()),
                ]),
                metrics: vec![
                    Metric {
                        kind: "accuracy".into(),
                        name: "Top-1 accuracy".into(),
                        value: round2(result.test_top1),
                    },
                    Metric {
                        kind: "top-5-accuracy".into(),
                        name: "Top-5 accuracy".into(),
                        value: round2(result.test_top5),
                    },
                ],
            }],
        }],
    };
    let yaml = serde_yaml_ng::to_string(&front).context("cannot write the card's YAML")?;
    let mut md = format!("---\n{yaml}---\n\n# {name}\n\n");
    let method = method_words(config);
    let _ = writeln!(
        md,
        "A {} trained on {dataset_name} {method}, with [attention-transfer]\
         (https://github.com/attention-transfer/attention-transfer), a Rust implementation on \
         candle of Zagoruyko & Komodakis, *Paying More Attention to Attention* (ICLR 2017).\n",
        config.student
    );
    let _ = writeln!(
        md,
        "| test top-1 | test top-5 | test error | epochs |\n|---:|---:|---:|---:|\n| {:.2}% | {:.2}% | {:.2}% | {} |\n",
        result.test_top1, result.test_top5, result.test_error, result.epochs
    );
    md.push_str("## How it was trained\n\n");
    if let Some(teacher) = &config.teacher {
        let accuracy = teacher_accuracy(&teacher.checkpoint).map_or_else(
            || "accuracy not recorded beside its weights".to_owned(),
            |a| format!("test top-1 {a:.2}%"),
        );
        let _ = writeln!(
            md,
            "- Teacher: {} from `{}` ({accuracy}).",
            teacher.model,
            teacher.checkpoint.display()
        );
    }
    if config.loss.beta > 0.0 {
        let _ = writeln!(
            md,
            "- Attention transfer: beta {} (`{}` of |A|^{} over channels, `{}` distance){}.",
            config.loss.beta,
            config.loss.map_reduce,
            config.loss.map_p,
            config.loss.distance,
            match config.loss.at_start_epoch {
                0 => String::new(),
                e => format!(", from epoch {e}"),
            }
        );
    }
    if config.loss.alpha > 0.0 {
        let _ = writeln!(
            md,
            "- Knowledge distillation: alpha {}, temperature {}.",
            config.loss.alpha, config.loss.temperature
        );
    }
    let o = &config.optim;
    let _ = writeln!(
        md,
        "- Recipe: {} epochs, batch {}, SGD lr {} (momentum {}, {} schedule), weight decay {}, \
         augmentation `{}`, seed {}.",
        config.epochs,
        config.batch_size,
        o.lr,
        o.momentum,
        o.schedule,
        o.weight_decay,
        config.data.augment,
        config.seed
    );
    let machine = if result.machine.is_empty() { "not recorded" } else { &result.machine };
    let _ =
        writeln!(md, "- Trained on: {machine}; wall time {:.1} minutes.", result.seconds / 60.0);
    let teacher_note = match &config.teacher {
        Some(t) => format!(
            " (with the teacher's weights at `{}`, or `--set teacher.checkpoint=...` pointing \
             at them, e.g. `hf://owner/name` of a published teacher)",
            t.checkpoint.display()
        ),
        None => String::new(),
    };
    let _ = writeln!(
        md,
        "\nReproduce it with the config in `training/`{teacher_note}; `training/metrics.jsonl` \
         holds every epoch of the published run:\n\n```sh\nat-train train --config \
         training/config.toml --run-dir runs/{name}\n```\n"
    );
    md.push_str(
        "## Use it\n\nIn Rust: `at_hub::from_hub(\"REPO\", &Device::Cpu)` builds the network \
         from `config.json` and loads `model.safetensors` strictly. The weights carry PyTorch \
         state-dict names"
            .replace("REPO", repo)
            .as_str(),
    );
    if config.student.starts_with("resnet") {
        let _ = write!(
            md,
            " (torchvision's), so `timm.create_model(\"hf_hub:{repo}\", pretrained=True)` loads them"
        );
    } else {
        md.push_str(", the names of the authors' PyTorch code");
    }
    md.push_str(".\n");
    if !figures.is_empty() {
        md.push_str(
            "\n## Attention maps\n\nFour test images, each followed by the attention map \
             (mean over channels of the squared activation) of every group:\n\n",
        );
        for f in figures {
            let _ = writeln!(md, "![{f}]({f})");
        }
    }
    Ok(md)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// "with attention transfer from a wrn-16-2" and the like.
fn method_words(config: &RunConfig) -> String {
    let teacher = config.teacher.as_ref().map_or("a teacher", |t| t.model.as_str());
    match (config.loss.beta > 0.0, config.loss.alpha > 0.0) {
        (true, true) => format!("with attention transfer and distillation from a {teacher}"),
        (true, false) => format!("with attention transfer from a {teacher}"),
        (false, true) => format!("with knowledge distillation from a {teacher}"),
        (false, false) if !config.pretrained.as_os_str().is_empty() => {
            format!("fine-tuned from {}", config.pretrained.display())
        }
        (false, false) => "alone (no teacher)".to_owned(),
    }
}

/// The test top-1 of the run whose weights are `checkpoint`, from its `result.json`.
fn teacher_accuracy(checkpoint: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(checkpoint.parent()?.join("result.json")).ok()?;
    Some(serde_json::from_str::<RunResult>(&text).ok()?.test_top1)
}

#[derive(Serialize)]
struct FrontMatter {
    library_name: String,
    license: String,
    pipeline_tag: String,
    tags: Vec<String>,
    datasets: Vec<String>,
    metrics: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base_model: Option<String>,
    #[serde(rename = "model-index")]
    model_index: Vec<ModelIndex>,
}

#[derive(Serialize)]
struct ModelIndex {
    name: String,
    results: Vec<IndexResult>,
}

#[derive(Serialize)]
struct IndexResult {
    task: BTreeMap<String, String>,
    dataset: BTreeMap<String, String>,
    metrics: Vec<Metric>,
}

#[derive(Serialize)]
struct Metric {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    value: f64,
}

/// The repository name a repro run is published under: model, method and teacher, dataset, and
/// the profile where it is not the paper's (`wrn-16-1-at-from-wrn-16-2-cifar10-seed0`).
pub fn repro_repo_name(owner: &str, key: &str, config: &RunConfig, profile: &str) -> String {
    let mut name = key.replace("-t-", "-from-").replace('/', "-");
    let dataset = config.data.dataset.to_string();
    if let Some(seed_at) = name.rfind("-seed").filter(|_| !name.starts_with(&dataset)) {
        name.insert_str(seed_at, &format!("-{dataset}"));
    }
    if profile != "paper" {
        name.push_str(&format!("-{profile}"));
    }
    name.retain(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    name.truncate(96);
    format!("{owner}/{name}")
}

/// Where [`publish`] writes the folder by default: `RUN_DIR/hub`.
pub fn default_staging(run_dir: &Path) -> PathBuf {
    run_dir.join("hub")
}

#[cfg(test)]
mod tests {
    use super::*;
    use at_trainer::config::{DataConfig, TeacherConfig};

    fn finetuned_resnet() -> RunConfig {
        RunConfig {
            student: "resnet18".into(),
            data: DataConfig { dataset: DatasetName::Cub, ..DataConfig::default() },
            pretrained: "hf://timm/resnet18.tv_in1k".into(),
            teacher: Some(TeacherConfig {
                model: "resnet34".into(),
                checkpoint: "runs/cub-resnet34/model.safetensors".into(),
            }),
            ..RunConfig::default()
        }
    }

    #[test]
    fn a_resnets_config_json_carries_timms_fields() {
        let config = model_config(&finetuned_resnet()).unwrap();
        assert_eq!(
            (config.architecture.as_str(), config.at_model.as_str()),
            ("resnet18", "resnet18")
        );
        assert_eq!(
            (config.num_classes, config.in_chans, config.input_size),
            (200, 3, [3, 224, 224])
        );
        assert_eq!(config.attention_points, ["layer1", "layer2", "layer3", "layer4"]);
        assert_eq!(config.num_features, Some(512));
        let cfg = config.pretrained_cfg.unwrap();
        assert_eq!(cfg["num_classes"], 200);
        assert_eq!(cfg["first_conv"], "conv1");
        assert_eq!(cfg["classifier"], "fc");
        assert_eq!(cfg["input_size"], serde_json::json!([3, 224, 224]));
        assert!(config.label_names.is_empty(), "CUB's names are in its files, not here");
    }

    #[test]
    fn a_finetuned_students_card_names_its_base_model_and_accuracy() {
        let run = FinishedRun {
            config: finetuned_resnet(),
            result: RunResult {
                student: "resnet18".into(),
                teacher: Some("resnet34".into()),
                epochs: 60,
                test_top1: 72.987,
                test_top5: 91.5,
                test_error: 27.013,
                seconds: 3600.0,
                interrupted: false,
                machine: "a test machine".into(),
            },
        };
        let md = card("someone/resnet18-cub", &run, &[]).unwrap();
        let yaml = md.strip_prefix("---\n").unwrap().split("\n---\n").next().unwrap();
        let front: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(front["base_model"].as_str(), Some("timm/resnet18.tv_in1k"));
        assert_eq!(front["pipeline_tag"].as_str(), Some("image-classification"));
        let result = &front["model-index"][0]["results"][0];
        assert_eq!(result["metrics"][0]["value"].as_f64(), Some(72.99));
        assert_eq!(result["dataset"]["name"].as_str(), Some("CUB-200-2011"));
        let tags = front["tags"].as_sequence().unwrap();
        assert!(tags.iter().any(|t| t.as_str() == Some("knowledge-distillation")));
        assert!(md.contains("timm.create_model(\"hf_hub:someone/resnet18-cub\", pretrained=True)"));
        assert!(md.contains("a test machine") && md.contains("60.0 minutes"), "{md}");
    }

    #[test]
    fn repository_names_say_model_method_teacher_and_dataset() {
        let config = RunConfig::default();
        let name = repro_repo_name("me", "wrn-16-1/at-t-wrn-16-2/seed3", &config, "paper");
        assert_eq!(name, format!("me/wrn-16-1-at-from-wrn-16-2-{}-seed3", config.data.dataset));
        assert!(check_repo_name(&name).is_ok());
        assert!(check_repo_name("no-owner").is_err());
        assert!(check_repo_name("me/has space").is_err());
    }
}
