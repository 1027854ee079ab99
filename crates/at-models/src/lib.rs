//! The architectures of "Paying More Attention to Attention" (Zagoruyko & Komodakis, ICLR 2017),
//! on candle, each returning the activations at its attention points beside its logits.
//!
//! - [`wrn`]: WRN-d-k, pre-activation, the authors' CIFAR networks (`wrn-16-1`, `wrn-40-2`, ...).
//! - [`nin`]: Network-in-Network for CIFAR, thin and wide, with or without batch norm.
//! - [`resnet`]: ResNet-18/34 in torchvision's layout (pretrained ImageNet weights load as they are).
//!
//! Every model implements [`AttentionModel`]: `forward_t(x, train)` gives an [`Output`] with the
//! logits and the group activations. Batch norm trains its running statistics in train mode and
//! uses them in evaluation mode. Models are built by name from the [`registry`], with their
//! parameters in a [`candle_nn::VarMap`] under PyTorch state-dict names, which [`save`] and
//! [`load`] write and read as safetensors.
//!
//! ```
//! use at_models::{AttentionModel, ModelOptions, build};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//!
//! # fn main() -> candle_core::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = build("wrn-16-1", &ModelOptions::default(), vb)?;
//! let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu)?;
//! let out = model.forward_t(&x, false)?;
//! assert_eq!(out.logits.dims(), &[2, 10]);
//! let sizes: Vec<_> = out.groups.iter().map(|g| g.dims().to_vec()).collect();
//! assert_eq!(sizes, [[2, 16, 32, 32], [2, 32, 16, 16], [2, 64, 8, 8]]);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod maps;
pub mod nin;
pub mod nn;
pub mod resnet;
mod state;
pub mod wrn;

use candle_core::{Result, Tensor, bail};
use candle_nn::VarBuilder;

pub use at_kernels::ParamGrads;
pub use nn::{Backend, InitScheme, max_pool2d, max_pool2d_on};
pub use state::{LoadReport, is_buffer, load, parameter_count, save};

/// What a model returns: its logits and the activations at its attention points.
#[derive(Clone, Debug)]
pub struct Output {
    /// `[B, classes]`.
    pub logits: Tensor,
    /// The activations at the attention points, from the input side: `[B, C_g, H_g, W_g]` each.
    pub groups: Vec<Tensor>,
    /// The attention maps asked of [`AttentionModel::forward_with_maps`] that the network made
    /// itself, by group: `mean_c A_c^2` before normalisation (at-ops' default map), `[B, H, W]`,
    /// equal in value and gradient to the map of the activation, cheaper (see [`maps`]).
    /// Empty, or `None` for a group, where it made none.
    pub maps: Vec<Option<Tensor>>,
}

impl Output {
    /// The logits and the group activations, without maps.
    pub fn new(logits: Tensor, groups: Vec<Tensor>) -> Self {
        Self { logits, groups, maps: vec![] }
    }
}

/// A network that exposes its attention points.
pub trait AttentionModel: Send + Sync {
    /// Runs the network; `train` selects batch statistics (and updates the running ones) in
    /// batch norm.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Output>;

    /// [`forward_t`](Self::forward_t), and the attention maps `mean_c A^2` of the groups
    /// `maps`, where the network makes them itself (WRN); others leave
    /// [`Output::maps`] empty, and the caller computes the maps from the activations.
    fn forward_with_maps(&self, x: &Tensor, train: bool, maps: &[usize]) -> Result<Output> {
        let _ = maps;
        self.forward_t(x, train)
    }

    /// [`forward_with_maps`](Self::forward_with_maps) in training mode, where the network's
    /// fused kernels may hand their parameters' gradients to `grads` in the backward pass
    /// instead of through candle's graph (cheaper: see `at_kernels::basic_block`): the caller
    /// merges them into the `GradStore` after `backward` (`ParamGrads::merge_into`). Networks
    /// without such kernels (the default) ignore `grads`.
    fn forward_deferred(&self, x: &Tensor, maps: &[usize], grads: &ParamGrads) -> Result<Output> {
        let _ = grads;
        self.forward_with_maps(x, true, maps)
    }

    /// The number of attention points (groups) [`forward_t`](Self::forward_t) returns.
    fn group_count(&self) -> usize;

    /// The attention points' names, in order: the weight-name prefix of each group (`group0`
    /// in the authors' WRN, `layer1` in torchvision's ResNet).
    fn group_names(&self) -> Vec<String> {
        (0..self.group_count()).map(|g| format!("group{g}")).collect()
    }
}

/// Options shared by every registered model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelOptions {
    /// Input channels: 3 for colour images, 1 for Fashion-MNIST.
    pub in_channels: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Parameter initialisation; `None` takes each family's own (the authors' for WRN and NIN,
    /// torchvision's for ResNet).
    pub init: Option<InitScheme>,
    /// ResNet only: every batch norm uses its running statistics and gets no gradient.
    pub freeze_bn: bool,
    /// ResNet only: the stem and the first group get no gradient.
    pub freeze_first_group: bool,
    /// Which ops the layers run: at-kernels' where they apply (the default) or candle's own
    /// everywhere (the reference).
    pub backend: Backend,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            in_channels: 3,
            num_classes: 10,
            init: None,
            freeze_bn: false,
            freeze_first_group: false,
            backend: Backend::Kernels,
        }
    }
}

