//! The GEMM of a "same" 3x3 convolution without repacking the image: `c = a * b`, where row
//! `kk` of the right operand `b` is the `n` contiguous values at `b[rows[kk]..]`.
//!
//! The convolution's right operand (the shifted image of `conv::shift3`, or the padded output
//! gradient) is already made of contiguous rows, and its left operand (the weights) is the same
//! for every image: so the weights are packed once per call ([`Lhs`]) and each image's rows are
//! read where they are, one GEMM per image whose inner dimension is every kernel tap (`9c` for
//! the forward pass instead of three GEMMs of `3c`). A general GEMM (the `gemm` crate) packs both
//! operands on every call, which is a few percent of a training step at CIFAR's image sizes.
//!
//! The kernel is written for AVX-512 ([`available`]); elsewhere the callers keep `gemm`.

use std::mem::MaybeUninit;

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
    pub(crate) fn new(m: usize, k: usize, a: impl Fn(usize, usize) -> f32) -> Self {
        let count = m.div_ceil(MR);
        let blocks: Vec<(usize, usize)> =
            (0..count).map(|b| (b * m / count, (b + 1) * m / count - b * m / count)).collect();
        let mut data = Vec::with_capacity(m * k);
        for &(first, rows) in &blocks {
            for kk in 0..k {
                data.extend((first..first + rows).map(|i| a(i, kk)));
            }
        }
        Self { data, blocks, m, k }
    }
}

/// Whether this CPU runs [`gather_gemm`] (x86-64 with AVX-512F).
pub(crate) fn available() -> bool {
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
    let (m, k) = (a.m, a.k);
    assert_eq!(rows.len(), k, "one row offset per inner index");
    assert!(ldc >= n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "the output is too short");
    assert!(rows.iter().all(|&r| r + n <= b.len()), "a row of the right operand is out of range");
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            row[..n].fill(MaybeUninit::new(0.0));
        }
        return;
    }
    assert!(available(), "gather_gemm needs AVX-512F");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is available (asserted); the asserts above keep every row of `b` read
    // (`rows[kk] + j`, `j < n`) and every element of `c` written (`i * ldc + j`, `i < m`,
    // `j < n`) in range, and the packed `a` holds `m * k` values.
    unsafe {
        avx512::gemm(a, b.as_ptr(), rows, n, c.as_mut_ptr().cast::<f32>(), ldc)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{KC, Lhs, NR};

    /// # Safety
    ///
    /// See [`super::gather_gemm`]: AVX-512F, and operands in range.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm(
        a: &Lhs,
        b: *const f32,
        rows: &[usize],
        n: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: the caller's promise; each tile stays inside the block, slice and columns it
        // is given.
        unsafe {
            let (n, k) = (n, a.k);
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let rows = &rows[k0..k0 + kc];
                for j0 in (0..n).step_by(NR) {
                    let cols = NR.min(n - j0);
                    // The lanes of the tile's last vector that are inside the output.
                    let tail = cols - (cols - 1) / 16 * 16;
                    let mask: __mmask16 = if tail == 16 { 0xffff } else { (1 << tail) - 1 };
                    for &(first, live) in &a.blocks {
                        let t = Tile {
                            a: a.data.as_ptr().add(first * k + k0 * live),
                            b: b.add(j0),
                            rows,
                            c: c.add(first * ldc + j0),
                            ldc,
                            mask,
                            accumulate: k0 > 0,
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

    /// One `R x 16V` block of the output over one slice of the inner dimension.
    struct Tile<'a> {
        /// The packed left block at this slice (`R` values per inner step).
        a: *const f32,
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
                    4 => self.run::<R, 4>(),
                    3 => self.run::<R, 3>(),
                    2 => self.run::<R, 2>(),
                    _ => self.run::<R, 1>(),
                }
            }
        }

        /// # Safety
        ///
        /// AVX-512F, and the pointers valid for the tile as [`gemm`] makes it.
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const R: usize, const V: usize>(&self) {
            // SAFETY: the caller's promise (AVX-512F; `a` holds `R` values per row of `rows`,
            // `b` a row at each offset with the tile's lanes, `c` the live rows' lanes).
            unsafe {
                let lanes = |v: usize| if v + 1 == V { self.mask } else { 0xffff };
                let mut acc = [[_mm512_setzero_ps(); V]; R];
                for (kk, &row) in self.rows.iter().enumerate() {
                    let (b, a) = (self.b.add(row), self.a.add(kk * R));
                    let mut bv = [_mm512_setzero_ps(); V];
                    for (v, bv) in bv.iter_mut().enumerate() {
                        *bv = _mm512_maskz_loadu_ps(lanes(v), b.add(16 * v));
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*a.add(r));
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

    /// `gather_gemm` against the plain triple loop, on sizes with partial row blocks, partial
    /// column tiles, several inner slices and rows read out of order.
    #[test]
    fn gather_gemm_matches_the_triple_loop_on_ragged_sizes() {
        if !available() {
            // The convolutions keep `gemm` on this CPU (`conv`'s tests cover that path).
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
}
