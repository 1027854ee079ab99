//! A run, described by one TOML file in which every key is visible with its default. A key that
//! does not exist is an error, not ignored.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use at_losses::gradient::{GradientConfig, GradientPenalty};
use at_ops::{AtConfig, ChannelReduce, Distance, MapSpec, Normalization, Resize};
use serde::{Deserialize, Serialize};

use crate::optim::{Schedule, SgdConfig};

/// Declares a config enum: a serde enum whose values are written as given, parsed once when
/// the config is read; an unknown value is an error that names every valid one (serde's
/// "unknown variant `x`, expected one of ...").
macro_rules! config_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($(#[$vdoc])* #[serde(rename = $text)] $variant),+ }

        impl $name {
            /// The value as written in a config file.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

config_enum! {
    /// The datasets a run can use (`data.dataset`).
    DatasetName {
        /// The Fashion-MNIST subset embedded in at-data: no download.
        FashionMnistSubset = "fashion-mnist-subset",
        /// Fashion-MNIST in IDX files (Debian's `dataset-fashion-mnist` by default).
        FashionMnist = "fashion-mnist",
        /// CIFAR-10's binary batches.
        Cifar10 = "cifar10",
        /// CIFAR-10 in the Hub's parquet layout.
        Cifar10Parquet = "cifar10-parquet",
        /// CUB-200-2011, cropped to its boxes.
        Cub = "cub",
        /// MIT Indoor 67.
        Scenes = "scenes",
        /// ImageNet in class folders.
        Imagenet = "imagenet",
        /// ImageNet in the Hub's parquet shards.
        ImagenetParquet = "imagenet-parquet",
    }
}

config_enum! {
    /// The training augmentation (`data.augment`).
    Augmentation {
        /// The dataset's usual one.
        Standard = "standard",
        /// Horizontal flips only (Table 3).
        Flip = "flip",
        /// None.
        None = "none",
    }
}

config_enum! {
    /// How an attention map combines channels (`loss.map_reduce`).
    MapReduce {
        /// `F_sum^p`.
        Sum = "sum",
        /// The channel mean (the authors' code; the same map after normalisation).
        Mean = "mean",
        /// `F_max^p`.
        Max = "max",
    }
}

config_enum! {
    /// The per-sample normalisation of a map (`loss.norm`).
    MapNorm {
        /// L2 (the paper's).
        L2 = "l2",
        /// L1.
        L1 = "l1",
        /// None.
        None = "none",
    }
}

config_enum! {
    /// How two normalised maps are compared (`loss.distance`).
    DistanceKind {
        /// The mean of squared differences: the authors' code.
        Code = "code",
        /// Eq. (2) of the paper, the `loss.distance_p` norm.
        Paper = "paper",
    }
}

config_enum! {
    /// How maps of different sizes are brought together (`loss.resize`).
    ResizeKind {
        /// Area averaging.
        Area = "area",
        /// Bilinear interpolation.
        Bilinear = "bilinear",
    }
}

config_enum! {
    /// Gradient-based attention (`loss.gradient`).
    GradientKind {
        /// None.
        None = "none",
        /// Minimise the input gradient's L2 norm.
        Jacobian = "jacobian",
        /// The input gradients of an image and its mirror should agree.
        Symmetry = "symmetry",
        /// Match the teacher's input gradient.
        Transfer = "transfer",
    }
}

config_enum! {
    /// The learning-rate schedule (`optim.schedule`).
    ScheduleKind {
        /// Multiplied by `gamma` at each milestone.
        Multistep = "multistep",
        /// Cosine annealing over the run's epochs.
        Cosine = "cosine",
        /// Constant.
        Constant = "constant",
    }
}

/// The device a run trains on, written `cpu`, `cuda:N` (`cuda` is `cuda:0`) or `metal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// The CUDA device of this ordinal.
    Cuda(usize),
    /// The Metal device.
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let unknown = || format!("unknown device `{s}`, expected one of `cpu`, `cuda:N`, `metal`");
        match s {
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(unknown()),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

/// Everything a training run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The network trained.
    pub student: String,
    /// The teacher, if any: required when `loss.alpha > 0`, `loss.beta > 0` or
    /// `loss.gradient = "transfer"`.
    pub teacher: Option<TeacherConfig>,
    /// The data.
    pub data: DataConfig,
    /// The loss.
    pub loss: LossSection,
    /// The optimiser and its schedule.
    pub optim: OptimConfig,
    /// Epochs.
    pub epochs: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// The seed of the initialisation, the data order and the augmentations.
    pub seed: u64,
    /// `cpu`, `cuda:N` or `metal`.
    pub device: DeviceSpec,
    /// Loader threads (0: as many as the machine has).
    pub threads: usize,
    /// Fine-tuning: start the student from these weights: a `model.safetensors`, or
    /// `hf://owner/name` for a Hub model repository's (e.g. `hf://timm/resnet18.tv_in1k`,
    /// which `cargo xtask download resnet18-imagenet` caches); empty for a fresh initialisation.
    pub pretrained: PathBuf,
    /// Fine-tuning: tensor-name prefixes not taken from `pretrained` (a new classifier head).
    pub pretrained_skip: Vec<String>,
    /// Fine-tuning: batch norm uses its running statistics and is not trained (ResNets).
    pub freeze_bn: bool,
    /// Fine-tuning: the stem and first group are not trained (ResNets).
    pub freeze_first_group: bool,
}

/// The teacher network and its trained weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// A registered model name.
    pub model: String,
    /// Its weights: a `model.safetensors` (e.g. `RUN_DIR/model.safetensors` of a finished run),
    /// or `hf://owner/name` for a Hub model repository's.
    pub checkpoint: PathBuf,
}

/// Which dataset, where, and how it is augmented.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `fashion-mnist-subset` (embedded), `fashion-mnist`, `cifar10` (binary),
    /// `cifar10-parquet` (the Hub's layout), `cub`, `scenes`, `imagenet` (folders) or
    /// `imagenet-parquet` (the Hub's shards).
    pub dataset: DatasetName,
    /// The dataset directory; empty for the embedded subset or the default location
    /// (`data/<dataset>`, or Debian's directory for Fashion-MNIST).
    pub root: PathBuf,
    /// `standard` (the dataset's usual training augmentation), `flip` (horizontal flips only,
    /// Table 3) or `none`.
    pub augment: Augmentation,
    /// Use only the first `n` training images (0: all).
    pub train_limit: usize,
    /// Use only the first `n` test images (0: all).
    pub test_limit: usize,
    /// The network's input side, for Fashion-MNIST only: 0 or 32 (zero-padded to CIFAR's size,
    /// as the paper's networks expect), or 28 (the images as they are: 23% fewer pixels, so 23%
    /// less work per image; the quick profile's choice). Other datasets have their own sizes.
    pub side: usize,
}

/// The loss terms; see at-losses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossSection {
    /// Knowledge-distillation weight (0: none).
    pub alpha: f64,
    /// Knowledge-distillation temperature.
    pub temperature: f64,
    /// Attention-transfer weight (0: none); 1e3 with the `code` distance.
    pub beta: f64,
    /// `sum`, `mean` or `max` over channels.
    pub map_reduce: MapReduce,
    /// The power p of `|A|^p`.
    pub map_p: f64,
    /// `l2`, `l1` or `none`.
    pub norm: MapNorm,
    /// `code` (mean of squared differences) or `paper` (eq. (2), the p-norm).
    pub distance: DistanceKind,
    /// The norm order of the `paper` distance.
    pub distance_p: f64,
    /// `area` or `bilinear`, for maps of different sizes.
    pub resize: ResizeKind,
    /// (student group, teacher group) pairs; empty: every group with its namesake.
    pub pairs: Vec<[usize; 2]>,
    /// Gradient-based attention (section 3.2, Table 3), by double backpropagation: `none`,
    /// `jacobian` (minimise the input gradient's L2 norm), `symmetry` (the input gradients of an
    /// image and of its mirror should agree) or `transfer` (match the teacher's input gradient).
    /// Combines with distillation (`alpha`), not with activation AT (`beta`).
    pub gradient: GradientKind,
    /// The weight of the gradient penalty.
    pub gradient_beta: f64,
    /// Split each batch into this many chunks for the double-backpropagation step, which needs
    /// several times a plain step's memory; the gradients are summed, so the step is the same.
    /// Only for students without batch norm (whose batch statistics chunks would change).
    pub gradient_chunks: usize,
    /// The first epoch (from 0) with attention transfer: before it `beta` counts as 0 (Table 5
    /// adds AT at epoch 60 of 100). 0: from the start.
    #[serde(default)]
    pub at_start_epoch: usize,
}

