//! Training-mode batch normalisation over `[N, C, H, W]`, optionally followed by a ReLU, as one
//! candle custom op: per-channel statistics in one pass, the output in another, and a backward
//! pass that computes all three gradients in two passes, instead of candle's broadcast ops whose
//! gradients reduce over non-trailing dimensions element by element.
//!
//! The fast backward builds no graph, so it is used only where candle detaches gradients anyway.
//! On a thread with second-order gradients switched on (double backpropagation) the backward is
//! written with candle's own differentiable ops instead, from the same formulas.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use crate::attention::MapGradient;

/// The statistics of the batch a [`batch_norm_train`] call normalised with.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchStats {
    /// Per-channel mean.
    pub mean: Vec<f64>,
    /// Per-channel biased variance (what the normalisation divides by).
    pub var: Vec<f64>,
    /// Values per channel (`N * H * W`).
    pub count: usize,
}

struct Op {
    eps: f64,
    relu: bool,
    stats: Arc<Mutex<Option<BatchStats>>>,
    /// An attention map's gradient for the input, added to the input's gradient.
    map_grad: Option<MapGradient>,
}

fn shape4(layout: &Layout) -> Result<(usize, usize, usize)> {
    match *layout.dims() {
        [n, c, h, w] => Ok((n, c, h * w)),
        ref dims => bail!("batch norm needs [N, C, H, W], got {dims:?}"),
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    crate::contiguous(data, layout, "batch norm: operands")
}

/// The operands of a batch-norm op as f32 slices, with their sizes.
struct Operands<'a> {
    /// `(n, c, h * w)`
    dims: (usize, usize, usize),
    x: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
}

fn operands<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> Result<Operands<'a>> {
    let (n, c, hw) = shape4(l1)?;
    let (CpuStorage::F32(x), CpuStorage::F32(gamma), CpuStorage::F32(beta)) = (s1, s2, s3) else {
        bail!("the batch-norm kernel takes f32, got {:?}", s1.dtype())
    };
    let (x, gamma, beta) = (contiguous(x, l1)?, contiguous(gamma, l2)?, contiguous(beta, l3)?);
    if gamma.len() != c || beta.len() != c {
        bail!("batch norm over {c} channels got {} weights and {} biases", gamma.len(), beta.len())
    }
    Ok(Operands { dims: (n, c, hw), x, gamma, beta })
}

/// `relu?(gamma * (x - mean) * invstd + beta)`, channel by channel, planes in parallel: the
/// forward pass of both ops, with the batch's statistics or the running ones.
fn normalize(
    x: &[f32],
    (c, hw): (usize, usize),
    (gamma, beta): (&[f32], &[f32]),
    (mean, invstd): (&[f64], &[f64]),
    relu: bool,
) -> Vec<f32> {
    let plane = |_: &mut (), plane: usize, y: &mut [MaybeUninit<f32>]| {
        let x = &x[plane * hw..(plane + 1) * hw];
        let (a, b) = affine((gamma, beta), (mean, invstd), plane % c);
        crate::write_each(y, |i| {
            let v = x[i] * a + b;
            if relu { v.max(0.0) } else { v }
        });
    };
    // SAFETY: `plane` writes its whole chunk.
    unsafe { crate::par_chunks_uninit(x.len(), hw, || (), plane) }
}

/// Lanes of the vectorisable reductions below (f32 sums in independent lanes, so that the
/// compiler can keep them in SIMD registers; lanes and planes are then added in f64).
const LANES: usize = 16;

/// `(sum f(a, b, c), sum g(a, b, c))` over three planes of equal length, in `LANES`
/// independent f32 accumulators (fixed-size chunks, so the loop vectorises), added up in f64.
#[inline(always)]
fn lane_sums(
    (a, b, c): (&[f32], &[f32], &[f32]),
    f: impl Fn(f32, f32, f32) -> f32,
    g: impl Fn(f32, f32, f32) -> f32,
) -> (f64, f64) {
    let (mut s, mut t) = ([0f32; LANES], [0f32; LANES]);
    let chunks = a.chunks_exact(LANES).zip(b.chunks_exact(LANES)).zip(c.chunks_exact(LANES));
    for ((a, b), c) in chunks {
        let a: &[f32; LANES] = a.try_into().expect("exact chunks");
        let b: &[f32; LANES] = b.try_into().expect("exact chunks");
        let c: &[f32; LANES] = c.try_into().expect("exact chunks");
        for l in 0..LANES {
            s[l] += f(a[l], b[l], c[l]);
            t[l] += g(a[l], b[l], c[l]);
        }
    }
    let full = a.len() / LANES * LANES;
    let (mut s_tail, mut t_tail) = (0f64, 0f64);
    for i in full..a.len() {
        s_tail += f(a[i], b[i], c[i]) as f64;
        t_tail += g(a[i], b[i], c[i]) as f64;
    }
    let sum = |v: [f32; LANES]| v.iter().map(|&x| x as f64).sum::<f64>();
    (sum(s) + s_tail, sum(t) + t_tail)
}

