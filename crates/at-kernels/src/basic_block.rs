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
//! With frozen batch norms (fine-tuning: `BasicBlock::frozen`, the running statistics, no
//! gradient to their weights and biases) each batch norm's backward is a per-channel scale.
//!
//! The parameters are read where they are, and their gradients bypass candle's graph: the
//! backward hands them to a [`ParamGrads`] the caller merges into the `GradStore` after
//! `backward` ([`ParamGrads::merge_into`]). Through the graph, each parameter would cost a copy
//! into one flat operand per step and, in the backward pass, two zero-and-add passes (the flat
//! operand's and its reshape's): about 40 ms of a ResNet-18 step at batch 8, for 11.7 M
//! parameters. The backward builds no graph: on a thread with second-order gradients
//! [`basic_blocks_train`] returns `None` and the caller builds the blocks from separate ops.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};

use crate::block::{
    AffineRelu, add_into, conv_norm_relu_backward, conv0_with_stats, f32_slice, with_f32,
};
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
    /// Frozen batch norms (fine-tuning): each one's running `(mean, variance)` (bn1, bn2, then
    /// the projection's), which [`basic_blocks_train`] normalises with, passing no gradient to
    /// their weights and biases; `None`: the batch's statistics, as in training.
    pub frozen: Option<&'a [(&'a Tensor, &'a Tensor)]>,
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

/// Parameter gradients a fused op computed in its backward pass and hands over outside candle's
/// graph (see the module documentation): a handle (clones share one list) the op fills and the
/// caller empties into the `GradStore` that `backward` returned. Dropping one that still holds
/// gradients is a bug (the parameters would silently not learn): debug builds panic.
#[derive(Clone, Debug, Default)]
pub struct ParamGrads(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl ParamGrads {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn push(&self, param: &Tensor, grad: Tensor) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push((param.clone(), grad));
    }

    /// Moves every gradient into `grads`, added to what `grads` already holds for the same
    /// parameter.
    ///
    /// # Errors
    ///
    /// Where the addition fails (a gradient of another shape).
    pub fn merge_into(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for (param, grad) in pending {
            let total = match grads.remove(&param) {
                Some(existing) => (existing + grad)?,
                None => grad,
            };
            grads.insert(&param, total);
        }
        Ok(())
    }
}

impl Drop for ParamGrads {
    fn drop(&mut self) {
        if Arc::strong_count(&self.0) == 1 && !std::thread::panicking() {
            let left = self.0.lock().map(|v| v.len()).unwrap_or(0);
            debug_assert_eq!(left, 0, "parameter gradients dropped without merge_into");
        }
    }
}

/// One block of the layer: its tensors (in the order of [`weights`]), channels and stride, and
/// with frozen batch norms their running statistics (bn1, bn2, then the projection's).
#[derive(Clone, Debug)]
struct Spec {
    tensors: Vec<Tensor>,
    c_in: usize,
    c_out: usize,
    stride: usize,
    frozen: Option<Vec<BatchStats>>,
}

impl Spec {
    fn projection(&self) -> bool {
        self.tensors.len() == 9
    }

    /// conv1, conv2 and the projection for a block input of `(n, h, w)`.
    fn dims(&self, (n, h, w): (usize, usize, usize)) -> Result<[Dims; 3]> {
        let (c_in, c_out, s) = (self.c_in, self.c_out, self.stride);
        let d1 = Dims::new((n, c_in, h, w), (c_out, c_in, 3, 3), s, 1)?;
        let d2 = Dims::new((n, c_out, d1.ho, d1.wo), (c_out, c_out, 3, 3), 1, 1)?;
        let dd = Dims::new((n, c_in, h, w), (c_out, c_in, 1, 1), s, 0)?;
        Ok([d1, d2, dd])
    }
}