/// SGD and the learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// The base learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay.
    pub weight_decay: f64,
    /// `multistep`, `cosine` or `constant`.
    pub schedule: ScheduleKind,
    /// Epochs at which a multi-step schedule multiplies the rate by `gamma`.
    pub milestones: Vec<usize>,
    /// The multi-step factor.
    pub gamma: f64,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            student: "wrn-16-1".into(),
            teacher: None,
            data: DataConfig::default(),
            loss: LossSection::default(),
            optim: OptimConfig::default(),
            epochs: 200,
            batch_size: 128,
            seed: 0,
            device: DeviceSpec::Cpu,
            threads: 0,
            pretrained: PathBuf::new(),
            pretrained_skip: vec!["fc.".into()],
            freeze_bn: false,
            freeze_first_group: false,
        }
    }
}

/// A named starting point for `--preset`: what it is, and its config.
pub struct Preset {
    /// The name `--preset` takes.
    pub name: &'static str,
    /// One line about it.
    pub about: &'static str,
    build: fn() -> RunConfig,
}

/// The presets: the one table of their names, descriptions and configs. Teacher checkpoints and
/// pretrained weights point to conventional places (`runs/...`, the Hub's `hf://timm/...`);
/// override them with `--set`.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "cifar",
        about: "CIFAR-10 recipe of the authors' cifar.py: WRN-16-1, 200 epochs, SGD 0.1, x0.2 at 60/120/160",
        build: recipes::cifar,
    },
    Preset {
        name: "cifar-at",
        about: "cifar + attention transfer from a WRN-16-2 teacher (beta 1e3, all three groups)",
        build: || recipes::cifar_with(recipes::at(LossSection::default(), vec![])),
    },
    Preset {
        name: "cifar-kd",
        about: "cifar + knowledge distillation from a WRN-16-2 teacher (alpha 0.9, T 4)",
        build: || recipes::cifar_with(recipes::kd(LossSection::default())),
    },
    Preset {
        name: "cifar-at-kd",
        about: "cifar + both (Table 1's AT+KD column)",
        build: || recipes::cifar_with(recipes::kd(recipes::at(LossSection::default(), vec![]))),
    },
    Preset {
        name: "finetune-cub",
        about: "Table 4: ResNet-18 from ImageNet weights on CUB, frozen BN and first group",
        build: || recipes::finetune(DatasetName::Cub),
    },
    Preset {
        name: "finetune-scenes",
        about: "Table 4: the same on MIT Indoor 67",
        build: || recipes::finetune(DatasetName::Scenes),
    },
    Preset {
        name: "finetune-cub-at",
        about: "Table 4: finetune-cub + AT from a fine-tuned ResNet-34 on the last two groups",
        build: || {
            recipes::resnet_at(
                recipes::finetune(DatasetName::Cub),
                "runs/cub-resnet34/model.safetensors",
            )
        },
    },
    Preset {
        name: "finetune-scenes-at",
        about: "Table 4: finetune-scenes + AT from a fine-tuned ResNet-34 on the last two groups",
        build: || {
            recipes::resnet_at(
                recipes::finetune(DatasetName::Scenes),
                "runs/scenes-resnet34/model.safetensors",
            )
        },
    },
    Preset {
        name: "imagenet",
        about: "Table 5: ResNet-18, batch 256, lr 0.1, wd 1e-4, 100 epochs, x0.1 at 30/60/90",
        build: recipes::imagenet,
    },
    Preset {
        name: "imagenet-at",
        about: "Table 5: imagenet + AT from a ResNet-34 on the last two groups (beta 1e3)",
        build: || recipes::resnet_at(recipes::imagenet(), "hf://timm/resnet34.tv_in1k"),
    },
    Preset {
        name: "nin",
        about: "Table 3 baseline: NIN-thin without BN on CIFAR-10, flips only, no weight decay, seed 1",
        build: recipes::nin,
    },
    Preset {
        name: "nin-jacobian",
        about: "Table 3 `min`: nin + the input gradient's L2 norm (double backprop)",
        build: || recipes::nin_gradient(GradientKind::Jacobian),
    },
    Preset {
        name: "nin-symmetry",
        about: "Table 3 `symmetry norm`: nin + gradients of image and mirror agree",
        build: || recipes::nin_gradient(GradientKind::Symmetry),
    },
    Preset {
        name: "nin-gradient-at",
        about: "Table 3 `AT-NIN-wide`: nin + gradient attention transfer from a NIN-wide teacher",
        build: || RunConfig {
            teacher: recipes::nin_teacher(),
            ..recipes::nin_gradient(GradientKind::Transfer)
        },
    },
    Preset {
        name: "nin-kd",
        about: "Table 3 `KD`: nin + distillation from the NIN-wide teacher (alpha 0.9, T 4)",
        build: || RunConfig {
            teacher: recipes::nin_teacher(),
            loss: recipes::kd(LossSection::default()),
            ..recipes::nin()
        },
    },
    Preset {
        name: "fmnist",
        about: "the fmnist profile's recipe: the full Fashion-MNIST padded to 32x32, 5 epochs, cosine from lr 0.1",
        build: recipes::fmnist,
    },
    Preset {
        name: "quick",
        about: "the quick profile's recipe (`at-train quick`): Fashion-MNIST subset, 2000 images at 28x28, 4 epochs",
        build: recipes::quick,
    },
];

