//! Wide residual networks, WRN-d-k (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016),
//! pre-activation, as the attention-transfer authors train them on CIFAR.
//!
//! Stem `conv0` (3x3, 16 channels); three groups of `n = (d - 4) / 6` blocks with widths 16k,
//! 32k, 64k (strides 1, 2, 2); final BN-ReLU, global average pool, `fc`. A block computes
//! `o1 = relu(bn0(x))`, `y = conv1(relu(bn1(conv0(o1))))` and returns `y + convdim(o1)` when the
//! width changes, `y + x` otherwise. No dropout. The attention points are the three group
//! outputs, before the final BN-ReLU. Parameter names are the authors' (`group0.block0.bn0.weight`).

use candle_core::{Module, Result, Tensor, bail};
use candle_nn::VarBuilder;

use at_kernels::{MapGradient, PreactBlock, preact_blocks_train_with};

use crate::maps::MapTaps;
use crate::nn::{
    BN_EPS, Backend, BatchNorm2d, Conv2d, ConvSpec, InitScheme, Linear, global_avg_pool,
};
use crate::{AttentionModel, Output};

/// The shape of a WRN-d-k.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrnConfig {
    /// Depth `d = 6n + 4`.
    pub depth: usize,
    /// Widening factor `k`.
    pub width: usize,
    /// Input channels (3 for CIFAR, 1 for Fashion-MNIST).
    pub in_channels: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Parameter initialisation.
    pub init: InitScheme,
    /// Which ops the layers run.
    pub backend: Backend,
}

impl WrnConfig {
    /// WRN-`depth`-`width` for 3-channel inputs and 10 classes, with the authors' initialisation.
    pub fn new(depth: usize, width: usize) -> Self {
        Self {
            depth,
            width,
            in_channels: 3,
            num_classes: 10,
            init: InitScheme::Authors,
            backend: Backend::Kernels,
        }
    }

    /// Blocks per group, `(d - 4) / 6`.
    pub fn blocks_per_group(&self) -> Result<usize> {
        if self.depth < 10 || !(self.depth - 4).is_multiple_of(6) {
            bail!(
                "a WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {}",
                self.depth
            )
        }
        Ok((self.depth - 4) / 6)
    }
}

#[derive(Clone, Debug)]
struct Block {
    bn0: BatchNorm2d,
    conv0: Conv2d,
    bn1: BatchNorm2d,
    conv1: Conv2d,
    convdim: Option<Conv2d>,
}

impl Block {
    fn new(
        c_in: usize,
        c_out: usize,
        stride: usize,
        config: &WrnConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bn = |c: usize, vb: VarBuilder| -> Result<BatchNorm2d> {
            Ok(BatchNorm2d::new(c, config.init, false, vb)?.on(config.backend))
        };
        let conv = |spec: ConvSpec, vb: VarBuilder| -> Result<Conv2d> {
            Ok(Conv2d::new(spec, vb)?.on(config.backend))
        };
        Ok(Self {
            bn0: bn(c_in, vb.pp("bn0"))?,
            conv0: conv(ConvSpec::new(c_in, c_out, 3, stride), vb.pp("conv0"))?,
            bn1: bn(c_out, vb.pp("bn1"))?,
            conv1: conv(ConvSpec::new(c_out, c_out, 3, 1), vb.pp("conv1"))?,
            convdim: if c_in != c_out {
                Some(conv(ConvSpec::new(c_in, c_out, 1, stride), vb.pp("convdim"))?)
            } else {
                None
            },
        })
    }

    /// The block's weights for the fused kernel (training mode; see `at_kernels::block`), `None`
    /// where it does not apply.
    fn fused(&self, train: bool) -> Option<PreactBlock<'_>> {
        self.with_norms(self.bn0.batch_affine(train)?, self.bn1.batch_affine(train)?)
    }

    /// The block in evaluation mode as one kernel (`at_kernels::preact_block_eval`: neither
    /// normalised activation stored), `None` where it does not apply (gradients tracked, not
    /// f32 on the CPU).
    fn eval_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        self.with_running(|block, running| at_kernels::preact_block_eval(x, block, running))
    }

    /// [`eval_fused`](Self::eval_fused) and the output's attention map `mean_c y_c^2`.
    fn eval_fused_map(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        self.with_running(|block, running| at_kernels::preact_block_eval_map(x, block, running))
    }

    /// `f` on the block's weights with the running statistics, `None` where they do not fit
    /// the kernel.
    fn with_running<R>(
        &self,
        f: impl FnOnce(&PreactBlock, [(&Tensor, &Tensor); 2]) -> Result<Option<R>>,
    ) -> Result<Option<R>> {
        let ((bn0, running0), (bn1, running1)) =
            (self.bn0.running_affine(), self.bn1.running_affine());
        let Some(block) = self.with_norms(bn0, bn1) else { return Ok(None) };
        f(&block, [(&running0.0, &running0.1), (&running1.0, &running1.1)])
    }

    /// The block's weights with these batch-norm affine parameters.
    fn with_norms<'a>(
        &'a self,
        bn0: (&'a Tensor, &'a Tensor),
        bn1: (&'a Tensor, &'a Tensor),
    ) -> Option<PreactBlock<'a>> {
        let (conv0, conv1) = (self.conv0.plain_weight(1)?, self.conv1.plain_weight(1)?);
        let convdim = match &self.convdim {
            Some(convdim) => Some(convdim.plain_weight(0)?),
            None => None,
        };
        Some(PreactBlock {
            bn0,
            conv0,
            bn1,
            conv1,
            convdim,
            stride: self.conv0.stride(),
            eps: BN_EPS,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train && let Some(y) = self.eval_fused(x)? {
            return Ok(y);
        }
        let o1 = self.bn0.forward_relu_t(x, train)?;
        let y = self.conv0.forward(&o1)?;
        let y = self.conv1.forward(&self.bn1.forward_relu_t(&y, train)?)?;
        match &self.convdim {
            Some(convdim) => y + convdim.forward(&o1)?,
            None => y + x,
        }
    }
}

