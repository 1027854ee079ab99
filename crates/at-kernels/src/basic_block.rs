//! The post-activation basic block of a ResNet (He et al. 2016, torchvision's `BasicBlock`) in
//! training mode, a whole layer of them as one candle custom op with a hand-written backward.
//!
//! A block computes `z1 = conv1(x)` (3x3, stride `s`), `z2 = conv2(relu(bn1(z1)))` and returns
//! `relu(bn2(z2) + shortcut)`, the shortcut being `x` or `bnd(convd(x))` (1x1, stride `s`).
//! Built from separate ops, candle's backward gives every edge a zero tensor and adds the edge's
//! gradient into it, and takes a ReLU's gradient in four more passes (a zero tensor, a
//! comparison, a conversion, a product): at 224 pixels, where a ResNet-18 layer's activations
//! are tens of megabytes at a batch of 8, those passes were a third of the step. As one op the
//! layer has one such edge (its input); inside, each gradient is written once, `relu(bn1(z1))`
//! is never stored (conv2 reads it through its input map, see `conv::InputMap`), and `bn2`, the
//! shortcut's batch norm, the addition and the ReLU are one pass.
//!
//! Like the pre-activation block of [`block`](crate::block), the parameters enter as one flat
//! tensor, and the backward builds no graph: on a thread with second-order gradients
//! [`basic_blocks_train`] returns `None` and the caller builds the blocks from separate ops.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use crate::block::{AffineRelu, PlaneSums, add_into, conv0_with_stats, f32_slice};
use crate::conv::{self, Dims, Plain};
use crate::norm::{self, BatchStats};

/// The weights and shape of one basic block (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct BasicBlock<'a> {
    /// `conv1`'s weight, `[c_out, c_in, 3, 3]`, stride [`BasicBlock::stride`], padding 1.
    pub conv1: &'a Tensor,
    /// `bn1`'s weight and bias (`c_out` each).
    pub bn1: (&'a Tensor, &'a Tensor),
    /// `conv2`'s weight, `[c_out, c_out, 3, 3]`, stride 1, padding 1.
    pub conv2: &'a Tensor,
    /// `bn2`'s weight and bias.
    pub bn2: (&'a Tensor, &'a Tensor),
    /// The projection shortcut: the 1x1 convolution's weight `[c_out, c_in, 1, 1]` (stride
    /// [`BasicBlock::stride`]) and its batch norm's weight and bias.
    pub downsample: Option<(&'a Tensor, (&'a Tensor, &'a Tensor))>,
    /// The stride of `conv1` and of the projection.
    pub stride: usize,
    /// The batch-norm epsilon.
    pub eps: f64,
}

/// The batch statistics one block normalised with, for the running averages.
#[derive(Clone, Debug, PartialEq)]
pub struct BasicBlockStats {
    /// `bn1`'s.
    pub bn1: BatchStats,
    /// `bn2`'s.
    pub bn2: BatchStats,
    /// The projection's batch norm's.
    pub downsample: Option<BatchStats>,
}

/// Where each parameter of a block starts in its part of the flat parameter tensor.
#[derive(Clone, Copy, Debug)]
struct Offsets {
    c_in: usize,
    c_out: usize,
    g1: usize,
    w2: usize,
    g2: usize,
    wd: usize,
    gd: usize,
    total: usize,
}

impl Offsets {
    fn new(c_in: usize, c_out: usize, projection: bool) -> Self {
        let g1 = c_out * c_in * 9;
        let w2 = g1 + 2 * c_out;
        let g2 = w2 + c_out * c_out * 9;
        let wd = g2 + 2 * c_out;
        let gd = wd + if projection { c_out * c_in } else { 0 };
        let total = gd + if projection { 2 * c_out } else { 0 };
        Self { c_in, c_out, g1, w2, g2, wd, gd, total }
    }

    fn projection(&self) -> bool {
        self.total > self.wd
    }

    /// A batch norm's weight and bias starting at `at`.
    fn norm<'p>(&self, p: &'p [f32], at: usize) -> (&'p [f32], &'p [f32]) {
        (&p[at..at + self.c_out], &p[at + self.c_out..at + 2 * self.c_out])
    }
}