impl RunConfig {
    /// The config of the preset called `name` (see [`PRESETS`]), or an error that lists them.
    pub fn preset(name: &str) -> Result<Self> {
        match PRESETS.iter().find(|p| p.name == name) {
            Some(preset) => Ok((preset.build)()),
            None => {
                let known: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
                bail!("unknown preset `{name}`; known presets: {}", known.join(", "))
            }
        }
    }
}

/// The paper's recipes, each written once: the presets are made of them, and so are the runs
/// that `at-repro` plans for a table (a method applied to a profile's base config).
pub mod recipes {
    use super::*;

    /// Distillation's weight and temperature (the authors' cifar.py; section 4.1: "We raise KD
    /// temperature for ResNet transfers to 4").
    pub const KD_ALPHA: f64 = 0.9;
    /// See [`KD_ALPHA`].
    pub const KD_TEMPERATURE: f64 = 4.0;
    /// Attention transfer's weight with the `code` distance.
    pub const AT_BETA: f64 = 1e3;

    /// `loss` with knowledge distillation.
    pub fn kd(loss: LossSection) -> LossSection {
        LossSection { alpha: KD_ALPHA, temperature: KD_TEMPERATURE, ..loss }
    }

    /// `loss` with attention transfer on `pairs` (empty: every group with its namesake).
    pub fn at(loss: LossSection, pairs: Vec<[usize; 2]>) -> LossSection {
        LossSection { beta: AT_BETA, pairs, ..loss }
    }

