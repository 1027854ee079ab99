//! 2-D convolution (square stride and padding, no dilation, one group) on the CPU as a GEMM per
//! image, the batch split across rayon's threads. A "same" 3x3 convolution (stride 1, padding 1,
//! most of a WRN) skips im2col: three shifted copies of the image (see `shift3`), whose rows are
//! the im2col rows of every kernel tap. With AVX-512 (f32) the GEMMs are the gather GEMM of
//! `gather.rs`, which reads those rows where they are, and the weight gradient takes its
//! input pixel by pixel (`weight_grad_pixels`); elsewhere they run on `gemm`, three per image.
//! Off the CPU, [`conv2d`] is candle's with a backward made of convolutions (`conv2d_by_candle`).
//!
//! Three candle custom ops form a family closed under differentiation, so a convolution can be
//! differentiated any number of times (double backpropagation included):
//!
//! - `Fwd(x, w) = y`, the convolution;
//! - `Dx(dy, w)`, the adjoint of `x -> Fwd(x, w)`: the gradient with respect to the input;
//! - `Dw(x, dy)`, the adjoint of `w -> Fwd(x, w)`: the gradient with respect to the weight.
//!
//! From `<Fwd(x, w), dy> = <x, Dx(dy, w)> = <w, Dw(x, dy)>` every partial derivative of each op
//! is one of the three: for `Dx(dy, w)` with incoming gradient `g`, `d/d dy = Fwd(g, w)` and
//! `d/dw = Dw(g, dy)`; for `Dw(x, dy)`, `d/dx = Dx(dy, g)` and `d/d dy = Fwd(x, g)`.
//!
//! The weight gradient sums over the batch in a fixed order (one accumulator per contiguous
//! chunk of images, the chunks added in order), so results do not depend on thread scheduling.
mod device;
mod lower;
mod pixels;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};

pub(crate) use device::{conv2d_by_candle, input_grad_by_conv, weight_grad_by_conv};
pub(crate) use lower::{
    Dims, InputMap, Plain, forward, forward_same3x3, input_grad, input_grad_same3x3, weight_grad,
    weight_grad_same3x3,
};

fn dims4(layout: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    match *layout.dims() {
        [a, b, c, d] => Ok((a, b, c, d)),
        ref dims => bail!("conv2d: {what} must be 4-dimensional, got {dims:?}"),
    }
}

fn operand<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    crate::contiguous(data, layout, &format!("conv2d: {what}"))
}

/// Runs `f` on the two operands as slices of one float type.
fn dispatch(
    (s1, l1, what1): (&CpuStorage, &Layout, &str),
    (s2, l2, what2): (&CpuStorage, &Layout, &str),
    f32: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    Ok(match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            CpuStorage::F32(f32(operand(a, l1, what1)?, operand(b, l2, what2)?))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(f64(operand(a, l1, what1)?, operand(b, l2, what2)?))
        }
        (a, b) => bail!("conv2d kernels take f32 or f64, got {:?} and {:?}", a.dtype(), b.dtype()),
    })
}

struct Fwd {
    stride: usize,
    pad: usize,
}

