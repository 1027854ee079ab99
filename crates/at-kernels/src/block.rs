//! The pre-activation residual block of a wide residual network, in training mode, as one candle
//! custom op with a hand-written backward pass.
//!
//! A block computes `o1 = relu(bn0(x))`, `o2 = relu(bn1(conv0(o1)))` and returns
//! `conv1(o2) + convdim(o1)` (or `+ x` when the width does not change). Built from separate ops,
//! candle's backward pass gives every edge of the graph a zero tensor and then adds the edge's
//! gradient into it: six activation-sized allocations, fills and additions per block, about a
//! sixth of a WRN training step on the CPU. As one op the block has one such edge (its input);
//! inside, each gradient is written once. [`preact_blocks_train`] makes a whole group of blocks
//! one op, so the gradient between two blocks is not accumulated by candle either. The
//! parameters enter as one flat tensor (their concatenation, which costs a copy of the weights per
//! step).
//!
//! The backward builds no graph, so the op is used only where candle detaches gradients: on a
//! thread with second-order gradients switched on, [`preact_block_train`] returns `None` and the
//! caller builds the block from differentiable ops.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use crate::attention::MapGradient;
use crate::conv::{self, Dims};
use crate::norm::{self, BatchStats};

/// The weights and shape of one pre-activation block (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct PreactBlock<'a> {
    /// `bn0`'s weight and bias (`c_in` each).
    pub bn0: (&'a Tensor, &'a Tensor),
    /// `conv0`'s weight, `[c_out, c_in, 3, 3]`, padding 1.
    pub conv0: &'a Tensor,
    /// `bn1`'s weight and bias (`c_out` each).
    pub bn1: (&'a Tensor, &'a Tensor),
    /// `conv1`'s weight, `[c_out, c_out, 3, 3]`, stride 1, padding 1.
    pub conv1: &'a Tensor,
    /// The projection shortcut, `[c_out, c_in, 1, 1]`, when the width or stride changes.
    pub convdim: Option<&'a Tensor>,
    /// The stride of `conv0` and `convdim`.
    pub stride: usize,
    /// The batch-norm epsilon.
    pub eps: f64,
}

/// Offsets of each parameter in the flat parameter tensor.
#[derive(Clone, Copy, Debug)]
struct Offsets {
    c_in: usize,
    c_out: usize,
    w0: usize,
    g1: usize,
    w1: usize,
    wd: usize,
    total: usize,
}

impl Offsets {
    fn new(c_in: usize, c_out: usize, projection: bool) -> Self {
        let w0 = 2 * c_in;
        let g1 = w0 + c_out * c_in * 9;
        let w1 = g1 + 2 * c_out;
        let wd = w1 + c_out * c_out * 9;
        let total = wd + if projection { c_out * c_in } else { 0 };
        Self { c_in, c_out, w0, g1, w1, wd, total }
    }

    fn projection(&self) -> bool {
        self.total > self.wd
    }

    /// bn0's weight and bias in the flat parameters `p`.
    fn bn0<'p>(&self, p: &'p [f32]) -> (&'p [f32], &'p [f32]) {
        (&p[..self.c_in], &p[self.c_in..self.w0])
    }

    /// bn1's weight and bias in the flat parameters `p`.
    fn bn1<'p>(&self, p: &'p [f32]) -> (&'p [f32], &'p [f32]) {
        (&p[self.g1..self.g1 + self.c_out], &p[self.g1 + self.c_out..self.w1])
    }
}

/// One block of a group: its parameters' offsets (from `start` in the group's flat parameters)
/// and its stride.
#[derive(Clone, Copy, Debug)]
struct Spec {
    offsets: Offsets,
    stride: usize,
    start: usize,
}

/// What a block's backward pass needs beyond the group's operands.
struct Saved {
    /// The block's input, for every block but the group's first (whose input is the op's).
    input: Option<Vec<f32>>,
    /// `(n, h, w)` of the input.
    dims: (usize, usize, usize),
    /// `relu(bn0(x))`, the input of conv0 and of the projection; `None` for a block whose
    /// conv0 reads it from `x` through bn0's input map (no projection, stride 1).
    o1: Option<Vec<f32>>,
    /// `conv0(o1)`; conv1's input `relu(bn1(y0))` is recomputed from it.
    y0: Vec<f32>,
    stats: [BatchStats; 2],
}