/// A registered model: its name, what it is, and how to build it.
pub struct ModelSpec {
    /// The name the CLI and the configs use, e.g. `wrn-16-2`.
    pub name: &'static str,
    /// One line about it.
    pub about: &'static str,
    build: fn(&ModelOptions, VarBuilder) -> Result<Box<dyn AttentionModel>>,
}

impl ModelSpec {
    /// Creates the model's parameters under `vb`.
    pub fn build(&self, options: &ModelOptions, vb: VarBuilder) -> Result<Box<dyn AttentionModel>> {
        if (options.freeze_bn || options.freeze_first_group) && !self.name.starts_with("resnet") {
            bail!(
                "freezing batch norm or the first group is only supported for ResNets, not {}",
                self.name
            )
        }
        (self.build)(options, vb)
    }
}

macro_rules! wrn {
    ($name:literal, $depth:literal, $width:literal, $about:literal) => {
        ModelSpec {
            name: $name,
            about: $about,
            build: |o, vb| {
                let config = wrn::WrnConfig {
                    in_channels: o.in_channels,
                    num_classes: o.num_classes,
                    backend: o.backend,
                    init: o.init.unwrap_or(InitScheme::Authors),
                    ..wrn::WrnConfig::new($depth, $width)
                };
                Ok(Box::new(wrn::Wrn::new(&config, vb)?))
            },
        }
    };
}

macro_rules! nin {
    ($name:literal, $ctor:ident, $bn:literal, $about:literal) => {
        ModelSpec {
            name: $name,
            about: $about,
            build: |o, vb| {
                let config = nin::NinConfig {
                    in_channels: o.in_channels,
                    num_classes: o.num_classes,
                    backend: o.backend,
                    init: o.init.unwrap_or(InitScheme::Authors),
                    ..nin::NinConfig::$ctor($bn)
                };
                Ok(Box::new(nin::Nin::new(&config, vb)?))
            },
        }
    };
}

macro_rules! resnet {
    ($name:literal, $ctor:ident, $about:literal) => {
        ModelSpec {
            name: $name,
            about: $about,
            build: |o, vb| {
                let config = resnet::ResNetConfig {
                    in_channels: o.in_channels,
                    num_classes: o.num_classes,
                    backend: o.backend,
                    init: o.init.unwrap_or(InitScheme::Standard),
                    freeze_bn: o.freeze_bn,
                    freeze_first_group: o.freeze_first_group,
                    ..resnet::ResNetConfig::$ctor()
                };
                Ok(Box::new(resnet::ResNet::new(&config, vb)?))
            },
        }
    };
}

static REGISTRY: &[ModelSpec] = &[
    wrn!("wrn-16-1", 16, 1, "WRN-16-1, CIFAR student (Table 1)"),
    wrn!("wrn-16-2", 16, 2, "WRN-16-2, CIFAR teacher and student (Table 1)"),
    wrn!("wrn-40-1", 40, 1, "WRN-40-1, CIFAR teacher (Tables 1, 2)"),
    wrn!("wrn-40-2", 40, 2, "WRN-40-2, CIFAR teacher (Table 1)"),
    nin!("nin-thin", thin, true, "NIN-thin with batch norm, CIFAR student (Table 1)"),
    nin!("nin-wide", wide, true, "NIN-wide with batch norm, CIFAR teacher (Table 1)"),
    nin!(
        "nin-thin-nobn",
        thin,
        false,
        "NIN-thin without batch norm, gradient AT student (Table 3)"
    ),
    nin!(
        "nin-wide-nobn",
        wide,
        false,
        "NIN-wide without batch norm, gradient AT teacher (Table 3)"
    ),
    resnet!("resnet18", resnet18, "ResNet-18, torchvision layout (Tables 4, 5)"),
    resnet!("resnet34", resnet34, "ResNet-34, torchvision layout (Tables 4, 5)"),
];

/// Every registered model, in a stable order.
pub fn registry() -> &'static [ModelSpec] {
    REGISTRY
}

/// The registered model called `name`, or an error that lists the known names.
pub fn find(name: &str) -> Result<&'static ModelSpec> {
    REGISTRY.iter().find(|spec| spec.name == name).ok_or_else(|| {
        let known: Vec<&str> = REGISTRY.iter().map(|s| s.name).collect();
        candle_core::Error::Msg(format!(
            "unknown model `{name}`; known models: {}",
            known.join(", ")
        ))
    })
}

/// Builds the registered model called `name` with its parameters under `vb`.
pub fn build(
    name: &str,
    options: &ModelOptions,
    vb: VarBuilder,
) -> Result<Box<dyn AttentionModel>> {
    find(name)?.build(options, vb)
}
