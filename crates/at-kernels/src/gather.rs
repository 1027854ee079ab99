//! The GEMM of the convolutions: `c = a * b`, where row `kk` of the right operand `b` is the `n`
//! contiguous values at `b[rows[kk]..]`.
//!
//! A convolution's right operand (the shifted image of `conv::shift3`, the padded output
//! gradient, an im2col matrix, or the pixel-major image of the weight gradient) is already made
//! of contiguous rows, so each image's rows are read where they are. The left operand is either
//! the same for every image (the weights: packed once per call, [`Lhs`]) or an image's own rows
//! (its output gradient, read in place, [`gather_gemm_add`]). A general GEMM (the `gemm` crate)
//! packs both operands on every call, which is a few percent of a training step at CIFAR's image
//! sizes.
//!
//! The kernel is written for AVX-512 ([`available`]); elsewhere the callers keep `gemm`.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// The most output rows per tile: each is one broadcast weight per inner step.
const MR: usize = 6;
/// 16-lane vectors per tile row: a full tile is `MR x 64` accumulators, 24 of the 32 registers.
const NV: usize = 4;
/// Output columns per tile.
const NR: usize = 16 * NV;
/// Inner steps per pass over the output, so that a tile's `KC x NR` slice of the right operand
/// (64 KiB) stays near the core while every row block uses it (measured against 64, 128 and
/// the whole inner dimension at WRN's sizes).
const KC: usize = 256;

/// The left operand (`m x k`) packed for [`gather_gemm`]: `ceil(m / MR)` blocks of rows as even
/// as possible (32 rows are blocks of 6, 6, 5, 5, 5 and 5: no tile computes padding), each block
/// stored by inner index (its `rows` values per `kk`).
pub(crate) struct Lhs {
    data: Vec<f32>,
    /// Each block's first row and number of rows; block `b` starts at `data[first * k]`.
    blocks: Vec<(usize, usize)>,
    m: usize,
    k: usize,
}

impl Lhs {
    /// Packs the `m x k` matrix whose element `(i, kk)` is `a(i, kk)`.
    ///
    /// The blocks are packed on rayon's threads: a convolution packs its weights once per call,
    /// and on one thread that was a serial gap of a few milliseconds per training step.
    pub(crate) fn new(m: usize, k: usize, a: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let blocks = row_blocks(m);
        let mut data = vec![0f32; m * k];
        // Block `(first, rows)` is `data[first * k..(first + rows) * k]`.
        let mut parts = Vec::with_capacity(blocks.len());
        let mut rest = &mut data[..];
        for &(first, rows) in &blocks {
            let (part, tail) = rest.split_at_mut(rows * k);
            parts.push((first, rows, part));
            rest = tail;
        }
        parts.into_par_iter().for_each(|(first, rows, part)| {
            for (kk, step) in part.chunks_exact_mut(rows).enumerate() {
                for (r, v) in step.iter_mut().enumerate() {
                    *v = a(first + r, kk);
                }
            }
        });
        Self { data, blocks, m, k }
    }
}

/// `m` rows as `ceil(m / MR)` blocks as even as possible: each block's first row and length.
fn row_blocks(m: usize) -> Vec<(usize, usize)> {
    let count = m.div_ceil(MR);
    (0..count).map(|b| (b * m / count, (b + 1) * m / count - b * m / count)).collect()
}

/// Whether [`gather_gemm`] runs here: x86-64 with AVX-512F, unless the process was started
/// with `AT_KERNELS_PORTABLE=1`, which makes the kernels take the path of a CPU without
/// AVX-512 (`gemm`'s), so that a machine with it can test that path whole (`.ci/run` runs the
/// kernels' and the models' tests so once more). Read once; the one environment variable the
/// kernels read, and it stands for the CPU, not for a choice of ops.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| !portable_forced() && cpu_has_avx512f())
}

