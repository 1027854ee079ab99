//! [`conv2d`](super::conv2d) off the CPU (CUDA, Metal): candle's convolution with a backward made
//! of convolutions, so that cuDNN runs the backward pass too.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Storage, Tensor, bail,
};

/// [`conv2d`] off the CPU (CUDA, Metal): candle's `conv2d` for the value (cuDNN with the
/// `cudnn` feature), tied to `x` and `w` by an op whose backward pass is again made of
/// convolutions ([`input_grad_by_conv`], [`weight_grad_by_conv`]), so that cuDNN runs the
/// backward pass too: candle's own backward of `conv2d` takes the input gradient from
/// `conv_transpose2d`, its own kernel. Differentiable to any order (the gradients are candle ops).
///
/// The convolution is computed detached and handed to the tying op, whose forward copies it out
/// and drops it: the graph holds the op's output only (as an argument of the op, the detached
/// value would be stored beside it, twice the activation memory of every convolution).
pub(crate) fn conv2d_by_candle(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    x.apply_op2(w, Tie { stride, pad: padding, y: Mutex::new(Some(y)) })
}

/// `Tie(x, w) = conv2d(x, w)`, the value computed beforehand (`y`, taken by the forward pass),
/// the gradients those of `conv2d(x, w)`.
struct Tie {
    stride: usize,
    pad: usize,
    /// The convolution, until the forward pass takes it.
    y: Mutex<Option<Tensor>>,
}

impl Tie {
    /// The value: a copy of the convolution (the op's own storage), which is then dropped.
    fn take<S: BackendStorage>(&self, of: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let y = self.y.lock().expect("the tie's lock").take();
        let Some(y) = y else { bail!("conv2d on a device: the tie ran twice") };
        let (storage, layout) = y.storage_and_layout();
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            bail!("conv2d on a device: the convolution's output must be contiguous")
        }
        let Some(storage) = of(&storage) else {
            bail!("conv2d on a device: the convolution is on another device than its input")
        };
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }
}

impl CustomOp2 for Tie {
    fn name(&self) -> &'static str {
        "at-conv2d-device"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.take(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.take(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.take(|s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, width) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let dx = match x.track_op() {
            true => Some(input_grad_by_conv(g, w, self.stride, self.pad, (h, width))?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(weight_grad_by_conv(x, g, self.stride, self.pad, (kh, kw))?),
            false => None,
        };
        Ok((dx, dw))
    }
}

/// The input gradient of `conv2d(x, w)` as one candle convolution (any device): `dy` with
/// `stride - 1` zeros between its pixels (and, where the forward pass left input rows or columns
/// unread at the far edge, that many more), convolved with the kernel flipped and its channel
/// axes swapped at padding `k - 1 - padding`. Square kernels whose padding is below their size;
/// others take candle's `conv_transpose2d`.
pub(crate) fn input_grad_by_conv(
    dy: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    (h, width): (usize, usize),
) -> Result<Tensor> {
    let (_, _, ho, wo) = dy.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    if ho == 0 || wo == 0 || h + 2 * padding < kh || width + 2 * padding < kw {
        bail!("conv2d input gradient: {h}x{width} does not fit a {kh}x{kw} kernel")
    }
    // The input rows and columns past the last window (`(h + 2p - k) mod stride`).
    let (rest_h, rest_w) = (
        (h + 2 * padding - kh) - (ho - 1) * stride,
        (width + 2 * padding - kw) - (wo - 1) * stride,
    );
    if kh != kw || padding >= kh {
        return dy.conv_transpose2d(w, padding, rest_h.min(rest_w), stride, 1);
    }
    // `len` entries along `dim` with `stride - 1` zeros after each but the last.
    let dilate = |t: Tensor, dim: usize, len: usize| -> Result<Tensor> {
        if stride == 1 {
            return Ok(t);
        }
        t.unsqueeze(dim + 1)?.pad_with_zeros(dim + 1, 0, stride - 1)?.flatten(dim, dim + 1)?.narrow(
            dim,
            0,
            (len - 1) * stride + 1,
        )
    };
    let spread = dilate(dilate(dy.clone(), 2, ho)?, 3, wo)?;
    let spread = spread.pad_with_zeros(2, 0, rest_h)?.pad_with_zeros(3, 0, rest_w)?;
    let flipped = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    spread.contiguous()?.conv2d(&flipped, kh - 1 - padding, 1, 1, 1)
}

/// The weight gradient of `conv2d(x, w)` as one candle convolution (any device): the batch as
/// the channels, `x^T (c, n, h, w)` convolved with `dy^T (o, n, ho, wo)` dilated by the stride,
/// cut to the kernel's size.
pub(crate) fn weight_grad_by_conv(
    x: &Tensor,
    dy: &Tensor,
    stride: usize,
    padding: usize,
    (kh, kw): (usize, usize),
) -> Result<Tensor> {
    let xt = x.transpose(0, 1)?.contiguous()?;
    let dyt = dy.transpose(0, 1)?.contiguous()?;
    let g = xt.conv2d(&dyt, padding, 1, stride, 1)?.transpose(0, 1)?;
    g.narrow(2, 0, kh)?.narrow(3, 0, kw)?.contiguous()
}
