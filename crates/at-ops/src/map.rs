//! Activation-based spatial attention maps (section 3.1 of the paper) and their normalisation.

use candle_core::{DType, Result, Tensor, bail};

use crate::kernels::AtBackend;

/// How the per-channel statistics `|A_i|^p` are combined into one spatial map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChannelReduce {
    /// `sum_i |A_i|^p`: the paper's `F_sum` (p = 1) and `F_sum^p`.
    Sum,
    /// `1/C sum_i |A_i|^p`: what the authors' code computes. After L1 or L2 normalisation it gives
    /// the same map as [`ChannelReduce::Sum`].
    #[default]
    Mean,
    /// `max_i |A_i|^p`: the paper's `F_max^p`. Ties share the gradient.
    Max,
}

/// Per-sample normalisation of an attention map, applied over all its positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Normalization {
    /// `Q / max(||Q||_2, 1e-12)`, as `torch.nn.functional.normalize` (the paper's default).
    #[default]
    L2,
    /// `Q / max(||Q||_1, 1e-12)`.
    L1,
    /// The raw map.
    None,
}

/// The smallest norm a map is divided by, as in `torch.nn.functional.normalize`: an all-zero map
/// stays zero and its gradient stays finite.
pub const NORM_EPS: f64 = 1e-12;

/// An attention mapping function `F: R^{C x H x W} -> R^{H x W}` with its normalisation.
///
/// The default, `MapSpec::default()`, is the authors' code: the mean over channels of `A^2`,
/// L2-normalised per sample.
///
/// ```
/// use at_ops::{ChannelReduce, MapSpec, Normalization};
///
/// // F_sum: the sum of absolute values, L1-normalised.
/// let f_sum = MapSpec::sum_abs().with_norm(Normalization::L1);
/// assert_eq!(f_sum.reduce, ChannelReduce::Sum);
/// // F_max^4.
/// let f_max4 = MapSpec::max_pow(4.0);
/// assert_eq!((f_max4.reduce, f_max4.p), (ChannelReduce::Max, 4.0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSpec {
    /// How channels are combined.
    pub reduce: ChannelReduce,
    /// The power applied to `|A_i|` before combining; any finite `p > 0`.
    pub p: f64,
    /// Per-sample normalisation of the map.
    pub norm: Normalization,
}

impl Default for MapSpec {
    fn default() -> Self {
        Self { reduce: ChannelReduce::Mean, p: 2.0, norm: Normalization::L2 }
    }
}

impl MapSpec {
    /// `F_sum(A) = sum_i |A_i|`, L2-normalised.
    pub const fn sum_abs() -> Self {
        Self::sum_pow(1.0)
    }

    /// `F_sum^p(A) = sum_i |A_i|^p`, L2-normalised.
    pub const fn sum_pow(p: f64) -> Self {
        Self { reduce: ChannelReduce::Sum, p, norm: Normalization::L2 }
    }

    /// `F_max^p(A) = max_i |A_i|^p`, L2-normalised.
    pub const fn max_pow(p: f64) -> Self {
        Self { reduce: ChannelReduce::Max, p, norm: Normalization::L2 }
    }

    /// The same map with another normalisation.
    pub const fn with_norm(self, norm: Normalization) -> Self {
        Self { norm, ..self }
    }

    /// The same map with another channel reduction.
    pub const fn with_reduce(self, reduce: ChannelReduce) -> Self {
        Self { reduce, ..self }
    }

    /// Whether this is `mean_c A_c^2` before normalisation (`p = 2`, the channel mean; any
    /// normalisation): the map a model's kernels can compute with the activation (at-models'
    /// `FusedMap`), which [`at_loss_from_maps`](crate::at_loss_from_maps) then takes.
    pub fn is_mean_square(&self) -> bool {
        self.p == 2.0 && self.reduce == ChannelReduce::Mean
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.p.is_finite() && self.p > 0.0) {
            bail!("attention map power p must be finite and positive, got {}", self.p)
        }
        Ok(())
    }
}

/// The attention map of an activation `[B, C, H, W]`, normalised per sample: `[B, H, W]`.
///
/// Half-precision inputs are computed in f32 (a sum of fourth powers overflows f16 quickly) and
/// the map is returned in the input's dtype. Differentiable with respect to `activation`.
pub fn attention_map(activation: &Tensor, spec: &MapSpec) -> Result<Tensor> {
    let dtype = activation.dtype();
    let map = raw_map(activation, spec, AtBackend::Candle)?;
    let map = normalize(&map, spec.norm)?;
    map.to_dtype(dtype)
}

