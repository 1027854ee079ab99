//! The layers the models are made of: convolution, batch norm that trains its running statistics
//! and can be frozen, linear, and a max pool that is right forward and backward.

use candle_core::{DType, Module, Result, Tensor, Var, bail};
use candle_nn::{Init, VarBuilder};

pub use at_kernels::Backend;

/// How a model's parameters are initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InitScheme {
    /// The authors' code: He-normal convolutions and linear weights (fan-in), batch-norm
    /// `gamma ~ U[0, 1)`, `beta = 0`, zero biases.
    #[default]
    Authors,
    /// The common one: He-normal convolutions, `gamma = 1`, `beta = 0`, zero biases.
    Standard,
}

/// He-normal (fan-in, gain sqrt 2) for a weight whose first dimension is the output.
fn he_normal(fan_in: usize) -> Init {
    Init::Randn { mean: 0.0, stdev: (2.0 / fan_in as f64).sqrt() }
}

/// A 2-D convolution with square kernel, stride and padding, as `torch.nn.Conv2d`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    backend: Backend,
}

/// Shape and options of a [`Conv2d`].
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Whether the convolution has a bias (none of ours does before a batch norm).
    pub bias: bool,
}

impl ConvSpec {
    /// A bias-free `k x k` convolution with "same" padding.
    pub fn new(c_in: usize, c_out: usize, kernel: usize, stride: usize) -> Self {
        Self { c_in, c_out, kernel, stride, padding: kernel / 2, bias: false }
    }

    /// The same convolution with a bias.
    pub fn with_bias(self) -> Self {
        Self { bias: true, ..self }
    }

    /// The same convolution with another padding.
    pub fn with_padding(self, padding: usize) -> Self {
        Self { padding, ..self }
    }
}

impl Conv2d {
    /// Creates `weight` (and `bias`) under `vb`, He-normal initialised.
    pub fn new(spec: ConvSpec, vb: VarBuilder) -> Result<Self> {
        let fan_in = spec.c_in * spec.kernel * spec.kernel;
        let shape = (spec.c_out, spec.c_in, spec.kernel, spec.kernel);
        let weight = vb.get_with_hints(shape, "weight", he_normal(fan_in))?;
        let bias = if spec.bias {
            Some(vb.get_with_hints(spec.c_out, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride: spec.stride,
            padding: spec.padding,
            backend: Backend::default(),
        })
    }

    /// The same convolution run by `backend`.
    pub fn on(self, backend: Backend) -> Self {
        Self { backend, ..self }
    }

    /// The weight, for a fused kernel; `None` unless the convolution is bias-free with
    /// `padding` and runs on at-kernels.
    pub(crate) fn plain_weight(&self, padding: usize) -> Option<&Tensor> {
        let plain = self.bias.is_none() && self.padding == padding && self.backend.kernels();
        plain.then_some(&self.weight)
    }

    /// The stride.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.backend {
            Backend::Kernels => at_kernels::conv2d(x, &self.weight, self.stride, self.padding)?,
            Backend::Candle => x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?,
            Backend::Device => {
                at_kernels::conv2d_device(x, &self.weight, self.stride, self.padding)?
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Spatial batch normalisation as `torch.nn.BatchNorm2d` (eps 1e-5, momentum 0.1).
///
/// In training it normalises with the batch statistics and updates the running ones in place
/// (unbiased variance, as PyTorch); in evaluation it uses the running ones. A *frozen* batch norm
/// always uses the running statistics and passes no gradient to its weight and bias (fine-tuning).
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    frozen: bool,
    backend: Backend,
}

/// The batch-norm epsilon of PyTorch and of the authors' code.
pub const BN_EPS: f64 = 1e-5;
/// The running-statistics momentum of PyTorch.
pub const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm2d {
    /// Creates `weight`, `bias`, `running_mean` and `running_var` under `vb`.
    pub fn new(channels: usize, init: InitScheme, frozen: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = match init {
            InitScheme::Authors => Init::Uniform { lo: 0.0, up: 1.0 },
            InitScheme::Standard => Init::Const(1.0),
        };
        let weight = vb.get_with_hints(channels, "weight", gamma)?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            frozen,
            backend: Backend::default(),
        })
    }