    /// The groups attention transfer pairs for a student `model`: the last two of a ResNet's
    /// four (Tables 4 and 5: "attention losses on 2 last groups"), every group otherwise (empty).
    pub fn at_pairs(model: &str) -> Vec<[usize; 2]> {
        if model.starts_with("resnet") { vec![[2, 2], [3, 3]] } else { vec![] }
    }

    /// The weight and batch chunks of a gradient-based penalty. The paper gives no weights:
    /// each puts its penalty at roughly a tenth of the cross-entropy at initialisation
    /// (docs/results/README.md). Chunks of 64 (32 for the symmetry norm, which runs the network
    /// twice) keep the double-backpropagation step at batch 128 under 4 GB
    /// (docs/benchmarks.md).
    pub fn gradient_weights(kind: GradientKind) -> (f64, usize) {
        match kind {
            GradientKind::Symmetry => (0.1, 4),
            GradientKind::None | GradientKind::Jacobian | GradientKind::Transfer => (1e3, 2),
        }
    }

    /// `loss` with the gradient-based penalty `kind` at its weight and chunks.
    pub fn gradient(loss: LossSection, kind: GradientKind) -> LossSection {
        let (gradient_beta, gradient_chunks) = gradient_weights(kind);
        LossSection { gradient: kind, gradient_beta, gradient_chunks, ..loss }
    }

    /// Table 3's training (section 4.1.1) applied to `config`'s data and optimiser: horizontal
    /// flips only, no weight decay ("turn off weight decay even for baseline experiments"), and
    /// lr 0.02, which the paper does not give: it is what trained NIN without batch norm stably
    /// here.
    pub fn gradient_table(config: RunConfig) -> RunConfig {
        RunConfig {
            data: DataConfig { augment: Augmentation::Flip, ..config.data },
            optim: OptimConfig { lr: 0.02, weight_decay: 0.0, ..config.optim },
            ..config
        }
    }