/// A block's parameters as slices, in the order of [`weights`]: conv1, bn1's weight and bias,
/// conv2, bn2's, then the projection's convolution and batch norm.
struct Params<'a>(Vec<&'a [f32]>);

impl Params<'_> {
    fn w1(&self) -> &[f32] {
        self.0[0]
    }
    fn bn1(&self) -> (&[f32], &[f32]) {
        (self.0[1], self.0[2])
    }
    fn w2(&self) -> &[f32] {
        self.0[3]
    }
    fn bn2(&self) -> (&[f32], &[f32]) {
        (self.0[4], self.0[5])
    }
    fn wd(&self) -> &[f32] {
        self.0[6]
    }
    fn bnd(&self) -> (&[f32], &[f32]) {
        (self.0[7], self.0[8])
    }
}

/// Runs `f` on every block's parameters as f32 slices, read in place (CPU storage).
fn with_params<R>(blocks: &[Spec], f: impl FnOnce(&[Params]) -> Result<R>) -> Result<R> {
    let tensors: Vec<&Tensor> = blocks.iter().flat_map(|b| &b.tensors).collect();
    with_f32(&tensors, &vec!["a parameter"; tensors.len()], |slices| {
        let mut rest = slices;
        let params: Vec<Params> = blocks
            .iter()
            .map(|b| {
                let (block, tail) = rest.split_at(b.tensors.len());
                rest = tail;
                Params(block.to_vec())
            })
            .collect();
        f(&params)
    })
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
    grads: ParamGrads,
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
    p: &Params,
    (n, h, w): (usize, usize, usize),
) -> Result<(Vec<f32>, Saved)> {
    let [d1, d2, dd] = spec.dims((n, h, w))?;
    // Each batch norm's statistics: the batch's, taken with its convolution, or the frozen
    // running ones.
    let frozen = |i: usize| spec.frozen.as_ref().map(|f| f[i].clone());
    let plain = |d: &Dims, x: &[f32], w: &[f32], i: usize| match frozen(i) {
        Some(stats) => (conv::forward(d, x, w), stats),
        None => conv_with_stats(d, x, w),
    };
    let (z1, bn1) = plain(&d1, x, p.w1(), 0);
    // conv2 reads relu(bn1(z1)) through its input map: it is never stored.
    let map1 = AffineRelu(norm::coefficients(p.bn1(), &bn1, eps));
    let (z2, bn2) = match frozen(1) {
        Some(stats) => (conv::forward_same3x3(&d2, &z1, p.w2(), &map1, &|_, _| {}), stats),
        None => conv0_with_stats(&d2, &z1, p.w2(), &map1),
    };
    let a2 = norm::coefficients(p.bn2(), &bn2, eps);
    let (zd, bnd) = match spec.projection() {
        true => {
            let (zd, bnd) = plain(&dd, x, p.wd(), 2);
            (Some(zd), Some(bnd))
        }
        false => (None, None),
    };
    let ad = bnd.as_ref().map(|s| norm::coefficients(p.bnd(), s, eps));
    let shortcut = match &zd {
        Some(zd) => (&zd[..], ad.as_deref()),
        None if x.len() == z2.len() => (x, None),
        None => bail!("a basic block without a projection must keep its input's shape"),
    };
    let out = output((&z2, &a2), shortcut, (spec.c_out, d2.p()));
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

/// One block's backward pass from the gradient `g` of its output `out`: the input's gradient
/// and the parameters' (in the order of [`weights`]).
fn block_backward(
    spec: &Spec,
    eps: f64,
    (x, p): (&[f32], &Params),
    (out, g): (&[f32], &[f32]),
    saved: &Saved,
) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let c = spec.c_out;
    let Saved { z1, z2, zd, stats, dims, .. } = saved;
    let [d1, d2, dd] = spec.dims(*dims)?;
    let (n, p2) = (d2.n, d2.p());

    // The output's ReLU: the gradient of `bn2(z2) + shortcut`.
    let relu = |_: &mut (), i: usize, gr: &mut [std::mem::MaybeUninit<f32>]| {
        let r = i * p2..i * p2 + gr.len();
        let (g, out) = (&g[r.clone()], &out[r]);
        crate::write_each(gr, |j| if out[j] > 0.0 { g[j] } else { 0.0 });
    };
    // SAFETY: `write_each` initialises every element of each plane.
    let gr: Vec<f32> = unsafe { crate::par_chunks_uninit(g.len(), p2, || (), relu) };
    if spec.frozen.is_some() {
        return frozen_backward(spec, eps, (x, p), &gr, saved);
    }
    let (d_z2, dg2, db2) = norm_backward(z2, &gr, (p.bn2(), &stats.bn2, eps), (n, c, p2));

    // conv2 of relu(bn1(z1)): its weight gradient through the input map; its input gradient
    // with the first pass of bn1's backward taken from each image while it is in cache.
    let map1 = AffineRelu(norm::coefficients(p.bn1(), &stats.bn1, eps));
    let dw2 = conv::weight_grad_same3x3(&d2, z1, &d_z2, &map1);
    let (d_z1, dg1, db1) =
        conv_norm_relu_backward(&d2, &d_z2, p.w2(), (z1, p.bn1(), &stats.bn1, eps));
    drop(d_z2);

    // conv1.
    let dw1 = conv::weight_grad(&d1, x, &d_z1);
    let mut dx = conv::input_grad(&d1, &d_z1, p.w1());
    drop(d_z1);
    let mut dp = vec![dw1, dg1, db1, dw2, dg2, db2];

    // The shortcut.
    match (zd, &stats.downsample) {
        (Some(zd), Some(bnd)) => {
            let (d_zd, dgd, dbd) = norm_backward(zd, &gr, (p.bnd(), bnd, eps), (n, c, dd.p()));
            let dwd = conv::weight_grad(&dd, x, &d_zd);
            add_into(&mut dx, &conv::input_grad(&dd, &d_zd, p.wd()));
            dp.extend([dwd, dgd, dbd]);
        }
        _ => add_into(&mut dx, &gr),
    }
    Ok((dx, dp))
}