/// One block of the layer: its parameters (from `start` in the flat tensor) and stride.
#[derive(Clone, Copy, Debug)]
struct Spec {
    offsets: Offsets,
    stride: usize,
    start: usize,
}

impl Spec {
    /// conv1, conv2 and the projection for a block input of `(n, h, w)`.
    fn dims(&self, (n, h, w): (usize, usize, usize)) -> Result<[Dims; 3]> {
        let (o, s) = (&self.offsets, self.stride);
        let d1 = Dims::new((n, o.c_in, h, w), (o.c_out, o.c_in, 3, 3), s, 1)?;
        let d2 = Dims::new((n, o.c_out, d1.ho, d1.wo), (o.c_out, o.c_out, 3, 3), 1, 1)?;
        let dd = Dims::new((n, o.c_in, h, w), (o.c_out, o.c_in, 1, 1), s, 0)?;
        Ok([d1, d2, dd])
    }
}

/// What a block's backward pass keeps from its forward pass.
struct Saved {
    /// The block's input, for every block but the layer's first (whose input is the op's); it is
    /// also the previous block's output, whose ReLU mask that block's backward reads.
    input: Option<Vec<f32>>,
    /// `(n, h, w)` of the input.
    dims: (usize, usize, usize),
    z1: Vec<f32>,
    z2: Vec<f32>,
    /// The projection's output, before its batch norm.
    zd: Option<Vec<f32>>,
    stats: BasicBlockStats,
}

struct Op {
    blocks: Vec<Spec>,
    eps: f64,
    saved: Mutex<Option<Vec<Saved>>>,
    stats: Arc<Mutex<Option<Vec<BasicBlockStats>>>>,
}

/// conv1 or the projection with its output's batch statistics.
fn conv_with_stats(d: &Dims, x: &[f32], w: &[f32]) -> (Vec<f32>, BatchStats) {
    conv0_with_stats(d, x, w, &Plain)
}

/// The shortcut's values and, for a projection, its batch norm's per-channel `(scale, shift)`.
type Shortcut<'a> = (&'a [f32], Option<&'a [(f32, f32)]>);

/// `relu((z2 a2 + b2) + shortcut)` per plane, the shortcut `zd ad + bd` or `x`: the expressions
/// of the batch-norm kernel and of candle's addition and ReLU, so the values are the same as
/// the separate ops'.
fn output(
    (z2, bn2): (&[f32], &[(f32, f32)]),
    shortcut: Shortcut,
    (c, p): (usize, usize),
) -> Vec<f32> {
    let plane = |_: &mut (), i: usize, out: &mut [std::mem::MaybeUninit<f32>]| {
        let r = i * p..(i + 1) * p;
        let (a, b) = bn2[i % c];
        let (z, s) = (&z2[r.clone()], &shortcut.0[r]);
        match shortcut.1 {
            Some(bnd) => {
                let (ad, bd) = bnd[i % c];
                crate::write_each(out, |j| ((z[j] * a + b) + (s[j] * ad + bd)).max(0.0));
            }
            None => crate::write_each(out, |j| ((z[j] * a + b) + s[j]).max(0.0)),
        }
    };
    // SAFETY: `write_each` initialises every element of each plane.
    unsafe { crate::par_chunks_uninit(z2.len(), p, || (), plane) }
}