/// One plane's mean and sum of squared deviations (two passes over the plane, which stays in
/// cache), in f64.
pub(crate) fn plane_moments(p: &[f32]) -> (f64, f64) {
    let hw = p.len() as f64;
    let mean = lane_sums((p, p, p), |x, _, _| x, |_, _, _| 0.0).0 / hw;
    let m = mean as f32;
    let m2 = lane_sums((p, p, p), |x, _, _| (x - m) * (x - m), |_, _, _| 0.0).0;
    // The deviations were taken from m, not from the exact plane mean.
    let shift = mean - m as f64;
    (mean, (m2 - hw * shift * shift).max(0.0))
}

/// The batch statistics of one channel from its planes' [`plane_moments`] (in image order),
/// merged in f64 with Chan et al.'s pairwise update; each plane holds `hw` values.
fn merge_moments(planes: impl Iterator<Item = (f64, f64)>, hw: usize) -> (f64, f64) {
    let (mut count, mut mean, mut m2) = (0f64, 0f64, 0f64);
    let hw = hw as f64;
    for (plane_mean, plane_m2) in planes {
        let total = count + hw;
        let delta = plane_mean - mean;
        mean += delta * hw / total;
        m2 += plane_m2 + delta * delta * count * hw / total;
        count = total;
    }
    (mean, m2 / count.max(1.0))
}

/// Per-channel mean and biased variance, channels in parallel, in one pass over `x`.
fn stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes =
                (0..n).map(|i| plane_moments(&x[(i * c + ch) * hw..(i * c + ch + 1) * hw]));
            merge_moments(planes, hw)
        })
        .unzip()
}

/// The batch statistics of an `(n, c, hw)` activation, as [`train_forward`] takes them.
pub(crate) fn batch_stats(x: &[f32], (n, c, hw): (usize, usize, usize)) -> BatchStats {
    let (mean, var) = stats(x, n, c, hw);
    BatchStats { mean, var, count: n * hw }
}

/// The batch statistics of an `(n, c, hw)` activation from the [`plane_moments`] of its planes
/// (`moments[i * c + ch]`), the same numbers [`train_forward`] computes from the activation.
pub(crate) fn stats_from_moments(
    moments: &[(f64, f64)],
    (n, c, hw): (usize, usize, usize),
) -> BatchStats {
    let (mean, var) =
        (0..c).map(|ch| merge_moments((0..n).map(|i| moments[i * c + ch]), hw)).unzip();
    BatchStats { mean, var, count: n * hw }
}

/// Per channel, the `(scale, shift)` of a ReLU'd batch norm with these statistics: the output
/// is `relu(x * scale + shift)`, exactly as [`train_forward`] computes it.
pub(crate) fn coefficients(
    (gamma, beta): (&[f32], &[f32]),
    stats: &BatchStats,
    eps: f64,
) -> Vec<(f32, f32)> {
    let invstd = invstd(&stats.var, eps);
    (0..gamma.len()).map(|ch| affine((gamma, beta), (&stats.mean, &invstd), ch)).collect()
}

