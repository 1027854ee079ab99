//! ResNet-18 and ResNet-34 (He et al., "Deep Residual Learning for Image Recognition", 2016) with
//! basic blocks, in torchvision's layout and parameter names, so that the `model.safetensors` of
//! `timm/resnet18.tv_in1k` and `timm/resnet34.tv_in1k` load unchanged.
//!
//! Stem `conv1` (7x7/2) - `bn1` - ReLU - max pool 3x3/2; `layer1` .. `layer4` of basic blocks
//! (64, 128, 256, 512 channels); global average pool; `fc`. The attention points are the outputs
//! of the four layers. For fine-tuning (Table 4) batch norm can be frozen (running statistics,
//! no gradients) and the stem with `layer1` frozen (no gradients, evaluation-mode batch norm).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{
    BN_EPS, Backend, BatchNorm2d, Conv2d, ConvSpec, InitScheme, Linear, global_avg_pool,
    max_pool2d_on,
};
use crate::{AttentionModel, Output, ParamGrads};

/// The shape and fine-tuning options of a ResNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    /// Blocks in each of the four layers: `[2, 2, 2, 2]` (18) or `[3, 4, 6, 3]` (34).
    pub layers: [usize; 4],
    /// Input channels.
    pub in_channels: usize,
    /// Number of classes (1000 for ImageNet; another count gives a new head for fine-tuning).
    pub num_classes: usize,
    /// Parameter initialisation (batch norm gamma; torchvision uses [`InitScheme::Standard`]).
    pub init: InitScheme,
    /// Every batch norm uses its running statistics and gets no gradient.
    pub freeze_bn: bool,
    /// The stem and `layer1` get no gradient and run their batch norm in evaluation mode.
    pub freeze_first_group: bool,
    /// Which ops the layers run.
    pub backend: Backend,
}

impl ResNetConfig {
    /// ResNet-18 for ImageNet.
    pub fn resnet18() -> Self {
        Self::with_layers([2, 2, 2, 2])
    }

    /// ResNet-34 for ImageNet.
    pub fn resnet34() -> Self {
        Self::with_layers([3, 4, 6, 3])
    }

    fn with_layers(layers: [usize; 4]) -> Self {
        Self {
            layers,
            in_channels: 3,
            num_classes: 1000,
            init: InitScheme::Standard,
            freeze_bn: false,
            freeze_first_group: false,
            backend: Backend::Kernels,
        }
    }
}