/// The gradient through a frozen batch norm `y = z a + b` (+ ReLU): `g a`, where the ReLU
/// passed it.
fn frozen_norm_backward(
    z: &[f32],
    g: &[f32],
    coefficients: &[(f32, f32)],
    (c, p): (usize, usize),
    relu: bool,
) -> Vec<f32> {
    let plane = |_: &mut (), i: usize, out: &mut [std::mem::MaybeUninit<f32>]| {
        let (a, b) = coefficients[i % c];
        let r = i * p..i * p + out.len();
        let (z, g) = (&z[r.clone()], &g[r]);
        crate::write_each(out, |j| if !relu || z[j] * a + b > 0.0 { g[j] * a } else { 0.0 });
    };
    // SAFETY: `write_each` initialises every element of each plane.
    unsafe { crate::par_chunks_uninit(g.len(), p, || (), plane) }
}

/// [`block_backward`] with frozen batch norms, from the gradient `gr` of `bn2(z2) + shortcut`:
/// the input's gradient and the convolutions' (the batch norms' weights and biases get none:
/// empty vectors in their places).
fn frozen_backward(
    spec: &Spec,
    eps: f64,
    (x, p): (&[f32], &Params),
    gr: &[f32],
    saved: &Saved,
) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let c = spec.c_out;
    let Saved { z1, z2, zd, stats, dims, .. } = saved;
    let [d1, d2, dd] = spec.dims(*dims)?;
    let p2 = d2.p();
    let a2 = norm::coefficients(p.bn2(), &stats.bn2, eps);
    let d_z2 = frozen_norm_backward(z2, gr, &a2, (c, p2), false);
    let map1 = AffineRelu(norm::coefficients(p.bn1(), &stats.bn1, eps));
    let dw2 = conv::weight_grad_same3x3(&d2, z1, &d_z2, &map1);
    let d_y1 = conv::input_grad_same3x3(&d2, &d_z2, p.w2(), &|_, _| {});
    drop(d_z2);
    let d_z1 = frozen_norm_backward(z1, &d_y1, &map1.0, (c, p2), true);
    drop(d_y1);
    let dw1 = conv::weight_grad(&d1, x, &d_z1);
    let mut dx = conv::input_grad(&d1, &d_z1, p.w1());
    drop(d_z1);
    let mut dp = vec![dw1, vec![], vec![], dw2, vec![], vec![]];
    match (zd, &stats.downsample) {
        (Some(zd), Some(bnd)) => {
            let ad = norm::coefficients(p.bnd(), bnd, eps);
            let d_zd = frozen_norm_backward(zd, gr, &ad, (c, dd.p()), false);
            dp.extend([conv::weight_grad(&dd, x, &d_zd), vec![], vec![]]);
            add_into(&mut dx, &conv::input_grad(&dd, &d_zd, p.wd()));
        }
        _ => add_into(&mut dx, gr),
    }
    Ok((dx, dp))
}

