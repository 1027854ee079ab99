//! The lowering of a convolution to GEMMs on the CPU: sizes (`Dims`), im2col and its adjoint,
//! the shifted copies of a "same" 3x3 convolution, the input maps and epilogues the fused
//! blocks use, and the forward, input-gradient and weight-gradient paths on the gather GEMM
//! (AVX-512) or `gemm`.

use std::mem::MaybeUninit;

use candle_core::{Result, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use super::pixels;
use crate::gather;

/// A float type the kernels run in.
pub(crate) trait Element:
    Copy + Default + Send + Sync + std::ops::Add<Output = Self> + std::ops::AddAssign + 'static
{
    const ONE: Self;

    /// The slice as `f32`s, where `Self` is `f32` (the type [`gather`](crate::gather) runs in).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;

    /// [`Element::as_f32`] for a mutable slice.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;

    /// [`Element::as_f32`] for an output.
    fn as_f32_uninit(s: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]>;
}
impl Element for f32 {
    const ONE: Self = 1.0;

    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }

    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }

    fn as_f32_uninit(s: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        Some(s)
    }
}
impl Element for f64 {
    const ONE: Self = 1.0;

    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }

    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }

    fn as_f32_uninit(_: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        None
    }
}

/// Every size of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dims {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) o: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
    pub(crate) stride: usize,
    pub(crate) pad: usize,
    /// Whether the GEMMs run on the gather kernel (f32 where the CPU has AVX-512, the
    /// default) or on `gemm` (what other CPUs run; the tests set it to compare the two).
    pub(crate) gather: bool,
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
        Ok(Self { n, c, h, w, o, kh, kw, ho, wo, stride, pad, gather: gather::available() })
    }

    /// Rows of the im2col matrix.
    pub(crate) fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions per image.
    pub(crate) fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1 convolution with stride 1 and no padding: the image itself is the im2col matrix.
    pub(crate) fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// A 3x3 convolution with stride 1 and padding 1, which the kernels compute from three
    /// shifted copies of the image instead of im2col's nine (see [`shift3`]).
    pub(crate) fn same3x3(&self) -> bool {
        (self.kh, self.kw, self.stride, self.pad) == (3, 3, 1, 1)
    }

    /// The length of one plane of [`shift3`]'s buffer: the image with a zero row above and below.
    pub(crate) fn padded_plane(&self) -> usize {
        (self.h + 2) * self.w
    }

    /// The range of output columns `ox` whose input column `ox * stride + kj - pad` is inside.
    pub(crate) fn valid(&self, k: usize, out: usize, input: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.pad.saturating_sub(k).div_ceil(s).min(out);
        let hi = (input + self.pad).saturating_sub(k).div_ceil(s).min(out);
        (lo, hi.max(lo))
    }
}

/// `dst (m x n, row-major with row stride dst_rs) (+)= a (m x k) * b (k x n)`, `a` and `b`
/// given by row and column strides, on this thread.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul<T: Element>(
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
pub(super) fn matmul_uninit<T: Element>(
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
pub(super) fn gemm_into<T: Element>(
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

/// A strided convolution reads every `stride`-th column of an input row, starting at each of
/// `stride` phases: [`im2col`] splits each row into its phases once (phase `b` of row `iy` at
/// `(b * h + iy) * len`, `len = ceil(w / stride)`), so that every kernel column is a contiguous
/// copy instead of a strided gather (and [`col2im`] adds into the phases, then interleaves).
pub(super) struct Phases {
    stride: usize,
    len: usize,
    h: usize,
}

impl Phases {
    fn new(d: &Dims) -> Self {
        Self { stride: d.stride, len: d.w.div_ceil(d.stride), h: d.h }
    }

    /// Where kernel column `kj` reads output column `ox`: the phase, and the index in it of
    /// `ox = 0` (`ox * stride + kj - pad = (ox + shift) * stride + phase`, `shift` negative for
    /// the kernel columns left of the centre: the caller starts at a valid `ox`).
    fn tap(&self, kj: usize, pad: usize) -> (usize, isize) {
        let t = kj as isize - pad as isize;
        let s = self.stride as isize;
        (t.rem_euclid(s) as usize, t.div_euclid(s))
    }

    /// The row of phase `b` of input row `iy` in the split buffer.
    fn row(&self, b: usize, iy: usize) -> std::ops::Range<usize> {
        let start = (b * self.h + iy) * self.len;
        start..start + self.len
    }

    fn split<T: Element>(&self, w: usize, plane: &[T], out: &mut [T]) {
        for (iy, row) in plane.chunks_exact(w).enumerate() {
            if self.stride == 2 {
                // Pairs, which the compiler turns into vector shuffles.
                let (even, odd) = out[self.row(0, iy).start..].split_at_mut(self.h * self.len);
                let (even, odd) = (&mut even[..self.len], &mut odd[..self.len]);
                for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2)) {
                    (*e, *o) = (pair[0], pair[1]);
                }
                if w % 2 == 1 {
                    even[w / 2] = row[w - 1];
                }
                continue;
            }
            for b in 0..self.stride {
                let dst = &mut out[self.row(b, iy)];
                for (d, v) in dst.iter_mut().zip(row.iter().skip(b).step_by(self.stride)) {
                    *d = *v;
                }
            }
        }
    }

    /// The adjoint of `split`: adds each phase back into its row of `plane`.
    fn merge_add<T: Element>(&self, w: usize, phases: &[T], plane: &mut [T]) {
        for (iy, row) in plane.chunks_exact_mut(w).enumerate() {
            for b in 0..self.stride {
                let src = &phases[self.row(b, iy)];
                for (d, v) in row.iter_mut().skip(b).step_by(self.stride).zip(src) {
                    *d += *v;
                }
            }
        }
    }
}