/// `1 / sqrt(var + eps)` per channel.
fn invstd(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

/// The per-channel `(scale, shift)` of the normalisation, `y = x * scale + shift`, in f32: the
/// forward pass computes the output, the backward pass the ReLU mask, from the same numbers.
fn affine(
    (gamma, beta): (&[f32], &[f32]),
    (mean, invstd): (&[f64], &[f64]),
    ch: usize,
) -> (f32, f32) {
    let scale = gamma[ch] as f64 * invstd[ch];
    (scale as f32, (beta[ch] as f64 - mean[ch] * scale) as f32)
}

/// Training-mode batch norm (then a ReLU when `relu`) of `x` (`(n, c, h * w)`, contiguous):
/// the output and the batch's statistics.
pub(crate) fn train_forward(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    (gamma, beta): (&[f32], &[f32]),
    eps: f64,
    relu: bool,
) -> (Vec<f32>, BatchStats) {
    let stats = batch_stats(x, (n, c, hw));
    let y = normalize_with(x, (c, hw), (gamma, beta), &stats, eps, relu);
    (y, stats)
}

/// The batch norm's output (+ ReLU) with these statistics: the batch's in training, the running
/// ones in evaluation.
pub(crate) fn normalize_with(
    x: &[f32],
    (c, hw): (usize, usize),
    (gamma, beta): (&[f32], &[f32]),
    stats: &BatchStats,
    eps: f64,
    relu: bool,
) -> Vec<f32> {
    normalize(x, (c, hw), (gamma, beta), (&stats.mean, &invstd(&stats.var, eps)), relu)
}

/// The incoming gradient where the ReLU (if any) passed it: where `x * a + b > 0`.
#[inline(always)]
fn masked(g: f32, x: f32, (a, b): (f32, f32), relu: bool) -> f32 {
    if !relu || x * a + b > 0.0 { g } else { 0.0 }
}

/// Over one plane of the output gradient `g` and the input `x`: the sum of the masked gradient,
/// and of it times `x - mean` (`ab`: the channel's [`coefficients`]). The first pass of
/// [`train_backward`], which a kernel can run where the plane is in cache.
pub(crate) fn plane_grad_sums(
    (g, x): (&[f32], &[f32]),
    ab: (f32, f32),
    mean: f32,
    relu: bool,
) -> (f64, f64) {
    lane_sums(
        (g, x, x),
        |g, x, _| masked(g, x, ab, relu),
        |g, x, _| masked(g, x, ab, relu) * (x - mean),
    )
}

/// What [`train_backward`] needs besides the input and the output's gradient.
pub(crate) struct Backward<'a> {
    /// `(n, c, h * w)` of the input.
    pub(crate) dims: (usize, usize, usize),
    /// Gamma and beta.
    pub(crate) affine: (&'a [f32], &'a [f32]),
    /// The forward pass's batch statistics.
    pub(crate) stats: &'a BatchStats,
    /// The variance epsilon.
    pub(crate) eps: f64,
    /// Whether a ReLU followed the normalisation.
    pub(crate) relu: bool,
    /// The first pass's [`plane_grad_sums`] of every plane (`[i * c + ch]`), if a kernel took
    /// them already.
    pub(crate) precomputed: Option<&'a [(f64, f64)]>,
    /// A residual gradient added to `dx` in the same pass (the identity shortcut of a residual
    /// block), `[n, c, hw]`.
    pub(crate) residual: Option<&'a [f32]>,
    /// An attention map's gradient (`[n, hw]`), already times `2 * scale`, whose term
    /// `map_grad * x` (broadcast over channels) is added in the same pass (see
    /// [`crate::attention::MapGradient`]).
    pub(crate) map_grad: Option<&'a [f32]>,
}