/// One block's forward pass on `x` (`(n, c_in, h, w)`) with its parameters `p`.
fn block_forward(
    spec: &Spec,
    eps: f64,
    x: &[f32],
    p: &[f32],
    (n, h, w): (usize, usize, usize),
) -> Result<(Vec<f32>, Saved)> {
    let o = &spec.offsets;
    let [d1, d2, dd] = spec.dims((n, h, w))?;
    let (z1, bn1) = conv_with_stats(&d1, x, &p[..o.g1]);
    // conv2 reads relu(bn1(z1)) through its input map: it is never stored.
    let map1 = AffineRelu(norm::coefficients(o.norm(p, o.g1), &bn1, eps));
    let (z2, bn2) = conv0_with_stats(&d2, &z1, &p[o.w2..o.g2], &map1);
    let a2 = norm::coefficients(o.norm(p, o.g2), &bn2, eps);
    let (zd, bnd) = match o.projection() {
        true => {
            let (zd, bnd) = conv_with_stats(&dd, x, &p[o.wd..o.gd]);
            (Some(zd), Some(bnd))
        }
        false => (None, None),
    };
    let ad = bnd.as_ref().map(|s| norm::coefficients(o.norm(p, o.gd), s, eps));
    let shortcut = match &zd {
        Some(zd) => (&zd[..], ad.as_deref()),
        None if x.len() == z2.len() => (x, None),
        None => bail!("a basic block without a projection must keep its input's shape"),
    };
    let out = output((&z2, &a2), shortcut, (o.c_out, d2.p()));
    let stats = BasicBlockStats { bn1, bn2, downsample: bnd };
    Ok((out, Saved { input: None, dims: (n, h, w), z1, z2, zd, stats }))
}

