//! Network-in-Network for CIFAR (Lin, Chen & Yan, "Network In Network", ICLR 2014), in the form
//! the attention-transfer paper uses: three blocks ("groups") of one spatial convolution followed
//! by two 1x1 convolutions.
//!
//! The authors did not publish their NIN, so the layer list is ours, chosen to match the paper's
//! parameter counts (NIN-wide 1M, NIN-thin 0.2M) and the classic CIFAR NIN:
//!
//! | block | convolutions (kernel x channels) | then |
//! |---|---|---|
//! | `block0` | 5x5 x w0, 1x1 x w1, 1x1 x w2 | max pool 3x3/2, pad 1 (32 -> 16) |
//! | `block1` | 5x5 x w3, 1x1 x w3, 1x1 x w3 | max pool 3x3/2, pad 1 (16 -> 8) |
//! | `block2` | 3x3 x w3, 1x1 x w3, 1x1 x w3 | global average pool, `fc` |
//!
//! with `(w0, w1, w2, w3) = (192, 160, 96, 192)` for NIN-wide (1,005,642 parameters with batch
//! norm, 10 classes) and `(88, 72, 48, 88)` for NIN-thin (225,026). Every convolution is followed
//! by BN-ReLU, or, without batch norm (the gradient-based experiments, Table 3), has a bias and is
//! followed by ReLU. The classic NIN ends with a 1x1 convolution to the classes; a linear layer
//! after the average pool (as in the WRN) keeps the third block's output a feature map the
//! attention maps can use. The attention points are the block outputs before pooling: 32x32,
//! 16x16 and 8x8 on CIFAR, the same sizes as the WRN's groups.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{
    Backend, BatchNorm2d, Conv2d, ConvSpec, InitScheme, Linear, global_avg_pool, max_pool2d_on,
};
use crate::{AttentionModel, Output};

/// The shape of a NIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NinConfig {
    /// Channel widths `(w0, w1, w2, w3)`; see the module documentation.
    pub widths: [usize; 4],
    /// Batch norm after every convolution (Table 1) or biases and none (Table 3).
    pub batch_norm: bool,
    /// Input channels.
    pub in_channels: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Parameter initialisation.
    pub init: InitScheme,
    /// Which ops the layers run.
    pub backend: Backend,
}

impl NinConfig {
    /// NIN-wide, about 1M parameters.
    pub fn wide(batch_norm: bool) -> Self {
        Self::with_widths([192, 160, 96, 192], batch_norm)
    }

    /// NIN-thin, about 0.2M parameters.
    pub fn thin(batch_norm: bool) -> Self {
        Self::with_widths([88, 72, 48, 88], batch_norm)
    }

    fn with_widths(widths: [usize; 4], batch_norm: bool) -> Self {
        Self {
            widths,
            batch_norm,
            in_channels: 3,
            num_classes: 10,
            init: InitScheme::Authors,
            backend: Backend::Kernels,
        }
    }
}

/// A convolution followed by BN-ReLU, or by ReLU alone when it has a bias.
#[derive(Clone, Debug)]
struct ConvUnit {
    conv: Conv2d,
    bn: Option<BatchNorm2d>,
}

impl ConvUnit {
    fn new(spec: ConvSpec, config: &NinConfig, vb: VarBuilder, i: usize) -> Result<Self> {
        if config.batch_norm {
            Ok(Self {
                conv: Conv2d::new(spec, vb.pp(format!("conv{i}")))?.on(config.backend),
                bn: Some(
                    BatchNorm2d::new(spec.c_out, config.init, false, vb.pp(format!("bn{i}")))?
                        .on(config.backend),
                ),
            })
        } else {
            let conv = Conv2d::new(spec.with_bias(), vb.pp(format!("conv{i}")))?;
            Ok(Self { conv: conv.on(config.backend), bn: None })
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        match &self.bn {
            Some(bn) => bn.forward_relu_t(&y, train),
            None => y.relu(),
        }
    }
}

/// A Network-in-Network; see the module documentation.
#[derive(Clone, Debug)]
pub struct Nin {
    blocks: Vec<[ConvUnit; 3]>,
    fc: Linear,
    backend: Backend,
}

impl Nin {
    /// Creates the network's parameters under `vb`.
    pub fn new(config: &NinConfig, vb: VarBuilder) -> Result<Self> {
        let [w0, w1, w2, w3] = config.widths;
        let layout = [
            [(config.in_channels, w0, 5), (w0, w1, 1), (w1, w2, 1)],
            [(w2, w3, 5), (w3, w3, 1), (w3, w3, 1)],
            [(w3, w3, 3), (w3, w3, 1), (w3, w3, 1)],
        ];
        let mut blocks = Vec::with_capacity(3);
        for (b, convs) in layout.iter().enumerate() {
            let vb_block = vb.pp(format!("block{b}"));
            let unit = |i: usize| {
                let (c_in, c_out, k) = convs[i];
                ConvUnit::new(ConvSpec::new(c_in, c_out, k, 1), config, vb_block.clone(), i)
            };
            blocks.push([unit(0)?, unit(1)?, unit(2)?]);
        }
        let fc = Linear::new(w3, config.num_classes, vb.pp("fc"))?;
        Ok(Self { blocks, fc, backend: config.backend })
    }
}

impl AttentionModel for Nin {
    fn group_count(&self) -> usize {
        self.blocks.len()
    }

    fn group_names(&self) -> Vec<String> {
        (0..self.blocks.len()).map(|b| format!("block{b}")).collect()
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Output> {
        let mut o = x.clone();
        let mut groups = Vec::with_capacity(3);
        for (b, units) in self.blocks.iter().enumerate() {
            if b > 0 {
                o = max_pool2d_on(&o, (3, 2, 1), self.backend)?;
            }
            for unit in units {
                o = unit.forward_t(&o, train)?;
            }
            groups.push(o.clone());
        }
        let logits = self.fc.forward(&global_avg_pool(&o)?)?;
        Ok(Output::new(logits, groups))
    }
}
