//! The channel reduction of an attention map, `scale * sum_c A_c^2` over `[B, C, H, W]`, in one
//! pass forward and one backward (at-ops' default map is this with `scale = 1/C`, then a
//! normalisation over `[B, H*W]`, which is cheap). at-ops takes it through
//! `at_ops::set_channel_power_kernel`, since at-ops depends on candle-core alone.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

struct SumSquares {
    scale: f32,
}

const OPERAND: &str = "channel_power: the activation";

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "at-channel-sum-of-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
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
            y.iter_mut().for_each(|v| *v *= self.scale);
        });
        Ok((CpuStorage::F32(y), Shape::from((b, h, w))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        if crate::second_order_thread() {
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

/// `scale * sum_c |x_c|^p` of `x` (`[B, C, H, W]`) as `[B, H, W]`, when a kernel applies (p = 2,
/// f32 on the CPU, unless [`set_reference`](crate::set_reference)); `None` otherwise.
/// Differentiable to any order. Its signature is the one `at_ops::set_channel_power_kernel`
/// takes.
pub fn channel_power(x: &Tensor, p: f64, scale: f64) -> Result<Option<Tensor>> {
    if p != 2.0 || !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 4 {
        return Ok(None);
    }
    if crate::reference() {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(SumSquares { scale: scale as f32 })?))
}