/// A training-mode batch norm's backward without a ReLU (`bn2`, the projection's): `(dz,
/// dgamma, dbeta)`.
fn norm_backward(
    z: &[f32],
    g: &[f32],
    (affine, stats, eps): ((&[f32], &[f32]), &BatchStats, f64),
    dims: (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let backward = norm::Backward {
        dims,
        affine,
        stats,
        eps,
        relu: false,
        precomputed: None,
        residual: None,
        map_grad: None,
    };
    norm::train_backward(z, g, &backward)
}

/// One block's backward pass from the gradient `g` of its output `out`: the input's gradient,
/// the parameters' gradients written into `dp`.
fn block_backward(
    spec: &Spec,
    eps: f64,
    (x, p): (&[f32], &[f32]),
    (out, g): (&[f32], &[f32]),
    saved: &Saved,
    dp: &mut [f32],
) -> Result<Vec<f32>> {
    let o = &spec.offsets;
    let Saved { z1, z2, zd, stats, dims, .. } = saved;
    let [d1, d2, dd] = spec.dims(*dims)?;
    let (n, p2) = (d2.n, d2.p());

    // The output's ReLU: the gradient of `bn2(z2) + shortcut`.
    let mut gr = vec![0f32; g.len()];
    gr.par_chunks_mut(1 << 14).zip(g.par_chunks(1 << 14)).zip(out.par_chunks(1 << 14)).for_each(
        |((gr, g), out)| {
            for ((d, &g), &y) in gr.iter_mut().zip(g).zip(out) {
                *d = if y > 0.0 { g } else { 0.0 };
            }
        },
    );
    let (d_z2, dg2, db2) =
        norm_backward(z2, &gr, (o.norm(p, o.g2), &stats.bn2, eps), (n, o.c_out, p2));
    dp[o.g2..o.g2 + o.c_out].copy_from_slice(&dg2);
    dp[o.g2 + o.c_out..o.wd].copy_from_slice(&db2);

    // conv2 of relu(bn1(z1)): its weight gradient through the input map; its input gradient
    // with the first pass of bn1's backward taken from each image while it is in cache.
    let map1 = AffineRelu(norm::coefficients(o.norm(p, o.g1), &stats.bn1, eps));
    dp[o.w2..o.g2].copy_from_slice(&conv::weight_grad_same3x3(&d2, z1, &d_z2, &map1));
    let sums = PlaneSums::new(z1, &map1.0, &stats.bn1, (o.c_out, p2));
    let take_sums = |image: usize, g: &[f32]| sums.take(image, g);
    let d_y1 = conv::input_grad_same3x3(&d2, &d_z2, &p[o.w2..o.g2], &take_sums);
    drop(d_z2);
    let sums = sums.into_sums();
    let bn1_backward = norm::Backward {
        dims: (n, o.c_out, p2),
        affine: o.norm(p, o.g1),
        stats: &stats.bn1,
        eps,
        relu: true,
        precomputed: Some(&sums),
        residual: None,
        map_grad: None,
    };
    let (d_z1, dg1, db1) = norm::train_backward(z1, &d_y1, &bn1_backward);
    drop(d_y1);
    dp[o.g1..o.g1 + o.c_out].copy_from_slice(&dg1);
    dp[o.g1 + o.c_out..o.w2].copy_from_slice(&db1);

    // conv1.
    dp[..o.g1].copy_from_slice(&conv::weight_grad(&d1, x, &d_z1));
    let mut dx = conv::input_grad(&d1, &d_z1, &p[..o.g1]);
    drop(d_z1);

    // The shortcut.
    match (zd, &stats.downsample) {
        (Some(zd), Some(bnd)) => {
            let (d_zd, dgd, dbd) =
                norm_backward(zd, &gr, (o.norm(p, o.gd), bnd, eps), (n, o.c_out, dd.p()));
            dp[o.gd..o.gd + o.c_out].copy_from_slice(&dgd);
            dp[o.gd + o.c_out..].copy_from_slice(&dbd);
            dp[o.wd..o.gd].copy_from_slice(&conv::weight_grad(&dd, x, &d_zd));
            add_into(&mut dx, &conv::input_grad(&dd, &d_zd, &p[o.wd..o.gd]));
        }
        _ => add_into(&mut dx, &gr),
    }
    Ok(dx)
}

impl CustomOp2 for Op {
    fn name(&self) -> &'static str {
        "at-basic-blocks"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, mut h, mut w) = match *l1.dims() {
            [n, c, h, w] => (n, c, h, w),
            ref dims => bail!("a basic block needs [N, C, H, W], got {dims:?}"),
        };
        let first = &self.blocks[0].offsets;
        if c != first.c_in {
            bail!(
                "a basic block over {} channels got an input of shape {:?}",
                first.c_in,
                l1.dims()
            )
        }
        let x = f32_slice(s1, l1, "the input")?;
        let p = f32_slice(s2, l2, "the parameters")?;
        let last = self.blocks.last().expect("a layer has blocks");
        if p.len() != last.start + last.offsets.total {
            bail!(
                "basic blocks take {} parameters, got {}",
                last.start + last.offsets.total,
                p.len()
            )
        }
        let mut saved = Vec::with_capacity(self.blocks.len());
        let mut current: Option<Vec<f32>> = None;
        for spec in &self.blocks {
            let params = &p[spec.start..spec.start + spec.offsets.total];
            let input = current.as_deref().unwrap_or(x);
            let (out, mut block) = block_forward(spec, self.eps, input, params, (n, h, w))?;
            block.input = current.take();
            let d1 = spec.dims((n, h, w))?[0];
            (h, w) = (d1.ho, d1.wo);
            saved.push(block);
            current = Some(out);
        }
        let stats = saved.iter().map(|s| s.stats.clone()).collect();
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        let out = current.expect("a layer has blocks");
        Ok((CpuStorage::F32(out), Shape::from((n, last.offsets.c_out, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if crate::second_order::is_second_order_thread() {
            bail!(
                "the fused basic blocks are not twice differentiable; build them from separate \
                 ops on a second-order thread (basic_blocks_train returns None there)"
            )
        }
        let (n, c, h, w) = x.dims4()?;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = params.storage_and_layout();
        let (os, ol) = out.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ps), Storage::Cpu(os), Storage::Cpu(gs)) =
            (&*xs, &*ps, &*os, &*gs)
        else {
            bail!("the basic-block kernel's backward runs on the CPU")
        };
        let x = f32_slice(xs, xl, "the input")?;
        let p = f32_slice(ps, pl, "the parameters")?;
        let out = f32_slice(os, ol, "the output")?;
        let g = f32_slice(gs, gl, "the output gradient")?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(saved) = saved.as_ref() else {
            bail!("the basic blocks' backward ran before their forward")
        };
        let mut dp = vec![0f32; p.len()];
        let mut grad: Option<Vec<f32>> = None;
        for (i, (spec, block)) in self.blocks.iter().zip(saved).enumerate().rev() {
            let range = spec.start..spec.start + spec.offsets.total;
            let input = block.input.as_deref().unwrap_or(x);
            // This block's output: the next block's input, or the op's.
            let output = saved.get(i + 1).and_then(|next| next.input.as_deref()).unwrap_or(out);
            let g = grad.as_deref().unwrap_or(g);
            let dx = block_backward(
                spec,
                self.eps,
                (input, &p[range.clone()]),
                (output, g),
                block,
                &mut dp[range],
            )?;
            grad = Some(dx);
        }
        let device = params.device();
        Ok((
            Some(Tensor::from_vec(grad.expect("a layer has blocks"), (n, c, h, w), device)?),
            Some(Tensor::from_vec(dp, p.len(), device)?),
        ))
    }
}

/// Consecutive training-mode basic blocks (a ResNet layer) on `x` (`[N, C, H, W]`) as one op:
/// the last block's output and each block's batch statistics (for the running averages).
/// `None` where the kernel does not apply (not f32 on the CPU, a thread with second-order
/// gradients), so that the caller builds the blocks from separate ops.
///
/// # Errors
///
/// Shapes that do not make basic blocks (named in the message), or what candle refuses.
pub fn basic_blocks_train(
    x: &Tensor,
    blocks: &[BasicBlock],
) -> Result<Option<(Tensor, Vec<BasicBlockStats>)>> {
    let Some(first) = blocks.first() else { bail!("basic_blocks_train needs at least one block") };
    let eps = first.eps;
    let applies = x.device().is_cpu()
        && x.rank() == 4
        && x.dtype() == DType::F32
        && blocks
            .iter()
            .all(|b| weights(b).iter().all(|t| t.dtype() == DType::F32) && b.eps == eps)
        && !crate::second_order::is_second_order_thread();
    if !applies {
        return Ok(None);
    }
    let mut specs = Vec::with_capacity(blocks.len());
    let mut parts = vec![];
    let mut start = 0;
    for block in blocks {
        let offsets = check(block)?;
        if let Some(previous) = specs.last().map(|s: &Spec| s.offsets.c_out)
            && previous != offsets.c_in
        {
            bail!(
                "a basic block with {} input channels follows one with {previous} outputs",
                offsets.c_in
            )
        }
        specs.push(Spec { offsets, stride: block.stride, start });
        start += offsets.total;
        for t in weights(block) {
            parts.push(t.flatten_all()?);
        }
    }
    let params = Tensor::cat(&parts, 0)?;
    let stats = Arc::new(Mutex::new(None));
    let op = Op { blocks: specs, eps, saved: Mutex::new(None), stats: stats.clone() };
    let y = x.contiguous()?.apply_op2(&params, op)?;
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(Some((y, stats.expect("the forward pass stored its statistics"))))
}

/// A block's tensors in the order of the flat parameters.
fn weights<'a>(b: &BasicBlock<'a>) -> Vec<&'a Tensor> {
    let mut w = vec![b.conv1, b.bn1.0, b.bn1.1, b.conv2, b.bn2.0, b.bn2.1];
    if let Some((conv, (gamma, beta))) = b.downsample {
        w.extend([conv, gamma, beta]);
    }
    w
}

