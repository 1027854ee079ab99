//! The pre-activation residual block of a wide residual network, in training mode, as one candle
//! custom op with a hand-written backward pass.
//!
//! A block computes `o1 = relu(bn0(x))`, `o2 = relu(bn1(conv0(o1)))` and returns
//! `conv1(o2) + convdim(o1)` (or `+ x` when the width does not change). Built from separate ops,
//! candle's backward pass gives every edge of the graph a zero tensor and then adds the edge's
//! gradient into it: six activation-sized allocations, fills and additions per block, about a
//! sixth of a WRN training step on the CPU. As one op the block has one such edge (its input);
//! inside, each gradient is written once. The parameters enter as one flat tensor (their
//! concatenation, which costs a copy of the weights per step).
//!
//! The backward builds no graph, so the op is used only where candle detaches gradients: on a
//! thread with second-order gradients switched on, [`preact_block_train`] returns `None` and the
//! caller builds the block from differentiable ops.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

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

/// What the backward pass needs beyond the op's operands.
struct Saved {
    /// `relu(bn0(x))`, the input of conv0 and of the projection.
    o1: Vec<f32>,
    /// `conv0(o1)`; conv1's input `relu(bn1(y0))` is recomputed from it.
    y0: Vec<f32>,
    stats: [BatchStats; 2],
}

struct Op {
    offsets: Offsets,
    stride: usize,
    eps: f64,
    saved: Mutex<Option<Saved>>,
    stats: Arc<Mutex<Option<[BatchStats; 2]>>>,
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
struct AffineRelu(Vec<(f32, f32)>);

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
fn conv0_with_stats(d: &Dims, x: &[f32], w: &[f32]) -> (Vec<f32>, BatchStats) {
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
    let y = conv::forward_same3x3(d, x, w, &conv::Plain, &take_moments);
    let moments = moments.into_inner().unwrap_or_else(|e| e.into_inner());
    (y, norm::stats_from_moments(&moments, (n, c, p)))
}

/// The first backward pass of a batch norm + ReLU (`norm::plane_grad_sums` of every plane),
/// taken image by image in a convolution's input-gradient epilogue, while the gradient is in
/// cache; `x` is the batch norm's input.
struct PlaneSums<'a> {
    x: &'a [f32],
    coefficients: &'a [(f32, f32)],
    stats: &'a BatchStats,
    /// `(c, h * w)`
    dims: (usize, usize),
    sums: Mutex<Vec<(f64, f64)>>,
}

impl<'a> PlaneSums<'a> {
    fn new(
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
    fn take(&self, image: usize, g: &[f32]) {
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
    fn into_sums(self) -> Vec<(f64, f64)> {
        self.sums.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

/// `dst += src`, in parallel.
fn add_into(dst: &mut [f32], src: &[f32]) {
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            *d += *s;
        }
    });
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("the residual-block kernel takes f32, got {:?} for {what}", storage.dtype())
    };
    crate::contiguous(data, layout, &format!("residual block: {what}"))
}

impl CustomOp2 for Op {
    fn name(&self) -> &'static str {
        "at-preact-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let o = &self.offsets;
        let (n, c, h, w) = match *l1.dims() {
            [n, c, h, w] => (n, c, h, w),
            ref dims => bail!("a residual block needs [N, C, H, W], got {dims:?}"),
        };
        if c != o.c_in {
            bail!("a residual block over {} channels got an input of shape {:?}", o.c_in, l1.dims())
        }
        let x = f32_slice(s1, l1, "the input")?;
        let p = f32_slice(s2, l2, "the parameters")?;
        if p.len() != o.total {
            bail!("a residual block takes {} parameters, got {}", o.total, p.len())
        }
        let [d0, d1, dd] = conv_dims(o, self.stride, (n, h, w))?;
        let (o1, stats0) = norm::train_forward(
            x,
            (n, o.c_in, h * w),
            (&p[..o.c_in], &p[o.c_in..o.w0]),
            self.eps,
            true,
        );