    /// The WRN-16-2 teacher of the CIFAR presets.
    fn cifar_teacher() -> Option<TeacherConfig> {
        Some(TeacherConfig {
            model: "wrn-16-2".into(),
            checkpoint: "runs/cifar-wrn-16-2/model.safetensors".into(),
        })
    }

    /// The CIFAR-10 recipe of the authors' cifar.py: WRN-16-1, 200 epochs, SGD 0.1 with
    /// momentum 0.9 and weight decay 5e-4, x0.2 at epochs 60, 120, 160, batch 128.
    pub fn cifar() -> RunConfig {
        RunConfig {
            data: DataConfig { dataset: DatasetName::Cifar10, ..DataConfig::default() },
            ..RunConfig::default()
        }
    }

    /// [`cifar`] with `loss`, learning from the WRN-16-2 of `runs/cifar-wrn-16-2`.
    pub fn cifar_with(loss: LossSection) -> RunConfig {
        RunConfig { teacher: cifar_teacher(), loss, ..cifar() }
    }

    /// Table 4's fine-tuning: ResNet-18 from torchvision's ImageNet weights, batch norm and the
    /// first group frozen, lr 0.01, 60 epochs.
    pub fn finetune(dataset: DatasetName) -> RunConfig {
        RunConfig {
            student: "resnet18".into(),
            data: DataConfig { dataset, ..DataConfig::default() },
            optim: OptimConfig {
                lr: 0.01,
                weight_decay: 1e-4,
                milestones: vec![20, 40],
                gamma: 0.1,
                ..OptimConfig::default()
            },
            epochs: 60,
            batch_size: 64,
            pretrained: "hf://timm/resnet18.tv_in1k".into(),
            freeze_bn: true,
            freeze_first_group: true,
            ..RunConfig::default()
        }
    }

    /// Attention transfer on the last two of ResNet's four groups, from a ResNet-34.
    pub fn resnet_at(base: RunConfig, teacher_checkpoint: &str) -> RunConfig {
        RunConfig {
            teacher: Some(TeacherConfig {
                model: "resnet34".into(),
                checkpoint: teacher_checkpoint.into(),
            }),
            loss: at(LossSection::default(), at_pairs(&base.student)),
            ..base
        }
    }

    /// Table 5's ImageNet recipe (the authors' imagenet.py): ResNet-18, batch 256, lr 0.1, weight
    /// decay 1e-4, 100 epochs, x0.1 at 30, 60, 90.
    pub fn imagenet() -> RunConfig {
        RunConfig {
            student: "resnet18".into(),
            data: DataConfig { dataset: DatasetName::Imagenet, ..DataConfig::default() },
            optim: OptimConfig {
                weight_decay: 1e-4,
                milestones: vec![30, 60, 90],
                gamma: 0.1,
                ..OptimConfig::default()
            },
            epochs: 100,
            batch_size: 256,
            ..RunConfig::default()
        }
    }

    /// Table 3 (section 4.1.1): NIN-thin without batch norm on CIFAR-10 with
    /// [`gradient_table`]'s training, fixed seed.
    pub fn nin() -> RunConfig {
        RunConfig { student: "nin-thin-nobn".into(), seed: 1, ..gradient_table(cifar()) }
    }

    /// The NIN-wide teacher of Table 3's transfer and KD rows (`runs/cifar-nin-wide`).
    pub fn nin_teacher() -> Option<TeacherConfig> {
        Some(TeacherConfig {
            model: "nin-wide-nobn".into(),
            checkpoint: "runs/cifar-nin-wide/model.safetensors".into(),
        })
    }

    /// [`nin`] with the gradient-based penalty `kind` ([`gradient`]).
    pub fn nin_gradient(kind: GradientKind) -> RunConfig {
        let base = nin();
        RunConfig { loss: gradient(base.loss.clone(), kind), ..base }
    }

