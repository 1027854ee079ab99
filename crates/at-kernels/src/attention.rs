//! The channel reduction of an attention map, `scale * sum_c A_c^2` over `[B, C, H, W]`, in one
//! pass forward and one backward (at-ops' default map is this with `scale = 1/C`, then a
//! normalisation over `[B, H*W]`, which is cheap), and [`at_distance`], the normalisation and
//! distance after it. An at-ops loss uses both when its config says so:
//! `AtConfig { backend: AtBackend::Kernels(&AT_OPS_KERNELS), .. }` ([`AT_OPS_KERNELS`]).
//!
//! [`channel_power_deferred`] is the same map with its backward moved into the op that
//! consumes the activation (a group's fused blocks, or the batch norm after the last group): the
//! map's gradient waits in a [`MapGradient`] and that op adds `2 * scale * g * x` while it writes
//! the activation's gradient anyway, instead of a gradient of its own that candle then adds to
//! the other one (two more passes over the activation).

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, bail,
};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

struct SumSquares {
    scale: f32,
}

const OPERAND: &str = "channel_power: the activation";

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "at-channel-sum-of-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        sum_squares(s, l, self.scale)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        if crate::second_order::is_second_order_thread() {
            // 2 * scale * x * g, broadcast over channels, in candle's differentiable ops.
            let dx = x.broadcast_mul(&g.reshape((b, 1, h, w))?)? * (2.0 * self.scale as f64);
            return dx.map(Some);
        }
        let hw = h * w;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(xs)), Storage::Cpu(CpuStorage::F32(gs))) = (&*xs, &*gs)
        else {
            bail!("channel_power's backward takes f32 on the CPU")
        };
        let (xs, gs) = (crate::contiguous(xs, xl, OPERAND)?, crate::contiguous(gs, gl, OPERAND)?);
        let k = 2.0 * self.scale;
        let plane = |_: &mut (), plane: usize, dx: &mut [std::mem::MaybeUninit<f32>]| {
            let i = plane / c;
            let (x, g) = (&xs[plane * hw..(plane + 1) * hw], &gs[i * hw..(i + 1) * hw]);
            crate::write_each(dx, |j| k * x[j] * g[j]);
        };
        // SAFETY: `plane` writes every element of its chunk. No serial zero fill of the
        // activation-sized gradient first.
        let dx = unsafe { crate::par_chunks_uninit(b * c * hw, hw, || (), plane) };
        Ok(Some(Tensor::from_vec(dx, (b, c, h, w), x.device())?))
    }
}

/// `scale * sum_c x_c^2` of `[B, C, H, W]` as `[B, H, W]`, images on rayon's threads.
fn sum_squares(s: &CpuStorage, l: &Layout, scale: f32) -> Result<(CpuStorage, Shape)> {
    let [b, c, h, w] = *l.dims() else { bail!("channel_power needs [B, C, H, W]") };
    let CpuStorage::F32(x) = s else { bail!("channel_power takes f32, got {:?}", s.dtype()) };
    let x = crate::contiguous(x, l, OPERAND)?;
    let hw = h * w;
    let mut y = vec![0f32; b * hw];
    y.par_chunks_mut(hw).enumerate().for_each(|(i, y)| {
        for ch in 0..c {
            let plane = &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
            for (y, &v) in y.iter_mut().zip(plane) {
                *y += v * v;
            }
        }
        y.iter_mut().for_each(|v| *v *= scale);
    });
    Ok((CpuStorage::F32(y), Shape::from((b, h, w))))
}

/// An attention map's gradient on its way to the op that consumes the map's activation: what
/// [`channel_power_deferred`]'s backward leaves (`2 * scale * g`, `[B, H * W]`, summed over
/// every map made with it) and that op's backward takes (see
/// [`preact_blocks_train_with`](crate::block::preact_blocks_train_with) and
/// [`batch_norm_train_with`](crate::norm::batch_norm_train_with)).
#[derive(Clone, Debug, Default)]
pub struct MapGradient(Arc<Mutex<Option<Vec<f32>>>>);

impl MapGradient {
    /// An empty one, to hand to the consumer op and then to the maps.
    pub fn new() -> Self {
        Self::default()
    }