struct Op {
    blocks: Vec<Spec>,
    eps: f64,
    saved: Mutex<Option<Vec<Saved>>>,
    stats: Arc<Mutex<Option<Vec<[BatchStats; 2]>>>>,
    /// An attention map's gradient for the input, added in the first block's backward.
    map_grad: Option<MapGradient>,
}

/// The three convolutions of a block input of `(n, c_in, h, w)`.
fn conv_dims(o: &Offsets, stride: usize, (n, h, w): (usize, usize, usize)) -> Result<[Dims; 3]> {
    let d0 = Dims::new((n, o.c_in, h, w), (o.c_out, o.c_in, 3, 3), stride, 1)?;
    let d1 = Dims::new((n, o.c_out, d0.ho, d0.wo), (o.c_out, o.c_out, 3, 3), 1, 1)?;
    let dd = Dims::new((n, o.c_in, h, w), (o.c_out, o.c_in, 1, 1), stride, 0)?;
    Ok([d0, d1, dd])
}

/// `relu(x * scale + shift)` per channel: a batch norm and ReLU applied as a convolution's
/// input map.
pub(crate) struct AffineRelu(pub(crate) Vec<(f32, f32)>);

impl conv::InputMap<f32> for AffineRelu {
    fn copy(&self, channel: usize, src: &[f32], dst: &mut [f32]) {
        let (a, b) = self.0[channel];
        // The expression of the batch-norm kernel's forward pass, so the values are the same.
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = (x * a + b).max(0.0);
        }
    }
}

/// conv0 and the statistics of its output (for bn1): for a "same" convolution from each
/// image's planes right after the GEMM, otherwise in a pass of their own; the numbers are the
/// same either way.
/// `map`: how conv0 reads its input (`relu(bn0(x))` from `x` itself, or the stored `o1` as is).
pub(crate) fn conv0_with_stats(
    d: &Dims,
    x: &[f32],
    w: &[f32],
    map: &impl conv::InputMap<f32>,
) -> (Vec<f32>, BatchStats) {
    let (n, c, p) = (d.n, d.o, d.p());
    if !d.same3x3() {
        let y = conv::forward(d, x, w);
        let stats = norm::batch_stats(&y, (n, c, p));
        return (y, stats);
    }
    let moments = Mutex::new(vec![(0.0, 0.0); n * c]);
    let take_moments = |image: usize, y: &mut [f32]| {
        let planes: Vec<(f64, f64)> = y.chunks_exact(p).map(norm::plane_moments).collect();
        let mut moments = moments.lock().unwrap_or_else(|e| e.into_inner());
        moments[image * c..(image + 1) * c].copy_from_slice(&planes);
    };
    let y = conv::forward_same3x3(d, x, w, map, &take_moments);
    let moments = moments.into_inner().unwrap_or_else(|e| e.into_inner());
    (y, norm::stats_from_moments(&moments, (n, c, p)))
}

/// The first backward pass of a batch norm + ReLU (`norm::plane_grad_sums` of every plane),
/// taken image by image in a convolution's input-gradient epilogue, while the gradient is in
/// cache; `x` is the batch norm's input.
pub(crate) struct PlaneSums<'a> {
    x: &'a [f32],
    coefficients: &'a [(f32, f32)],
    stats: &'a BatchStats,
    /// `(c, h * w)`
    dims: (usize, usize),
    sums: Mutex<Vec<(f64, f64)>>,
}

impl<'a> PlaneSums<'a> {
    pub(crate) fn new(
        x: &'a [f32],
        coefficients: &'a [(f32, f32)],
        stats: &'a BatchStats,
        (c, hw): (usize, usize),
    ) -> Self {
        let images = x.len() / (c * hw).max(1);
        Self {
            x,
            coefficients,
            stats,
            dims: (c, hw),
            sums: Mutex::new(vec![(0.0, 0.0); images * c]),
        }
    }

    /// Takes the sums of image `image`, whose gradient is `g` (`c x h * w`).
    pub(crate) fn take(&self, image: usize, g: &[f32]) {
        let (c, hw) = self.dims;
        let x = &self.x[image * c * hw..(image + 1) * c * hw];
        let planes: Vec<(f64, f64)> = (0..c)
            .map(|ch| {
                let r = ch * hw..(ch + 1) * hw;
                let mean = self.stats.mean[ch] as f32;
                norm::plane_grad_sums((&g[r.clone()], &x[r]), self.coefficients[ch], mean, true)
            })
            .collect();
        let mut sums = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        sums[image * c..(image + 1) * c].copy_from_slice(&planes);
    }