/// The op's operands are the input and an *anchor*: the layer's first weight, read by nobody,
/// given no gradient, there so that candle records the op (and runs its backward) whenever a
/// weight learns, even when the input tracks no gradient (a fine-tuned layer after a frozen
/// one). The weights' gradients go to the op's `ParamGrads`.
impl CustomOp2 for Op {
    fn name(&self) -> &'static str {
        "at-basic-blocks"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _anchor: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, mut h, mut w) = match *l1.dims() {
            [n, c, h, w] => (n, c, h, w),
            ref dims => bail!("a basic block needs [N, C, H, W], got {dims:?}"),
        };
        if c != self.blocks[0].c_in {
            bail!(
                "a basic block over {} channels got an input of shape {:?}",
                self.blocks[0].c_in,
                l1.dims()
            )
        }
        let x = f32_slice(s1, l1, "the input")?;
        let mut saved = Vec::with_capacity(self.blocks.len());
        let mut current: Option<Vec<f32>> = None;
        with_params(&self.blocks, |params| {
            for (spec, p) in self.blocks.iter().zip(params) {
                let input = current.as_deref().unwrap_or(x);
                let (out, mut block) = block_forward(spec, self.eps, input, p, (n, h, w))?;
                block.input = current.take();
                let d1 = spec.dims((n, h, w))?[0];
                (h, w) = (d1.ho, d1.wo);
                saved.push(block);
                current = Some(out);
            }
            Ok(())
        })?;
        let stats = saved.iter().map(|s| s.stats.clone()).collect();
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        let out = current.expect("a layer has blocks");
        let c_out = self.blocks.last().expect("a layer has blocks").c_out;
        Ok((CpuStorage::F32(out), Shape::from((n, c_out, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
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
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(saved) = saved.as_ref() else {
            bail!("the basic blocks' backward ran before their forward")
        };
        let mut grad: Option<Vec<f32>> = None;
        let mut param_grads = Vec::with_capacity(self.blocks.len());
        let what = ["the input", "the output", "the output gradient"];
        with_f32(&[x, out, &g], &what, |operands| {
            let &[x, out, g] = operands else { unreachable!("three operands") };
            with_params(&self.blocks, |params| {
                for (i, (spec, block)) in self.blocks.iter().zip(saved).enumerate().rev() {
                    let input = block.input.as_deref().unwrap_or(x);
                    // This block's output: the next block's input, or the op's.
                    let output =
                        saved.get(i + 1).and_then(|next| next.input.as_deref()).unwrap_or(out);
                    let g = grad.as_deref().unwrap_or(g);
                    let (dx, dp) =
                        block_backward(spec, self.eps, (input, &params[i]), (output, g), block)?;
                    param_grads.push((i, dp));
                    grad = Some(dx);
                }
                Ok(())
            })
        })?;
        for (i, dp) in param_grads {
            // Empty: a frozen batch norm's weight or bias, which gets no gradient.
            for (t, d) in self.blocks[i].tensors.iter().zip(dp).filter(|(_, d)| !d.is_empty()) {
                self.grads.push(t, Tensor::from_vec(d, t.shape(), t.device())?);
            }
        }
        let dx = grad.expect("a layer has blocks");
        Ok((Some(Tensor::from_vec(dx, (n, c, h, w), x.device())?), None))
    }
}

/// Consecutive training-mode basic blocks (a ResNet layer) on `x` (`[N, C, H, W]`) as one op:
/// the last block's output and each block's batch statistics (for the running averages). The
/// parameters' gradients go to `grads` in the backward pass (merge them into the `GradStore`
/// after `backward`: [`ParamGrads::merge_into`]); the input's through candle's graph. `None`
/// where the kernel does not apply (not f32 on the CPU, a thread with second-order gradients),
/// so that the caller builds the blocks from separate ops.
///
/// # Errors
///
/// Shapes that do not make basic blocks (named in the message), or what candle refuses.
pub fn basic_blocks_train(
    x: &Tensor,
    blocks: &[BasicBlock],
    grads: &ParamGrads,
) -> Result<Option<(Tensor, Vec<BasicBlockStats>)>> {
    let Some(first) = blocks.first() else { bail!("basic_blocks_train needs at least one block") };
    let eps = first.eps;
    let applies = x.device().is_cpu()
        && x.rank() == 4
        && x.dtype() == DType::F32
        && blocks.iter().all(|b| {
            weights(b).iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
                && b.eps == eps
        })
        && !crate::second_order::is_second_order_thread();
    if !applies {
        return Ok(None);
    }
    let mut specs: Vec<Spec> = Vec::with_capacity(blocks.len());
    for block in blocks {
        let (c_in, c_out) = check(block)?;
        if let Some(previous) = specs.last().map(|s| s.c_out)
            && previous != c_in
        {
            bail!("a basic block with {c_in} input channels follows one with {previous} outputs")
        }
        let tensors = weights(block).into_iter().cloned().collect();
        let frozen =
            block.frozen.map(|running| running_stats(block, running, c_out)).transpose()?;
        specs.push(Spec { tensors, c_in, c_out, stride: block.stride, frozen });
    }
    let stats = Arc::new(Mutex::new(None));
    let op = Op {
        blocks: specs,
        eps,
        saved: Mutex::new(None),
        stats: stats.clone(),
        grads: grads.clone(),
    };
    let anchor = blocks[0].conv1.clone();
    let y = x.contiguous()?.apply_op2(&anchor, op)?;
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(Some((y, stats.expect("the forward pass stored its statistics"))))
}

/// A block's batch norms' running statistics (`(mean, var)` of bn1, bn2, then the
/// projection's), checked against its shape, as the kernels take them.
fn running_stats(
    block: &BasicBlock,
    running: &[(&Tensor, &Tensor)],
    c_out: usize,
) -> Result<Vec<BatchStats>> {
    let norms = if block.downsample.is_some() { 3 } else { 2 };
    if running.len() != norms
        || running.iter().any(|(m, v)| m.elem_count() != c_out || v.elem_count() != c_out)
    {
        bail!("a basic block's {norms} batch norms need running statistics of {c_out} channels")
    }
    let values =
        |t: &Tensor| -> Result<Vec<f64>> { t.flatten_all()?.to_dtype(DType::F64)?.to_vec1() };
    running
        .iter()
        .map(|(mean, var)| Ok(BatchStats { mean: values(mean)?, var: values(var)?, count: 0 }))
        .collect()
}

/// A block's tensors in the order the kernel takes them.
fn weights<'a>(b: &BasicBlock<'a>) -> Vec<&'a Tensor> {
    let mut w = vec![b.conv1, b.bn1.0, b.bn1.1, b.conv2, b.bn2.0, b.bn2.1];
    if let Some((conv, (gamma, beta))) = b.downsample {
        w.extend([conv, gamma, beta]);
    }
    w
}