    fn put(&self, m: Vec<f32>) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(sum) => sum.iter_mut().zip(&m).for_each(|(s, v)| *s += v),
            None => *slot = Some(m),
        }
    }

    /// The gradient left since the last take, if any (the consumer's backward), checked
    /// against the consumer's input `[n, c, h, w]`: `n * h * w` values.
    pub(crate) fn take(
        &self,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Result<Option<Vec<f32>>> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(m) = &m
            && m.len() != n * h * w
        {
            bail!(
                "an attention map's gradient of {} values for an input {:?}",
                m.len(),
                (n, c, h, w)
            )
        }
        Ok(m)
    }
}

/// [`SumSquares`] whose backward leaves the activation's gradient to its consumer. Operands:
/// the activation and the anchor (a tensor computed from the consumer's output).
struct DeferredSumSquares {
    scale: f32,
    slot: MapGradient,
}

impl CustomOp2 for DeferredSumSquares {
    fn name(&self) -> &'static str {
        "at-channel-sum-of-squares-deferred"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        sum_squares(s, l, self.scale)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        anchor: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if crate::second_order::is_second_order_thread() {
            bail!(
                "a deferred attention map is not twice differentiable; use channel_power on a \
                 second-order thread (channel_power_deferred returns None there)"
            )
        }
        let k = 2.0 * self.scale;
        let mut m: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        m.iter_mut().for_each(|v| *v *= k);
        self.slot.put(m);
        // The anchor gets a zero gradient: it must get one from this op (candle expects every
        // node on the way to the loss to get one), and the true one comes from the loss's other
        // terms.
        Ok((None, Some(anchor.zeros_like()?)))
    }
}

/// `scale * sum_c x_c^2` of `x` (`[B, C, H, W]`) as `[B, H, W]`, like [`channel_power`] with
/// `p = 2`, except that its gradient is not returned to `x`: it waits in `slot` for the op that
/// consumes `x`, which must have been made with the same `slot` and must take it (the fused
/// group of [`preact_blocks_train_with`](crate::block::preact_blocks_train_with), the batch
/// norm of [`batch_norm_train_with`](crate::norm::batch_norm_train_with)), and adds
/// `2 * scale * g * x` as it writes `x`'s gradient. `anchor` must be computed from that op's
/// output (a network's logits): it makes candle run this op's backward before the consumer's,
/// and gets a zero gradient. `None` where it does not apply (as [`channel_power`], and on a
/// thread with second-order gradients); use [`channel_power`] then.
pub fn channel_power_deferred(
    x: &Tensor,
    scale: f64,
    anchor: &Tensor,
    slot: &MapGradient,
) -> Result<Option<Tensor>> {
    let applies = x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 4
        && !crate::second_order::is_second_order_thread();
    if !applies {
        return Ok(None);
    }
    let op = DeferredSumSquares { scale: scale as f32, slot: slot.clone() };
    Ok(Some(x.contiguous()?.apply_op2(anchor, op)?))
}

/// `scale * sum_c |x_c|^p` of `x` (`[B, C, H, W]`) as `[B, H, W]`, when a kernel applies (p = 2,
/// f32 on the CPU); `None` otherwise.
/// Differentiable to any order. [`AT_OPS_KERNELS`] hands it to at-ops.
pub fn channel_power(x: &Tensor, p: f64, scale: f64) -> Result<Option<Tensor>> {
    if p != 2.0 || !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 4 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(SumSquares { scale: scale as f32 })?))
}

use at_ops::NORM_EPS;

/// `mean over b, n of (s_b / ||s_b|| - t_b / ||t_b||)^2` for `[B, N]` maps, the norms clamped at
/// `NORM_EPS`; the teacher `t` is a constant.
struct Distance;

/// Each row's `1 / max(||row||, eps)`, in f64, and whether the clamp applied.
fn inverse_norms(q: &[f32], n: usize) -> Vec<(f64, bool)> {
    q.chunks_exact(n)
        .map(|row| {
            let sq: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
            let clamped = sq <= NORM_EPS * NORM_EPS;
            (1.0 / sq.max(NORM_EPS * NORM_EPS).sqrt(), clamped)
        })
        .collect()
}