        // conv0, with bn1's statistics taken from each image's output while it is in cache.
        let (y0, stats1) = conv0_with_stats(&d0, &o1, &p[o.w0..o.g1]);
        // conv1 reads relu(bn1(y0)) through its input map (bn1's output is never stored); the
        // shortcut is added to each image's output while it is in cache.
        let bn1 = AffineRelu(norm::coefficients(o.bn1(p), &stats1, self.eps));
        let projection = match o.projection() {
            true => Some(conv::forward(&dd, &o1, &p[o.wd..])),
            false if n * o.c_out * d1.p() == x.len() => None,
            false => bail!("a residual block without a projection must keep its input's shape"),
        };
        let shortcut = projection.as_deref().unwrap_or(x);
        let per_image = o.c_out * d1.p();
        let add_shortcut = |image: usize, y: &mut [f32]| {
            for (y, s) in y.iter_mut().zip(&shortcut[image * per_image..(image + 1) * per_image]) {
                *y += *s;
            }
        };
        let out = conv::forward_same3x3(&d1, &y0, &p[o.w1..o.wd], &bn1, &add_shortcut);
        let stats = [stats0, stats1];
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats.clone());
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved { o1, y0, stats });
        Ok((CpuStorage::F32(out), Shape::from((n, o.c_out, d0.ho, d0.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if crate::second_order_thread() {
            bail!(
                "the fused residual block is not twice differentiable; build the block from \
                 separate ops on a second-order thread (preact_block_train returns None there)"
            )
        }
        let o = &self.offsets;
        let (n, _, h, w) = x.dims4()?;
        let [d0, d1, dd] = conv_dims(o, self.stride, (n, h, w))?;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = params.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ps), Storage::Cpu(gs)) = (&*xs, &*ps, &*gs) else {
            bail!("the residual-block kernel's backward runs on the CPU")
        };
        let x = f32_slice(xs, xl, "the input")?;
        let p = f32_slice(ps, pl, "the parameters")?;
        let g = f32_slice(gs, gl, "the output gradient")?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Saved { o1, y0, stats }) = saved.as_ref() else {
            bail!("the residual block's backward ran before its forward")
        };
        let mut dp = vec![0f32; o.total];

        // out = conv1(relu(bn1(y0))) + shortcut
        let bn1 = AffineRelu(norm::coefficients(o.bn1(p), &stats[1], self.eps));
        let dw1 = conv::weight_grad_same3x3(&d1, y0, g, &bn1);
        dp[o.w1..o.wd].copy_from_slice(&dw1);

        // conv1's input gradient, with the first pass of bn1's backward taken from each
        // image's planes while they are in cache.
        let bn1_sums = PlaneSums::new(y0, &bn1.0, &stats[1], (o.c_out, d0.p()));
        let take_sums = |image: usize, d_o2: &[f32]| bn1_sums.take(image, d_o2);
        let d_o2 = conv::input_grad_same3x3(&d1, g, &p[o.w1..o.wd], &take_sums);
        let bn1_sums = bn1_sums.into_sums();
        let (d_y0, dg1, db1) = norm::train_backward(
            (y0, &d_o2, None),
            (n, o.c_out, d0.p()),
            o.bn1(p),
            &stats[1],
            self.eps,
            true,
            Some(&bn1_sums),
        );
        drop(d_o2);
        dp[o.g1..o.g1 + o.c_out].copy_from_slice(&dg1);
        dp[o.g1 + o.c_out..o.w1].copy_from_slice(&db1);
        dp[o.w0..o.g1].copy_from_slice(&conv::weight_grad(&d0, o1, &d_y0));

        // conv0's input gradient; without a projection (which adds to it afterwards), with the
        // first pass of bn0's backward taken from each image while it is in cache.
        let bn0 = norm::coefficients(o.bn0(p), &stats[0], self.eps);
        let bn0_sums = PlaneSums::new(x, &bn0, &stats[0], (o.c_in, h * w));
        let fused_sums = !o.projection() && d0.same3x3();
        let mut d_o1 = if fused_sums {
            let take_sums = |image: usize, d_o1: &[f32]| bn0_sums.take(image, d_o1);
            conv::input_grad_same3x3(&d0, &d_y0, &p[o.w0..o.g1], &take_sums)
        } else {
            conv::input_grad(&d0, &d_y0, &p[o.w0..o.g1])
        };
        let bn0_sums = fused_sums.then(|| bn0_sums.into_sums());
        drop(d_y0);
        if o.projection() {
            dp[o.wd..].copy_from_slice(&conv::weight_grad(&dd, o1, g));
            add_into(&mut d_o1, &conv::input_grad(&dd, g, &p[o.wd..]));
        }
        let (dx, dg0, db0) = norm::train_backward(
            (x, &d_o1, (!o.projection()).then_some(g)),
            (n, o.c_in, h * w),
            o.bn0(p),
            &stats[0],
            self.eps,
            true,
            bn0_sums.as_deref(),
        );

        dp[..o.c_in].copy_from_slice(&dg0);
        dp[o.c_in..o.w0].copy_from_slice(&db0);
        let device = params.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, o.c_in, h, w), device)?),
            Some(Tensor::from_vec(dp, o.total, device)?),
        ))
    }
}

/// One training-mode pre-activation block (batch statistics) on `x` (`[N, C, H, W]`): the output
/// and the two batch norms' statistics (for their running averages). `None` where the kernel does
/// not apply (not f32 on the CPU, [`set_reference`](crate::set_reference), or a thread with
/// second-order gradients), so that the caller builds the block from separate ops.
pub fn preact_block_train(
    x: &Tensor,
    block: &PreactBlock,
) -> Result<Option<(Tensor, [BatchStats; 2])>> {
    let weights = [block.bn0.0, block.bn0.1, block.conv0, block.bn1.0, block.bn1.1, block.conv1];
    let applies = x.device().is_cpu()
        && x.rank() == 4
        && x.dtype() == DType::F32
        && weights.iter().chain(block.convdim.iter()).all(|t| t.dtype() == DType::F32)
        && !crate::reference()
        && !crate::second_order_thread();
    if !applies {
        return Ok(None);
    }
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
    let offsets = Offsets::new(c_in, c_out, block.convdim.is_some());
    let mut parts: Vec<Tensor> = weights.iter().map(|t| t.flatten_all()).collect::<Result<_>>()?;
    if let Some(convdim) = block.convdim {
        parts.push(convdim.flatten_all()?);
    }
    let norms = [block.bn0.0, block.bn0.1, block.bn1.0, block.bn1.1].map(|t| t.elem_count());
    if norms != [c_in, c_in, c_out, c_out] {
        bail!("a residual block's batch norms must have {c_in} and {c_out} channels, got {norms:?}")
    }
    let params = Tensor::cat(&parts, 0)?;
    let stats = Arc::new(Mutex::new(None));
    let op = Op {
        offsets,
        stride: block.stride,
        eps: block.eps,
        saved: Mutex::new(None),
        stats: stats.clone(),
    };
    let y = x.contiguous()?.apply_op2(&params, op)?;
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(Some((y, stats.expect("the forward pass stored its statistics"))))
}