/// A block's shapes, checked: its input and output channels.
fn check(block: &BasicBlock) -> Result<(usize, usize)> {
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
    Ok((c_in, c_out))
}

/// One evaluation-mode basic block (batch norms with their running statistics), forward only:
/// conv2 reads `relu(bn1(z1))` through its input map, and `bn2`, the shortcut's batch norm, the
/// addition and the ReLU are one pass (see the module documentation).
struct EvalOp {
    spec: Spec,
    eps: f64,
    /// Each batch norm's running statistics: bn1, bn2, then the projection's.
    running: Vec<BatchStats>,
}

impl CustomOp1 for EvalOp {
    fn name(&self) -> &'static str {
        "at-basic-block-eval"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let spec = &self.spec;
        let (n, h, w) = match *l1.dims() {
            [n, c, h, w] if c == spec.c_in => (n, h, w),
            ref dims => bail!("a basic block over {} channels got {dims:?}", spec.c_in),
        };
        let x = f32_slice(s1, l1, "the input")?;
        let [d1, d2, dd] = spec.dims((n, h, w))?;
        let running = &self.running;
        let out = with_params(std::slice::from_ref(spec), |params| {
            let p = &params[0];
            let z1 = conv::forward(&d1, x, p.w1());
            let map1 = AffineRelu(norm::coefficients(p.bn1(), &running[0], self.eps));
            let z2 = conv::forward_same3x3(&d2, &z1, p.w2(), &map1, &|_, _| {});
            drop(z1);
            let a2 = norm::coefficients(p.bn2(), &running[1], self.eps);
            let zd = spec.projection().then(|| conv::forward(&dd, x, p.wd()));
            let ad = zd.as_ref().map(|_| norm::coefficients(p.bnd(), &running[2], self.eps));
            let shortcut = match &zd {
                Some(zd) => (&zd[..], ad.as_deref()),
                None if x.len() == z2.len() => (x, None),
                None => bail!("a basic block without a projection must keep its input's shape"),
            };
            Ok(output((&z2, &a2), shortcut, (spec.c_out, d2.p())))
        })?;
        Ok((CpuStorage::F32(out), Shape::from((n, spec.c_out, d2.ho, d2.wo))))
    }
}

