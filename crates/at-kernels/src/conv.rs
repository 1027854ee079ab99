//! 2-D convolution (square stride and padding, no dilation, one group) on the CPU as im2col and
//! a GEMM per image, the batch split across rayon's threads. A "same" 3x3 convolution (stride 1,
//! padding 1, most of a WRN) skips im2col: three shifted copies of the image and three GEMMs,
//! one per kernel row (see `shift3`).
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

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

/// A float type the kernels run in.
pub(crate) trait Element:
    Copy + Default + Send + Sync + std::ops::AddAssign + 'static
{
    const ONE: Self;
}
impl Element for f32 {
    const ONE: Self = 1.0;
}
impl Element for f64 {
    const ONE: Self = 1.0;
}

/// Every size of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dims {
    pub(crate) n: usize,
    c: usize,
    h: usize,
    w: usize,
    pub(crate) o: usize,
    kh: usize,
    kw: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
    stride: usize,
    pad: usize,
}

impl Dims {
    pub(crate) fn new(
        x: (usize, usize, usize, usize),
        weight: (usize, usize, usize, usize),
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        let (n, c, h, w) = x;
        let (o, wc, kh, kw) = weight;
        if wc != c {
            bail!("conv2d: the input has {c} channels but the weight expects {wc}")
        }
        if stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
            bail!(
                "conv2d: a {kh}x{kw} kernel (stride {stride}, padding {pad}) does not fit {h}x{w}"
            )
        }
        let (ho, wo) = ((h + 2 * pad - kh) / stride + 1, (w + 2 * pad - kw) / stride + 1);
        Ok(Self { n, c, h, w, o, kh, kw, ho, wo, stride, pad })
    }

    /// Rows of the im2col matrix.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions per image.
    pub(crate) fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1 convolution with stride 1 and no padding: the image itself is the im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// A 3x3 convolution with stride 1 and padding 1, which the kernels compute from three
    /// shifted copies of the image instead of im2col's nine (see [`shift3`]).
    pub(crate) fn same3x3(&self) -> bool {
        (self.kh, self.kw, self.stride, self.pad) == (3, 3, 1, 1)
    }

    /// The length of one plane of [`shift3`]'s buffer: the image with a zero row above and below.
    fn padded_plane(&self) -> usize {
        (self.h + 2) * self.w
    }

    /// The range of output columns `ox` whose input column `ox * stride + kj - pad` is inside.
    fn valid(&self, k: usize, out: usize, input: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.pad.saturating_sub(k).div_ceil(s).min(out);
        let hi = (input + self.pad).saturating_sub(k).div_ceil(s).min(out);
        (lo, hi.max(lo))
    }
}

/// `dst (m x n, row-major with row stride dst_rs) (+)= a (m x k) * b (k x n)`, `a` and `b`
/// given by row and column strides, on this thread.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Element>(
    dims: (usize, usize, usize),
    (dst, dst_rs): (&mut [T], usize),
    accumulate: bool,
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
) {
    // SAFETY: `dst` is initialised, so reading it when accumulating is fine.
    let dst = unsafe { &mut *(dst as *mut [T] as *mut [MaybeUninit<T>]) };
    gemm_into(dims, (dst, dst_rs), accumulate, a, a_strides, b, b_strides);
}

/// `dst = a * b` as [`matmul`], into memory that need not be initialised (gemm writes every
/// element of the `m x n` window when it does not accumulate).
fn matmul_uninit<T: Element>(
    dims: (usize, usize, usize),
    dst: (&mut [MaybeUninit<T>], usize),
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
) {
    gemm_into(dims, dst, false, a, a_strides, b, b_strides);
}