/// Whether `AT_KERNELS_PORTABLE=1` asks for the path of a CPU without AVX-512.
pub(crate) fn portable_forced() -> bool {
    std::env::var_os("AT_KERNELS_PORTABLE").is_some_and(|v| v == "1")
}

fn cpu_has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[i][j] = sum_kk a[i][kk] * b[rows[kk] + j]` for `i < m`, `j < n`, into `c` (row-major, row
/// stride `ldc`), which need not be initialised: every element of the `m x n` window is written.
///
/// # Panics
///
/// Where [`available`] is false, or an operand is too short for these sizes.
pub(crate) fn gather_gemm(
    a: &Lhs,
    (b, rows): (&[f32], &[usize]),
    n: usize,
    (c, ldc): (&mut [MaybeUninit<f32>], usize),
) {
    assert_eq!(rows.len(), a.k, "one row offset per inner index");
    run(Left::Packed(a), a.m, (b, rows), n, (c, ldc), false);
}

/// `c[i][j] += sum_kk a[i * lda + kk] * b[rows[kk] + j]` for `i < m`, `kk < rows.len()`: the
/// left operand read where it is, `m` rows of stride `lda` (for a left operand that changes
/// with every image, which packing would copy once more), the rest as [`gather_gemm`].
pub(crate) fn gather_gemm_add(
    (a, lda, m): (&[f32], usize, usize),
    (b, rows): (&[f32], &[usize]),
    n: usize,
    (c, ldc): (&mut [f32], usize),
) {
    let k = rows.len();
    assert!(m == 0 || k == 0 || (m - 1) * lda + k <= a.len(), "the left operand is too short");
    let starts: Vec<usize> = (0..m).map(|i| i * lda).collect();
    // SAFETY: `run` writes only initialised values (and reads `c` only when accumulating).
    let c = unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) };
    gather_gemm_runs((a, &starts), (b, rows), n, (c, ldc), true);
}

/// `c (+)= a * b` where row `i` of the left operand is the `k = rows.len()` values at
/// `a[starts[i]..]` (runs anywhere in `a`, in any order, overlapping or not), the rest as
/// [`gather_gemm`]; `c` need not be initialised unless `accumulate`. A convolution on few pixels
/// and many channels takes its input this way, pixel-major: row `i` is output pixel `i`'s run
/// of input pixels, read where it lies in the image.
///
/// # Panics
///
/// As [`gather_gemm`], or where a run ends past `a`.
pub(crate) fn gather_gemm_runs(
    (a, starts): (&[f32], &[usize]),
    (b, rows): (&[f32], &[usize]),
    n: usize,
    (c, ldc): (&mut [MaybeUninit<f32>], usize),
    accumulate: bool,
) {
    let (m, k) = (starts.len(), rows.len());
    assert!(
        k == 0 || starts.iter().all(|&s| s + k <= a.len()),
        "a run of the left operand is out of range"
    );
    let blocks = row_blocks(m);
    run(Left::Runs { a, starts, blocks: &blocks }, m, (b, rows), n, (c, ldc), accumulate);
}

/// Where [`run`] finds the left operand.
#[derive(Clone, Copy)]
enum Left<'a> {
    /// Packed.
    Packed(&'a Lhs),
    /// Row `i`, inner index `kk` at `a[starts[i] + kk]`, rows in `blocks`.
    Runs { a: &'a [f32], starts: &'a [usize], blocks: &'a [(usize, usize)] },
}

/// `c (+)= a * b` over the inner indices `rows` covers; `c` must be initialised where
/// `accumulate`, and `a` in range (its callers check).
fn run(
    a: Left,
    m: usize,
    (b, rows): (&[f32], &[usize]),
    n: usize,
    (c, ldc): (&mut [MaybeUninit<f32>], usize),
    accumulate: bool,
) {
    let k = rows.len();
    assert!(ldc >= n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "the output is too short");
    assert!(rows.iter().all(|&r| r + n <= b.len()), "a row of the right operand is out of range");
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(MaybeUninit::new(0.0));
            }
        }
        return;
    }
    assert!(available(), "gather_gemm needs AVX-512F");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is available (asserted); the asserts above keep every row of `b` read
    // (`rows[kk] + j`, `j < n`), every element of `c` written (`i * ldc + j`, `i < m`,
    // `j < n`) in range, and the callers keep the left operand's rows and inner indices in
    // range (`a.k == k` values per packed row, or `starts[i] + k` for each row's run).
    unsafe {
        avx512::gemm(a, (b.as_ptr(), rows), n, (c.as_mut_ptr().cast::<f32>(), ldc), accumulate)
    }
}

/// Writes `planes` (`c` planes of `h x w`) pixel by pixel into `out`: pixel `(y, x)`'s `c` values
/// at `out[(first + y * stride + x) * c..]`, the rest of `out` untouched (the weight gradient's
/// right operand, see `conv::weight_grad_pixels`). Sixteen channels by sixteen pixels at a time
/// in registers where AVX-512 runs and the sizes allow it.
pub(crate) fn to_pixels(
    planes: &[f32],
    (c, h, w): (usize, usize, usize),
    (first, stride): (usize, usize),
    out: &mut [f32],
) {
    assert!(planes.len() >= c * h * w && stride >= w);
    assert!(h == 0 || w == 0 || (first + (h - 1) * stride + w) * c <= out.len());
    #[cfg(target_arch = "x86_64")]
    if available() && c % 16 == 0 && (h * w) % 16 == 0 {
        // SAFETY: AVX-512F is available; the asserts above keep every read (`ch * h * w + y * w
        // + x`) and write (`(first + y * stride + x) * c + ch`) in range.
        unsafe { avx512::to_pixels(planes, (c, h, w), (first, stride), out) };
        return;
    }
    let hw = h * w;
    for c0 in (0..c).step_by(16) {
        let c1 = (c0 + 16).min(c);
        for y in 0..h {
            for x in 0..w {
                let dst = &mut out[(first + y * stride + x) * c..][c0..c1];
                for (ch, v) in (c0..c1).zip(dst) {
                    *v = planes[ch * hw + y * w + x];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{KC, Left, MR, NR};

    /// # Safety
    ///
    /// See [`super::gather_gemm`]: AVX-512F, and operands in range.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm(
        a: Left,
        (b, rows): (*const f32, &[usize]),
        n: usize,
        (c, ldc): (*mut f32, usize),
        accumulate: bool,
    ) {
        // SAFETY: the caller's promise; each tile stays inside the block, slice and columns it
        // is given.
        unsafe {
            let k = rows.len();
            let blocks = match a {
                Left::Packed(lhs) => &lhs.blocks[..],
                Left::Runs { blocks, .. } => blocks,
            };
            // Slices of equal length (288 = 144 + 144, not 256 + 32).
            let kc_even = k.div_ceil(k.div_ceil(KC));
            for k0 in (0..k).step_by(kc_even) {
                let kc = kc_even.min(k - k0);
                let rows = &rows[k0..k0 + kc];
                for j0 in (0..n).step_by(NR) {
                    let cols = NR.min(n - j0);
                    // The lanes of the tile's last vector that are inside the output.
                    let tail = cols - (cols - 1) / 16 * 16;
                    let mask: __mmask16 = if tail == 16 { 0xffff } else { (1 << tail) - 1 };
                    for &(first, live) in blocks {
                        let mut runs = [std::ptr::null(); MR];
                        let (a, packed) = match a {
                            Left::Packed(lhs) => {
                                (lhs.data.as_ptr().add(first * lhs.k + k0 * live), true)
                            }
                            Left::Runs { a, starts, .. } => {
                                for (run, &start) in
                                    runs.iter_mut().zip(&starts[first..first + live])
                                {
                                    *run = a.as_ptr().add(start + k0);
                                }
                                (a.as_ptr(), false)
                            }
                        };
                        let t = Tile {
                            a,
                            runs,
                            packed,
                            b: b.add(j0),
                            rows,
                            c: c.add(first * ldc + j0),
                            ldc,
                            mask,
                            accumulate: accumulate || k0 > 0,
                        };
                        match live {
                            6 => t.run_rows::<6>(cols),
                            5 => t.run_rows::<5>(cols),
                            4 => t.run_rows::<4>(cols),
                            3 => t.run_rows::<3>(cols),
                            2 => t.run_rows::<2>(cols),
                            _ => t.run_rows::<1>(cols),
                        }
                    }
                }
            }
        }
    }

    /// See [`super::to_pixels`]; `c` and `h * w` multiples of 16.
    ///
    /// # Safety
    ///
    /// AVX-512F, and the operands in range as `super::to_pixels` asserts.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn to_pixels(
        planes: &[f32],
        (c, h, w): (usize, usize, usize),
        (first, stride): (usize, usize),
        out: &mut [f32],
    ) {
        let hw = h * w;
        // SAFETY: the caller's promise.
        unsafe {
            let (src, dst) = (planes.as_ptr(), out.as_mut_ptr());
            for c0 in (0..c).step_by(16) {
                // Sixteen pixels in a row of the planes (of one image row or, for narrow images,
                // of several).
                for q0 in (0..hw).step_by(16) {
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (i, r) in r.iter_mut().enumerate() {
                        *r = _mm512_loadu_ps(src.add((c0 + i) * hw + q0));
                    }
                    let r = transpose16(r);
                    for (j, r) in r.iter().enumerate() {
                        let (y, x) = ((q0 + j) / w, (q0 + j) % w);
                        _mm512_storeu_ps(dst.add((first + y * stride + x) * c + c0), *r);
                    }
                }
            }
        }
    }

    /// The 16 x 16 transpose: lane `j` of row `i` to lane `i` of row `j`.
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        // Per 128-bit lane L: t[2i] = (r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]), t[2i+1] the
        // same at 4L+2 and 4L+3.
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4i + e], lane L: rows 4i..4i+4 at column 4L + e.
        let mut u = [_mm512_setzero_ps(); 16];
        let (lo, hi) = (
            |a: __m512, b: __m512| {
                _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
            },
            |a: __m512, b: __m512| {
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
            },
        );
        for i in 0..4 {
            u[4 * i] = lo(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = hi(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = lo(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = hi(t[4 * i + 1], t[4 * i + 3]);
        }
        // Column 4L + e gathers lane L of u[e], u[4 + e], u[8 + e], u[12 + e].
        let mut out = [_mm512_setzero_ps(); 16];
        for e in 0..4 {
            let a = _mm512_shuffle_f32x4::<0x88>(u[e], u[4 + e]);
            let b = _mm512_shuffle_f32x4::<0x88>(u[8 + e], u[12 + e]);
            let c = _mm512_shuffle_f32x4::<0xdd>(u[e], u[4 + e]);
            let d = _mm512_shuffle_f32x4::<0xdd>(u[8 + e], u[12 + e]);
            out[e] = _mm512_shuffle_f32x4::<0x88>(a, b);
            out[8 + e] = _mm512_shuffle_f32x4::<0xdd>(a, b);
            out[4 + e] = _mm512_shuffle_f32x4::<0x88>(c, d);
            out[12 + e] = _mm512_shuffle_f32x4::<0xdd>(c, d);
        }
        out
    }

    /// One `R x 16V` block of the output over one slice of the inner dimension.
    struct Tile<'a> {
        /// The left block at this slice, packed: row `r` at inner step `kk` is `a[kk * R + r]`.
        a: *const f32,
        /// Otherwise row `r` at inner step `kk` is `runs[r][kk]`.
        runs: [*const f32; MR],
        packed: bool,
        /// The right operand at the tile's first column (rows at `rows[kk]` from here).
        b: *const f32,
        rows: &'a [usize],
        /// The output at the tile's first row and column.
        c: *mut f32,
        ldc: usize,
        /// The lanes of the last vector inside the output.
        mask: __mmask16,
        /// Add to the output (written by the previous slice) instead of overwriting it.
        accumulate: bool,
    }

    impl Tile<'_> {
        /// [`Tile::run`] for `cols` (at most `NR`) columns.
        ///
        /// # Safety
        ///
        /// As [`Tile::run`].
        #[target_feature(enable = "avx512f")]
        unsafe fn run_rows<const R: usize>(&self, cols: usize) {
            // SAFETY: the caller's promise.
            unsafe {
                match cols.div_ceil(16) {
                    4 if self.packed => self.run::<R, 4, true>(),
                    3 if self.packed => self.run::<R, 3, true>(),
                    2 if self.packed => self.run::<R, 2, true>(),
                    1 if self.packed => self.run::<R, 1, true>(),
                    4 => self.run::<R, 4, false>(),
                    3 => self.run::<R, 3, false>(),
                    2 => self.run::<R, 2, false>(),
                    _ => self.run::<R, 1, false>(),
                }
            }
        }

        /// # Safety
        ///
        /// AVX-512F, and the pointers valid for the tile as [`gemm`] makes it.
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const R: usize, const V: usize, const PACKED: bool>(&self) {
            // SAFETY: the caller's promise (AVX-512F; `a` holds `R` values per row of `rows`,
            // `b` a row at each offset with the tile's lanes, `c` the live rows' lanes).
            unsafe {
                let lanes = |v: usize| if v + 1 == V { self.mask } else { 0xffff };
                let mut acc = [[_mm512_setzero_ps(); V]; R];
                for (kk, &row) in self.rows.iter().enumerate() {
                    let b = self.b.add(row);
                    let mut bv = [_mm512_setzero_ps(); V];
                    for (v, bv) in bv.iter_mut().enumerate() {
                        *bv = _mm512_maskz_loadu_ps(lanes(v), b.add(16 * v));
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        // Packed: `R` values per step; runs: one value per step in each.
                        let a = if PACKED { self.a.add(kk * R + r) } else { self.runs[r].add(kk) };
                        let av = _mm512_set1_ps(*a);
                        for (acc, bv) in acc.iter_mut().zip(&bv) {
                            *acc = _mm512_fmadd_ps(av, *bv, *acc);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let c = self.c.add(r * self.ldc);
                    for (v, acc) in acc.iter().enumerate() {
                        let (c, lanes) = (c.add(16 * v), lanes(v));
                        let value = if self.accumulate {
                            _mm512_add_ps(*acc, _mm512_maskz_loadu_ps(lanes, c))
                        } else {
                            *acc
                        };
                        _mm512_mask_storeu_ps(c, lanes, value);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI on a machine meant to test the AVX-512 path sets `AT_REQUIRE_AVX512=1`: there the
    /// gather tests must run, not be ignored.
    #[test]
    fn avx512_path_is_tested_where_ci_requires_it() {
        if std::env::var_os("AT_REQUIRE_AVX512").is_some_and(|v| v == "1") {
            assert!(crate::avx512_tests_run(), "AT_KERNELS_PORTABLE=1 and AT_REQUIRE_AVX512=1");
            assert!(!cfg!(at_no_avx512), "the gather tests were built to be ignored");
        }
    }

    /// `gather_gemm` against the plain triple loop, on sizes with partial row blocks, partial
    /// column tiles, several inner slices and rows read out of order.
    #[test]
    #[cfg_attr(at_no_avx512, ignore = "no AVX-512F on this CPU: the gather kernel cannot run")]
    fn gather_gemm_matches_the_triple_loop_on_ragged_sizes() {
        if !crate::avx512_tests_run() {
            return;
        }
        for &(m, n, k) in &[(1, 1, 1), (6, 64, 128), (7, 65, 129), (13, 200, 300), (32, 17, 5)] {
            let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 250.0;
            let a: Vec<f32> = (0..m * k).map(value).collect();
            let stride = n + 3;
            let b: Vec<f32> = (0..k * stride + 11).map(|i| value(i + 17)).collect();
            // Rows in reverse order, shifted by a few elements.
            let rows: Vec<usize> = (0..k).map(|kk| (k - 1 - kk) * stride + kk % 4).collect();
            let ldc = n + 2;
            let mut c = vec![MaybeUninit::new(f32::NAN); m * ldc];
            gather_gemm(&Lhs::new(m, k, |i, kk| a[i * k + kk]), (&b, &rows), n, (&mut c, ldc));
            for i in 0..m {
                for j in 0..ldc {
                    // SAFETY: every element was initialised (NaN, or written by the GEMM).
                    let got = unsafe { c[i * ldc + j].assume_init() };
                    if j >= n {
                        assert!(
                            got.is_nan(),
                            "({m}, {n}, {k}): wrote outside the window at {i},{j}"
                        );
                        continue;
                    }
                    let want: f32 = (0..k).map(|kk| a[i * k + kk] * b[rows[kk] + j]).sum();
                    let tol = 1e-4 * (1.0 + want.abs()) * k as f32;
                    assert!(
                        (got - want).abs() <= tol,
                        "({m}, {n}, {k}) at {i},{j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// `to_pixels` (the AVX-512 transpose where it runs, 16 channels x 16 pixels) against the
    /// definition, on sizes that take the vector path and sizes that do not.
    #[test]
    fn to_pixels_writes_each_pixels_channels_contiguously() {
        for &(c, h, w) in
            &[(16, 2, 16), (32, 3, 32), (48, 1, 16), (5, 3, 7), (16, 2, 8), (16, 3, 8)]
        {
            let planes: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
            let (first, stride) = (3, w + 1);
            let len = (first + h * stride + 2) * c;
            let mut out = vec![-1f32; len];
            to_pixels(&planes, (c, h, w), (first, stride), &mut out);
            let mut want = vec![-1f32; len];
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        want[(first + y * stride + x) * c + ch] = planes[(ch * h + y) * w + x];
                    }
                }
            }
            assert_eq!(out, want, "c {c}, h {h}, w {w}");
        }
    }

    /// `gather_gemm_add` (the left operand read in place as strided rows) adds the product to
    /// what the output holds, on ragged sizes.
    #[test]
    #[cfg_attr(at_no_avx512, ignore = "no AVX-512F on this CPU: the gather kernel cannot run")]
    fn gather_gemm_add_accumulates_from_a_strided_left_operand() {
        if !crate::avx512_tests_run() {
            return;
        }
        for &(m, n, k) in &[(1, 1, 1), (16, 48, 64), (7, 33, 300), (13, 96, 5)] {
            let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 250.0;
            let lda = k + 5;
            let a: Vec<f32> = (0..m * lda).map(value).collect();
            let b: Vec<f32> = (0..k * n + 7).map(|i| value(i + 3)).collect();
            let rows: Vec<usize> = (0..k).map(|kk| kk * n + kk % 3).collect();
            let ldc = n + 1;
            let start: Vec<f32> = (0..m * ldc).map(|i| value(i + 11)).collect();
            let mut c = start.clone();
            gather_gemm_add((&a, lda, m), (&b, &rows), n, (&mut c, ldc));
            for i in 0..m {
                for j in 0..ldc {
                    let got = c[i * ldc + j];
                    let mut want = start[i * ldc + j];
                    if j < n {
                        want += (0..k).map(|kk| a[i * lda + kk] * b[rows[kk] + j]).sum::<f32>();
                    }
                    let tol = 1e-4 * (1.0 + want.abs()) * k as f32;
                    assert!(
                        (got - want).abs() <= tol,
                        "({m}, {n}, {k}) at {i},{j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