    /// The sums of every plane, `[image * c + channel]`.
    pub(crate) fn into_sums(self) -> Vec<(f64, f64)> {
        self.sums.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

/// Back through a "same" 3x3 convolution `w` and the batch norm + ReLU before it, whose input was
/// `z`: from the convolution's output gradient `g`, the gradients of `z` and of the batch
/// norm's weight and bias, its first backward pass taken from each image's planes in the
/// convolution's input-gradient epilogue, while they are in cache.
pub(crate) fn conv_norm_relu_backward(
    d: &Dims,
    g: &[f32],
    w: &[f32],
    (z, affine, stats, eps): (&[f32], (&[f32], &[f32]), &BatchStats, f64),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (c, p) = (d.c, d.p());
    let coefficients = norm::coefficients(affine, stats, eps);
    let sums = PlaneSums::new(z, &coefficients, stats, (c, p));
    let take_sums = |image: usize, dy: &[f32]| sums.take(image, dy);
    let dy = conv::input_grad_same3x3(d, g, w, &take_sums);
    let sums = sums.into_sums();
    let backward = norm::Backward {
        dims: (d.n, c, p),
        affine,
        stats,
        eps,
        relu: true,
        precomputed: Some(&sums),
        residual: None,
        map_grad: None,
    };
    norm::train_backward(z, &dy, &backward)
}

/// `dst += src`, in parallel.
pub(crate) fn add_into(dst: &mut [f32], src: &[f32]) {
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            *d += *s;
        }
    });
}

/// Runs `f` on the f32 values of contiguous CPU tensors, `what[i]` naming tensor `i` in the
/// errors: how the kernels' backward passes read operands they get as tensors.
pub(crate) fn with_f32<R>(
    tensors: &[&Tensor],
    what: &[&str],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .zip(what)
        .map(|((storage, layout), what)| match &**storage {
            Storage::Cpu(s) => f32_slice(s, layout, what),
            _ => bail!("{what} is not on the CPU, where this kernel runs"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&slices)
}

pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("the residual-block kernel takes f32, got {:?} for {what}", storage.dtype())
    };
    crate::contiguous(data, layout, &format!("residual block: {what}"))
}

/// A block's output: conv1 of `relu(bn1(y0))` (read through bn1's input map, never stored) plus
/// the shortcut (the projection, or the block's input `x`), added to each image's output while it
/// is in cache.
///
/// `map`: where to write the output's attention map `mean_c out_c^2` (`[n, p]`), taken from each
/// image's output in the same epilogue.
fn conv1_plus_shortcut(
    d1: &Dims,
    (y0, bn1): (&[f32], &AffineRelu),
    w1: &[f32],
    projection: Option<&[f32]>,
    x: &[f32],
    map: Option<&Mutex<Vec<f32>>>,
) -> Result<Vec<f32>> {
    let per_image = d1.o * d1.p();
    let shortcut = match projection {
        Some(projection) => projection,
        None if d1.n * per_image == x.len() => x,
        None => bail!("a residual block without a projection must keep its input's shape"),
    };
    let scale = 1.0 / d1.o as f32;
    let add_shortcut = |image: usize, y: &mut [f32]| {
        for (y, s) in y.iter_mut().zip(&shortcut[image * per_image..(image + 1) * per_image]) {
            *y += *s;
        }
        if let Some(map) = map {
            let mut row = vec![0f32; d1.p()];
            for plane in y.chunks_exact(d1.p()) {
                row.iter_mut().zip(plane).for_each(|(m, &v)| *m += v * v);
            }
            let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
            let dst = &mut map[image * d1.p()..(image + 1) * d1.p()];
            dst.iter_mut().zip(&row).for_each(|(m, &v)| *m = v * scale);
        }
    };
    Ok(conv::forward_same3x3(d1, y0, w1, bn1, &add_shortcut))
}