/// The gradients `(dx, dgamma, dbeta)` of [`train_forward`] from its input `x` and the output's
/// gradient `g`, in two passes (the ReLU mask is recomputed from `x`); the rest is in `b`.
pub(crate) fn train_backward(x: &[f32], g: &[f32], b: &Backward) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Backward {
        dims: (n, c, hw),
        affine: (gamma, beta),
        stats,
        eps,
        relu,
        precomputed,
        residual,
        map_grad,
    } = *b;
    let invstd = invstd(&stats.var, eps);
    let coefficients = |ch| affine((gamma, beta), (&stats.mean, &invstd), ch);
    // Per channel: sum of the masked gradient, and of it times x-hat, from the planes' sums in
    // image order.
    let plane_sums = |ch: usize, i: usize| match precomputed {
        Some(sums) => sums[i * c + ch],
        None => {
            let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
            let mean = stats.mean[ch] as f32;
            plane_grad_sums((&g[r.clone()], &x[r]), coefficients(ch), mean, relu)
        }
    };
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut sg, mut sgx) = (0f64, 0f64);
            for i in 0..n {
                let (a, b) = plane_sums(ch, i);
                sg += a;
                sgx += b;
            }
            // sum g * (x - mean) * invstd
            (sg, sgx * invstd[ch])
        })
        .collect();
    let m = stats.count as f64;
    let plane = |_: &mut (), plane: usize, dx: &mut [MaybeUninit<f32>]| {
        let ch = plane % c;
        let (sg, sgxhat) = sums[ch];
        let k = gamma[ch] as f64 * invstd[ch];
        // dx = k * (g - sg/m - xhat * sgxhat/m)
        let a = k as f32;
        let b = (k * sg / m) as f32;
        let cx = (k * sgxhat / m * invstd[ch]) as f32;
        let mean = stats.mean[ch] as f32;
        let ab = coefficients(ch);
        let masked = |g: f32, x: f32| masked(g, x, ab, relu);
        let (g, x) = (&g[plane * hw..(plane + 1) * hw], &x[plane * hw..(plane + 1) * hw]);
        let core = |i: usize| a * masked(g[i], x[i]) - b - cx * (x[i] - mean);
        let image = plane / c;
        match (residual, map_grad) {
            (None, None) => crate::write_each(dx, core),
            (Some(r), None) => {
                let r = &r[plane * hw..(plane + 1) * hw];
                crate::write_each(dx, |i| core(i) + r[i])
            }
            (None, Some(m)) => {
                let m = &m[image * hw..(image + 1) * hw];
                crate::write_each(dx, |i| core(i) + m[i] * x[i])
            }
            (Some(r), Some(m)) => {
                let (r, m) = (&r[plane * hw..(plane + 1) * hw], &m[image * hw..(image + 1) * hw]);
                crate::write_each(dx, |i| core(i) + r[i] + m[i] * x[i])
            }
        }
    };
    // SAFETY: `plane` writes its whole chunk.
    let dx = unsafe { crate::par_chunks_uninit(x.len(), hw, || (), plane) };
    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    (dx, dgamma, dbeta)
}

impl CustomOp3 for Op {
    fn name(&self) -> &'static str {
        if self.relu { "at-batch-norm-relu" } else { "at-batch-norm" }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Operands { dims, x, gamma, beta } = operands((s1, l1), (s2, l2), (s3, l3))?;
        let (y, stats) = train_forward(x, dims, (gamma, beta), self.eps, self.relu);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let hw = h * w;
        let map_grad = self.map_grad.as_ref().map(|m| m.take((n, c, h, w))).transpose()?.flatten();
        if crate::second_order::is_second_order_thread() {
            let (mut dx, dgamma, dbeta) = self.composite_bwd(x, gamma, beta, y, g)?;
            if let Some(m) = map_grad {
                let m = Tensor::from_vec(m, (n, 1, h, w), x.device())?.to_dtype(x.dtype())?;
                dx = (dx + x.broadcast_mul(&m)?)?;
            }
            return Ok((Some(dx), Some(dgamma), Some(dbeta)));
        }
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stats = stats.expect("the forward pass stored its statistics");
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let (xs, x_layout) = x.storage_and_layout();
        let (gs, g_layout) = g.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(xs)), Storage::Cpu(CpuStorage::F32(gs))) = (&*xs, &*gs)
        else {
            bail!("the batch-norm kernel's backward takes f32 on the CPU")
        };
        let x = contiguous(xs, x_layout)?;
        let g = contiguous(gs, g_layout)?;
        let (gamma_v, beta_v) = (gamma.to_vec1::<f32>()?, beta.to_vec1::<f32>()?);
        let backward = Backward {
            dims: (n, c, hw),
            affine: (&gamma_v, &beta_v),
            stats: &stats,
            eps: self.eps,
            relu: self.relu,
            precomputed: None,
            residual: None,
            map_grad: map_grad.as_deref(),
        };
        let (dx, dgamma, dbeta) = train_backward(x, g, &backward);
        let device = gamma.device();
        let dx = Tensor::from_vec(dx, (n, c, h, w), device)?;
        Ok((
            Some(dx),
            Some(Tensor::from_vec(dgamma, c, device)?),
            Some(Tensor::from_vec(dbeta, c, device)?),
        ))
    }
}

impl Op {
    /// The same gradients with candle's differentiable ops, for double backpropagation.
    fn composite_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = x.dim(1)?;
        let g =
            if self.relu { g.mul(&y.detach().gt(0.0)?.to_dtype(g.dtype())?)? } else { g.clone() };
        let mean = x.mean_keepdim((0, 2, 3))?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
        let invstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = centred.broadcast_mul(&invstd)?;
        let dbeta = g.sum_keepdim((0, 2, 3))?;
        let dgamma = (&g * &xhat)?.sum_keepdim((0, 2, 3))?;
        let m = (x.elem_count() / c) as f64;
        let k = invstd.broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?;
        let inner = ((g * m)?.broadcast_sub(&dbeta)? - xhat.broadcast_mul(&dgamma)?)?;
        let dx = (inner.broadcast_mul(&k)? / m)?;
        Ok((dx, dgamma.flatten_all()?, dbeta.flatten_all()?))
    }
}