/// A group of blocks, `group{g}` in the authors' names.
#[derive(Clone, Debug)]
struct Group {
    blocks: Vec<Block>,
}

impl Group {
    /// The group's output. `taps`: the attention maps asked for; in training this group's
    /// kernel takes the gradient of the previous group's map (group `g - 1`: its input), in
    /// evaluation its last block makes group `g`'s map.
    fn forward(&self, x: &Tensor, train: bool, g: usize, taps: &mut MapTaps) -> Result<Tensor> {
        if train {
            let slot = g.checked_sub(1).and_then(|prev| taps.gradient_slot(prev));
            if let Some(y) = self.fused(x, slot.as_ref())? {
                if slot.is_some() {
                    taps.took(g - 1);
                }
                return Ok(y);
            }
        }
        let (last, first) = self.blocks.split_last().expect("a group has blocks");
        let o = first.iter().try_fold(x.clone(), |o, block| block.forward_t(&o, train))?;
        if taps.wants_made(g)
            && let Some((y, map)) = last.eval_fused_map(&o)?
        {
            taps.made(g, map);
            return Ok(y);
        }
        last.forward_t(&o, train)
    }

    /// The blocks as one kernel (training mode): one candle graph edge for the group instead of
    /// one per block; its backward adds the map gradient left in `map_grad`, if any. `None`
    /// where the kernel does not apply.
    fn fused(&self, x: &Tensor, map_grad: Option<&MapGradient>) -> Result<Option<Tensor>> {
        let blocks = &self.blocks;
        let Some(fused) = blocks.iter().map(|b| b.fused(true)).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let Some((y, stats)) = preact_blocks_train_with(x, &fused, map_grad)? else {
            return Ok(None);
        };
        for (block, [stats0, stats1]) in blocks.iter().zip(&stats) {
            block.bn0.update_running_from(stats0)?;
            block.bn1.update_running_from(stats1)?;
        }
        Ok(Some(y))
    }
}

/// A WRN-d-k; see the module documentation.
#[derive(Clone, Debug)]
pub struct Wrn {
    conv0: Conv2d,
    groups: Vec<Group>,
    bn: BatchNorm2d,
    fc: Linear,
    backend: Backend,
}

impl Wrn {
    /// Creates the network's parameters under `vb`.
    pub fn new(config: &WrnConfig, vb: VarBuilder) -> Result<Self> {
        let n = config.blocks_per_group()?;
        let widths = [16 * config.width, 32 * config.width, 64 * config.width];
        let conv0 = Conv2d::new(ConvSpec::new(config.in_channels, 16, 3, 1), vb.pp("conv0"))?
            .on(config.backend);
        let mut c_in = 16;
        let mut groups = Vec::with_capacity(3);
        for (g, &c_out) in widths.iter().enumerate() {
            let vb_group = vb.pp(format!("group{g}"));
            let mut blocks = Vec::with_capacity(n);
            for i in 0..n {
                let stride = if i == 0 && g > 0 { 2 } else { 1 };
                let vb_block = vb_group.pp(format!("block{i}"));
                blocks.push(Block::new(c_in, c_out, stride, config, vb_block)?);
                c_in = c_out;
            }
            groups.push(Group { blocks });
        }
        let bn = BatchNorm2d::new(c_in, config.init, false, vb.pp("bn"))?.on(config.backend);
        let fc = Linear::new(c_in, config.num_classes, vb.pp("fc"))?;
        Ok(Self { conv0, groups, bn, fc, backend: config.backend })
    }
}

impl AttentionModel for Wrn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Output> {
        self.forward_with_maps(x, train, &[])
    }

    /// The authors' `f`: conv0, the three groups, BN-ReLU, average pool, fc; `taps` carries the
    /// attention maps asked for (see [`crate::maps`]).
    fn forward_with_maps(&self, x: &Tensor, train: bool, maps: &[usize]) -> Result<Output> {
        let mut taps = MapTaps::new(train, self.backend, self.groups.len(), maps);
        let mut o = self.conv0.forward(x)?;
        let mut groups = Vec::with_capacity(self.groups.len());
        for (g, group) in self.groups.iter().enumerate() {
            o = group.forward(&o, train, g, &mut taps)?;
            groups.push(o.clone());
        }
        let o = self.final_bn_relu(&o, train, &mut taps)?;
        let logits = self.fc.forward(&global_avg_pool(&o)?)?;
        let maps = taps.finish(&groups, &logits)?;
        Ok(Output { logits, groups, maps })
    }

    fn group_count(&self) -> usize {
        self.groups.len()
    }
}

impl Wrn {
    /// `relu(bn(x))` after the last group; in training its kernel takes the gradient of the last
    /// group's map, if asked for.
    fn final_bn_relu(&self, x: &Tensor, train: bool, taps: &mut MapTaps) -> Result<Tensor> {
        let last = self.groups.len() - 1;
        if train && let Some(slot) = taps.gradient_slot(last) {
            if let Some(y) = self.bn.forward_relu_train_with(x, &slot)? {
                taps.took(last);
                return Ok(y);
            }
        }
        self.bn.forward_relu_t(x, train)
    }
}