#[derive(Clone, Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    fn new(
        c_in: usize,
        c_out: usize,
        stride: usize,
        config: &ResNetConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bn = |c: usize, vb: VarBuilder| -> Result<BatchNorm2d> {
            Ok(BatchNorm2d::new(c, config.init, config.freeze_bn, vb)?.on(config.backend))
        };
        let conv = |spec: ConvSpec, vb: VarBuilder| -> Result<Conv2d> {
            Ok(Conv2d::new(spec, vb)?.on(config.backend))
        };
        let downsample = if stride != 1 || c_in != c_out {
            let conv = conv(ConvSpec::new(c_in, c_out, 1, stride), vb.pp("downsample.0"))?;
            Some((conv, bn(c_out, vb.pp("downsample.1"))?))
        } else {
            None
        };
        Ok(Self {
            conv1: conv(ConvSpec::new(c_in, c_out, 3, stride), vb.pp("conv1"))?,
            bn1: bn(c_out, vb.pp("bn1"))?,
            conv2: conv(ConvSpec::new(c_out, c_out, 3, 1), vb.pp("conv2"))?,
            bn2: bn(c_out, vb.pp("bn2"))?,
            downsample,
        })
    }

    /// The block as at-kernels' training-mode kernel takes it, `None` where it does not apply
    /// (evaluation, convolutions with a bias or off at-kernels, some batch norms frozen and
    /// others not). `frozen`: the running statistics of [`BasicBlock::frozen_running`], for
    /// frozen batch norms.
    fn fused<'a>(
        &'a self,
        train: bool,
        frozen: Option<&'a [(&'a Tensor, &'a Tensor)]>,
    ) -> Option<at_kernels::BasicBlock<'a>> {
        let affine = |bn: &'a BatchNorm2d| match frozen {
            Some(_) if train && bn.is_frozen() => Some(bn.running_affine().0),
            Some(_) => None,
            None => bn.batch_affine(train),
        };
        let downsample = match &self.downsample {
            Some((conv, bn)) => Some((conv.plain_weight(0)?, affine(bn)?)),
            None => None,
        };
        Some(at_kernels::BasicBlock {
            conv1: self.conv1.plain_weight(1)?,
            bn1: affine(&self.bn1)?,
            conv2: self.conv2.plain_weight(1)?,
            bn2: affine(&self.bn2)?,
            downsample,
            stride: self.conv1.stride(),
            eps: BN_EPS,
            frozen,
        })
    }

    /// The running `(mean, var)` of bn1, bn2 and the projection's batch norm, detached, when
    /// every one of them is frozen (fine-tuning); `None` otherwise.
    fn frozen_running(&self) -> Option<Vec<(Tensor, Tensor)>> {
        let norms = [Some(&self.bn1), Some(&self.bn2), self.downsample.as_ref().map(|(_, bn)| bn)];
        let norms: Vec<&BatchNorm2d> = norms.into_iter().flatten().collect();
        norms
            .iter()
            .all(|bn| bn.is_frozen())
            .then(|| norms.iter().map(|bn| bn.running_affine().1).collect())
    }

    /// Updates the running statistics from the kernel's batch statistics (frozen batch norms
    /// keep theirs).
    fn update_running_from(&self, stats: &at_kernels::BasicBlockStats) -> Result<()> {
        if self.bn1.is_frozen() {
            return Ok(());
        }
        self.bn1.update_running_from(&stats.bn1)?;
        self.bn2.update_running_from(&stats.bn2)?;
        if let (Some((_, bn)), Some(stats)) = (&self.downsample, &stats.downsample) {
            bn.update_running_from(stats)?;
        }
        Ok(())
    }

    /// The block in evaluation mode as one at-kernels op (`at_kernels::basic_block_eval`), `None`
    /// where it does not apply (gradients tracked, not f32 on the CPU, convolutions off
    /// at-kernels).
    ///
    /// `detach`: run on detached weights, for a block whose output is detached anyway (the frozen
    /// first group), where the weights' tracking would otherwise make the kernel decline.
    fn eval_fused(&self, x: &Tensor, detach: bool) -> Result<Option<Tensor>> {
        let d = |t: &Tensor| if detach { t.detach() } else { t.clone() };
        let ((g1, b1), r1) = self.bn1.running_affine();
        let ((g2, b2), r2) = self.bn2.running_affine();
        let mut running = vec![r1, r2];
        let mut norms = vec![(d(g1), d(b1)), (d(g2), d(b2))];
        let projection = match &self.downsample {
            Some((conv, bn)) => {
                let ((g, b), r) = bn.running_affine();
                running.push(r);
                norms.push((d(g), d(b)));
                match conv.plain_weight(0) {
                    Some(w) => Some(d(w)),
                    None => return Ok(None),
                }
            }
            None => None,
        };
        let (Some(conv1), Some(conv2)) = (self.conv1.plain_weight(1), self.conv2.plain_weight(1))
        else {
            return Ok(None);
        };
        let (conv1, conv2) = (d(conv1), d(conv2));
        let block = at_kernels::BasicBlock {
            conv1: &conv1,
            bn1: (&norms[0].0, &norms[0].1),
            conv2: &conv2,
            bn2: (&norms[1].0, &norms[1].1),
            downsample: projection.as_ref().map(|w| (w, (&norms[2].0, &norms[2].1))),
            stride: self.conv1.stride(),
            eps: BN_EPS,
            frozen: None,
        };
        let running: Vec<_> = running.iter().map(|(m, v)| (m, v)).collect();
        at_kernels::basic_block_eval(x, &block, &running)
    }

    /// The block of the frozen first group (evaluation mode, output detached by the caller): one
    /// `basic_block_eval` op where it applies.
    fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        match self.eval_fused(x, true)? {
            Some(y) => Ok(y),
            None => self.forward_t(x, false),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train && let Some(y) = self.eval_fused(x, false)? {
            return Ok(y);
        }
        let y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let y = self.bn2.forward_t(&self.conv2.forward(&y)?, train)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// A layer's blocks in training mode as one at-kernels op (`at_kernels::basic_blocks_train`:
/// one candle graph edge for the layer instead of about ten per block, the parameters'
/// gradients handed to `grads`), their running statistics updated; `None` where the kernel
/// does not apply.
fn fused_layer(
    blocks: &[BasicBlock],
    x: &Tensor,
    train: bool,
    grads: &ParamGrads,
) -> Result<Option<Tensor>> {
    if !train {
        return Ok(None);
    }
    // Frozen batch norms (fine-tuning) normalise with their running statistics.
    let running: Vec<Option<Vec<(Tensor, Tensor)>>> =
        blocks.iter().map(BasicBlock::frozen_running).collect();
    let running: Vec<Option<Vec<(&Tensor, &Tensor)>>> = running
        .iter()
        .map(|r| r.as_ref().map(|r| r.iter().map(|(mean, var)| (mean, var)).collect()))
        .collect();
    let fused = blocks.iter().zip(&running).map(|(b, r)| b.fused(train, r.as_deref()));
    let Some(fused) = fused.collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    let Some((y, stats)) = at_kernels::basic_blocks_train(x, &fused, grads)? else {
        return Ok(None);
    };
    for (block, stats) in blocks.iter().zip(&stats) {
        block.update_running_from(stats)?;
    }
    Ok(Some(y))
}

/// The stem's max pool: kernel, stride, padding (torchvision's), fused or not.
const STEM_POOL: (usize, usize, usize) = (3, 2, 1);

/// A ResNet with basic blocks; see the module documentation.
#[derive(Clone, Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<Vec<BasicBlock>>,
    fc: Linear,
    freeze_first_group: bool,
    backend: Backend,
}

