//! Which implementation computes the two hot steps of an attention-transfer loss: candle's ops
//! (the default), or faster kernels a kernel crate supplies, chosen per loss as a value
//! ([`AtConfig::backend`](crate::AtConfig::backend)). Nothing here is global: the same call with
//! the same config gives the same result whatever else the process linked or did.

use candle_core::{Result, Tensor};

/// Faster versions of two steps of [`at_loss`](crate::at_loss), supplied by a kernel crate
/// (at-kernels' `AT_OPS_KERNELS`, for instance). Each returns `None` for what it does not take
/// (dtypes, devices, second-order gradients), which then goes to candle's ops, and must compute
/// the same value and gradient as those ops.
#[derive(Clone, Copy)]
pub struct AtKernels {
    /// A name for logs and `Debug`.
    pub name: &'static str,
    /// `scale * sum_c |x_c|^p` of `[B, C, H, W]` as `[B, H, W]` (the sum and mean maps),
    /// differentiable to any order: `(x, p, scale)`.
    pub channel_power: fn(&Tensor, f64, f64) -> Result<Option<Tensor>>,
    /// [`Distance::Code`](crate::Distance::Code) between L2-normalised maps: from the
    /// unnormalised flattened maps `[B, N]` of the student and of the teacher (a constant) to
    /// `mean over b, n of (s_b / ||s_b|| - t_b / ||t_b||)^2`, the norms clamped at
    /// [`NORM_EPS`](crate::NORM_EPS).
    pub distance: fn(&Tensor, &Tensor) -> Result<Option<Tensor>>,
}

impl std::fmt::Debug for AtKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtKernels").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Where an attention-transfer loss runs its channel reduction and its distance.
#[derive(Clone, Copy, Debug, Default)]
pub enum AtBackend {
    /// candle's ops: what at-ops computes on its own.
    #[default]
    Candle,
    /// The given kernels where they apply, candle's ops elsewhere.
    Kernels(&'static AtKernels),
}

impl PartialEq for AtBackend {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Candle, Self::Candle) => true,
            (Self::Kernels(a), Self::Kernels(b)) => std::ptr::eq(*a, *b) || a.name == b.name,
            _ => false,
        }
    }
}

impl AtBackend {
    /// The kernels, if any.
    pub(crate) fn kernels(self) -> Option<&'static AtKernels> {
        match self {
            Self::Candle => None,
            Self::Kernels(k) => Some(k),
        }
    }
}