/// One evaluation-mode basic block on `x` (`[N, C, H, W]`), its batch norms with their running
/// statistics (`running`: bn1's `(mean, var)`, bn2's, then the projection's), forward only: a
/// teacher's block in one op, neither `relu(bn1(z1))` nor the batch norms' outputs stored. `None`
/// where it does not apply: not f32 on the CPU, or any operand tracked for gradients (a frozen
/// batch norm in a student, whose convolutions train), where the caller builds the block from
/// separate ops.
///
/// # Errors
///
/// Shapes that do not make a basic block, running statistics of the wrong length.
pub fn basic_block_eval(
    x: &Tensor,
    block: &BasicBlock,
    running: &[(&Tensor, &Tensor)],
) -> Result<Option<Tensor>> {
    let tensors = weights(block);
    let applies = x.device().is_cpu()
        && x.rank() == 4
        && x.dtype() == DType::F32
        && !x.track_op()
        && tensors.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op());
    if !applies {
        return Ok(None);
    }
    let (c_in, c_out) = check(block)?;
    let running = running_stats(block, running, c_out)?;
    let tensors = tensors.into_iter().cloned().collect();
    let spec = Spec { tensors, c_in, c_out, stride: block.stride, frozen: None };
    let op = EvalOp { spec, eps: block.eps, running };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}