impl ResNet {
    /// Creates the network's parameters under `vb`, with torchvision's names.
    pub fn new(config: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let stem = ConvSpec::new(config.in_channels, 64, 7, 2).with_padding(3);
        let conv1 = Conv2d::new(stem, vb.pp("conv1"))?.on(config.backend);
        let bn1 =
            BatchNorm2d::new(64, config.init, config.freeze_bn, vb.pp("bn1"))?.on(config.backend);
        let mut c_in = 64;
        let mut layers = Vec::with_capacity(4);
        for (l, (&n, c_out)) in config.layers.iter().zip([64, 128, 256, 512]).enumerate() {
            let vb_layer = vb.pp(format!("layer{}", l + 1));
            let mut blocks = Vec::with_capacity(n);
            for i in 0..n {
                let stride = if i == 0 && l > 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(
                    c_in,
                    c_out,
                    stride,
                    config,
                    vb_layer.pp(i.to_string()),
                )?);
                c_in = c_out;
            }
            layers.push(blocks);
        }
        let fc = Linear::new(512, config.num_classes, vb.pp("fc"))?;
        let freeze_first_group = config.freeze_first_group;
        Ok(Self { conv1, bn1, layers, fc, freeze_first_group, backend: config.backend })
    }
}

impl ResNet {
    /// The forward pass; with `deferred`, the training-mode layers run as fused kernels that
    /// hand their parameters' gradients to it (see [`AttentionModel::forward_deferred`]).
    fn forward_inner(
        &self,
        x: &Tensor,
        train: bool,
        deferred: Option<&ParamGrads>,
    ) -> Result<Output> {
        // The frozen first group runs as in evaluation and is cut from the graph after layer1.
        let first_train = train && !self.freeze_first_group;
        let stem = match deferred {
            Some(grads) if first_train => self.fused_stem(x, grads)?,
            _ => None,
        };
        let mut o = match stem {
            Some(o) => o,
            None => {
                let o = self.bn1.forward_relu_t(&self.conv1.forward(x)?, first_train)?;
                max_pool2d_on(&o, STEM_POOL, self.backend)?
            }
        };
        let mut groups = Vec::with_capacity(4);
        for (l, blocks) in self.layers.iter().enumerate() {
            if l == 0 && self.freeze_first_group {
                // Nothing before layer2 learns: the frozen group runs on detached operands.
                o = blocks.iter().try_fold(o.detach(), |o, block| block.forward_frozen(&o))?;
                groups.push(o.clone());
                continue;
            }
            let layer_train = if l == 0 { first_train } else { train };
            let fused = match deferred {
                Some(grads) => fused_layer(blocks, &o, layer_train, grads)?,
                None => None,
            };
            o = match fused {
                Some(y) => y,
                None => blocks.iter().try_fold(o, |o, block| block.forward_t(&o, layer_train))?,
            };
            groups.push(o.clone());
        }
        let logits = self.fc.forward(&global_avg_pool(&o)?)?;
        Ok(Output::new(logits, groups))
    }

    /// The stem (conv1, bn1, its ReLU and the max pool) in training mode as at-kernels' fused
    /// op, its parameters' gradients handed to `grads`; `None` where it does not apply (a frozen
    /// bn1, candle's ops, images that track a gradient, see `at_kernels::stem_train`).
    fn fused_stem(&self, x: &Tensor, grads: &ParamGrads) -> Result<Option<Tensor>> {
        let (Some(conv), Some(bn)) = (self.conv1.plain_weight(3), self.bn1.batch_affine(true))
        else {
            return Ok(None);
        };
        let stem = at_kernels::Stem {
            conv,
            stride: self.conv1.stride(),
            padding: 3,
            bn,
            eps: BN_EPS,
            pool: STEM_POOL,
        };
        let Some((y, stats)) = at_kernels::stem_train(x, &stem, grads)? else { return Ok(None) };
        self.bn1.update_running_from(&stats)?;
        Ok(Some(y))
    }
}

impl AttentionModel for ResNet {
    fn group_count(&self) -> usize {
        self.layers.len()
    }

    fn group_names(&self) -> Vec<String> {
        (1..=self.layers.len()).map(|l| format!("layer{l}")).collect()
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Output> {
        self.forward_inner(x, train, None)
    }

    fn forward_deferred(&self, x: &Tensor, maps: &[usize], grads: &ParamGrads) -> Result<Output> {
        let _ = maps;
        self.forward_inner(x, true, Some(grads))
    }
}
