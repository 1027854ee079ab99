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
//! The tile kernel is written for AVX-512 (`MR x 64` tiles) and for AVX2 with FMA (`MR x 16`),
//! chosen at run time ([`isa`]); elsewhere the callers keep `gemm`.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// The most output rows per tile: each is one broadcast weight per inner step.
const MR: usize = 6;
/// Inner steps per pass over the output, so that a tile's `KC x NR` slice of the right operand
/// (64 KiB with AVX-512's 64 columns, 16 KiB with AVX2's 16) stays near the core while every
/// row block uses it (measured against 64, 128 and the whole inner dimension at WRN's sizes).
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
    /// Packs the `rows.len() x cols.len()` matrix whose element `(i, kk)` is `a[rows[i] +
    /// cols[kk]]`: a row-major matrix (`rows[i] = i k`, `cols[kk] = kk`), its transpose, or a
    /// convolution's weights in the order of its input gradient, each index an offset.
    ///
    /// The blocks are packed on rayon's threads: a convolution packs its weights once per call,
    /// and on one thread that was a serial gap of a few milliseconds per training step. The
    /// offsets are computed once per row and column, not per element (a closure dividing each
    /// element's indices into a weight's four took 10 ms of ResNet-34's step at batch 8).
    ///
    /// # Panics
    ///
    /// Where an element is past the end of `a`.
    pub(crate) fn new(a: &[f32], rows: &[usize], cols: &[usize]) -> Self {
        let (m, k) = (rows.len(), cols.len());
        let blocks = row_blocks(m);
        let mut data = vec![0f32; m * k];
        // Block `(first, rows)` is `data[first * k..(first + rows) * k]`.
        let mut parts = Vec::with_capacity(blocks.len());
        let mut rest = &mut data[..];
        for &(first, live) in &blocks {
            let (part, tail) = rest.split_at_mut(live * k);
            parts.push((&rows[first..first + live], part));
            rest = tail;
        }
        parts.into_par_iter().for_each(|(rows, part)| {
            for (&col, step) in cols.iter().zip(part.chunks_exact_mut(rows.len())) {
                for (&row, v) in rows.iter().zip(step) {
                    *v = a[row + col];
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

/// The instruction set the kernels run on. The gather GEMM and its transposes have an AVX-512
/// and an AVX2 (with FMA) version; [`Isa::Portable`] leaves the GEMMs to the `gemm` crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// No gather kernel: `gemm`'s GEMMs (any CPU).
    Portable,
    /// 256-bit vectors with FMA: x86-64 CPUs without AVX-512 (Haswell on, Zen 1-3).
    Avx2,
    /// 512-bit vectors: AVX-512F.
    Avx512,
}

impl Isa {
    /// The name `AT_KERNELS_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The path the kernels take in this process: the widest this CPU has, or a narrower one where
/// the process was started with `AT_KERNELS_ISA` set to `avx2` or `portable`, so that a machine
/// with AVX-512 can test (and time) the paths of older CPUs whole (`.ci/run` runs the kernels'
/// and the models' tests on each). Read once; the one environment variable the kernels read,
/// and it stands for the CPU, not for a choice of ops.
///
/// # Panics
///
/// On a value of `AT_KERNELS_ISA` other than `avx512`, `avx2` or `portable`.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| chosen_isa(std::env::var("AT_KERNELS_ISA").ok().as_deref(), cpu_isa()))
}

/// The path for a CPU whose widest is `cpu` where `AT_KERNELS_ISA` is `asked`: that one, or
/// the CPU's where it asks for more than the CPU has (a cap, as oneDNN's `ONEDNN_MAX_CPU_ISA`).
fn chosen_isa(asked: Option<&str>, cpu: Isa) -> Isa {
    match asked {
        None | Some("") => cpu,
        Some(asked) => [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .find(|isa| isa.name() == asked)
            .unwrap_or_else(|| panic!("AT_KERNELS_ISA={asked}: it takes avx512, avx2 or portable"))
            .min(cpu),
    }
}

/// Whether [`gather_gemm`] runs here (see [`isa`]).
pub(crate) fn available() -> bool {
    isa() != Isa::Portable
}

fn cpu_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Portable
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
    run(Left::Packed(a), a.m, (b, rows), None, n, (c, ldc), false);
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
    gemm_on_runs((a, starts), (b, rows, None), n, (c, ldc), accumulate);
}

/// The width of the panels of [`gather_gemm_panels`]' right operand: the tile kernel's (64
/// columns with AVX-512, 16 with AVX2), so that a tile's slice of the operand is one
/// contiguous block.
pub(crate) fn panel_width() -> usize {
    match isa() {
        Isa::Avx2 => 16,
        Isa::Avx512 | Isa::Portable => 64,
    }
}

/// [`gather_gemm_runs`] with the right operand stored by panels of `width` columns (a multiple
/// of [`panel_width`]), `stride` values apart: row `kk`'s column `j` is `b[j / width * stride +
/// rows[kk] + j % width]`. A convolution's weights, which every tile reads again, are stored so
/// (`conv::pixels`): with rows `width` apart, a tile's slice of them is then one contiguous
/// block, which AVX2's tiles read in place instead of copying it first.
///
/// # Panics
///
/// As [`gather_gemm_runs`], or where the panels overlap or `width` is not a multiple of
/// [`panel_width`].
pub(crate) fn gather_gemm_panels(
    (a, starts): (&[f32], &[usize]),
    (b, rows, panels): (&[f32], &[usize], (usize, usize)),
    n: usize,
    (c, ldc): (&mut [MaybeUninit<f32>], usize),
    accumulate: bool,
) {
    assert!(panels.0.is_multiple_of(panel_width()), "a tile would straddle two panels");
    gemm_on_runs((a, starts), (b, rows, Some(panels)), n, (c, ldc), accumulate);
}

/// [`gather_gemm_runs`] and [`gather_gemm_panels`]: checks the runs, then [`run`].
fn gemm_on_runs(
    (a, starts): (&[f32], &[usize]),
    (b, rows, panels): (&[f32], &[usize], Option<(usize, usize)>),
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
    run(Left::Runs { a, starts, blocks: &blocks }, m, (b, rows), panels, n, (c, ldc), accumulate);
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
/// `panels`: where the right operand is stored by panels, their width and stride (see
/// [`gather_gemm_panels`]), a multiple of the tile's width.
fn run(
    a: Left,
    m: usize,
    (b, rows): (&[f32], &[usize]),
    panels: Option<(usize, usize)>,
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
    // With panels at least their width apart, the last one's last column is the farthest.
    let end = match panels {
        None => n,
        Some((width, stride)) => {
            assert!(width > 0 && stride >= width, "the right operand's panels overlap");
            (n - 1) / width * stride + (n - 1) % width + 1
        }
    };
    assert!(rows.iter().all(|&r| r + end <= b.len()), "a row of the right operand is out of range");
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(MaybeUninit::new(0.0));
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let kernel = match isa() {
            Isa::Avx512 => avx512::KERNEL,
            Isa::Avx2 => avx2::KERNEL,
            Isa::Portable => panic!("gather_gemm needs AVX2 and FMA, or AVX-512F"),
        };
        // SAFETY: the kernel's instructions are available (`isa`); the asserts above keep every
        // row of `b` read (`rows[kk] + j`, `j < n`), every element of `c` written (`i * ldc +
        // j`, `i < m`, `j < n`) in range, and the callers keep the left operand's rows and inner
        // indices in range (`a.k == k` values per packed row, or `starts[i] + k` for each row's
        // run).
        unsafe {
            let (b, c) = ((b.as_ptr(), rows, panels), (c.as_mut_ptr().cast::<f32>(), ldc));
            tiles(a, b, n, c, accumulate, kernel)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    panic!("gather_gemm needs x86-64 with AVX2 and FMA, or AVX-512F")
}

/// Writes `planes` (`c` planes of `h x w`) pixel by pixel into `out`: pixel `(y, x)`'s `c` values
/// at `out[(first + y * stride + x) * c..]`, the rest of `out` untouched (the weight gradient's
/// right operand, see `conv::weight_grad_pixels`). Sixteen (AVX-512) or eight (AVX2) channels
/// by as many pixels at a time in registers where the sizes allow it.
pub(crate) fn to_pixels(
    planes: &[f32],
    (c, h, w): (usize, usize, usize),
    (first, stride): (usize, usize),
    out: &mut [MaybeUninit<f32>],
) {
    assert!(planes.len() >= c * h * w && stride >= w);
    assert!(h == 0 || w == 0 || (first + (h - 1) * stride + w) * c <= out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if let Some((square, block)) = transpose_block()
            && c % square == 0
            && (h * w) % square == 0
        {
            let (hw, src, dst) = (h * w, planes.as_ptr(), out.as_mut_ptr().cast::<f32>());
            let mut pixels = [std::ptr::null_mut(); 16];
            for c0 in (0..c).step_by(square) {
                // `square` pixels in a row of the planes (of one image row or, for narrow
                // images, of several).
                for q0 in (0..hw).step_by(square) {
                    for (j, pixel) in pixels[..square].iter_mut().enumerate() {
                        let (y, x) = ((q0 + j) / w, (q0 + j) % w);
                        // SAFETY: in range, as the asserts above keep every write.
                        *pixel = unsafe { dst.add((first + y * stride + x) * c + c0) };
                    }
                    // SAFETY: the instructions are available (`isa`); the asserts above keep
                    // every read (`ch * h * w + y * w + x`) and write (`(first + y * stride + x)
                    // * c + ch`) in range.
                    unsafe { block(src.add(c0 * hw + q0), hw, &pixels[..square]) };
                }
            }
            return;
        }
    }
    let hw = h * w;
    for c0 in (0..c).step_by(16) {
        let c1 = (c0 + 16).min(c);
        for y in 0..h {
            for x in 0..w {
                let dst = &mut out[(first + y * stride + x) * c..][c0..c1];
                for (ch, v) in (c0..c1).zip(dst) {
                    v.write(planes[ch * hw + y * w + x]);
                }
            }
        }
    }
}

/// `out[row(r) + i] = a[i * lda + r]` for `i < m`, `r < cols`: `cols` columns of a matrix of
/// `m` rows `lda` apart, transposed into rows that start where `row` says (`r * ld` for rows
/// `ld` apart, or any order: the pixel-major convolutions' weight panels), the rest of `out`
/// untouched. Square blocks of sixteen (AVX-512) or eight (AVX2) in registers, the columns
/// past the last full square in a block of that many; the rows past the last full square one
/// value at a time.
///
/// # Panics
///
/// Where a read or a written row is out of range.
pub(crate) fn transpose(
    a: &[f32],
    (m, cols, lda): (usize, usize, usize),
    (out, row): (&mut [MaybeUninit<f32>], impl Fn(usize) -> usize),
) {
    if m == 0 || cols == 0 {
        return;
    }
    assert!(lda >= cols, "rows overlap");
    assert!(a.len() >= (m - 1) * lda + cols, "a row of the source is out of range");
    assert!((0..cols).all(|r| row(r) + m <= out.len()), "a written row is out of range");
    let mut blocked = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if let Some((square, block)) = transpose_block() {
            blocked = m / square * square;
            let base = out.as_mut_ptr().cast::<f32>();
            let mut dst = [std::ptr::null_mut(); 16];
            for i0 in (0..blocked).step_by(square) {
                for r0 in (0..cols).step_by(square) {
                    let width = square.min(cols - r0);
                    for (j, dst) in dst[..width].iter_mut().enumerate() {
                        // SAFETY: inside `out`, as asserted.
                        *dst = unsafe { base.add(row(r0 + j) + i0) };
                    }
                    // SAFETY: the instructions are available (`isa`); the block reads rows
                    // `i0 + i` (`i < square <= m`) for `width` values from column `r0`, and
                    // writes `square` values to each of rows `r0 + j` (`j < width`) from column
                    // `i0`, all inside the asserted ranges.
                    unsafe { block(a.as_ptr().add(i0 * lda + r0), lda, &dst[..width]) };
                }
            }
        }
    }
    for r in 0..cols {
        let at = row(r);
        for i in blocked..m {
            out[at + i].write(a[i * lda + r]);
        }
    }
}

/// One `live x cols` block of the output over one slice of the inner dimension, for an
/// instruction set's tile kernel ([`Kernel`]; `live <= MR`, `cols` at most its tile width).
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    /// The left block at this slice, packed: row `r` at inner step `kk` is `a[kk * live + r]`.
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
    cols: usize,
    /// Add to the output (written by the previous slice) instead of overwriting it.
    accumulate: bool,
}

/// An instruction set's tile kernel.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Kernel {
    /// Output columns per tile.
    nr: usize,
    /// Computes one [`Tile`] of `live` rows.
    ///
    /// # Safety
    ///
    /// Its instructions available, and the tile's pointers valid as [`tiles`] makes them.
    tile: unsafe fn(&Tile, usize),
    /// Where the right operand is copied first (see [`tiles`]): copies `cols` (at most `nr`)
    /// values of each row `b + rows[kk]` to `dst + kk * nr`.
    ///
    /// # Safety
    ///
    /// Its instructions available, every row readable for `cols` values, `dst` writable for
    /// `rows.len() * nr`.
    pack: Option<PackFn>,
}

/// One square block of [`to_pixels`] and [`transpose`] in registers (16 x 16 with AVX-512, 8 x 8
/// with AVX2), or its first `dst.len()` columns: the block's row `i` (`i` below the square's
/// side) is the `dst.len()` values at `src + i * ld`, and its column `j` is written to `dst[j]`
/// (the square's side of values).
///
/// # Safety
///
/// Its instructions available, `dst` no longer than the square's side, every row readable for
/// `dst.len()` values and every `dst[j]` writable for the square's side of values.
#[cfg(target_arch = "x86_64")]
type TransposeBlock = unsafe fn(*const f32, usize, &[*mut f32]);

/// This process's [`TransposeBlock`] and its square's side, where its instruction set has one.
#[cfg(target_arch = "x86_64")]
fn transpose_block() -> Option<(usize, TransposeBlock)> {
    match isa() {
        Isa::Avx512 => Some((16, avx512::transpose_block)),
        Isa::Avx2 => Some((8, avx2::transpose_block)),
        Isa::Portable => None,
    }
}

/// See [`Kernel::pack`].
#[cfg(target_arch = "x86_64")]
type PackFn = unsafe fn(*const f32, &[usize], usize, *mut f32);

thread_local! {
    /// [`tiles`]' copy of one column tile's slice of the right operand.
    static PACKED_B: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `c (+)= a * b` tile by tile: slices of the inner dimension of equal length (at most `KC`:
/// 288 = 144 + 144, not 256 + 32), column tiles of the kernel's width, then the left operand's
/// row blocks, so that a tile's slice of the right operand stays near the core while every row
/// block uses it.
///
/// With AVX2, where there are several row blocks, that slice is first copied to a contiguous
/// buffer: read where it is, its rows' single lines are a stride apart that often maps them to
/// a few sets of the L1 cache (rows of 512 weights are 2 KiB apart: two sets of 64), so that
/// every row block fetched them again from L2 (ResNet-18's convolutions at batch 8 on Zen 4: 573
/// ms read in place, 486 ms copied). AVX-512's tiles read four consecutive lines per row and
/// copying was slower there (450 -> 473 ms), so it reads the operand where it is.
///
/// # Safety
///
/// As [`run`] asserts and promises: operands in range, `kernel`'s instructions available.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles(
    a: Left,
    (b, rows, panels): (*const f32, &[usize], Option<(usize, usize)>),
    n: usize,
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
    kernel: Kernel,
) {
    let k = rows.len();
    let blocks = match a {
        Left::Packed(lhs) => &lhs.blocks[..],
        Left::Runs { blocks, .. } => blocks,
    };
    let kc_even = k.div_ceil(k.div_ceil(KC));
    let nr = kernel.nr;
    // Panels of the tile's width are read in place: their rows are consecutive.
    let pack = kernel.pack.filter(|_| blocks.len() > 1 && panels.is_none_or(|(w, _)| w != nr));
    let packed_rows: Vec<usize> =
        if pack.is_some() { (0..kc_even).map(|kk| kk * nr).collect() } else { vec![] };
    PACKED_B.with_borrow_mut(|buf| {
        if pack.is_some() && buf.len() < kc_even * nr {
            buf.resize(kc_even * nr, 0.0);
        }
        // SAFETY: the caller's promise; each tile stays inside the block, slice and columns it
        // is given, and the packed slice (`kc * nr` values) inside `buf`.
        unsafe {
            for k0 in (0..k).step_by(kc_even) {
                let kc = kc_even.min(k - k0);
                let rows = &rows[k0..k0 + kc];
                for j0 in (0..n).step_by(nr) {
                    let cols = nr.min(n - j0);
                    let b = match panels {
                        None => b.add(j0),
                        Some((width, stride)) => b.add(j0 / width * stride + j0 % width),
                    };
                    let (b, rows) = if let Some(pack) = pack {
                        pack(b, rows, cols, buf.as_mut_ptr());
                        (buf.as_ptr(), &packed_rows[..kc])
                    } else {
                        (b, rows)
                    };
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
                            b,
                            rows,
                            c: c.add(first * ldc + j0),
                            ldc,
                            cols,
                            accumulate: accumulate || k0 > 0,
                        };
                        (kernel.tile)(&t, live);
                    }
                }
            }
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Tile;

    /// 16-lane vectors per tile row: a full tile is `MR x 64` accumulators, 24 of the 32
    /// registers.
    const NV: usize = 4;
    /// Output columns per tile.
    const NR: usize = 16 * NV;

    pub(super) const KERNEL: super::Kernel = super::Kernel { nr: NR, tile, pack: None };

    /// [`super::Kernel::tile`] for AVX-512F.
    ///
    /// # Safety
    ///
    /// AVX-512F, and the tile's pointers valid as [`super::tiles`] makes them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(t: &Tile, live: usize) {
        // SAFETY: the caller's promise.
        unsafe {
            match live {
                6 => rows::<6>(t),
                5 => rows::<5>(t),
                4 => rows::<4>(t),
                3 => rows::<3>(t),
                2 => rows::<2>(t),
                _ => rows::<1>(t),
            }
        }
    }

    /// # Safety
    ///
    /// As [`tile`].
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const R: usize>(t: &Tile) {
        // SAFETY: the caller's promise.
        unsafe {
            match (t.cols.div_ceil(16), t.packed) {
                (4, true) => run::<R, 4, true>(t),
                (3, true) => run::<R, 3, true>(t),
                (2, true) => run::<R, 2, true>(t),
                (1, true) => run::<R, 1, true>(t),
                (4, false) => run::<R, 4, false>(t),
                (3, false) => run::<R, 3, false>(t),
                (2, false) => run::<R, 2, false>(t),
                _ => run::<R, 1, false>(t),
            }
        }
    }

    /// One `R x 16V` tile (its last vector masked to the output's columns).
    ///
    /// # Safety
    ///
    /// As [`tile`].
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize, const V: usize, const PACKED: bool>(t: &Tile) {
        // SAFETY: the caller's promise (AVX-512F; `a` holds `R` values per row of `rows`, `b` a
        // row at each offset with the tile's lanes, `c` the live rows' lanes).
        unsafe {
            // The lanes of the tile's last vector that are inside the output.
            let tail = t.cols - (t.cols - 1) / 16 * 16;
            let mask: __mmask16 = if tail == 16 { 0xffff } else { (1 << tail) - 1 };
            let lanes = |v: usize| if v + 1 == V { mask } else { 0xffff };
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for (kk, &row) in t.rows.iter().enumerate() {
                let b = t.b.add(row);
                let mut bv = [_mm512_setzero_ps(); V];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = _mm512_maskz_loadu_ps(lanes(v), b.add(16 * v));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    // Packed: `R` values per step; runs: one value per step in each.
                    let a = if PACKED { t.a.add(kk * R + r) } else { t.runs[r].add(kk) };
                    let av = _mm512_set1_ps(*a);
                    for (acc, bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm512_fmadd_ps(av, *bv, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let c = t.c.add(r * t.ldc);
                for (v, acc) in acc.iter().enumerate() {
                    let (c, lanes) = (c.add(16 * v), lanes(v));
                    let value = if t.accumulate {
                        _mm512_add_ps(*acc, _mm512_maskz_loadu_ps(lanes, c))
                    } else {
                        *acc
                    };
                    _mm512_mask_storeu_ps(c, lanes, value);
                }
            }
        }
    }

    /// [`super::TransposeBlock`] for AVX-512F.
    ///
    /// # Safety
    ///
    /// As there.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_block(src: *const f32, ld: usize, dst: &[*mut f32]) {
        // SAFETY: the caller's promise.
        unsafe {
            let lanes = ((1u32 << dst.len()) - 1) as __mmask16;
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, r) in r.iter_mut().enumerate() {
                *r = _mm512_maskz_loadu_ps(lanes, src.add(i * ld));
            }
            for (r, &dst) in transpose16(r).iter().zip(dst) {
                _mm512_storeu_ps(dst, *r);
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
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Tile;

    /// Output columns per tile: two 8-lane vectors, so that a full tile (`MR x 16`) is 12
    /// accumulators of the 16 registers, with two for the right operand's row and one for the
    /// broadcast weight.
    const NR: usize = 16;

    pub(super) const KERNEL: super::Kernel = super::Kernel { nr: NR, tile, pack: Some(pack) };

    /// The mask of an 8-lane vector's first `n` lanes (`n <= 8`), as `maskload` and `maskstore`
    /// take it.
    #[target_feature(enable = "avx2,fma")]
    fn first_lanes(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// [`super::Kernel::pack`] for AVX2.
    ///
    /// # Safety
    ///
    /// As there.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pack(b: *const f32, rows: &[usize], cols: usize, dst: *mut f32) {
        // SAFETY: the caller's promise; masked lanes are neither read nor written.
        unsafe {
            if cols == NR {
                for (kk, &row) in rows.iter().enumerate() {
                    let (src, dst) = (b.add(row), dst.add(kk * NR));
                    _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
                    _mm256_storeu_ps(dst.add(8), _mm256_loadu_ps(src.add(8)));
                }
                return;
            }
            for (kk, &row) in rows.iter().enumerate() {
                let (src, dst) = (b.add(row), dst.add(kk * NR));
                for v in 0..cols.div_ceil(8) {
                    let mask = first_lanes((cols - 8 * v).min(8));
                    _mm256_storeu_ps(dst.add(8 * v), _mm256_maskload_ps(src.add(8 * v), mask));
                }
            }
        }
    }

    /// [`super::Kernel::tile`] for AVX2 with FMA.
    ///
    /// # Safety
    ///
    /// AVX2 and FMA, and the tile's pointers valid as [`super::tiles`] makes them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(t: &Tile, live: usize) {
        // SAFETY: the caller's promise.
        unsafe {
            match live {
                6 => rows::<6>(t),
                5 => rows::<5>(t),
                4 => rows::<4>(t),
                3 => rows::<3>(t),
                2 => rows::<2>(t),
                _ => rows::<1>(t),
            }
        }
    }

    /// # Safety
    ///
    /// As [`tile`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const R: usize>(t: &Tile) {
        let masked = !t.cols.is_multiple_of(8);
        // SAFETY: the caller's promise.
        unsafe {
            match (t.cols.div_ceil(8), t.packed, masked) {
                (2, true, false) => run::<R, 2, true, false>(t),
                (2, true, true) => run::<R, 2, true, true>(t),
                (1, true, false) => run::<R, 1, true, false>(t),
                (1, true, true) => run::<R, 1, true, true>(t),
                (2, false, false) => run::<R, 2, false, false>(t),
                (2, false, true) => run::<R, 2, false, true>(t),
                (1, false, false) => run::<R, 1, false, false>(t),
                _ => run::<R, 1, false, true>(t),
            }
        }
    }

    /// One `R x 8V` tile; where `MASKED`, its last vector is masked to the output's columns.
    ///
    /// # Safety
    ///
    /// As [`tile`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const R: usize, const V: usize, const PACKED: bool, const MASKED: bool>(
        t: &Tile,
    ) {
        // SAFETY: the caller's promise (AVX2 and FMA; `a` holds `R` values per row of `rows`,
        // `b` a row at each offset with the tile's lanes, `c` the live rows' lanes; masked
        // lanes are neither read nor written).
        unsafe {
            // The lanes of the tile's last vector that are inside the output.
            let mask = first_lanes(t.cols - (t.cols - 1) / 8 * 8);
            let mut acc = [[_mm256_setzero_ps(); V]; R];
            for (kk, &row) in t.rows.iter().enumerate() {
                let b = t.b.add(row);
                let mut bv = [_mm256_setzero_ps(); V];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = if MASKED && v + 1 == V {
                        _mm256_maskload_ps(b.add(8 * v), mask)
                    } else {
                        _mm256_loadu_ps(b.add(8 * v))
                    };
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    // Packed: `R` values per step; runs: one value per step in each.
                    let a = if PACKED { t.a.add(kk * R + r) } else { t.runs[r].add(kk) };
                    let av = _mm256_broadcast_ss(&*a);
                    for (acc, bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm256_fmadd_ps(av, *bv, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let c = t.c.add(r * t.ldc);
                for (v, acc) in acc.iter().enumerate() {
                    let c = c.add(8 * v);
                    if MASKED && v + 1 == V {
                        let value = if t.accumulate {
                            _mm256_add_ps(*acc, _mm256_maskload_ps(c, mask))
                        } else {
                            *acc
                        };
                        _mm256_maskstore_ps(c, mask, value);
                    } else {
                        let value = if t.accumulate {
                            _mm256_add_ps(*acc, _mm256_loadu_ps(c))
                        } else {
                            *acc
                        };
                        _mm256_storeu_ps(c, value);
                    }
                }
            }
        }
    }

    /// [`super::TransposeBlock`] for AVX2.
    ///
    /// # Safety
    ///
    /// As there.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose_block(src: *const f32, ld: usize, dst: &[*mut f32]) {
        // SAFETY: the caller's promise.
        unsafe {
            if let [dst] = dst {
                // One column (the ninth of a 3x3 kernel's taps): eight loads, not a transpose.
                let column: [f32; 8] = std::array::from_fn(|i| *src.add(i * ld));
                _mm256_storeu_ps(*dst, _mm256_loadu_ps(column.as_ptr()));
                return;
            }
            let lanes = first_lanes(dst.len());
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, r) in r.iter_mut().enumerate() {
                *r = _mm256_maskload_ps(src.add(i * ld), lanes);
            }
            for (r, &dst) in transpose8(r).iter().zip(dst) {
                _mm256_storeu_ps(dst, *r);
            }
        }
    }

    /// The 8 x 8 transpose: lane `j` of row `i` to lane `i` of row `j`.
    #[target_feature(enable = "avx2,fma")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // Per 128-bit half H: t[2i] = (r2i[4H], r2i+1[4H], r2i[4H+1], r2i+1[4H+1]), t[2i+1] the
        // same at 4H+2 and 4H+3.
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4g + e], half H: rows 4g..4g+4 at column 4H + e.
        let mut u = [_mm256_setzero_ps(); 8];
        for g in 0..2 {
            let (lo, hi) = (t[4 * g], t[4 * g + 1]);
            let (lo2, hi2) = (t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm256_shuffle_ps::<0x44>(lo, lo2);
            u[4 * g + 1] = _mm256_shuffle_ps::<0xee>(lo, lo2);
            u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(hi, hi2);
            u[4 * g + 3] = _mm256_shuffle_ps::<0xee>(hi, hi2);
        }
        // Column e: the low halves of u[e] and u[4 + e]; column 4 + e: their high halves.
        let mut out = [_mm256_setzero_ps(); 8];
        for e in 0..4 {
            out[e] = _mm256_permute2f128_ps::<0x20>(u[e], u[4 + e]);
            out[4 + e] = _mm256_permute2f128_ps::<0x31>(u[e], u[4 + e]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI names the path a run of the tests must take (`AT_REQUIRE_ISA`, beside the
    /// `AT_KERNELS_ISA` it sets): the kernels take that one there, and its tests are not ignored.
    #[test]
    fn the_path_ci_requires_is_the_one_that_runs() {
        if let Ok(want) = std::env::var("AT_REQUIRE_ISA") {
            assert_eq!(isa().name(), want, "this CPU or AT_KERNELS_ISA gives another path");
            if want != "portable" {
                assert!(crate::gather_tests_run());
                if cfg!(at_no_gather) {
                    panic!("the gather tests were built to be ignored");
                }
            }
        }
    }

    /// `AT_KERNELS_ISA` caps the path at what it names, never above the CPU's, and a value it
    /// does not take stops with the values it does.
    #[test]
    fn at_kernels_isa_caps_the_path_and_refuses_unknown_names() {
        assert_eq!(chosen_isa(None, Isa::Avx512), Isa::Avx512);
        assert_eq!(chosen_isa(Some(""), Isa::Avx2), Isa::Avx2);
        assert_eq!(chosen_isa(Some("avx2"), Isa::Avx512), Isa::Avx2);
        assert_eq!(chosen_isa(Some("portable"), Isa::Avx512), Isa::Portable);
        assert_eq!(chosen_isa(Some("avx512"), Isa::Avx2), Isa::Avx2);
        let refused = std::panic::catch_unwind(|| chosen_isa(Some("avx3"), Isa::Avx512));
        let message = *refused.expect_err("an unknown name").downcast::<String>().unwrap();
        assert_eq!(message, "AT_KERNELS_ISA=avx3: it takes avx512, avx2 or portable");
    }

    /// The AVX2 and AVX-512 tile kernels compute each output as the same sequence of fused
    /// multiply-adds (inner index by inner index, in the same slices), so that a run gives the
    /// same numbers to the bit on either path (the README's Table 1 quick numbers, checked with
    /// `AT_KERNELS_ISA=avx2`). Runs where the CPU has AVX-512 (both kernels), with packed and
    /// in-place left operands, ragged sizes and several inner slices.
    #[test]
    #[cfg_attr(at_no_gather, ignore = "neither AVX-512F nor AVX2 and FMA here: no gather kernel")]
    fn avx2_and_avx512_kernels_agree_to_the_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            if cpu_isa() != Isa::Avx512 {
                eprintln!("this CPU has no AVX-512: one kernel only, nothing to compare");
                return;
            }
            for &(m, n, k) in &[(7, 65, 300), (32, 17, 5), (13, 200, 600), (6, 64, 256)] {
                let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 250.0;
                let a: Vec<f32> = (0..m * k).map(value).collect();
                let stride = n + 5;
                let b: Vec<f32> = (0..k * stride).map(|i| value(i + 31)).collect();
                let rows: Vec<usize> = (0..k).map(|kk| (k - 1 - kk) * stride + kk % 5).collect();
                let (by_row, by_col): (Vec<usize>, Vec<usize>) =
                    ((0..m).map(|i| i * k).collect(), (0..k).collect());
                let lhs = Lhs::new(&a, &by_row, &by_col);
                let blocks = row_blocks(m);
                for left in
                    [Left::Packed(&lhs), Left::Runs { a: &a, starts: &by_row, blocks: &blocks }]
                {
                    let mut out = [vec![0f32; m * n], vec![0f32; m * n]];
                    for (kernel, c) in [avx512::KERNEL, avx2::KERNEL].into_iter().zip(&mut out) {
                        // SAFETY: the CPU has AVX-512F (and so AVX2 and FMA); `b`'s rows hold
                        // `n` values from each offset, `c` is `m x n`, the left operand `m x k`.
                        unsafe {
                            let b = (b.as_ptr(), &rows[..], None);
                            tiles(left, b, n, (c.as_mut_ptr(), n), false, kernel)
                        };
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&out[0]), bits(&out[1]), "({m}, {n}, {k})");
                }
            }
        }
    }

    /// `gather_gemm` against the plain triple loop, on sizes with partial row blocks, partial
    /// column tiles, several inner slices and rows read out of order.
    #[test]
    #[cfg_attr(at_no_gather, ignore = "neither AVX-512F nor AVX2 and FMA here: no gather kernel")]
    fn gather_gemm_matches_the_triple_loop_on_ragged_sizes() {
        if !crate::gather_tests_run() {
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
            let (by_row, by_col): (Vec<usize>, Vec<usize>) =
                ((0..m).map(|i| i * k).collect(), (0..k).collect());
            gather_gemm(&Lhs::new(&a, &by_row, &by_col), (&b, &rows), n, (&mut c, ldc));
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

    /// `to_pixels` (the AVX-512 or AVX2 transpose where it runs, 16 or 8 channels by as many
    /// pixels) against the definition, on sizes that take the vector path and sizes that do not.
    #[test]
    fn to_pixels_writes_each_pixels_channels_contiguously() {
        for &(c, h, w) in &[
            (16, 2, 16),
            (32, 3, 32),
            (48, 1, 16),
            (5, 3, 7),
            (16, 2, 8),
            (16, 3, 8),
            (8, 1, 8),
            (24, 3, 8),
        ] {
            let planes: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
            let (first, stride) = (3, w + 1);
            let len = (first + h * stride + 2) * c;
            let mut out = vec![MaybeUninit::new(-1f32); len];
            to_pixels(&planes, (c, h, w), (first, stride), &mut out);
            // SAFETY: every element was initialised (-1, or written by `to_pixels`).
            let out: Vec<f32> = out.into_iter().map(|v| unsafe { v.assume_init() }).collect();
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

    /// `transpose` (square blocks in registers where the instruction set has them, a partial
    /// block for the last columns, the last rows one by one) against the definition: every
    /// value in place, and nothing written between the rows or past them.
    #[test]
    fn transpose_moves_every_value_and_leaves_the_gaps_alone() {
        for &(m, cols, lda, ld) in &[
            (16, 16, 16, 16),
            (32, 48, 50, 40),
            (37, 21, 25, 45),
            (512, 9, 9, 528),
            (8, 3, 9, 8),
            (5, 7, 7, 5),
            (24, 17, 17, 30),
        ] {
            let a: Vec<f32> = (0..(m - 1) * lda + cols).map(|i| i as f32).collect();
            let mut out = vec![MaybeUninit::new(-1f32); (cols - 1) * ld + m + 3];
            transpose(&a, (m, cols, lda), (&mut out, |r| r * ld));
            // SAFETY: every element was initialised to -1 and written with values since.
            let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
            let mut want = vec![-1f32; out.len()];
            for r in 0..cols {
                for i in 0..m {
                    want[r * ld + i] = a[i * lda + r];
                }
            }
            assert_eq!(out, want, "m {m}, cols {cols}, lda {lda}, ld {ld}");
        }
    }

    /// `gather_gemm_add` (the left operand read in place as strided rows) adds the product to
    /// what the output holds, on ragged sizes.
    #[test]
    #[cfg_attr(at_no_gather, ignore = "neither AVX-512F nor AVX2 and FMA here: no gather kernel")]
    fn gather_gemm_add_accumulates_from_a_strided_left_operand() {
        if !crate::gather_tests_run() {
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
