//! One step of SGD with momentum and weight decay, in place on the CPU, as one pass over each
//! parameter and its momentum buffer instead of six tensor ops that each allocate and fill a
//! parameter-sized tensor: for ResNet-18's 11.7 M parameters those took 20-50 ms of a 750 ms
//! step, PyTorch's fused update 8. (Two in-place passes, the buffer's then the parameter's,
//! took 20-27 ms for ResNet-34's 21.8 M against PyTorch's 10-11.) candle's in-place ops write
//! one tensor each, so the pass is an in-place op on the buffer that runs one on the parameter
//! from inside, where both are writable.
//!
//! Each element is computed with the same f32 (or f64) operations, in the same order, as the
//! tensor ops of `torch.optim.SGD`'s formula (`x * s` as candle's affine `x * s + 0`), so the
//! result is the same to the bit as the tensor path's.

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor, bail};
use rayon::prelude::*;

/// The hyper-parameters of one step: with gradient `g`, `d = g + wd * p`; with momentum,
/// `buf = momentum * buf + d` and `d = buf` (or `d + momentum * buf` with Nesterov); then
/// `p -= lr * d`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0: no momentum buffer).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

/// Updates `param` and its `momentum` buffer (`None`: the step has no momentum) in place from
/// `grad`. Returns `Ok(false)`, touching nothing, where the kernel does not apply (a device
/// other than the CPU, a type other than f32 and f64, a layout that is not contiguous, shapes
/// or types that differ): the caller then runs the step as tensor ops.
///
/// # Errors
///
/// Where candle refuses the in-place op.
pub fn sgd_step_in_place(
    param: &Tensor,
    grad: &Tensor,
    momentum: Option<&Tensor>,
    step: SgdStep,
) -> Result<bool> {
    let operands = [Some(param), Some(grad), momentum];
    let fits = operands.iter().flatten().all(|t| {
        t.device().is_cpu()
            && t.dtype() == param.dtype()
            && t.dims() == param.dims()
            && t.is_contiguous()
            && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    });
    if !fits || (momentum.is_some() != (step.momentum != 0.0)) {
        return Ok(false);
    }
    match momentum {
        Some(buf) => buf.inplace_op2(grad, &Momentum { step, param })?,
        None => param.inplace_op2(grad, &Plain(step))?,
    }
    Ok(true)
}

/// A float type of the kernel, with candle's affine `x * s + 0` for a scalar `s`.
trait Float: Copy + Send + Sync + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> {
    fn scale(self, s: f64) -> Self;
}

impl Float for f32 {
    fn scale(self, s: f64) -> Self {
        self * s as f32 + 0.0
    }
}

impl Float for f64 {
    fn scale(self, s: f64) -> Self {
        self * s + 0.0
    }
}

impl SgdStep {
    /// `g + wd * p` (`g` itself without weight decay, as the tensor path).
    fn decayed<T: Float>(&self, g: T, p: T) -> T {
        if self.weight_decay != 0.0 { g + p.scale(self.weight_decay) } else { g }
    }

    /// `p -= lr * (g + wd * p)`, without momentum, on rayon's threads.
    fn plain<T: Float>(&self, p: &mut [T], g: &[T]) {
        p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(p, g)| {
            for (p, &g) in p.iter_mut().zip(g) {
                *p = *p - self.decayed(g, *p).scale(self.lr);
            }
        });
    }
}

fn slice<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    crate::contiguous(data, layout, &format!("sgd: {what}"))
}

fn slice_mut<'a, T>(data: &'a mut [T], layout: &Layout, what: &str) -> Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => bail!("sgd: {what} must be contiguous"),
    }
}

/// The step with momentum, in place on the buffer (with the gradient): it hands the buffer and
/// the gradient to [`Update`], an in-place op on the parameter, which runs the one pass.
struct Momentum<'a> {
    step: SgdStep,
    param: &'a Tensor,
}

impl InplaceOp2 for Momentum<'_> {
    fn name(&self) -> &'static str {
        "at-sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        buf: &mut CpuStorage,
        lb: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<()> {
        let operands = match (buf, g) {
            (CpuStorage::F32(b), CpuStorage::F32(g)) => {
                Operands::F32(slice_mut(b, lb, "the momentum")?, slice(g, lg, "the gradient")?)
            }
            (CpuStorage::F64(b), CpuStorage::F64(g)) => {
                Operands::F64(slice_mut(b, lb, "the momentum")?, slice(g, lg, "the gradient")?)
            }
            _ => bail!("sgd: the parameter, its gradient and momentum must all be f32 or all f64"),
        };
        self.param.inplace_op1(&Update { step: self.step, operands: Mutex::new(operands) })
    }
}

/// The momentum buffer (writable) and the gradient, of one float type.
enum Operands<'a> {
    F32(&'a mut [f32], &'a [f32]),
    F64(&'a mut [f64], &'a [f64]),
}

/// `d = g + wd * p`, `buf = momentum * buf + d`, `d = buf` (or `d + momentum * buf` with
/// Nesterov), `p -= lr * d`: one pass, in place on the parameter and on the buffer it holds.
struct Update<'a> {
    step: SgdStep,
    operands: Mutex<Operands<'a>>,
}

impl Update<'_> {
    fn pass<T: Float>(&self, p: &mut [T], buf: &mut [T], g: &[T]) -> Result<()> {
        if p.len() != buf.len() || p.len() != g.len() {
            bail!("sgd: the parameter, its gradient and momentum differ in length")
        }
        let s = self.step;
        let chunks =
            p.par_chunks_mut(CHUNK).zip(buf.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK));
        chunks.for_each(|((p, buf), g)| {
            for ((p, b), &g) in p.iter_mut().zip(buf.iter_mut()).zip(g) {
                let decayed = s.decayed(g, *p);
                *b = b.scale(s.momentum) + decayed;
                let d = if s.nesterov { decayed + b.scale(s.momentum) } else { *b };
                *p = *p - d.scale(s.lr);
            }
        });
        Ok(())
    }
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "at-sgd-update"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, lp: &Layout) -> Result<()> {
        let mut operands = self.operands.lock().unwrap_or_else(|e| e.into_inner());
        match (p, &mut *operands) {
            (CpuStorage::F32(p), Operands::F32(buf, g)) => {
                self.pass(slice_mut(p, lp, "the parameter")?, buf, g)
            }
            (CpuStorage::F64(p), Operands::F64(buf, g)) => {
                self.pass(slice_mut(p, lp, "the parameter")?, buf, g)
            }
            _ => bail!("sgd: the parameter, its gradient and momentum must all be f32 or all f64"),
        }
    }
}

/// `p -= lr * (g + wd * p)`, without momentum; in place on the parameter.
struct Plain(SgdStep);

impl InplaceOp2 for Plain {
    fn name(&self) -> &'static str {
        "at-sgd"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, lp: &Layout, g: &CpuStorage, lg: &Layout) -> Result<()> {
        let s = self.0;
        match (p, g) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => {
                s.plain(slice_mut(p, lp, "the parameter")?, slice(g, lg, "the gradient")?)
            }
            (CpuStorage::F64(p), CpuStorage::F64(g)) => {
                s.plain(slice_mut(p, lp, "the parameter")?, slice(g, lg, "the gradient")?)
            }
            _ => bail!("sgd: the parameter and its gradient must both be f32 or both f64"),
        }
        Ok(())
    }
}