    /// The same batch norm run by `backend`.
    pub fn on(self, backend: Backend) -> Self {
        Self { backend, ..self }
    }

    /// Normalises `x` (`[B, C, H, W]`); `train` selects batch statistics (unless frozen).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_maybe_relu(x, train, false)
    }

    /// `relu(forward_t(x, train))` in training (batch statistics) as at-kernels' fused op whose
    /// backward also takes an attention map's gradient from `map_grad`
    /// (`at_kernels::batch_norm_train_with`); `None` where that kernel does not apply.
    pub fn forward_relu_train_with(
        &self,
        x: &Tensor,
        map_grad: &at_kernels::MapGradient,
    ) -> Result<Option<Tensor>> {
        self.train_kernel(x, true, Some(map_grad))
    }

    /// Training mode (batch statistics, the running ones updated) as at-kernels' fused op;
    /// `None` where it does not apply (frozen, a shape it does not take, another device or
    /// dtype).
    fn train_kernel(
        &self,
        x: &Tensor,
        relu: bool,
        map_grad: Option<&at_kernels::MapGradient>,
    ) -> Result<Option<Tensor>> {
        let c = self.weight.dim(0)?;
        if self.frozen || !self.backend.kernels() || x.rank() != 4 || x.dim(1)? != c {
            return Ok(None);
        }
        let fused =
            at_kernels::batch_norm_train_with(x, &self.weight, &self.bias, BN_EPS, relu, map_grad)?;
        let Some((y, stats)) = fused else { return Ok(None) };
        self.update_running_from(&stats)?;
        Ok(Some(y))
    }

    /// `relu(forward_t(x, train))`, fused into one kernel where at-kernels applies.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_maybe_relu(x, train, true)
    }

    fn forward_maybe_relu(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        // The kernels of at-kernels where they apply (f32 on the CPU), else candle's ops.
        if train && !self.frozen {
            if let Some(y) = self.train_kernel(x, relu, None)? {
                return Ok(y);
            }
        } else if self.backend.kernels() && x.rank() == 4 && x.dim(1)? == c {
            let (weight, bias) = self.affine();
            let (mean, var) = (self.running_mean.as_tensor(), self.running_var.as_tensor());
            let fused = at_kernels::batch_norm_eval(x, &weight, &bias, mean, var, BN_EPS, relu)?;
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        let y = self.reference_forward(x, train)?;
        if relu { y.relu() } else { Ok(y) }
    }

    /// Batch norm from candle's own ops (every device and dtype; the reference for the kernel).
    fn reference_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        if x.rank() != 4 || x.dim(1)? != c {
            bail!("batch norm over {c} channels got an input of shape {:?}", x.dims())
        }
        let (weight, bias) = self.affine();
        let (mean, var) = if train && !self.frozen {
            let mean = x.mean_keepdim((0, 2, 3))?; // [1, c, 1, 1]
            let centred = x.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim((0, 2, 3))?; // biased, as the normalisation uses
            self.update_running(&mean, &var, x.elem_count() / c)?;
            (mean, var)
        } else {
            // Detached: the running statistics are buffers and must never collect a gradient.
            let shape = (1, c, 1, 1);
            (
                self.running_mean.as_tensor().detach().reshape(shape)?,
                self.running_var.as_tensor().detach().reshape(shape)?,
            )
        };
        // y = (x - mean) * gamma / sqrt(var + eps) + beta, with the per-channel factors folded.
        let scale =
            (var + BN_EPS)?.sqrt()?.recip()?.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?;
        let shift = bias.reshape((1, c, 1, 1))?.sub(&mean.mul(&scale)?)?;
        x.broadcast_mul(&scale)?.broadcast_add(&shift)
    }

    /// Whether it is frozen: running statistics always, no gradient to gamma and beta.
    pub(crate) fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Gamma and beta, for a fused kernel that normalises with the batch's statistics; `None`
    /// when this batch norm would not (evaluation, or frozen).
    pub(crate) fn batch_affine(&self, train: bool) -> Option<(&Tensor, &Tensor)> {
        (train && !self.frozen && self.backend.kernels()).then_some((&self.weight, &self.bias))
    }

    /// Gamma and beta for a kernel in evaluation mode, with the running mean and variance
    /// (detached: buffers, not parameters).
    pub(crate) fn running_affine(&self) -> ((&Tensor, &Tensor), (Tensor, Tensor)) {
        let running =
            (self.running_mean.as_tensor().detach(), self.running_var.as_tensor().detach());
        ((&self.weight, &self.bias), running)
    }

    /// Updates the running statistics from a kernel's batch statistics.
    pub(crate) fn update_running_from(&self, stats: &at_kernels::BatchStats) -> Result<()> {
        let device = self.weight.device();
        let mean = Tensor::new(stats.mean.as_slice(), device)?;
        let var = Tensor::new(stats.var.as_slice(), device)?;
        self.update_running(&mean, &var, stats.count)
    }

    /// Gamma and beta; detached when frozen, so that they take no gradient.
    fn affine(&self) -> (Tensor, Tensor) {
        if self.frozen {
            (self.weight.detach(), self.bias.detach())
        } else {
            (self.weight.clone(), self.bias.clone())
        }
    }

    fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        let unbiased = if n > 1 { n as f64 / (n - 1) as f64 } else { 1.0 };
        let m = BN_MOMENTUM;
        let mean = mean.detach().flatten_all()?.to_dtype(DType::F32)?;
        let var = var.detach().flatten_all()?.to_dtype(DType::F32)?;
        let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (var * (m * unbiased))?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)
    }
}