impl CustomOp2 for Fwd {
    fn name(&self) -> &'static str {
        "at-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d =
            Dims::new(dims4(l1, "the input")?, dims4(l2, "the weight")?, self.stride, self.pad)?;
        let y = dispatch(
            (s1, l1, "the input"),
            (s2, l2, "the weight"),
            |x, w| forward(&d, x, w),
            |x, w| forward(&d, x, w),
        )?;
        Ok((y, Shape::from((d.n, d.o, d.ho, d.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, width) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        // An input that is not tracked (the images, for the first layer) takes no gradient.
        let dx = if x.track_op() {
            Some(conv2d_input_grad(dy, w, self.stride, self.pad, (h, width))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(conv2d_weight_grad(x, dy, self.stride, self.pad, (kh, kw))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

struct Dx {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for Dx {
    fn name(&self) -> &'static str {
        "at-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, o, ho, wo) = dims4(l1, "the output gradient")?;
        let weight = dims4(l2, "the weight")?;
        let d = Dims::new((n, weight.1, self.h, self.w), weight, self.stride, self.pad)?;
        if (d.o, d.ho, d.wo) != (o, ho, wo) {
            bail!("conv2d input gradient: the output gradient has shape {:?}", l1.dims())
        }
        let dx = dispatch(
            (s1, l1, "the output gradient"),
            (s2, l2, "the weight"),
            |dy, w| input_grad(&d, dy, w),
            |dy, w| input_grad(&d, dy, w),
        )?;
        Ok((dx, Shape::from((d.n, d.c, d.h, d.w))))
    }

    fn bwd(
        &self,
        dy: &Tensor,
        w: &Tensor,
        _dx: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, kh, kw) = w.dims4()?;
        let d_dy = conv2d(g, w, self.stride, self.pad)?;
        let d_w = conv2d_weight_grad(g, dy, self.stride, self.pad, (kh, kw))?;
        Ok((Some(d_dy), Some(d_w)))
    }
}

struct Dw {
    stride: usize,
    pad: usize,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for Dw {
    fn name(&self) -> &'static str {
        "at-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = dims4(l1, "the input")?;
        let (n, o, ho, wo) = dims4(l2, "the output gradient")?;
        let d = Dims::new(x, (o, x.1, self.kh, self.kw), self.stride, self.pad)?;
        if (d.n, d.ho, d.wo) != (n, ho, wo) {
            bail!("conv2d weight gradient: the output gradient has shape {:?}", l2.dims())
        }
        let dw = dispatch(
            (s1, l1, "the input"),
            (s2, l2, "the output gradient"),
            |x, dy| weight_grad(&d, x, dy),
            |x, dy| weight_grad(&d, x, dy),
        )?;
        Ok((dw, Shape::from((d.o, d.c, d.kh, d.kw))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        dy: &Tensor,
        _dw: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let d_x = conv2d_input_grad(dy, g, self.stride, self.pad, (h, w))?;
        let d_dy = conv2d(x, g, self.stride, self.pad)?;
        Ok((Some(d_x), Some(d_dy)))
    }
}

/// Whether the kernels can take these operands: f32 or f64 on the CPU.
fn supported(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// `conv2d(x, w)` with square `stride` and `padding` (`x`: `[N, C, H, W]`, `w`: `[O, C, kh, kw]`):
/// the fast kernels on the CPU in f32 and f64,
/// candle's `conv2d` elsewhere. Differentiable to any order.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if supported(x, w) {
        x.contiguous()?.apply_op2(&w.contiguous()?, Fwd { stride, pad: padding })
    } else if !x.device().is_cpu() {
        conv2d_by_candle(x, w, stride, padding)
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
}

/// `conv2d(x, w)` as [`conv2d`] runs it off the CPU (CUDA, Metal), on any device: candle's
/// convolution (cuDNN with the `cudnn` feature) with a backward made of convolutions.
/// Differentiable to any order. [`Backend::Device`](crate::Backend::Device) runs it on the CPU.
pub fn conv2d_device(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_by_candle(x, w, stride, padding)
}

/// The gradient of `sum(conv2d(x, w) * dy)` with respect to `x`, for an input of `size` (H, W).
pub fn conv2d_input_grad(
    dy: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    (h, width): (usize, usize),
) -> Result<Tensor> {
    if !supported(dy, w) {
        return input_grad_by_conv(dy, w, stride, padding, (h, width));
    }
    dy.contiguous()?.apply_op2(&w.contiguous()?, Dx { stride, pad: padding, h, w: width })
}

/// The gradient of `sum(conv2d(x, w) * dy)` with respect to `w`, for a `kernel` (kh, kw).
pub fn conv2d_weight_grad(
    x: &Tensor,
    dy: &Tensor,
    stride: usize,
    padding: usize,
    (kh, kw): (usize, usize),
) -> Result<Tensor> {
    if !supported(x, dy) {
        return weight_grad_by_conv(x, dy, stride, padding, (kh, kw));
    }
    x.contiguous()?.apply_op2(&dy.contiguous()?, Dw { stride, pad: padding, kh, kw })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what} at {i}: {x} vs {y}");
        }
    }

    /// Convolution geometries with ragged channel counts, a non-square image, "same" 3x3
    /// convolutions and the im2col path (stride 2, 1x1 projections); then ResNet's at 224 px
    /// with fewer channels: the 7x7/2 stem, a 14x14 layer (weight gradient image by image), 7x7
    /// outputs (weight gradient by bands of output channels over the batch, 13 channels in
    /// bands of 6, 6 and 1) and a 1x1/2 projection; then layers wide enough for the
    /// pixel-major paths (`pixels.rs`, from 256 channels): 7x7 with a ragged output width, a
    /// strided 14 -> 7, and a 10x12 image (120 pixels: both pixel-major, in column groups);
    /// 512 channels (9 MiB of weights: the pixel-major work split between threads by output
    /// columns, not images), "same" and strided; last, a strided input gradient pixel-major
    /// (from 128 channels) on an odd image of 7x9, with 136 input channels (a ragged panel).
    const GEOMETRIES: [Geometry; 19] = [
        ((3, 5, 9, 7), (7, 5, 3, 3), 1, 1),
        ((2, 16, 8, 8), (32, 16, 3, 3), 1, 1),
        ((2, 32, 4, 16), (16, 32, 3, 3), 1, 1),
        ((2, 6, 9, 8), (13, 6, 3, 3), 2, 1),
        ((2, 6, 9, 8), (13, 6, 1, 1), 2, 0),
        ((2, 16, 8, 8), (32, 16, 3, 3), 2, 1),
        ((2, 16, 8, 8), (32, 16, 1, 1), 2, 0),
        ((2, 16, 8, 8), (32, 16, 1, 1), 1, 0),
        ((2, 3, 32, 32), (8, 3, 7, 7), 2, 3),
        ((2, 16, 14, 14), (16, 16, 3, 3), 1, 1),
        ((3, 24, 7, 7), (13, 24, 3, 3), 1, 1),
        ((5, 32, 14, 14), (64, 32, 3, 3), 2, 1),
        ((3, 16, 28, 28), (32, 16, 1, 1), 2, 0),
        ((2, 256, 7, 7), (264, 256, 3, 3), 1, 1),
        ((3, 256, 14, 14), (256, 256, 3, 3), 2, 1),
        ((2, 256, 10, 12), (256, 256, 3, 3), 1, 1),
        ((1, 512, 5, 4), (512, 512, 3, 3), 1, 1),
        ((2, 512, 6, 6), (512, 512, 3, 3), 2, 1),
        ((2, 136, 7, 9), (128, 136, 3, 3), 2, 1),
    ];

    type Geometry = ((usize, usize, usize, usize), (usize, usize, usize, usize), usize, usize);

    /// The forward pass, the input gradient and the weight gradient of geometry `i` with
    /// `gather` on or off, on fixed values; and the values `(x, w, dy)`.
    fn paths(i: usize, gather: bool) -> ([Vec<f32>; 3], [Vec<f32>; 3]) {
        let (x, w, stride, pad) = GEOMETRIES[i];
        let d = Dims { gather, ..Dims::new(x, w, stride, pad).unwrap() };
        let xs = values(x.0 * x.1 * x.2 * x.3, i);
        let ws = values(w.0 * w.1 * w.2 * w.3, i + 10);
        let dy = values(d.n * d.o * d.p(), i + 20);
        let out = [forward(&d, &xs, &ws), input_grad(&d, &dy, &ws), weight_grad(&d, &xs, &dy)];
        (out, [xs, ws, dy])
    }

    /// The portable `gemm` path (what CPUs without AVX-512 run) against candle's own
    /// convolutions, on every CPU: the forward pass and both gradients.
    #[test]
    fn portable_path_matches_candle_on_forward_and_both_gradients() {
        use candle_core::{Device, Var};
        for (i, &(x, w, stride, pad)) in GEOMETRIES.iter().enumerate() {
            let ([y, dx, dw], [xs, ws, dy]) = paths(i, false);
            let xv = Var::from_vec(xs, x, &Device::Cpu).unwrap();
            let wv = Var::from_vec(ws, w, &Device::Cpu).unwrap();
            // candle's convolution, with the backward as candle's convolutions again
            // (`conv2d_by_candle`): candle's own backward fails on geometries whose strided
            // windows leave input columns unread.
            let theirs = conv2d_by_candle(xv.as_tensor(), wv.as_tensor(), stride, pad).unwrap();
            let dyt = Tensor::from_vec(dy, theirs.shape(), &Device::Cpu).unwrap();
            let grads = (&theirs * &dyt).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&y, &flat(&theirs), &format!("forward, geometry {i}"));
            assert_close(&dx, &flat(grads.get(&xv).unwrap()), &format!("input grad, geometry {i}"));
            assert_close(
                &dw,
                &flat(grads.get(&wv).unwrap()),
                &format!("weight grad, geometry {i}"),
            );
        }
    }

    /// The gather GEMM (AVX-512 or AVX2, as this process runs) and the portable `gemm` path give
    /// the same forward pass and gradients on every geometry.
    #[test]
    #[cfg_attr(at_no_gather, ignore = "neither AVX-512F nor AVX2 and FMA here: no gather kernel")]
    fn gather_and_portable_paths_agree_on_forward_and_both_gradients() {
        if !crate::gather_tests_run() {
            return;
        }
        for i in 0..GEOMETRIES.len() {
            let (fast, portable) = (paths(i, true).0, paths(i, false).0);
            for (what, (a, b)) in ["forward", "input gradient", "weight gradient"]
                .iter()
                .zip(fast.iter().zip(&portable))
            {
                assert_close(a, b, &format!("{what}, geometry {i}"));
            }
        }
    }

    /// The device path (`conv2d_by_candle`: candle's convolution tied to a backward made of
    /// convolutions, what CUDA and Metal run), here on the CPU: the value and both gradients
    /// against the CPU kernels, on geometries with strides, padding, 1x1 kernels and input rows
    /// the strided windows leave unread.
    #[test]
    fn device_path_matches_the_kernels_in_value_and_gradients() {
        use candle_core::{Device, Var};
        let geometries = [
            ((2, 3, 7, 6), (4, 3, 3, 3), 1, 1),
            ((2, 3, 8, 8), (5, 3, 3, 3), 2, 1),
            ((2, 3, 9, 7), (5, 3, 3, 3), 2, 1),
            ((2, 4, 9, 8), (6, 4, 1, 1), 2, 0),
            ((1, 2, 10, 10), (3, 2, 3, 3), 3, 1),
        ];
        for (i, &(xs, ws, stride, pad)) in geometries.iter().enumerate() {
            let var = |shape: (usize, usize, usize, usize), seed: usize| {
                let n = shape.0 * shape.1 * shape.2 * shape.3;
                Var::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()
            };
            let (x, w) = (var(xs, i), var(ws, i + 10));
            let ours = conv2d_by_candle(x.as_tensor(), w.as_tensor(), stride, pad).unwrap();
            let theirs = conv2d(x.as_tensor(), w.as_tensor(), stride, pad).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&flat(&ours), &flat(&theirs), &format!("value, geometry {i}"));
            let r =
                Tensor::from_vec(values(theirs.elem_count(), i + 20), theirs.shape(), &Device::Cpu)
                    .unwrap();
            let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("input", &x), ("weight", &w)] {
                let (a, b) = (g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
                assert_eq!(a.dims(), b.dims(), "{name} gradient shape, geometry {i}");
                assert_close(&flat(a), &flat(b), &format!("{name} gradient, geometry {i}"));
            }
        }
    }
}