/// One block's forward pass on `x` (`(n, c_in, h, w)`) with its parameters `p`: the output and
/// what the backward pass needs.
fn block_forward(
    spec: &Spec,
    eps: f64,
    x: &[f32],
    p: &[f32],
    (n, h, w): (usize, usize, usize),
) -> Result<(Vec<f32>, Saved)> {
    let o = &spec.offsets;
    let [d0, d1, dd] = conv_dims(o, spec.stride, (n, h, w))?;
    // conv0, with bn1's statistics taken from each image's output while it is in cache. It
    // reads relu(bn0(x)) through its input map, unless the projection needs it too (or conv0
    // is strided): then it is stored once.
    let (o1, stats0, (y0, stats1)) = if reads_x(o, &d0) {
        let stats0 = norm::batch_stats(x, (n, o.c_in, h * w));
        let bn0 = AffineRelu(norm::coefficients(o.bn0(p), &stats0, eps));
        (None, stats0, conv0_with_stats(&d0, x, &p[o.w0..o.g1], &bn0))
    } else {
        let (o1, stats0) = norm::train_forward(x, (n, o.c_in, h * w), o.bn0(p), eps, true);
        let conv0 = conv0_with_stats(&d0, &o1, &p[o.w0..o.g1], &conv::Plain);
        (Some(o1), stats0, conv0)
    };
    // conv1 reads relu(bn1(y0)) through its input map (bn1's output is never stored); the
    // shortcut is added to each image's output while it is in cache.
    let bn1 = AffineRelu(norm::coefficients(o.bn1(p), &stats1, eps));
    let projection = match (&o1, o.projection()) {
        (Some(o1), true) => Some(conv::forward(&dd, o1, &p[o.wd..])),
        _ => None,
    };
    let out =
        conv1_plus_shortcut(&d1, (&y0, &bn1), &p[o.w1..o.wd], projection.as_deref(), x, None)?;
    let stats = [stats0, stats1];
    Ok((out, Saved { input: None, dims: (n, h, w), o1, y0, stats }))
}

/// Whether the block's conv0 reads `relu(bn0(x))` from `x` through its input map (and
/// `o1` is not stored): no projection needs `o1`, and conv0 is a "same" 3x3.
fn reads_x(o: &Offsets, d0: &Dims) -> bool {
    !o.projection() && d0.same3x3()
}

/// One block's backward pass: the input's gradient, the parameters' gradients written into `dp`.
fn block_backward(
    spec: &Spec,
    eps: f64,
    (x, p, g): (&[f32], &[f32], &[f32]),
    saved: &Saved,
    dp: &mut [f32],
    map_grad: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let o = &spec.offsets;
    let Saved { o1, y0, stats, dims: (n, h, w), .. } = saved;
    let (n, h, w) = (*n, *h, *w);
    let [d0, d1, dd] = conv_dims(o, spec.stride, (n, h, w))?;

    // out = conv1(relu(bn1(y0))) + shortcut
    let bn1 = AffineRelu(norm::coefficients(o.bn1(p), &stats[1], eps));
    let dw1 = conv::weight_grad_same3x3(&d1, y0, g, &bn1);
    dp[o.w1..o.wd].copy_from_slice(&dw1);

    // conv1's input gradient, with the first pass of bn1's backward taken from each
    // image's planes while they are in cache.
    let (d_y0, dg1, db1) =
        conv_norm_relu_backward(&d1, g, &p[o.w1..o.wd], (y0, o.bn1(p), &stats[1], eps));
    dp[o.g1..o.g1 + o.c_out].copy_from_slice(&dg1);
    dp[o.g1 + o.c_out..o.w1].copy_from_slice(&db1);
    let dw0 = match o1 {
        Some(o1) => conv::weight_grad(&d0, o1, &d_y0),
        None => {
            let bn0 = AffineRelu(norm::coefficients(o.bn0(p), &stats[0], eps));
            conv::weight_grad_same3x3(&d0, x, &d_y0, &bn0)
        }
    };
    dp[o.w0..o.g1].copy_from_slice(&dw0);

    // conv0's input gradient; without a projection (which adds to it afterwards), with the
    // first pass of bn0's backward taken from each image while it is in cache.
    let (mut d_o1, bn0_sums) = if !o.projection() && d0.same3x3() {
        let bn0 = norm::coefficients(o.bn0(p), &stats[0], eps);
        let bn0_sums = PlaneSums::new(x, &bn0, &stats[0], (o.c_in, h * w));
        let take_sums = |image: usize, d_o1: &[f32]| bn0_sums.take(image, d_o1);
        let d_o1 = conv::input_grad_same3x3(&d0, &d_y0, &p[o.w0..o.g1], &take_sums);
        (d_o1, Some(bn0_sums.into_sums()))
    } else {
        (conv::input_grad(&d0, &d_y0, &p[o.w0..o.g1]), None)
    };
    drop(d_y0);
    if let (true, Some(o1)) = (o.projection(), o1) {
        dp[o.wd..].copy_from_slice(&conv::weight_grad(&dd, o1, g));
        add_into(&mut d_o1, &conv::input_grad(&dd, g, &p[o.wd..]));
    }
    let bn0_backward = norm::Backward {
        dims: (n, o.c_in, h * w),
        affine: o.bn0(p),
        stats: &stats[0],
        eps,
        relu: true,
        precomputed: bn0_sums.as_deref(),
        residual: (!o.projection()).then_some(g),
        map_grad,
    };
    let (dx, dg0, db0) = norm::train_backward(x, &d_o1, &bn0_backward);

    dp[..o.c_in].copy_from_slice(&dg0);
    dp[o.c_in..o.w0].copy_from_slice(&db0);
    Ok(dx)
}