/// A fully connected layer, `y = x W^T + b`, as `torch.nn.Linear`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Creates `weight` (He-normal, as the authors' code) and a zero `bias` under `vb`.
    pub fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((c_out, c_in), "weight", he_normal(c_in))?;
        let bias = vb.get_with_hints(c_out, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Max pooling over `kernel x kernel` windows with a stride and padding, as
/// `torch.nn.functional.max_pool2d` (padding counts as -inf).
///
/// candle 0.11's own `max_pool2d` scales its gradient by `1/k^2` and has no backward when kernel
/// and stride differ. This one picks each window's maximum by index (a step without gradient),
/// so the whole gradient goes to the maximum, and then selects the maxima so that the backward
/// pass is parallel over (image, channel) rows on every backend: with `gather` on a first-order
/// thread, and on the second-order thread (`gather`'s backward, `scatter_add`, has a broken
/// backward in candle 0.11) with one `index_select` per window element, shared by every row,
/// whose backward (`index_add`) is differentiable again, so double backpropagation works
/// through it. Both give [`max_pool2d_flat`]'s numbers (tests/max_pool.rs).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    max_pool2d_on(x, (kernel, stride, padding), Backend::Kernels)
}

/// [`max_pool2d`] as `backend` runs it. On the CPU a first-order pool with at-kernels
/// (`Backend::Kernels`, f32) is `at_kernels::max_pool2d`, one pass each way; a second-order pool
/// takes [`max_pool2d_flat`]'s path, whose serial backward is the fastest there (the
/// one-index-per-window-element path made Table 3's step 1.5x slower on 2 cores);
/// `Backend::Device` takes the path of a GPU on any device.
pub fn max_pool2d_on(
    x: &Tensor,
    (kernel, stride, padding): (usize, usize, usize),
    backend: Backend,
) -> Result<Tensor> {
    let second_order = at_kernels::second_order::is_second_order_thread();
    if second_order && x.device().is_cpu() && backend != Backend::Device {
        return max_pool2d_flat(x, kernel, stride, padding);
    }
    if !second_order
        && x.device().is_cpu()
        && backend == Backend::Kernels
        && x.dtype() == DType::F32
    {
        // One pass each way (at-kernels' op); the same maxima and gradients.
        return at_kernels::max_pool2d(x, (kernel, stride, padding));
    }
    let (b, c, _, _) = x.dims4()?;
    let Pool { index, ext, table, local, out: (oh, ow) } = pool(x, kernel, stride, padding)?;
    if !second_order {
        // First order: pick the maxima along the spatial axis with `gather`, whose backward
        // (`scatter_add`) spreads over every (image, channel) row in parallel on a GPU.
        return ext.gather(&index.contiguous()?, 2)?.reshape((b, c, oh, ow));
    }
    // Second order (`gather`'s backward has a broken backward in candle 0.11: it fails on shapes
    // and masks the wrong gradient): for each window element `k`, the input at that element of
    // every window with `index_select` along the spatial axis (one index shared by every row,
    // so its backward `index_add` is parallel over the rows on a GPU, and differentiable again),
    // kept where `k` is the window's maximum.
    let kk = kernel * kernel;
    let table = table.reshape((oh * ow, kk))?;
    let mut y: Option<Tensor> = None;
    for k in 0..kk {
        let at_k = table.narrow(1, k, 1)?.squeeze(1)?.contiguous()?;
        let values = ext.index_select(&at_k, 2)?; // [b, c, oh*ow]
        let is_max = local.eq(k as f64)?;
        // `where_cond`, not a product with a 0/1 mask: a padding cell is -inf, and -inf * 0 is NaN.
        let kept = is_max.where_cond(&values, &values.zeros_like()?.detach())?;
        y = Some(match y {
            None => kept,
            Some(sum) => (sum + kept)?,
        });
    }
    y.expect("a window has at least one element").reshape((b, c, oh, ow))
}