/// The one call into gemm; `dst` must be initialised where `accumulate` reads it.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: Element>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [MaybeUninit<T>], usize),
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
) {
    assert!(dst_rs >= n);
    assert!(m == 0 || n == 0 || dst.len() >= (m - 1) * dst_rs + n);
    assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(n == 0 || k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above keep every index gemm reads or writes inside the slices; gemm
    // reads `dst` only when accumulating.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<T>(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// The im2col matrix (`k x p`) of one image (`c x h x w`).
fn im2col<T: Element>(d: &Dims, x: &[T], col: &mut [T]) {
    let p = d.p();
    for c in 0..d.c {
        let plane = &x[c * d.h * d.w..(c + 1) * d.h * d.w];
        for ki in 0..d.kh {
            let (oy0, oy1) = d.valid(ki, d.ho, d.h);
            for kj in 0..d.kw {
                let row = (c * d.kh + ki) * d.kw + kj;
                let dst = &mut col[row * p..(row + 1) * p];
                let (ox0, ox1) = d.valid(kj, d.wo, d.w);
                dst[..oy0 * d.wo].fill(T::default());
                dst[oy1 * d.wo..].fill(T::default());
                if d.stride == 1 && d.wo == d.w && oy0 < oy1 && ox0 < ox1 {
                    // A "same" convolution: the rows of this kernel offset are one shifted copy
                    // of the plane; the columns that wrapped around to a neighbouring row are
                    // zeroed afterwards.
                    let (first, last) = (oy0 * d.wo + ox0, (oy1 - 1) * d.wo + ox1);
                    let src0 = (oy0 + ki - d.pad) * d.w + ox0 + kj - d.pad;
                    dst[first..last].copy_from_slice(&plane[src0..src0 + (last - first)]);
                    for oy in oy0..oy1 {
                        dst[oy * d.wo..oy * d.wo + ox0].fill(T::default());
                        dst[oy * d.wo + ox1..(oy + 1) * d.wo].fill(T::default());
                    }
                    continue;
                }
                for oy in oy0..oy1 {
                    let iy = oy * d.stride + ki - d.pad;
                    let src = &plane[iy * d.w..(iy + 1) * d.w];
                    let out = &mut dst[oy * d.wo..(oy + 1) * d.wo];
                    out[..ox0].fill(T::default());
                    out[ox1..].fill(T::default());
                    if ox0 < ox1 {
                        let ix0 = ox0 * d.stride + kj - d.pad;
                        if d.stride == 1 {
                            out[ox0..ox1].copy_from_slice(&src[ix0..ix0 + (ox1 - ox0)]);
                        } else {
                            for (i, v) in out[ox0..ox1].iter_mut().enumerate() {
                                *v = src[ix0 + i * d.stride];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds each column entry back to the pixel it came from, into `x`,
/// which starts at zero. Entries that came from padding are discarded (for a "same" convolution,
/// by zeroing them in `col`).
fn col2im<T: Element>(d: &Dims, col: &mut [T], x: &mut [T]) {
    let p = d.p();
    for c in 0..d.c {
        let plane = &mut x[c * d.h * d.w..(c + 1) * d.h * d.w];
        for ki in 0..d.kh {
            let (oy0, oy1) = d.valid(ki, d.ho, d.h);
            for kj in 0..d.kw {
                let row = (c * d.kh + ki) * d.kw + kj;
                let (ox0, ox1) = d.valid(kj, d.wo, d.w);
                if ox0 >= ox1 {
                    continue;
                }
                if d.stride == 1 && d.wo == d.w && oy0 < oy1 {
                    // The adjoint of the shifted copy in `im2col`.
                    let src = &mut col[row * p..(row + 1) * p];
                    for oy in oy0..oy1 {
                        src[oy * d.wo..oy * d.wo + ox0].fill(T::default());
                        src[oy * d.wo + ox1..(oy + 1) * d.wo].fill(T::default());
                    }
                    let (first, last) = (oy0 * d.wo + ox0, (oy1 - 1) * d.wo + ox1);
                    let dst0 = (oy0 + ki - d.pad) * d.w + ox0 + kj - d.pad;
                    let dst = &mut plane[dst0..dst0 + (last - first)];
                    for (x, v) in dst.iter_mut().zip(&src[first..last]) {
                        *x += *v;
                    }
                    continue;
                }
                let src = &col[row * p..(row + 1) * p];
                for oy in oy0..oy1 {
                    let iy = oy * d.stride + ki - d.pad;
                    let dst = &mut plane[iy * d.w..(iy + 1) * d.w];
                    let ix0 = ox0 * d.stride + kj - d.pad;
                    let src = &src[oy * d.wo + ox0..oy * d.wo + ox1];
                    if d.stride == 1 {
                        for (x, v) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                            *x += *v;
                        }
                    } else {
                        for (x, v) in dst[ix0..].iter_mut().step_by(d.stride).zip(src) {
                            *x += *v;
                        }
                    }
                }
            }
        }
    }
}

/// How a "same" 3x3 convolution reads its input channels: [`Plain`], or through a per-channel
/// map applied while [`shift3`] copies the image (the residual-block kernel's batch norm and
/// ReLU, so that their output is never stored).
pub(crate) trait InputMap<T>: Sync {
    /// Writes channel `channel`'s values `src`, mapped, into `dst` (of the same length).
    fn copy(&self, channel: usize, src: &[T], dst: &mut [T]);
}

/// The input as it is.
pub(crate) struct Plain;

impl<T: Element> InputMap<T> for Plain {
    fn copy(&self, _: usize, src: &[T], dst: &mut [T]) {
        dst.copy_from_slice(src);
    }
}

/// For a "same" 3x3 convolution, the three horizontal shifts of one image (`c x h x w`),
/// `buf[c, kj][1 + y, x] = x[c][y][x + kj - 1]` (zero outside the image), each plane with a zero
/// row above and below (`padded_plane` long), rows ordered `(c, kj)`.
///
/// Row `(c, ki, kj)` of the im2col matrix is the slice of row `(c, kj)` that starts at `ki * w`,
/// so for each `ki` the rows `(c, kj)` form a `3c x p` matrix with row stride `padded_plane`:
/// the convolution is three GEMMs over the weights of kernel row `ki` (see [`kernel_rows`]),
/// from a copy three times the image instead of im2col's nine. The image is read through `map`
/// (padding stays zero).
fn shift3<T: Element>(d: &Dims, x: &[T], buf: &mut [T], map: &impl InputMap<T>) {
    let (w, hw, plane) = (d.w, d.h * d.w, d.padded_plane());
    let zero = T::default();
    for (c, rows) in buf.chunks_exact_mut(3 * plane).take(d.c).enumerate() {
        for row in rows.chunks_exact_mut(plane) {
            row[..w].fill(zero);
            row[w + hw..].fill(zero);
        }
        let (left, rest) = rows.split_at_mut(plane);
        let (centre, right) = rest.split_at_mut(plane);
        let (left, centre, right) =
            (&mut left[w..w + hw], &mut centre[w..w + hw], &mut right[w..w + hw]);
        // kj = 1: the image itself, mapped once; the other two shifts are copies of it.
        map.copy(c, &x[c * hw..(c + 1) * hw], centre);
        // kj = 0, x[y][x - 1]: one to the right, the first column zero.
        left[1..].copy_from_slice(&centre[..hw - 1]);
        left.iter_mut().step_by(w).for_each(|v| *v = zero);
        // kj = 2, x[y][x + 1]: one to the left, the last column zero.
        right[..hw - 1].copy_from_slice(&centre[1..]);
        right.iter_mut().skip(w - 1).step_by(w).for_each(|v| *v = zero);
    }
}

/// The adjoint of [`shift3`]: `dx[c][y][x] = g[c, 1][1 + y, x] + g[c, 0][1 + y, x + 1] +
/// g[c, 2][1 + y, x - 1]` (the terms that exist); the padding rows are dropped.
fn unshift3<T: Element>(d: &Dims, g: &[T], dx: &mut [MaybeUninit<T>]) {
    let (w, hw, plane) = (d.w, d.h * d.w, d.padded_plane());
    for c in 0..d.c {
        let row = |kj: usize| &g[(c * 3 + kj) * plane + w..(c * 3 + kj) * plane + w + hw];
        let (g0, g1, g2) = (row(0), row(1), row(2));
        let out = &mut dx[c * hw..(c + 1) * hw];
        for y in 0..d.h {
            let r = y * w..(y + 1) * w;
            let (out, g0, g1, g2) = (&mut out[r.clone()], &g0[r.clone()], &g1[r.clone()], &g2[r]);
            crate::write_each(out, |x| {
                let mut v = g1[x];
                if x + 1 < w {
                    v += g0[x + 1];
                }
                if x > 0 {
                    v += g2[x - 1];
                }
                v
            });
        }
    }
}

/// The weights (`o x c x 3 x 3`) as three `o x 3c` matrices, one per kernel row `ki`, columns
/// ordered `(c, kj)` as the rows of [`shift3`]'s buffer.
fn kernel_rows<T: Element>(d: &Dims, w: &[T]) -> Vec<T> {
    let (o, c) = (d.o, d.c);
    let mut rows = vec![T::default(); 3 * o * 3 * c];
    for ki in 0..3 {
        for oo in 0..o {
            for cc in 0..c {
                for kj in 0..3 {
                    rows[(ki * o + oo) * 3 * c + cc * 3 + kj] =
                        w[((oo * c + cc) * 3 + ki) * 3 + kj];
                }
            }
        }
    }
    rows
}

pub(crate) fn forward<T: Element>(d: &Dims, x: &[T], w: &[T]) -> Vec<T> {
    if d.same3x3() {
        return forward_same3x3(d, x, w, &Plain, &|_, _| {});
    }
    let (k, p) = (d.k(), d.p());
    let image = d.c * d.h * d.w;
    let image_conv = |col: &mut Vec<T>, n: usize, y: &mut [MaybeUninit<T>]| {
        let x = &x[n * image..(n + 1) * image];
        let col: &[T] = if d.pointwise() {
            x
        } else {
            im2col(d, x, col);
            col
        };
        matmul_uninit((d.o, p, k), (y, p), w, (k, 1), col, (p, 1));
    };
    let init = || if d.pointwise() { vec![] } else { vec![T::default(); k * p] };
    // SAFETY: the GEMM writes the whole chunk (`o x p`).
    unsafe { crate::par_chunks_uninit(d.n * d.o * p, d.o * p, init, image_conv) }
}

/// A "same" 3x3 convolution of `map(x)`; `epilogue(n, y_n)` runs on each image's output while
/// it is in cache (the block kernel takes the next batch norm's statistics there, or adds the
/// shortcut).
pub(crate) fn forward_same3x3<T: Element>(
    d: &Dims,
    x: &[T],
    w: &[T],
    map: &impl InputMap<T>,
    epilogue: &(dyn Fn(usize, &mut [T]) + Sync),
) -> Vec<T> {
    assert!(d.same3x3(), "forward_same3x3 takes a 3x3 convolution with stride 1 and padding 1");
    let (p, k3, plane, image) = (d.p(), 3 * d.c, d.padded_plane(), d.c * d.h * d.w);
    let rows = kernel_rows(d, w);
    let image_conv = |buf: &mut Vec<T>, n: usize, y: &mut [MaybeUninit<T>]| {
        shift3(d, &x[n * image..(n + 1) * image], buf, map);
        let (w0, shifted0) = (&rows[..d.o * k3], &buf[..]);
        matmul_uninit((d.o, p, k3), (&mut *y, p), w0, (k3, 1), shifted0, (plane, 1));
        // SAFETY: the GEMM above wrote every element of `y` (`o x p`, row stride `p`).
        let y = unsafe { crate::assume_init_mut(y) };
        for ki in 1..3 {
            let (wk, shifted) = (&rows[ki * d.o * k3..], &buf[ki * d.w..]);
            matmul((d.o, p, k3), (y, p), true, wk, (k3, 1), shifted, (plane, 1));
        }
        epilogue(n, y);
    };
    // SAFETY: `image_conv` writes its whole chunk.
    unsafe {
        crate::par_chunks_uninit(
            d.n * d.o * p,
            d.o * p,
            || vec![T::default(); k3 * plane],
            image_conv,
        )
    }
}

/// The input gradient of a "same" 3x3 convolution; `epilogue(n, dx_n)` runs on each image's
/// gradient while it is in cache.
pub(crate) fn input_grad_same3x3<T: Element>(
    d: &Dims,
    dy: &[T],
    w: &[T],
    epilogue: &(dyn Fn(usize, &[T]) + Sync),
) -> Vec<T> {
    assert!(d.same3x3(), "input_grad_same3x3 takes a 3x3 convolution with stride 1 and padding 1");
    let (p, k3, plane, image) = (d.p(), 3 * d.c, d.padded_plane(), d.c * d.h * d.w);
    let rows = kernel_rows(d, w);
    let image_grad = |g: &mut Vec<T>, n: usize, dx: &mut [MaybeUninit<T>]| {
        let dy = &dy[n * d.o * p..(n + 1) * d.o * p];
        // The three GEMMs write overlapping windows of each row: the first overwrites `[0, p)`,
        // the others add; the rest of the row starts at zero.
        for row in g.chunks_exact_mut(plane) {
            row[p..].fill(T::default());
        }
        for ki in 0..3 {
            let (wk, window) = (&rows[ki * d.o * k3..], &mut g[ki * d.w..]);
            // w_ki^T (3c x o) * dy (o x p)
            matmul((k3, p, d.o), (window, plane), ki > 0, wk, (1, k3), dy, (p, 1));
        }
        unshift3(d, g, dx);
        // SAFETY: `unshift3` initialised every element of `dx`.
        epilogue(n, unsafe { crate::assume_init_mut(dx) });
    };
    // SAFETY: `image_grad` writes its whole chunk.
    unsafe {
        crate::par_chunks_uninit(d.n * image, image, || vec![T::default(); k3 * plane], image_grad)
    }
}

/// The weight gradient of a "same" 3x3 convolution of `map(x)`.
pub(crate) fn weight_grad_same3x3<T: Element>(
    d: &Dims,
    x: &[T],
    dy: &[T],
    map: &impl InputMap<T>,
) -> Vec<T> {
    assert!(d.same3x3(), "weight_grad_same3x3 takes a 3x3 convolution with stride 1 and padding 1");
    let (p, k3, plane, image) = (d.p(), 3 * d.c, d.padded_plane(), d.c * d.h * d.w);
    // Per kernel row, the transposed gradient (`3c x o`), as in `weight_grad`.
    let acc = sum_over_images(
        d.n,
        3 * k3 * d.o,
        || vec![T::default(); k3 * plane],
        |buf, acc, n| {
            shift3(d, &x[n * image..(n + 1) * image], buf, map);
            let dy = &dy[n * d.o * p..(n + 1) * d.o * p];
            for ki in 0..3 {
                let (acc, shifted) = (&mut acc[ki * k3 * d.o..], &buf[ki * d.w..]);
                matmul((k3, d.o, p), (acc, d.o), true, shifted, (plane, 1), dy, (1, p));
            }
        },
    );
    // total[o][c][ki][kj] from acc[ki][(c, kj)][o]
    (0..d.o * d.c * 9)
        .map(|i| {
            let (oc, ki, kj) = (i / 9, i / 3 % 3, i % 3);
            let (oo, cc) = (oc / d.c, oc % d.c);
            acc[(ki * k3 + cc * 3 + kj) * d.o + oo]
        })
        .collect()
}

pub(crate) fn input_grad<T: Element>(d: &Dims, dy: &[T], w: &[T]) -> Vec<T> {
    if d.same3x3() {
        return input_grad_same3x3(d, dy, w, &|_, _| {});
    }
    let (k, p) = (d.k(), d.p());
    let image = d.c * d.h * d.w;
    // Zeroed chunks: `col2im` adds into them.
    crate::par_chunks_zeroed(
        d.n * image,
        image,
        || if d.pointwise() { vec![] } else { vec![T::default(); k * p] },
        |col, n, dx| {
            let dy = &dy[n * d.o * p..(n + 1) * d.o * p];
            // w^T (k x o) * dy (o x p)
            if d.pointwise() {
                matmul((k, p, d.o), (dx, p), false, w, (1, k), dy, (p, 1));
            } else {
                matmul((k, p, d.o), (col, p), false, w, (1, k), dy, (p, 1));
                col2im(d, col, dx);
            }
        },
    )
}

pub(crate) fn weight_grad<T: Element>(d: &Dims, x: &[T], dy: &[T]) -> Vec<T> {
    if d.same3x3() {
        return weight_grad_same3x3(d, x, dy, &Plain);
    }
    let (k, p) = (d.k(), d.p());
    let image = d.c * d.h * d.w;
    // Accumulated transposed (`k x o`): gemm then streams the long im2col rows straight from
    // memory and packs only `dy`, which is 2.4x faster at 32x32 than `o x k`, where gemm repacks
    // the whole im2col matrix of every image.
    let acc = sum_over_images(
        d.n,
        k * d.o,
        || if d.pointwise() { vec![] } else { vec![T::default(); k * p] },
        |col, acc, n| {
            let x = &x[n * image..(n + 1) * image];
            let dy = &dy[n * d.o * p..(n + 1) * d.o * p];
            // col (k x p) * dy^T (p x o)
            let col: &[T] = if d.pointwise() {
                x
            } else {
                im2col(d, x, col);
                col
            };
            matmul((k, d.o, p), (acc, d.o), true, col, (p, 1), dy, (1, p));
        },
    );
    // total[o][j] from acc[j][o]
    (0..d.o * k).map(|i| acc[i % k * d.o + i / k]).collect()
}

/// The sum over the batch of what `image(scratch, acc, n)` adds into `acc` (`len` values) for
/// each image `n`, in a fixed order: one contiguous chunk of images per thread, each into its own
/// accumulator, the chunks added in order. So the result does not depend on thread scheduling.
fn sum_over_images<T: Element, S>(
    n: usize,
    len: usize,
    scratch: impl Fn() -> S + Sync + Send,
    image: impl Fn(&mut S, &mut [T], usize) + Sync + Send,
) -> Vec<T> {
    let chunks = rayon::current_num_threads().clamp(1, n.max(1));
    let per_chunk = n.div_ceil(chunks);
    let partial: Vec<Vec<T>> = (0..chunks)
        .into_par_iter()
        .map(|chunk| {
            let (mut acc, mut scratch) = (vec![T::default(); len], scratch());
            for n in chunk * per_chunk..((chunk + 1) * per_chunk).min(n) {
                image(&mut scratch, &mut acc, n);
            }
            acc
        })
        .collect();
    let mut total = vec![T::default(); len];
    for acc in &partial {
        for (t, a) in total.iter_mut().zip(acc) {
            *t += *a;
        }
    }
    total
}

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
/// the fast kernels on the CPU in f32 and f64 (unless [`set_reference`](crate::set_reference)),
/// candle's `conv2d` elsewhere. Differentiable to any order.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if supported(x, w) && !crate::reference() {
        x.contiguous()?.apply_op2(&w.contiguous()?, Fwd { stride, pad: padding })
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
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
        bail!("conv2d_input_grad runs on the CPU in f32 or f64")
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
        bail!("conv2d_weight_grad runs on the CPU in f32 or f64")
    }
    x.contiguous()?.apply_op2(&dy.contiguous()?, Dw { stride, pad: padding, kh, kw })
}