/// Training-mode batch normalisation of `x` (`[N, C, H, W]`, f32 on the CPU) with the batch's
/// statistics, `gamma * (x - mean) / sqrt(var + eps) + beta`, followed by a ReLU when `relu`.
/// Returns the output and the statistics (for the running averages). Differentiable to any
/// order; `None` where the kernel does not apply (other devices and dtypes), so that the caller
/// uses its own ops.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Option<(Tensor, BatchStats)>> {
    batch_norm_train_with(x, gamma, beta, eps, relu, None)
}

/// [`batch_norm_train`] whose backward also takes the gradient that attention maps of `x` made
/// by [`channel_power_deferred`](crate::attention::channel_power_deferred) with `map_grad`
/// left, and adds it to `x`'s gradient in the same pass.
pub fn batch_norm_train_with(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
    map_grad: Option<&MapGradient>,
) -> Result<Option<(Tensor, BatchStats)>> {
    let applies = x.device().is_cpu()
        && [x.dtype(), gamma.dtype(), beta.dtype()] == [DType::F32; 3]
        && x.rank() == 4;
    if !applies {
        return Ok(None);
    }
    let stats = Arc::new(Mutex::new(None));
    let op = Op { eps, relu, stats: stats.clone(), map_grad: map_grad.cloned() };
    let y = x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Some((y, stats.expect("the forward pass stored its statistics"))))
}

/// `relu?(x * scale + shift)` per channel: batch norm with running statistics. The operands are
/// `(x, gamma, beta)`; `mean` and `invstd` are the running statistics, constants.
struct Affine {
    mean: Vec<f64>,
    invstd: Vec<f64>,
    relu: bool,
}

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "at-batch-norm-eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Operands { dims: (_, c, hw), x, gamma, beta } = operands((s1, l1), (s2, l2), (s3, l3))?;
        let y = normalize(x, (c, hw), (gamma, beta), (&self.mean, &self.invstd), self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// With candle's ops (differentiable): backpropagating through an evaluation-mode batch norm
    /// is rare (a teacher's input gradient, frozen fine-tuning), its forward is the hot path.
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.mean.len();
        let device = x.device();
        let shape = (1, c, 1, 1);
        let column = |v: &[f64]| -> Result<Tensor> {
            Tensor::from_vec(v.iter().map(|&v| v as f32).collect::<Vec<_>>(), shape, device)?
                .to_dtype(g.dtype())
        };
        let (mean, invstd) = (column(&self.mean)?, column(&self.invstd)?);
        let g =
            if self.relu { g.mul(&y.detach().gt(0.0)?.to_dtype(g.dtype())?)? } else { g.clone() };
        let dx = g.broadcast_mul(&invstd.broadcast_mul(&gamma.reshape(shape)?)?)?;
        // The weight and bias gradients only where someone asks for them.
        let (dgamma, dbeta) = if gamma.track_op() {
            let xhat = x.broadcast_sub(&mean)?.broadcast_mul(&invstd)?;
            (Some((&g * xhat)?.sum((0, 2, 3))?), Some(g.sum((0, 2, 3))?))
        } else {
            (None, None)
        };
        Ok((Some(dx), dgamma, dbeta))
    }
}

/// Batch norm with running statistics (evaluation, a teacher, frozen fine-tuning), then a ReLU
/// when `relu`: `gamma * (x - mean) / sqrt(var + eps) + beta`. Differentiable (the backward uses
/// candle's ops). `None` where the kernel does not apply.
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Option<Tensor>> {
    let applies = x.device().is_cpu()
        && [x.dtype(), gamma.dtype(), beta.dtype()] == [DType::F32; 3]
        && x.rank() == 4;
    if !applies {
        return Ok(None);
    }
    let v = |t: &Tensor| -> Result<Vec<f64>> { t.to_dtype(DType::F64)?.flatten_all()?.to_vec1() };
    let (mean, invstd) = (v(running_mean)?, invstd(&v(running_var)?, eps));
    let op = Affine { mean, invstd, relu };
    Ok(Some(x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?))
}