    /// The fmnist profile's epochs, students and teachers alike (a cosine schedule). Fashion-MNIST's
    /// 60,000 images make 469 steps an epoch at batch 128; at 5 epochs Table 1 is estimated at
    /// about 52 hours on a 2-core CPU (the dry run says, per run), a third of 15 epochs' cost, and
    /// one row at one seed at about 2.3 hours. WRN-16-1 reached 8.43% test error in 5 epochs.
    pub const FMNIST_EPOCHS: usize = 5;

    /// The recipe of `repro`'s fmnist profile: the full Fashion-MNIST (Debian's files or the
    /// Hub's), padded to 32x32, [`FMNIST_EPOCHS`] epochs with a cosine schedule from lr 0.1.
    pub fn fmnist() -> RunConfig {
        RunConfig {
            data: DataConfig { dataset: DatasetName::FashionMnist, ..DataConfig::default() },
            optim: OptimConfig { schedule: ScheduleKind::Cosine, ..OptimConfig::default() },
            epochs: FMNIST_EPOCHS,
            ..RunConfig::default()
        }
    }

    /// The training images of the quick profile's runs.
    const QUICK_TRAIN_IMAGES: usize = 2000;

    /// The recipe of `repro`'s quick profile (the README's main job): its scale lives here only
    /// (and the teacher's epochs in at-repro's profile table).
    pub fn quick() -> RunConfig {
        RunConfig {
            data: DataConfig {
                train_limit: QUICK_TRAIN_IMAGES,
                test_limit: 0,
                side: 28,
                ..DataConfig::default()
            },
            optim: OptimConfig {
                schedule: ScheduleKind::Cosine,
                lr: 0.05,
                ..OptimConfig::default()
            },
            epochs: 4,
            batch_size: 64,
            seed: 1,
            ..RunConfig::default()
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DatasetName::FashionMnistSubset,
            root: PathBuf::new(),
            augment: Augmentation::Standard,
            train_limit: 0,
            test_limit: 0,
            side: 0,
        }
    }
}

impl Default for LossSection {
    fn default() -> Self {
        Self {
            alpha: 0.0,
            temperature: 4.0,
            beta: 0.0,
            map_reduce: MapReduce::Mean,
            map_p: 2.0,
            norm: MapNorm::L2,
            distance: DistanceKind::Code,
            distance_p: 2.0,
            resize: ResizeKind::Area,
            pairs: vec![],
            gradient: GradientKind::None,
            gradient_beta: 0.0,
            gradient_chunks: 1,
            at_start_epoch: 0,
        }
    }
}

impl Default for OptimConfig {
    /// The CIFAR recipe of the authors' cifar.py.
    fn default() -> Self {
        Self {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            schedule: ScheduleKind::Multistep,
            milestones: vec![60, 120, 160],
            gamma: 0.2,
        }
    }
}

impl RunConfig {
    /// Reads a TOML file; unknown keys and bad values are errors naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid run config", path.display()))?;
        config.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    /// The config as TOML, every key written out (an absent teacher as a commented section).
    pub fn to_toml(&self) -> String {
        let mut text = toml::to_string_pretty(self).expect("a run config serialises");
        if self.teacher.is_none() {
            text.push_str(
                "\n# No teacher. To distil or transfer attention (loss.alpha, loss.beta):\n",
            );
            text.push_str("# [teacher]\n# model = \"wrn-16-2\"\n# checkpoint = \"runs/teacher/model.safetensors\"\n");
        }
        text
    }