/// A block's shapes, checked: its parameters' offsets.
fn check(block: &BasicBlock) -> Result<Offsets> {
    let (c_out, c_in, kh, kw) = block.conv1.dims4()?;
    if (kh, kw) != (3, 3) || block.conv2.dims4()? != (c_out, c_out, 3, 3) {
        bail!(
            "a basic block has 3x3 convolutions, got {:?} and {:?}",
            block.conv1.dims(),
            block.conv2.dims()
        )
    }
    let mut norms = vec![block.bn1.0, block.bn1.1, block.bn2.0, block.bn2.1];
    if let Some((conv, (gamma, beta))) = block.downsample {
        if conv.dims4()? != (c_out, c_in, 1, 1) {
            bail!(
                "a basic block's projection must be [{c_out}, {c_in}, 1, 1], got {:?}",
                conv.dims()
            )
        }
        norms.extend([gamma, beta]);
    } else if block.stride != 1 || c_in != c_out {
        bail!("a basic block that changes the stride or the width needs a projection")
    }
    if let Some(t) = norms.iter().find(|t| t.elem_count() != c_out) {
        bail!("a basic block's batch norms must have {c_out} channels, got {:?}", t.dims())
    }
    Ok(Offsets::new(c_in, c_out, block.downsample.is_some()))
}