/// [`max_pool2d`] as it was before its parallel backward: the maxima picked with
/// `index_select` from the flattened input (the backward, `index_add` along one axis of
/// `b * c * h * w` entries, runs on one GPU thread). The reference the tests compare with.
#[doc(hidden)]
pub fn max_pool2d_flat(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let Pool { index, ext, out: (oh, ow), .. } = pool(x, kernel, stride, padding)?;
    let rows = (h * w + 1) as u32;
    let base = Tensor::arange_step(0u32, b as u32 * c as u32 * rows, rows, x.device())?;
    let index = index.broadcast_add(&base.reshape((b, c, 1))?)?.flatten_all()?;
    ext.flatten_all()?.index_select(&index, 0)?.reshape((b, c, oh, ow))
}

/// What a max pool picks, found without gradient.
struct Pool {
    /// Each window's maximum as a flat spatial index of the input, `[b, c, oh*ow]`.
    index: Tensor,
    /// The input flattened, with a `-inf` cell at `h * w` for padding: `[b, c, h*w + 1]`.
    ext: Tensor,
    /// For each output cell and window element, the flat input index (`h * w` for padding).
    table: Tensor,
    /// Which window element is the maximum, `[b, c, oh*ow]`.
    local: Tensor,
    /// The output's size.
    out: (usize, usize),
}

fn pool(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Pool> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = at_kernels::pool::pool_output((h, w), (kernel, stride, padding))?;
    let kk = kernel * kernel;
    let mut table = Vec::with_capacity(oh * ow * kk);
    for i in 0..oh {
        for j in 0..ow {
            for di in 0..kernel {
                for dj in 0..kernel {
                    let (y, x) = (
                        (i * stride + di) as isize - padding as isize,
                        (j * stride + dj) as isize - padding as isize,
                    );
                    let inside = y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w;
                    table.push(if inside {
                        (y as usize * w + x as usize) as u32
                    } else {
                        (h * w) as u32
                    });
                }
            }
        }
    }
    let dev = x.device();
    let table = Tensor::from_vec(table, oh * ow * kk, dev)?;
    let pad = Tensor::full(f32::NEG_INFINITY, (b, c, 1), dev)?.to_dtype(x.dtype())?;
    let ext = Tensor::cat(&[&x.flatten_from(2)?, &pad], 2)?; // [b, c, h*w + 1]
    // Which window element is the maximum: no gradient flows through this choice.
    let windows = ext.detach().index_select(&table, 2)?.reshape((b, c, oh * ow, kk))?;
    let local = windows.argmax(3)?; // [b, c, oh*ow], u32
    let offsets = Tensor::arange_step(0u32, (oh * ow * kk) as u32, kk as u32, dev)?;
    let position = local.broadcast_add(&offsets)?.flatten_all()?; // into `table`
    let index = table.index_select(&position, 0)?.reshape((b, c, oh * ow))?;
    Ok(Pool { index, ext, table, local, out: (oh, ow) })
}

/// The mean over all spatial positions: `[B, C, H, W] -> [B, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}