    /// Checks the values that serde cannot.
    pub fn validate(&self) -> Result<()> {
        at_models::find(&self.student)?;
        if let Some(teacher) = &self.teacher {
            at_models::find(&teacher.model)?;
        }
        self.check_ranges()?;
        let gradient = self.gradient_config()?;
        let transfer = gradient.is_some_and(|g| g.penalty == GradientPenalty::Transfer);
        if (self.loss.alpha > 0.0 || self.loss.beta > 0.0 || transfer) && self.teacher.is_none() {
            bail!(
                "loss.alpha, loss.beta or loss.gradient = \"transfer\" is set but there is no \
                 [teacher] (model and checkpoint)"
            )
        }
        if gradient.is_some() && self.loss.beta > 0.0 {
            bail!(
                "loss.gradient = \"{}\" combines with distillation (loss.alpha) but not with \
                 activation attention transfer: set loss.beta = 0",
                self.loss.gradient
            )
        }
        if self.batch_size == 0 || self.epochs == 0 {
            bail!("batch_size and epochs must be at least 1")
        }
        let l = &self.loss;
        if l.at_start_epoch > 0 && l.beta == 0.0 {
            bail!(
                "loss.at_start_epoch = {} starts attention transfer, but loss.beta = 0: there is \
                 none to start; set loss.beta (1e3 with the code distance) or remove the key",
                l.at_start_epoch
            )
        }
        if l.beta > 0.0 && l.at_start_epoch >= self.epochs {
            bail!(
                "loss.at_start_epoch = {} (from 0) is not before the run's end (epochs = {}): \
                 attention transfer would never start; use a value below {}",
                l.at_start_epoch,
                self.epochs,
                self.epochs
            )
        }
        if gradient.is_some() && l.gradient_chunks > self.batch_size {
            bail!(
                "loss.gradient_chunks = {} splits a batch of {} images into more chunks than it \
                 has images: use at most batch_size",
                l.gradient_chunks,
                self.batch_size
            )
        }
        let m = &self.optim.milestones;
        if self.optim.schedule == ScheduleKind::Multistep && m.windows(2).any(|w| w[0] >= w[1]) {
            bail!("optim.milestones must increase, like [60, 120, 160], not {m:?}")
        }
        let fashion = matches!(
            self.data.dataset,
            DatasetName::FashionMnist | DatasetName::FashionMnistSubset
        );
        match (fashion, self.data.side) {
            (_, 0) => {}
            (true, side) if side < 28 => bail!(
                "data.side = {side} would crop Fashion-MNIST's 28x28 images: use 28, 32 (the \
                 default) or more"
            ),
            (true, _) => {}
            (false, side) => bail!(
                "data.side = {side} is for Fashion-MNIST; {} has its own input size: remove the key",
                self.data.dataset
            ),
        }
        Ok(())
    }

    /// Every numeric value in its range, checked before any work: an error names the key, the
    /// value and the range.
    fn check_ranges(&self) -> Result<()> {
        let (l, o) = (&self.loss, &self.optim);
        let checks: [(&str, f64, &str, fn(f64) -> bool); 10] = [
            ("optim.lr", o.lr, "a finite number > 0", |v| v > 0.0),
            ("optim.momentum", o.momentum, "a number in [0, 1)", |v| (0.0..1.0).contains(&v)),
            ("optim.weight_decay", o.weight_decay, "a finite number >= 0", |v| v >= 0.0),
            ("optim.gamma", o.gamma, "a finite number > 0", |v| v > 0.0),
            ("loss.alpha", l.alpha, "a number in [0, 1]", |v| (0.0..=1.0).contains(&v)),
            ("loss.temperature", l.temperature, "a finite number > 0", |v| v > 0.0),
            ("loss.beta", l.beta, "a finite number >= 0", |v| v >= 0.0),
            ("loss.map_p", l.map_p, "a finite number > 0", |v| v > 0.0),
            ("loss.distance_p", l.distance_p, "a finite number >= 1", |v| v >= 1.0),
            ("loss.gradient_beta", l.gradient_beta, "a finite number >= 0", |v| v >= 0.0),
        ];
        for (key, value, range, ok) in checks {
            if !(value.is_finite() && ok(value)) {
                bail!("{key} must be {range}, not {value}")
            }
        }
        if l.gradient_chunks == 0 {
            bail!("loss.gradient_chunks must be at least 1")
        }
        Ok(())
    }

    /// The attention-transfer settings (on candle's ops: the trainer chooses the kernels).
    pub fn at_config(&self) -> Result<AtConfig> {
        let l = &self.loss;
        let reduce = match l.map_reduce {
            MapReduce::Sum => ChannelReduce::Sum,
            MapReduce::Mean => ChannelReduce::Mean,
            MapReduce::Max => ChannelReduce::Max,
        };
        let norm = match l.norm {
            MapNorm::L2 => Normalization::L2,
            MapNorm::L1 => Normalization::L1,
            MapNorm::None => Normalization::None,
        };
        let distance = match l.distance {
            DistanceKind::Code => Distance::Code,
            DistanceKind::Paper => Distance::Paper { p: l.distance_p },
        };
        let resize = match l.resize {
            ResizeKind::Area => Resize::Area,
            ResizeKind::Bilinear => Resize::Bilinear,
        };
        Ok(AtConfig {
            map: MapSpec { reduce, p: l.map_p, norm },
            distance,
            resize,
            ..AtConfig::default()
        })
    }