/// The attention map flattened per sample: `[B, H * W]`, as the authors' code and eq. (2) use it.
pub fn attention_map_flat(activation: &Tensor, spec: &MapSpec) -> Result<Tensor> {
    attention_map(activation, spec)?.flatten_from(1)
}

/// The attention map of an activation `[B, C, H, W]` before normalisation, `F(A)` (`[B, H, W]`),
/// in f32 (f64 stays f64): what [`at_loss_from_maps`](crate::at_loss_from_maps) takes.
/// Differentiable with respect to `activation`.
pub fn raw_attention_map(activation: &Tensor, spec: &MapSpec) -> Result<Tensor> {
    raw_map(activation, spec, AtBackend::Candle)
}

/// The unnormalised map `F(A)` in the working dtype (f64 stays f64, everything else is f32),
/// its channel reduction by `backend`.
pub(crate) fn raw_map(activation: &Tensor, spec: &MapSpec, backend: AtBackend) -> Result<Tensor> {
    spec.validate()?;
    let (_b, c, _h, _w) = activation.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "an attention map needs an activation [B, C, H, W], got shape {:?}",
            activation.dims()
        ))
    })?;
    if c == 0 {
        bail!("an attention map needs at least one channel, got shape {:?}", activation.dims())
    }
    let a = activation.to_dtype(working_dtype(activation.dtype()))?;
    let scale = match spec.reduce {
        ChannelReduce::Sum => Some(1.0),
        ChannelReduce::Mean => Some(1.0 / c as f64),
        ChannelReduce::Max => None,
    };
    if let (Some(scale), Some(kernels)) = (scale, backend.kernels())
        && let Some(map) = (kernels.channel_power)(&a, spec.p, scale)?
    {
        return Ok(map);
    }
    let powered = abs_pow(&a, spec.p)?; // [b, c, h, w]
    match spec.reduce {
        ChannelReduce::Sum => channel_sum(&powered, 1.0),
        ChannelReduce::Mean => channel_sum(&powered, 1.0 / c as f64),
        ChannelReduce::Max => powered.max(1),
    } // [b, h, w]
}

/// `weight * sum over channels` of `[B, C, H, W]`, as a batched product with a row of weights:
/// candle reduces over a middle dimension element by element, while a matrix product runs on its
/// GEMM, forward and backward (and stays differentiable to any order).
fn channel_sum(x: &Tensor, weight: f64) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let row = Tensor::full(weight, (1, 1, c), x.device())?.to_dtype(x.dtype())?;
    row.broadcast_as((b, 1, c))?.matmul(&x.reshape((b, c, h * w))?)?.reshape((b, h, w))
}

/// `|a|^p`, with the common powers written so that their gradient is exact and finite at zero.
fn abs_pow(a: &Tensor, p: f64) -> Result<Tensor> {
    if p == 1.0 {
        abs(a)
    } else if p == 2.0 {
        a.sqr()
    } else if p == 4.0 {
        a.sqr()?.sqr()
    } else {
        abs(a)?.powf(p)
    }
}

/// `|x|` whose gradient at 0 is 0, as PyTorch's. Candle's `abs` passes +1 there, which matters
/// for activations after a ReLU, where exact zeros are common.
pub(crate) fn abs(x: &Tensor) -> Result<Tensor> {
    x * x.sign()?.detach()
}

/// Normalises each sample of `map` (`[B, ...]`) over all its non-batch dimensions.
///
/// Half-precision maps are normalised in f32 and returned in their dtype. The divisor is clamped
/// at [`NORM_EPS`], so an all-zero map stays zero with a zero gradient.
pub fn normalize(map: &Tensor, norm: Normalization) -> Result<Tensor> {
    if norm == Normalization::None {
        return Ok(map.clone());
    }
    let dtype = map.dtype();
    let q = map.to_dtype(working_dtype(dtype))?;
    let dims: Vec<usize> = (1..q.rank()).collect();
    if dims.is_empty() {
        bail!("normalize needs a batch of maps [B, ...], got shape {:?}", map.dims())
    }
    let divisor = match norm {
        // sqrt(max(sum q^2, eps^2)) equals max(||q||, eps) and never takes the square root of 0,
        // whose derivative is infinite.
        Normalization::L2 => q.sqr()?.sum_keepdim(dims)?.maximum(NORM_EPS * NORM_EPS)?.sqrt()?,
        Normalization::L1 => abs(&q)?.sum_keepdim(dims)?.maximum(NORM_EPS)?,
        Normalization::None => unreachable!(),
    };
    q.broadcast_div(&divisor)?.to_dtype(dtype)
}

/// The dtype the maps are computed in: f64 stays f64 (precise gradient checks), the rest is f32.
pub(crate) fn working_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 { DType::F64 } else { DType::F32 }
}