/// The im2col matrix (`k x p`) of one image (`c x h x w`).
pub(super) fn im2col<T: Element>(d: &Dims, x: &[T], col: &mut [T]) {
    let p = d.p();
    let phases = Phases::new(d);
    let mut split = vec![T::default(); if d.stride > 1 { d.stride * d.h * phases.len } else { 0 }];
    for c in 0..d.c {
        let plane = &x[c * d.h * d.w..(c + 1) * d.h * d.w];
        if d.stride > 1 {
            phases.split(d.w, plane, &mut split);
        }
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
                let (b, shift) = phases.tap(kj, d.pad);
                for oy in oy0..oy1 {
                    let iy = oy * d.stride + ki - d.pad;
                    let out = &mut dst[oy * d.wo..(oy + 1) * d.wo];
                    out[..ox0].fill(T::default());
                    out[ox1..].fill(T::default());
                    if ox0 < ox1 {
                        let src = if d.stride == 1 {
                            &plane[iy * d.w..(iy + 1) * d.w]
                        } else {
                            &split[phases.row(b, iy)]
                        };
                        // The input column of `ox0` (for stride 1, `ox0 + kj - pad`).
                        let ix0 = (ox0 as isize + shift) as usize;
                        out[ox0..ox1].copy_from_slice(&src[ix0..ix0 + (ox1 - ox0)]);
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds each column entry back to the pixel it came from, into `x`,
/// which starts at zero. Entries that came from padding are discarded (for a "same" convolution,
/// by zeroing them in `col`).
pub(super) fn col2im<T: Element>(d: &Dims, col: &mut [T], x: &mut [T]) {
    let p = d.p();
    let phases = Phases::new(d);
    let mut split = vec![T::default(); if d.stride > 1 { d.stride * d.h * phases.len } else { 0 }];
    for c in 0..d.c {
        let plane = &mut x[c * d.h * d.w..(c + 1) * d.h * d.w];
        split.fill(T::default());
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
                let (b, shift) = phases.tap(kj, d.pad);
                let ix0 = (ox0 as isize + shift) as usize;
                for oy in oy0..oy1 {
                    let iy = oy * d.stride + ki - d.pad;
                    let dst = if d.stride == 1 {
                        &mut plane[iy * d.w..(iy + 1) * d.w]
                    } else {
                        &mut split[phases.row(b, iy)]
                    };
                    let src = &src[oy * d.wo + ox0..oy * d.wo + ox1];
                    for (x, v) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                        *x += *v;
                    }
                }
            }
        }
        if d.stride > 1 {
            phases.merge_add(d.w, &split, plane);
        }
    }
}

/// How a "same" 3x3 convolution reads its input channels: [`Plain`], or through a per-channel
/// map applied while [`shift3`] copies the image (the residual-block kernel's batch norm and
/// ReLU, so that their output is never stored).
pub(crate) trait InputMap<T>: Sync {
    /// Writes channel `channel`'s values `src`, mapped, into `dst` (of the same length).
    fn copy(&self, channel: usize, src: &[T], dst: &mut [T]);

    /// Whether the map is the identity, so that a kernel may read the input itself instead of
    /// a mapped copy.
    fn is_identity(&self) -> bool {
        false
    }
}

/// The input as it is.
pub(crate) struct Plain;

impl<T: Element> InputMap<T> for Plain {
    fn copy(&self, _: usize, src: &[T], dst: &mut [T]) {
        dst.copy_from_slice(src);
    }

    fn is_identity(&self) -> bool {
        true
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
pub(super) fn shift3<T: Element>(d: &Dims, x: &[T], buf: &mut [T], map: &impl InputMap<T>) {
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
/// g[c, 2][1 + y, x - 1]` (the terms that exist), the padding rows dropped: row `(c, kj)` of `g`
/// starts at `(c * 3 + kj) * stride`, and its image part at `start` within it.
pub(super) fn unshift3<T: Element>(
    d: &Dims,
    (g, stride, start): (&[T], usize, usize),
    dx: &mut [MaybeUninit<T>],
) {
    let (w, hw) = (d.w, d.h * d.w);
    for c in 0..d.c {
        let row = |kj: usize| &g[(c * 3 + kj) * stride + start..(c * 3 + kj) * stride + start + hw];
        let (g0, g1, g2) = (row(0), row(1), row(2));
        let out = &mut dx[c * hw..(c + 1) * hw];
        for y in 0..d.h {
            let r = y * w..(y + 1) * w;
            let (out, g0, g1, g2) = (&mut out[r.clone()], &g0[r.clone()], &g1[r.clone()], &g2[r]);
            if w == 1 {
                out[0].write(g1[0]);
                continue;
            }
            // The columns with both neighbours as one branch-free (vectorisable) pass, then the
            // two edges.
            let (first, inner) = out.split_at_mut(1);
            let (inner, last) = inner.split_at_mut(w - 2);
            let sources = g1[1..w - 1].iter().zip(&g0[2..]).zip(&g2[..w - 2]);
            for (o, ((&a, &b), &c)) in inner.iter_mut().zip(sources) {
                o.write(a + b + c);
            }
            first[0].write(g1[0] + g0[1]);
            last[0].write(g1[w - 1] + g2[w - 2]);
        }
    }
}

/// The weights (`o x c x 3 x 3`) as three `o x 3c` matrices, one per kernel row `ki`, columns
/// ordered `(c, kj)` as the rows of [`shift3`]'s buffer.
pub(super) fn kernel_rows<T: Element>(d: &Dims, w: &[T]) -> Vec<T> {
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
    if pixels::takes_forward::<T>(d) {
        return pixels::forward3x3(d, x, w, &Plain, &|_, _| {});
    }
    let (k, p) = (d.k(), d.p());
    let image = d.c * d.h * d.w;
    let gather = dense_gather(d.gather, w, (d.o, k, p), false);
    let image_conv = |col: &mut Vec<T>, n: usize, y: &mut [MaybeUninit<T>]| {
        let x = &x[n * image..(n + 1) * image];
        let col: &[T] = if d.pointwise() {
            x
        } else {
            im2col(d, x, col);
            col
        };
        dense_gemm(&gather, (d.o, p, k), (y, p), (w, (k, 1)), col);
    };
    let init = || if d.pointwise() { vec![] } else { vec![T::default(); k * p] };
    // SAFETY: the GEMM writes the whole chunk (`o x p`).
    unsafe { crate::par_chunks_uninit(d.n * d.o * p, d.o * p, init, image_conv) }
}

/// How [`dense_gemm`]'s gather GEMM reads its left operand: a row-major `a` where it is (each
/// row one contiguous run: no copy), the transpose of one packed (`gather::Lhs`).
pub(super) enum DenseLeft {
    /// The offset of each row's run.
    Runs(Vec<usize>),
    Packed(gather::Lhs),
}

/// For [`dense_gemm`]: how to read `a` (`m x k` row-major, or the transpose of a `k x m` one),
/// and the offsets of the `k` rows of a dense `k x n` right operand, where the gather GEMM runs
/// (f32 on AVX-512 or AVX2).
pub(super) fn dense_gather<T: Element>(
    on: bool,
    a: &[T],
    (m, k, n): (usize, usize, usize),
    transposed: bool,
) -> Option<(DenseLeft, Vec<usize>)> {
    let a = T::as_f32(a).filter(|_| on)?;
    let left = if transposed {
        let cols: Vec<usize> = (0..k).map(|kk| kk * m).collect();
        DenseLeft::Packed(gather::Lhs::new(a, &(0..m).collect::<Vec<_>>(), &cols))
    } else {
        DenseLeft::Runs((0..m).map(|i| i * k).collect())
    };
    Some((left, (0..k).map(|kk| kk * n).collect()))
}

/// `dst = a * b` (`m x n`, row stride `dst_rs`) for a dense `b` (`k x n`): the gather GEMM
/// reading `a` as [`dense_gather`] says where it runs, `gemm` on `a` (given by its strides)
/// otherwise.
pub(super) fn dense_gemm<T: Element>(
    gather: &Option<(DenseLeft, Vec<usize>)>,
    (m, n, k): (usize, usize, usize),
    dst: (&mut [MaybeUninit<T>], usize),
    (a, a_strides): (&[T], (usize, usize)),
    b: &[T],
) {
    match gather {
        Some((left, rows)) => {
            let (dst, dst_rs) = dst;
            let (b, dst) = (T::as_f32(b).expect("f32"), T::as_f32_uninit(dst).expect("f32"));
            match left {
                DenseLeft::Packed(lhs) => gather::gather_gemm(lhs, (b, rows), n, (dst, dst_rs)),
                DenseLeft::Runs(starts) => {
                    let a = T::as_f32(a).expect("f32");
                    gather::gather_gemm_runs((a, starts), (b, rows), n, (dst, dst_rs), false)
                }
            }
        }
        None => matmul_uninit((m, n, k), dst, a, a_strides, b, (n, 1)),
    }
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
    if pixels::takes_forward::<T>(d) {
        return pixels::forward3x3(d, x, w, map, epilogue);
    }
    let (p, k3, plane, image) = (d.p(), 3 * d.c, d.padded_plane(), d.c * d.h * d.w);
    // With the gather GEMM: the weights read where they are (`o x 9c`, each output channel's
    // row one run: packing them cost more than it saved, 128x28 forward 8.7 -> 8.4 ms), and row
    // `(c, ki, kj)` of the im2col matrix read from the shifted copy `(c, kj)` at kernel row
    // `ki`.
    let gather = T::as_f32(w).filter(|_| d.gather).map(|w| {
        let by_row: Vec<usize> = (0..d.o).map(|o| o * 9 * d.c).collect();
        let rows: Vec<usize> =
            (0..9 * d.c).map(|kk| (kk / 9 * 3 + kk % 3) * plane + kk / 3 % 3 * d.w).collect();
        (w, by_row, rows)
    });
    let rows = if gather.is_some() { vec![] } else { kernel_rows(d, w) };
    let image_conv = |buf: &mut Vec<T>, n: usize, y: &mut [MaybeUninit<T>]| {
        shift3(d, &x[n * image..(n + 1) * image], buf, map);
        if let Some((w, by_row, offsets)) = &gather {
            let (buf, y) = (T::as_f32(buf).expect("f32"), T::as_f32_uninit(y).expect("f32"));
            gather::gather_gemm_runs((w, by_row), (buf, offsets), p, (y, p), false);
        } else {
            let (w0, shifted0) = (&rows[..d.o * k3], &buf[..]);
            matmul_uninit((d.o, p, k3), (&mut *y, p), w0, (k3, 1), shifted0, (plane, 1));
        }
        // SAFETY: the GEMM above wrote every element of `y` (`o x p`, row stride `p`).
        let y = unsafe { crate::assume_init_mut(y) };
        if gather.is_none() {
            for ki in 1..3 {
                let (wk, shifted) = (&rows[ki * d.o * k3..], &buf[ki * d.w..]);
                matmul((d.o, p, k3), (y, p), true, wk, (k3, 1), shifted, (plane, 1));
            }
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
    if pixels::takes_input_grad::<T>(d) {
        return pixels::input_grad_same3x3(d, dy, w, epilogue);
    }
    let (p, k3, plane, image) = (d.p(), 3 * d.c, d.padded_plane(), d.c * d.h * d.w);
    // With the gather GEMM, one GEMM per image: `g[(c, kj)][q] = sum over (ki, o) of
    // w[o][c][ki][kj] dy[o][q - (ki - 1) w]`, the output gradient read from a copy whose rows
    // have `w` zeros on each side (`padded` long), so that the rows shifted by a kernel row stay
    // inside it.
    let padded = p + 2 * d.w;
    let gather = T::as_f32(w).filter(|_| d.gather).map(|w| {
        // Row `(c, kj)` and inner index `(ki, o)` of `w[o][c][ki][kj]`.
        let by_row: Vec<usize> = (0..k3).map(|r| r / 3 * 9 + r % 3).collect();
        let by_col: Vec<usize> = (0..3 * d.o).map(|kk| kk % d.o * 9 * d.c + kk / d.o * 3).collect();
        let lhs = gather::Lhs::new(w, &by_row, &by_col);
        let rows: Vec<usize> =
            (0..3 * d.o).map(|kk| kk % d.o * padded + (2 - kk / d.o) * d.w).collect();
        (lhs, rows)
    });
    let rows = if gather.is_some() { vec![] } else { kernel_rows(d, w) };
    let image_grad = |g: &mut Vec<T>, n: usize, dx: &mut [MaybeUninit<T>]| {
        let dy = &dy[n * d.o * p..(n + 1) * d.o * p];
        if let Some((lhs, offsets)) = &gather {
            // `g` is the padded copy of dy (its padding stays zero) and then `3c x p`.
            let (dyp, g) = g.split_at_mut(d.o * padded);
            for (padded, dy) in dyp.chunks_exact_mut(padded).zip(dy.chunks_exact(p)) {
                padded[d.w..d.w + p].copy_from_slice(dy);
            }
            // SAFETY: the GEMM writes only initialised values into `g`.
            let g_out = unsafe { &mut *(&mut g[..k3 * p] as *mut [T] as *mut [MaybeUninit<T>]) };
            let dyp = T::as_f32(dyp).expect("f32");
            gather::gather_gemm(lhs, (dyp, offsets), p, (T::as_f32_uninit(g_out).expect("f32"), p));
            unshift3(d, (g, p, 0), dx);
        } else {
            // The three GEMMs write overlapping windows of each row: the first overwrites
            // `[0, p)`, the others add; the rest of the row starts at zero.
            for row in g.chunks_exact_mut(plane) {
                row[p..].fill(T::default());
            }
            for ki in 0..3 {
                let (wk, window) = (&rows[ki * d.o * k3..], &mut g[ki * d.w..]);
                // w_ki^T (3c x o) * dy (o x p)
                matmul((k3, p, d.o), (window, plane), ki > 0, wk, (1, k3), dy, (p, 1));
            }
            unshift3(d, (g, plane, d.w), dx);
        }
        // SAFETY: `unshift3` initialised every element of `dx`.
        epilogue(n, unsafe { crate::assume_init_mut(dx) });
    };
    let scratch = if gather.is_some() { d.o * padded + k3 * p } else { k3 * plane };
    // SAFETY: `image_grad` writes its whole chunk.
    unsafe {
        crate::par_chunks_uninit(d.n * image, image, || vec![T::default(); scratch], image_grad)
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
    if let Some(dy) = T::as_f32(dy).filter(|_| d.gather) {
        return weight_grad_pixels(d, x, dy, map);
    }
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
    per_output_channel(d.o, (d.c, 3, 3), |oo, cc, ki, kj| acc[(ki * k3 + cc * 3 + kj) * d.o + oo])
}

/// Whether [`weight_grad_pixels`] takes this convolution: 3x3 with padding 1 or 1x1 without,
/// any stride.
pub(super) fn pixel_weight_grad(d: &Dims) -> bool {
    d.kh == d.kw && d.kh == 2 * d.pad + 1 && d.pad <= 1
}

/// Output pixels per image below which [`weight_grad_pixels`] splits the output's rows among
/// the threads and runs each row's sum over the whole batch in one GEMM, instead of one GEMM
/// per image into a per-thread accumulator: with few pixels per image the inner dimension of
/// each image's GEMM is short and the accumulator (`kh x o x kw c`, megabytes at 512 channels)
/// is read and written once per image. Measured at 224 px, batch 8 (`conv_bench resnet`):
/// ResNet's 7x7 layers (49 pixels) 21 -> 15.5 ms this way, its 14x14 ones (196) 10.5 -> 11.5,
/// so only the former; and only from `pixels::PIXEL_MAJOR_CHANNELS` output channels (WRN's
/// 8x8 layers of 128 channels at batch 128: 13.5 -> 14.3 ms this way).
const ROWS_OVER_BATCH_PIXELS: usize = 100;

/// The weight gradient on the gather GEMM (f32 on AVX-512), per kernel row `ki`:
/// `dW_ki[o][(kj, c)] = sum over output pixels j of dy[o][j] x_pix[run(ki, j)][(kj, c)]`, where
/// `x_pix` is `map(x)` stored pixel by pixel ([`gather::to_pixels`]) on a grid of `w + 1`
/// columns with a zero row above and below: the last column is zero, so the `kw` pixels that
/// kernel row `ki` reads for output pixel `j` are one contiguous run of `kw * c` values (the
/// pixel left of column 0 is the zero column of the row above, the pixel right of column
/// `w - 1` this row's). The output gradient is the left operand (rows of `p` values per image);
/// no shifted copies, no im2col.
///
/// Large images: one GEMM per image into a per-thread accumulator (chunks of images summed in
/// order, [`sum_over_images`]). Small ones ([`ROWS_OVER_BATCH_PIXELS`]): every image's grid
/// first, then each thread takes a band of output rows and sums over the whole batch (its rows
/// of the output gradient copied side by side, image after image). Either way the sum over the
/// batch is in a fixed order.
pub(super) fn weight_grad_pixels<T: Element>(
    d: &Dims,
    x: &[T],
    dy: &[f32],
    map: &impl InputMap<T>,
) -> Vec<T> {
    assert!(pixel_weight_grad(d), "weight_grad_pixels takes 3x3 (padding 1) or 1x1 (padding 0)");
    let (p, image, (kh, kw)) = (d.p(), d.c * d.h * d.w, (d.kh, d.kw));
    let c3 = kw * d.c;
    let grid = pixels::Grid::new(d.c, d.h, d.w);
    // rows[ki][(oy, ox)]: the run from input pixel (oy s + ki - pad, ox s - pad), which is grid
    // position (oy s + ki - pad + 1, ox s - pad + 1).
    let rows: Vec<Vec<usize>> = (0..kh)
        .map(|ki| {
            (0..p)
                .map(|j| {
                    let (oy, ox) = (j / d.wo, j % d.wo);
                    grid.at(oy * d.stride + ki + 1 - d.pad, ox * d.stride + 1 - d.pad)
                })
                .collect()
        })
        .collect();
    // acc[o][ki][(kj, c)] (by rows over the batch) or acc[ki][o][(kj, c)] (by images).
    let by_rows = p < ROWS_OVER_BATCH_PIXELS && d.o >= pixels::PIXEL_MAJOR_CHANNELS;
    let (acc, row_major) = if by_rows {
        let grids = grid.build(d.n, x, map);
        // Image `n`'s runs are its grid's, `n` grids further.
        let rows: Vec<Vec<usize>> = rows
            .iter()
            .map(|rows| {
                (0..d.n).flat_map(|n| rows.iter().map(move |r| n * grid.len() + r)).collect()
            })
            .collect();
        let band = d.o.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(6).min(d.o);
        let band_rows = |left: &mut Vec<f32>, b: usize, acc: &mut [MaybeUninit<T>]| {
            let (o0, m) = (b * band, acc.len() / (kh * c3));
            let acc = T::as_f32_uninit(acc).expect("f32");
            // This band's rows of the output gradient, image after image: `m x n p`.
            left.clear();
            for o in o0..o0 + m {
                left.extend((0..d.n).flat_map(|n| &dy[(n * d.o + o) * p..][..p]));
            }
            let starts: Vec<usize> = (0..m).map(|i| i * d.n * p).collect();
            // Kernel row `ki` writes columns `ki c3..(ki + 1) c3` of every row: the GEMMs
            // overwrite the chunk whole, with no zero fill before them.
            for (ki, rows) in rows.iter().enumerate() {
                let acc = &mut acc[ki * c3..];
                gather::gather_gemm_runs(
                    (left, &starts),
                    (&grids, rows),
                    c3,
                    (acc, kh * c3),
                    false,
                );
            }
        };
        // SAFETY: `band_rows` writes every element of its chunk (see above).
        let acc =
            unsafe { crate::par_chunks_uninit(d.o * kh * c3, band * kh * c3, Vec::new, band_rows) };
        (acc, true)
    } else {
        let acc = sum_over_images(
            d.n,
            kh * d.o * c3,
            || (Vec::new(), vec![0f32; grid.len()]),
            |(mapped, x_pix), acc, n| {
                // SAFETY: `write` stores only initialised values into the (zeroed) buffer.
                let pixels = unsafe {
                    &mut *(x_pix.as_mut_slice() as *mut [f32] as *mut [MaybeUninit<f32>])
                };
                grid.write(&x[n * image..(n + 1) * image], map, mapped, pixels);
                let dy = &dy[n * d.o * p..(n + 1) * d.o * p];
                let acc = T::as_f32_mut(acc).expect("f32");
                for (ki, rows) in rows.iter().enumerate() {
                    let acc = &mut acc[ki * d.o * c3..(ki + 1) * d.o * c3];
                    gather::gather_gemm_add((dy, p, d.o), (x_pix, rows), c3, (acc, c3));
                }
            },
        );
        (acc, false)
    };
    // total[o][c][ki][kj]: run (ki, kj) of output channel o is acc's row (o, ki) or (ki, o)
    // from column kj c.
    interleave_runs(acc, d.o, (d.c, kh * kw), |oo, t| {
        let (ki, kj) = (t / kw, t % kw);
        let row = if row_major { oo * kh + ki } else { ki * d.o + oo };
        row * c3 + kj * d.c
    })
}

/// A weight gradient (`o x c x taps`, `taps` = `kh kw`) from an accumulator that holds each
/// output channel `oo`'s values of kernel position `t` for the `c` input channels as one run
/// from `start(oo, t)`: per output channel (a chunk on rayon's threads), its `taps` runs
/// interleaved ([`interleave`]; nine runs, 3x3, as an array), one run (1x1) a copy: the
/// per-element closure of [`per_output_channel`] took 2.3-3.5 ms per ResNet 512x7 layer at
/// batch 8, about 22 ms of ResNet-34's step.
fn interleave_runs<T: Element>(
    acc: Vec<T>,
    o: usize,
    (c, taps): (usize, usize),
    start: impl Fn(usize, usize) -> usize + Sync,
) -> Vec<T> {
    let channel = |_: &mut (), oo: usize, out: &mut [MaybeUninit<T>]| {
        let run = |t: usize| &acc[start(oo, t)..][..c];
        match taps {
            1 => {
                for (d, &v) in out.iter_mut().zip(run(0)) {
                    d.write(v);
                }
            }
            9 => interleave(&std::array::from_fn::<_, 9, _>(run), out),
            _ => interleave(&(0..taps).map(run).collect::<Vec<_>>(), out),
        }
    };
    // SAFETY: each chunk's `c taps` elements are written above.
    unsafe { crate::par_chunks_uninit(o * c * taps, c * taps, || (), channel) }
}

/// `out[cc runs.len() + t] = runs[t][cc]`: inlined, so that nine runs (an array) make an inner
/// loop of constant length.
#[inline(always)]
fn interleave<T: Copy>(runs: &[&[T]], out: &mut [MaybeUninit<T>]) {
    for (cc, d) in out.chunks_exact_mut(runs.len()).enumerate() {
        for (d, run) in d.iter_mut().zip(runs) {
            d.write(run[cc]);
        }
    }
}

/// A weight gradient (`o x c x kh x kw`) from an accumulator in another order: `value(o, c, ki,
/// kj)` is its element. One output channel per chunk on rayon's threads, its elements in
/// order by nested loops: the permutation reads its source with a stride, which on one thread
/// took as long as the GEMM for ResNet's 512-channel layers, and with an index divided into
/// `(c, ki, kj)` per element, a few percent of a ResNet step.
fn per_output_channel<T: Element>(
    o: usize,
    (c, kh, kw): (usize, usize, usize),
    value: impl Fn(usize, usize, usize, usize) -> T + Sync,
) -> Vec<T> {
    let row = |_: &mut (), oo: usize, out: &mut [MaybeUninit<T>]| {
        let mut out = out.iter_mut();
        for cc in 0..c {
            for ki in 0..kh {
                for kj in 0..kw {
                    out.next().expect("c kh kw values per channel").write(value(oo, cc, ki, kj));
                }
            }
        }
    };
    // SAFETY: each chunk's `c kh kw` elements are written above.
    unsafe { crate::par_chunks_uninit(o * c * kh * kw, c * kh * kw, || (), row) }
}

pub(crate) fn input_grad<T: Element>(d: &Dims, dy: &[T], w: &[T]) -> Vec<T> {
    if d.same3x3() {
        return input_grad_same3x3(d, dy, w, &|_, _| {});
    }
    if pixels::takes_input_grad_strided::<T>(d) {
        return pixels::input_grad_strided3x3(d, dy, w);
    }
    let (k, p) = (d.k(), d.p());
    let image = d.c * d.h * d.w;
    let gather = dense_gather(d.gather, w, (k, d.o, p), true);
    // Zeroed chunks: `col2im` adds into them.
    crate::par_chunks_zeroed(
        d.n * image,
        image,
        || if d.pointwise() { vec![] } else { vec![T::default(); k * p] },
        |col, n, dx| {
            let dy = &dy[n * d.o * p..(n + 1) * d.o * p];
            // w^T (k x o) * dy (o x p), into memory that is initialised (so any value the GEMM
            // writes keeps it so).
            let out = if d.pointwise() { &mut *dx } else { &mut col[..] };
            // SAFETY: the GEMM writes only initialised values.
            let out = unsafe { &mut *(out as *mut [T] as *mut [MaybeUninit<T>]) };
            dense_gemm(&gather, (k, p, d.o), (out, p), (w, (1, k)), dy);
            if !d.pointwise() {
                col2im(d, col, dx);
            }
        },
    )
}

pub(crate) fn weight_grad<T: Element>(d: &Dims, x: &[T], dy: &[T]) -> Vec<T> {
    if d.same3x3() {
        return weight_grad_same3x3(d, x, dy, &Plain);
    }
    if let Some(dy) = T::as_f32(dy).filter(|_| d.gather && pixel_weight_grad(d)) {
        return weight_grad_pixels(d, x, dy, &Plain);
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
    per_output_channel(d.o, (k, 1, 1), |oo, j, _, _| acc[j * d.o + oo])
}

/// The sum over the batch of what `image(scratch, acc, n)` adds into `acc` (`len` values) for
/// each image `n`, in a fixed order: one contiguous chunk of images per thread, each into its own
/// accumulator, the chunks added in order. So the result does not depend on thread scheduling.
pub(super) fn sum_over_images<T: Element, S>(
    n: usize,
    len: usize,
    scratch: impl Fn() -> S + Sync + Send,
    image: impl Fn(&mut S, &mut [T], usize) + Sync + Send,
) -> Vec<T> {
    let chunks = rayon::current_num_threads().clamp(1, n.max(1));
    let per_chunk = n.div_ceil(chunks);
    let mut partial: Vec<Vec<T>> = (0..chunks)
        .into_par_iter()
        .map(|chunk| {
            let (mut acc, mut scratch) = (vec![T::default(); len], scratch());
            for n in chunk * per_chunk..((chunk + 1) * per_chunk).min(n) {
                image(&mut scratch, &mut acc, n);
            }
            acc
        })
        .collect();
    // Zero plus each chunk's accumulator in order, into the first, on rayon's threads: a pass
    // over a weight-sized buffer (ResNet-34's weight gradients at batch 8: 10.3 ms per step as
    // a serial loop into a zeroed total, 4.6 ms so).
    let (total, rest) = partial.split_first_mut().expect("at least one chunk");
    total.par_chunks_mut(SUM_CHUNK).enumerate().for_each(|(i, total)| {
        let start = i * SUM_CHUNK;
        for (j, t) in total.iter_mut().enumerate() {
            *t = rest.iter().fold(T::default() + *t, |sum, acc| sum + acc[start + j]);
        }
    });
    partial.swap_remove(0)
}

/// Values per task of [`sum_over_images`]' final sum.
const SUM_CHUNK: usize = 1 << 14;