/// The two maps' rows, checked: `(s, t, b, n)`.
fn map_pair<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
) -> Result<(&'a [f32], &'a [f32], usize, usize)> {
    let [b, n] = *l1.dims() else { bail!("at_distance takes [B, N] maps, got {:?}", l1.dims()) };
    if l2.dims() != l1.dims() {
        bail!("at_distance: the maps have shapes {:?} and {:?}", l1.dims(), l2.dims())
    }
    let (CpuStorage::F32(s), CpuStorage::F32(t)) = (s1, s2) else {
        bail!("at_distance takes f32 maps")
    };
    let s = crate::contiguous(s, l1, "at_distance: the student's map")?;
    let t = crate::contiguous(t, l2, "at_distance: the teacher's map")?;
    Ok((s, t, b, n))
}

impl CustomOp2 for Distance {
    fn name(&self) -> &'static str {
        "at-distance"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, t, b, n) = map_pair((s1, l1), (s2, l2))?;
        let (is, it) = (inverse_norms(s, n), inverse_norms(t, n));
        let sum: f64 = (0..b)
            .map(|row| {
                let (sr, tr) = (&s[row * n..(row + 1) * n], &t[row * n..(row + 1) * n]);
                sr.iter()
                    .zip(tr)
                    .map(|(&a, &c)| {
                        let d = a as f64 * is[row].0 - c as f64 * it[row].0;
                        d * d
                    })
                    .sum::<f64>()
            })
            .sum();
        let loss = (sum / (b * n).max(1) as f64) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    /// With `u = s / ns`, `e = 2 (u - t / nt) / (B N)`: `dL/ds = (e - u (u . e)) / ns` where the
    /// norm is above the clamp, `e / eps` where it is clamped (a constant divisor).
    fn bwd(
        &self,
        s: &Tensor,
        t: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(DType::F64)?.to_vec0::<f64>()?;
        let (ss, sl) = s.storage_and_layout();
        let (ts, tl) = t.storage_and_layout();
        let (Storage::Cpu(ss), Storage::Cpu(ts)) = (&*ss, &*ts) else {
            bail!("at_distance's backward runs on the CPU")
        };
        let (s_data, t_data, b, n) = map_pair((ss, sl), (ts, tl))?;
        let (is, it) = (inverse_norms(s_data, n), inverse_norms(t_data, n));
        let scale = 2.0 * g / (b * n).max(1) as f64;
        let mut ds = vec![0f32; b * n];
        for (row, out) in ds.chunks_exact_mut(n).enumerate() {
            let (sr, tr) = (&s_data[row * n..(row + 1) * n], &t_data[row * n..(row + 1) * n]);
            let ((inv_s, clamped), (inv_t, _)) = (is[row], it[row]);
            let u = |i: usize| sr[i] as f64 * inv_s;
            let e = |i: usize| scale * (u(i) - tr[i] as f64 * inv_t);
            let ue: f64 = if clamped { 0.0 } else { (0..n).map(|i| u(i) * e(i)).sum() };
            for (i, o) in out.iter_mut().enumerate() {
                *o = ((e(i) - u(i) * ue) * inv_s) as f32;
            }
        }
        Ok((Some(Tensor::from_vec(ds, (b, n), s.device())?), None))
    }
}

/// at-ops' default attention distance between unnormalised flattened maps `[B, N]` (L2
/// normalisation, then the mean squared difference), the teacher's `t` a constant, as one op
/// with a hand-written backward; `None` where it does not apply (not f32 on the CPU,
/// or a thread with second-order gradients, since the
/// backward builds no graph). [`AT_OPS_KERNELS`] hands it to at-ops.
pub fn at_distance(s: &Tensor, t: &Tensor) -> Result<Option<Tensor>> {
    let applies = s.device().is_cpu()
        && t.device().is_cpu()
        && s.dtype() == DType::F32
        && t.dtype() == DType::F32
        && s.rank() == 2
        && !crate::second_order::is_second_order_thread();
    if !applies {
        return Ok(None);
    }
    Ok(Some(s.contiguous()?.apply_op2(&t.detach().contiguous()?, Distance)?))
}

/// [`channel_power`] and [`at_distance`] for at-ops: an attention-transfer loss runs them when
/// its config says `backend: at_ops::AtBackend::Kernels(&AT_OPS_KERNELS)`.
pub static AT_OPS_KERNELS: at_ops::AtKernels =
    at_ops::AtKernels { name: "at-kernels", channel_power, distance: at_distance };