impl CustomOp2 for Op {
    fn name(&self) -> &'static str {
        "at-preact-blocks"
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
            ref dims => bail!("a residual block needs [N, C, H, W], got {dims:?}"),
        };
        let first = &self.blocks[0].offsets;
        if c != first.c_in {
            bail!(
                "a residual block over {} channels got an input of shape {:?}",
                first.c_in,
                l1.dims()
            )
        }
        let x = f32_slice(s1, l1, "the input")?;
        let p = f32_slice(s2, l2, "the parameters")?;
        let last = self.blocks.last().expect("a group has blocks");
        if p.len() != last.start + last.offsets.total {
            bail!(
                "residual blocks take {} parameters, got {}",
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
            let d0 = conv_dims(&spec.offsets, spec.stride, (n, h, w))?[0];
            (h, w) = (d0.ho, d0.wo);
            saved.push(block);
            current = Some(out);
        }
        let stats = saved.iter().map(|s| s.stats.clone()).collect();
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        let out = current.expect("a group has blocks");
        Ok((CpuStorage::F32(out), Shape::from((n, last.offsets.c_out, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if crate::second_order::is_second_order_thread() {
            bail!(
                "the fused residual block is not twice differentiable; build the block from \
                 separate ops on a second-order thread (preact_block_train returns None there)"
            )
        }
        let (n, c, h, w) = x.dims4()?;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(saved) = saved.as_ref() else {
            bail!("the residual block's backward ran before its forward")
        };
        let map_grad = self.map_grad.as_ref().map(|m| m.take((n, c, h, w))).transpose()?.flatten();
        let what = ["the input", "the parameters", "the output gradient"];
        let (dx, dp) = with_f32(&[x, params, &g], &what, |operands| {
            let &[x, p, g] = operands else { unreachable!("three operands") };
            let mut dp = vec![0f32; p.len()];
            let mut grad: Option<Vec<f32>> = None;
            for (i, (spec, block)) in self.blocks.iter().zip(saved).enumerate().rev() {
                let range = spec.start..spec.start + spec.offsets.total;
                let input = block.input.as_deref().unwrap_or(x);
                let g = grad.as_deref().unwrap_or(g);
                let dx = block_backward(
                    spec,
                    self.eps,
                    (input, &p[range.clone()], g),
                    block,
                    &mut dp[range],
                    if i == 0 { map_grad.as_deref() } else { None },
                )?;
                grad = Some(dx);
            }
            Ok((grad.expect("a group has blocks"), dp))
        })?;
        let (device, len) = (params.device(), dp.len());
        Ok((
            Some(Tensor::from_vec(dx, (n, c, h, w), device)?),
            Some(Tensor::from_vec(dp, len, device)?),
        ))
    }
}

/// One training-mode pre-activation block (batch statistics) on `x` (`[N, C, H, W]`): the output
/// and the two batch norms' statistics (for their running averages). `None` where the kernel does
/// not apply (not f32 on the CPU, or a thread with
/// second-order gradients), so that the caller builds the block from separate ops.
pub fn preact_block_train(
    x: &Tensor,
    block: &PreactBlock,
) -> Result<Option<(Tensor, [BatchStats; 2])>> {
    let fused = preact_blocks_train(x, std::slice::from_ref(block))?;
    Ok(fused.map(|(y, mut stats)| (y, stats.remove(0))))
}

/// Consecutive training-mode pre-activation blocks (a WRN group) as one op: the output of the
/// last and each block's two batch-norm statistics. One op instead of one per block saves
/// candle's zero-and-add of a gradient between every two blocks. `None` where the kernel does not
/// apply (as [`preact_block_train`]).
pub fn preact_blocks_train(
    x: &Tensor,
    blocks: &[PreactBlock],
) -> Result<Option<(Tensor, Vec<[BatchStats; 2]>)>> {
    preact_blocks_train_with(x, blocks, None)
}

/// [`preact_blocks_train`] whose backward also takes the gradient that attention maps of `x`
/// made by [`channel_power_deferred`](crate::attention::channel_power_deferred) with
/// `map_grad` left, and adds it to `x`'s gradient in the same pass.
pub fn preact_blocks_train_with(
    x: &Tensor,
    blocks: &[PreactBlock],
    map_grad: Option<&MapGradient>,
) -> Result<Option<(Tensor, Vec<[BatchStats; 2]>)>> {
    let Some(first) = blocks.first() else { bail!("preact_blocks_train needs at least one block") };
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
                "a block with {} input channels follows one with {previous} outputs",
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
    let op = Op {
        blocks: specs,
        eps,
        saved: Mutex::new(None),
        stats: stats.clone(),
        map_grad: map_grad.cloned(),
    };
    let y = x.contiguous()?.apply_op2(&params, op)?;
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(Some((y, stats.expect("the forward pass stored its statistics"))))
}

/// An evaluation-mode block (running statistics), forward only: the flat parameters are the
/// block's, then bn0's running mean and variance, then bn1's.
struct EvalOp {
    spec: Spec,
    eps: f64,
    /// Where the output's attention map goes, when asked for.
    map: Option<Arc<Mutex<Vec<f32>>>>,
}

impl CustomOp2 for EvalOp {
    fn name(&self) -> &'static str {
        "at-preact-block-eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let o = &self.spec.offsets;
        let (n, h, w) = match *l1.dims() {
            [n, c, h, w] if c == o.c_in => (n, h, w),
            ref dims => bail!("a residual block over {} channels got {dims:?}", o.c_in),
        };
        let x = f32_slice(s1, l1, "the input")?;
        let all = f32_slice(s2, l2, "the parameters")?;
        if all.len() != o.total + 2 * (o.c_in + o.c_out) {
            bail!("an evaluation block takes {} parameters", o.total + 2 * (o.c_in + o.c_out))
        }
        let (p, running) = all.split_at(o.total);
        let (running0, running1) = running.split_at(2 * o.c_in);
        let stats = |r: &[f32], c: usize| BatchStats {
            mean: r[..c].iter().map(|&v| v as f64).collect(),
            var: r[c..].iter().map(|&v| v as f64).collect(),
            count: n * h * w,
        };
        let (stats0, stats1) = (stats(running0, o.c_in), stats(running1, o.c_out));
        let bn1 = AffineRelu(norm::coefficients(o.bn1(p), &stats1, self.eps));
        let [d0, d1, dd] = conv_dims(o, self.spec.stride, (n, h, w))?;
        // conv0 reads relu(bn0(x)) through its input map, unless the projection needs it too
        // (or conv0 is strided): then it is stored once.
        let (y0, projection) = if !reads_x(o, &d0) {
            let o1 = norm::normalize_with(x, (o.c_in, h * w), o.bn0(p), &stats0, self.eps, true);
            let y0 = conv::forward(&d0, &o1, &p[o.w0..o.g1]);
            (y0, o.projection().then(|| conv::forward(&dd, &o1, &p[o.wd..])))
        } else {
            let bn0 = AffineRelu(norm::coefficients(o.bn0(p), &stats0, self.eps));
            (conv::forward_same3x3(&d0, x, &p[o.w0..o.g1], &bn0, &|_, _| {}), None)
        };
        if let Some(map) = &self.map {
            *map.lock().unwrap_or_else(|e| e.into_inner()) = vec![0f32; n * d1.p()];
        }
        let projection = projection.as_deref();
        let map = self.map.as_deref();
        let out = conv1_plus_shortcut(&d1, (&y0, &bn1), &p[o.w1..o.wd], projection, x, map)?;
        Ok((CpuStorage::F32(out), Shape::from((n, o.c_out, d1.ho, d1.wo))))
    }
}

/// One evaluation-mode pre-activation block (batch norms with their running statistics,
/// `running[i] = (mean, var)` of bn`i`) on `x` (`[N, C, H, W]`), forward only: conv0 and conv1
/// read their batch norm + ReLU through their input maps, and the shortcut is added in conv1's
/// epilogue, so neither normalised activation is stored. `None` where it does not apply: not
/// f32 on the CPU, or any operand tracked for
/// gradients (a teacher's input gradient, a student's weights), where the caller builds the
/// block from differentiable ops.
pub fn preact_block_eval(
    x: &Tensor,
    block: &PreactBlock,
    running: [(&Tensor, &Tensor); 2],
) -> Result<Option<Tensor>> {
    Ok(eval(x, block, running, false)?.map(|(y, _)| y))
}

/// [`preact_block_eval`] and the output's attention map `mean_c y_c^2` (`[N, H, W]`, at-ops'
/// default map before normalisation), taken from each image's output while it is in cache:
/// a teacher's group output and its map in one pass.
pub fn preact_block_eval_map(
    x: &Tensor,
    block: &PreactBlock,
    running: [(&Tensor, &Tensor); 2],
) -> Result<Option<(Tensor, Tensor)>> {
    let Some((y, map)) = eval(x, block, running, true)? else { return Ok(None) };
    Ok(Some((y, map.expect("the map was asked for"))))
}

fn eval(
    x: &Tensor,
    block: &PreactBlock,
    running: [(&Tensor, &Tensor); 2],
    with_map: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let mut operands = weights(block);
    operands.extend([running[0].0, running[0].1, running[1].0, running[1].1]);
    let applies = x.device().is_cpu()
        && x.rank() == 4
        && x.dtype() == DType::F32
        && operands.iter().all(|t| t.dtype() == DType::F32 && !t.track_op())
        && !x.track_op();
    if !applies {
        return Ok(None);
    }
    let offsets = check(block)?;
    for (i, (mean, var)) in running.iter().enumerate() {
        let c = if i == 0 { offsets.c_in } else { offsets.c_out };
        if mean.elem_count() != c || var.elem_count() != c {
            bail!("bn{i}'s running statistics must have {c} channels")
        }
    }
    let parts = operands.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?;
    let params = Tensor::cat(&parts, 0)?;
    let map = with_map.then(|| Arc::new(Mutex::new(vec![])));
    let spec = Spec { offsets, stride: block.stride, start: 0 };
    let op = EvalOp { spec, eps: block.eps, map: map.clone() };
    let y = x.contiguous()?.apply_op2_no_bwd(&params, &op)?;
    let map = match map {
        Some(map) => {
            let (n, _, h, w) = y.dims4()?;
            let values = std::mem::take(&mut *map.lock().unwrap_or_else(|e| e.into_inner()));
            Some(Tensor::from_vec(values, (n, h, w), y.device())?)
        }
        None => None,
    };
    Ok(Some((y, map)))
}

/// A block's tensors in the order of the flat parameters.
fn weights<'a>(b: &PreactBlock<'a>) -> Vec<&'a Tensor> {
    let mut w = vec![b.bn0.0, b.bn0.1, b.conv0, b.bn1.0, b.bn1.1, b.conv1];
    w.extend(b.convdim);
    w
}

/// A block's shapes, checked: its parameters' offsets.
fn check(block: &PreactBlock) -> Result<Offsets> {
    let (c_out, c_in, kh, kw) = block.conv0.dims4()?;
    if (kh, kw) != (3, 3) || block.conv1.dims4()? != (c_out, c_out, 3, 3) {
        bail!(
            "a residual block has 3x3 convolutions, got {:?} and {:?}",
            block.conv0.dims(),
            block.conv1.dims()
        )
    }
    if let Some(convdim) = block.convdim
        && convdim.dims4()? != (c_out, c_in, 1, 1)
    {
        bail!(
            "a residual block's projection must be [{c_out}, {c_in}, 1, 1], got {:?}",
            convdim.dims()
        )
    }
    let norms = [block.bn0.0, block.bn0.1, block.bn1.0, block.bn1.1].map(|t| t.elem_count());
    if norms != [c_in, c_in, c_out, c_out] {
        bail!("a residual block's batch norms must have {c_in} and {c_out} channels, got {norms:?}")
    }
    Ok(Offsets::new(c_in, c_out, block.convdim.is_some()))
}