    /// The gradient-based penalty, if any.
    pub fn gradient_config(&self) -> Result<Option<GradientConfig>> {
        let l = &self.loss;
        let penalty = match l.gradient {
            GradientKind::None => return Ok(None),
            GradientKind::Jacobian => GradientPenalty::Jacobian,
            GradientKind::Symmetry => GradientPenalty::Symmetry,
            GradientKind::Transfer => GradientPenalty::Transfer,
        };
        Ok(Some(GradientConfig {
            penalty,
            beta: l.gradient_beta,
            alpha: l.alpha,
            temperature: l.temperature,
        }))
    }

    /// The optimiser's settings.
    pub fn sgd(&self) -> SgdConfig {
        let o = &self.optim;
        SgdConfig {
            lr: o.lr,
            momentum: o.momentum,
            nesterov: o.nesterov,
            weight_decay: o.weight_decay,
        }
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Result<Schedule> {
        Ok(match self.optim.schedule {
            ScheduleKind::Multistep => Schedule::MultiStep {
                milestones: self.optim.milestones.clone(),
                gamma: self.optim.gamma,
            },
            ScheduleKind::Cosine => Schedule::Cosine { epochs: self.epochs },
            ScheduleKind::Constant => Schedule::Constant,
        })
    }
}

/// The keys of `[teacher]`.
const TEACHER_KEYS: [&str; 2] = ["model", "checkpoint"];

/// The key a `[teacher]` table still lacks, if it has one and lacks one.
fn incomplete_teacher(table: &toml::Table) -> Option<&'static str> {
    let teacher = table.get("teacher")?.as_table()?;
    TEACHER_KEYS.into_iter().find(|key| !teacher.contains_key(*key))
}

/// The config of a file (or the defaults) with `KEY=VALUE` overrides applied. A key that the
/// config does not have is an error (but a config without a teacher takes `teacher.model` and
/// `teacher.checkpoint`, which must come together); values are TOML (`2`, `1e3`, `true`,
/// `"text"`, `[60, 120]`), and a bare word is taken as a string.
pub fn resolve(file: Option<&Path>, preset: Option<&str>, sets: &[String]) -> Result<RunConfig> {
    let base = match (file, preset) {
        (Some(path), _) => RunConfig::load(path)?,
        (None, Some(name)) => RunConfig::preset(name)?,
        (None, None) => RunConfig::default(),
    };
    if sets.is_empty() {
        return Ok(base);
    }
    let mut table: toml::Table = toml::from_str(&base.to_toml()).expect("a config round-trips");
    for set in sets {
        let (key, value) =
            set.split_once('=').with_context(|| format!("`{set}` is not KEY=VALUE"))?;
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_owned()));
        let parts: Vec<&str> = key.trim().split('.').collect();
        let mut node = &mut table;
        for (i, part) in parts.iter().enumerate() {
            // A config without a teacher gets one key by key: `teacher.model`, `teacher.checkpoint`.
            let teacher_key = i == 1 && parts[0] == "teacher" && TEACHER_KEYS.contains(part);
            let known = node.contains_key(*part) || (i == 0 && *part == "teacher") || teacher_key;
            if !known {
                bail!("unknown config key `{key}` (`at-train config` lists every key)")
            }
            if i + 1 == parts.len() {
                node.insert((*part).to_owned(), value.clone());
            } else {
                node = node
                    .entry((*part).to_owned())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .with_context(|| {
                        format!("config key `{}` is not a section", parts[..=i].join("."))
                    })?;
            }
        }
        // Each override is checked as it is applied, so that an error names it (the document
        // parsed here is generated, its line numbers would mean nothing to the user); a teacher
        // given key by key is checked once it has both keys.
        if incomplete_teacher(&table).is_none()
            && let Err(e) = toml::from_str::<RunConfig>(&toml::to_string(&table)?)
        {
            bail!("--set {set}: {}", e.message().trim())
        }
    }
    if let Some(missing) = incomplete_teacher(&table) {
        bail!("--set teacher.{missing}=... is needed too: a teacher has a model and a checkpoint")
    }
    let config: RunConfig = toml::from_str(&toml::to_string(&table)?)
        .context("the overrides do not make a valid config")?;
    config.validate()?;
    Ok(config)
}
