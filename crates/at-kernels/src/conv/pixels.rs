//! Convolutions computed pixel-major on the gather GEMM: an image stored pixel by pixel on a
//! zero-bordered grid ([`Grid`]), so that the input pixels one kernel row reads for one output
//! pixel are one contiguous run of values, read where they lie.
//!
//! The weight gradient of a 3x3 or 1x1 convolution reads its input this way (`weight_grad_pixels`
//! in `lower.rs`). The forward pass and the input gradient of a "same" 3x3 convolution do too on
//! small images ([`PIXEL_MAJOR_FORWARD`], [`PIXEL_MAJOR_INPUT_GRAD`]): there the channel-major
//! GEMM's columns are the image's few pixels (49 at ResNet's 7x7 layers: a 64-column tile 77%
//! full, and the 9 MiB of 512-channel weights read for every image), while pixel-major its rows
//! are the pixels of several images and its columns the many channels, in full tiles.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::lower::{Dims, Element, InputMap};
use crate::gather;

/// Output pixels per image below which a 3x3 convolution's forward pass runs pixel-major
/// (with the gather GEMM). Measured at 224 px, batch 8 (`conv_bench resnet`): ResNet-18's 7x7
/// layers (49 pixels) go this way (13.2 -> 11.6 ms); its 14x14 ones (196) since the weights
/// are transposed by blocks in registers and the padding is skipped (9.4-10.3 -> 8.5-9.7 ms,
/// six alternating pairs; ResNet-34's forward pass at batch 8 about 315 -> 305 ms).
pub(super) const PIXEL_MAJOR_FORWARD: usize = 200;

/// The same for the input gradient: the 7x7 layers (17.7 -> 11.5 ms) and the 14x14 ones
/// (11.4-12.7 -> 9.7-11.6 ms over three alternating runs).
pub(super) const PIXEL_MAJOR_INPUT_GRAD: usize = 200;

/// Channels (in and out) from which the pixel-major paths pay: they win where the weights are
/// large (256 and 512 channels, megabytes read per image channel-major), and lose on WRN's 8x8
/// layers of 128 channels at batch 128 (forward 11.9 -> 12.8 ms, input gradient 12.5 -> 13-17,
/// three alternating runs).
pub(super) const PIXEL_MAJOR_CHANNELS: usize = 256;

/// Channels (in and out) from which a 3x3 convolution of stride 2 runs its input gradient
/// pixel-major ([`input_grad_strided3x3`]), and its forward pass where the output is small
/// ([`takes_forward`]). At 224 px, batch 8, ten alternating runs: the input gradient of
/// ResNet's 256 -> 512 layer (14 -> 7 pixels) 7.2 -> 5.2 ms, of its 128 -> 256 one (28 -> 14)
/// 6.1 -> 5.7, of its 64 -> 128 one (56 -> 28) lost (7.1 -> 8.5); the forward pass of the 128
/// -> 256 layer 5.2 -> 5.0 (AVX2 5.1 -> 5.0).
pub(super) const PIXEL_MAJOR_STRIDED_CHANNELS: usize = 128;

/// An image of `c` channels, `h x w`, stored pixel by pixel (`c` values each) on a grid of
/// `w + 1` columns with a zero row above and below and one zero pixel first: image pixel
/// `(y, x)` is grid pixel `1 + (y + 1) (w + 1) + x`. The last column is zero, so the pixel left
/// of column 0 is the zero column of the row above and the pixel right of column `w - 1` the
/// zero column of its own row: a run of `k` pixels from column `x - 1` (`x <= w - k + 2`) reads
/// zeros where it leaves the image.
#[derive(Clone, Copy, Debug)]
pub(super) struct Grid {
    c: usize,
    h: usize,
    w: usize,
}

impl Grid {
    pub(super) fn new(c: usize, h: usize, w: usize) -> Self {
        Self { c, h, w }
    }

    /// Values per image on the grid.
    pub(super) fn len(&self) -> usize {
        (1 + (self.h + 2) * (self.w + 1) + 1) * self.c
    }

    /// Where the pixel of image row `y1 - 1` and column `x1 - 1` starts (`y1` from 0 to
    /// `h + 1`, `x1` from 0 to `w + 1`: one outside the image on each side reads zeros).
    pub(super) fn at(&self, y1: usize, x1: usize) -> usize {
        (y1 * (self.w + 1) + x1) * self.c
    }

    /// Writes `map(planes)` (`c` planes of `h x w`) onto `out` (`len` values, zero where the
    /// image is not), using `mapped` as scratch where `map` is not the identity.
    pub(super) fn write<T: Element>(
        &self,
        planes: &[T],
        map: &impl InputMap<T>,
        mapped: &mut Vec<T>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let hw = self.h * self.w;
        let planes = if map.is_identity() {
            planes
        } else {
            mapped.resize(self.c * hw, T::default());
            for (ch, (src, dst)) in
                planes.chunks_exact(hw).zip(mapped.chunks_exact_mut(hw)).enumerate()
            {
                map.copy(ch, src, dst);
            }
            &mapped[..]
        };
        let planes = T::as_f32(planes).expect("the grid is f32");
        let stride = self.w + 1;
        gather::to_pixels(planes, (self.c, self.h, self.w), (1 + stride, stride), out);
    }

    /// The grids of every image of `x` (`n` images), built on rayon's threads.
    pub(super) fn build<T: Element>(&self, n: usize, x: &[T], map: &impl InputMap<T>) -> Vec<f32> {
        let image = self.c * self.h * self.w;
        let (c, stride) = (self.c, self.w + 1);
        let grid = |mapped: &mut Vec<T>, i: usize, out: &mut [MaybeUninit<f32>]| {
            // The zeros first (the first pixel and the row above, each row's last column, the
            // row below and the last pixel), then the image's pixels over the rest.
            let zero = MaybeUninit::new(0.0);
            out[..(1 + stride) * c].fill(zero);
            for y1 in 1..=self.h {
                out[(1 + y1 * stride + self.w) * c..][..c].fill(zero);
            }
            out[(1 + (self.h + 1) * stride) * c..].fill(zero);
            self.write(&x[i * image..(i + 1) * image], map, mapped, out)
        };
        // SAFETY: `grid` zeroes every pixel outside the image and `write` writes every one
        // inside it (`gather::to_pixels`), so each chunk is initialised whole.
        unsafe { crate::par_chunks_uninit(n * self.len(), self.len(), Vec::new, grid) }
    }
}

/// Whether a 3x3 convolution with padding 1 runs its forward pass pixel-major (any stride): f32
/// on the gather GEMM, outputs of fewer than [`PIXEL_MAJOR_FORWARD`] pixels, at least
/// [`PIXEL_MAJOR_CHANNELS`] channels ([`PIXEL_MAJOR_STRIDED_CHANNELS`] with a stride).
pub(super) fn takes_forward<T: Element>(d: &Dims) -> bool {
    let channels = if d.stride > 1 { PIXEL_MAJOR_STRIDED_CHANNELS } else { PIXEL_MAJOR_CHANNELS };
    (d.kh, d.kw, d.pad) == (3, 3, 1)
        && d.gather
        && d.p() < PIXEL_MAJOR_FORWARD
        && d.c.min(d.o) >= channels
        && T::as_f32(&[]).is_some()
}

/// Whether a "same" 3x3 convolution runs its input gradient pixel-major: f32 on the gather
/// GEMM, images of fewer than [`PIXEL_MAJOR_INPUT_GRAD`] pixels, at least
/// [`PIXEL_MAJOR_CHANNELS`] channels.
pub(super) fn takes_input_grad<T: Element>(d: &Dims) -> bool {
    d.same3x3()
        && d.gather
        && d.p() < PIXEL_MAJOR_INPUT_GRAD
        && d.c.min(d.o) >= PIXEL_MAJOR_CHANNELS
        && T::as_f32(&[]).is_some()
}

/// `out[n][col][j] = sum over ki, t < 3, ch < C of src_n[s j_y + row(ki) - 1, s j_x - 1 + t][ch]
/// b[(ki, t, ch)][col]` for the `h x w` images of `src` (`C` channels, read through `map`) and
/// the `ho x wo` outputs `j` (stride `s`), `row(ki)` = `ki` or, with `flip`, `2 - ki`: a 3x3
/// convolution's forward pass with padding 1 (`b` the weights transposed) or a "same" one's
/// input gradient (`flip`, the kernel's columns reversed). `epilogue(n, out_n)` runs on each
/// image's output.
#[allow(clippy::too_many_arguments)]
fn conv3x3<T: Element>(
    (n, channels, h, w): (usize, usize, usize, usize),
    (ho, wo, stride): (usize, usize, usize),
    src: &[T],
    map: &impl InputMap<T>,
    b: &Panels,
    flip: bool,
    epilogue: &(dyn Fn(usize, &mut [T]) + Sync),
) -> Vec<T> {
    let (grid, p) = (Grid::new(channels, h, w), ho * wo);
    assert_eq!(b.k, 9 * channels, "the weights' rows are the kernel's taps by channels");
    let grids = grid.build(n, src, map);
    // The output rows `lo..hi` whose kernel row `row(ki)` reads inside the image: grid row
    // `y stride + row(ki)` from 1 to `h`, not the zero row above or below it. The middle kernel
    // row reads inside for every output row.
    let inside = |row: usize| {
        let lo = (0..ho).find(|&y| y * stride + row >= 1).unwrap_or(ho);
        let hi = (0..ho).rev().find(|&y| y * stride + row <= h).map_or(0, |y| y + 1);
        (lo, hi.max(lo))
    };
    debug_assert_eq!(inside(1), (0, ho));
    // The same across: output column `x`'s run reads image columns `x stride - 1 + t`, `t < 3`;
    // those inside are `t` in `t0..t1`. Consecutive columns with the same range form a group
    // (at most three: the first column, the inner ones, the last).
    let across = |x: usize| (usize::from(x * stride == 0), if x * stride + 1 >= w { 2 } else { 3 });
    let mut groups: Vec<(usize, usize, (usize, usize))> = vec![]; // (x0, x1, (t0, t1))
    for x in 0..wo {
        match groups.last_mut() {
            Some(g) if g.2 == across(x) => g.1 = x + 1,
            _ => groups.push((x, x + 1, across(x))),
        }
    }
    // Each group's kernel rows read the weights of its inside kernel columns only: one block
    // of consecutive rows of each panel.
    let b_rows: Vec<Vec<Vec<usize>>> = (0..3)
        .map(|ki| {
            let rows = |&(_, _, (t0, t1)): &(usize, usize, (usize, usize))| {
                let first = (ki * 3 + t0) * channels;
                (first..first + (t1 - t0) * channels).map(|r| r * b.width).collect()
            };
            groups.iter().map(rows).collect()
        })
        .collect();
    let Jobs { group, parts, part, jobs } = Jobs::new(n, b);
    // A job's GEMM rows are its output pixels in the order (column group, y, image, x), so
    // that the rows a kernel row reads inside the images are one range per group and each
    // group's runs are as long as its inside kernel columns: the GEMMs skip the padding the
    // kernel would read (at 7x7 with a 3x3 kernel 18% of the products, at 14x14 9%), the
    // middle kernel row first to write every row. Row `(g, y, i, x)` of a job of `count`
    // images is `starts(count)[g] + (y count + i) width(g) + x - x0(g)`.
    let starts = |count: usize| starts_of(groups.iter().map(|&(x0, x1, _)| count * ho * (x1 - x0)));
    let job = |&(t, c): &(usize, usize)| {
        let (first, count) = (t * group, group.min(n - t * group));
        let start = starts(count);
        let mut yt = vec![MaybeUninit::<f32>::uninit(); count * p * part];
        let mut runs = vec![];
        for (pass, ki) in [1, 0, 2].into_iter().enumerate() {
            let row = if flip { 2 - ki } else { ki };
            let (lo, hi) = inside(row);
            if lo == hi {
                continue;
            }
            for (g, &(x0, x1, (t0, _))) in groups.iter().enumerate() {
                runs.clear();
                for y in lo..hi {
                    for i in first..first + count {
                        runs.extend((x0..x1).map(|x| {
                            i * grid.len() + grid.at(y * stride + row, x * stride) + t0 * channels
                        }));
                    }
                }
                let width = x1 - x0;
                let rows = start[g] + lo * count * width..start[g] + hi * count * width;
                let yt = &mut yt[rows.start * part..rows.end * part];
                let b = (b.from(c * part), &b_rows[ki][g][..], (b.width, b.k * b.width));
                gather::gather_gemm_panels((&grids, &runs), b, part, (yt, part), pass > 0);
            }
        }
        // SAFETY: the middle kernel row's GEMMs wrote every element (`count p x part`).
        unsafe { crate::assume_init_vec(yt) }
    };
    let yts: Vec<Vec<f32>> = jobs.par_iter().map(job).collect();
    // Output pixel `(y, x)` of image `local` of a job of `count` images is row `(g, y, local,
    // x)`.
    let order = |count: usize, local: usize| {
        let start = starts(count);
        let mut order = Vec::with_capacity(p);
        for (g, &(x0, x1, _)) in groups.iter().enumerate() {
            for y in 0..ho {
                let row = start[g] + (y * count + local) * (x1 - x0);
                order.extend((x0..x1).map(|x| (y * wo + x, row + x - x0)));
            }
        }
        order
    };
    from_pixels(&yts, (n, b.cols, p), (group, parts), order, epilogue)
}

/// Where each of consecutive blocks of these `sizes` starts (the sums of the sizes before it):
/// the first GEMM row of each column group or parity of a job.
fn starts_of(sizes: impl Iterator<Item = usize>) -> Vec<usize> {
    sizes
        .scan(0, |next, size| {
            let start = *next;
            *next += size;
            Some(start)
        })
        .collect()
}

/// How [`conv3x3`] and [`input_grad_strided3x3`] share their GEMMs between rayon's threads:
/// jobs of a range of images by a range of output columns, by images (a range per thread, at
/// most [`JOB_IMAGES`], every column) or, where the weights are large, by columns (a range of
/// whole panels per thread, at most [`JOB_IMAGES_BY_COLUMNS`] images), so that each thread
/// streams only its part of the weights from memory (ResNet's 512x7 layers, 9 MiB of weights:
/// forward 10.3 -> 9.6 ms, input gradient 10.1 -> 9.6; at 256 channels, 2.3 MiB, no gain).
struct Jobs {
    /// Images per job.
    group: usize,
    /// Column ranges per job's images.
    parts: usize,
    /// Columns per range.
    part: usize,
    /// `(t, c)`: images `t group..`, columns `c part..`.
    jobs: Vec<(usize, usize)>,
}

impl Jobs {
    fn new(n: usize, b: &Panels) -> Self {
        let threads = rayon::current_num_threads().max(1);
        let weights = b.k * b.cols * size_of::<f32>();
        let parts = if weights >= SPLIT_WEIGHTS && b.cols.is_multiple_of(b.width * threads) {
            threads
        } else {
            1
        };
        let group = if parts > 1 {
            n.min(JOB_IMAGES_BY_COLUMNS)
        } else {
            n.div_ceil(threads).clamp(1, JOB_IMAGES)
        };
        let jobs = (0..n.div_ceil(group)).flat_map(|t| (0..parts).map(move |c| (t, c))).collect();
        Self { group, parts, part: b.cols / parts, jobs }
    }
}

/// The output of the jobs' GEMMs (`yts`, by [`Jobs`]: rows of pixels, `part` columns each)
/// image by image in channel-major order, and `epilogue` on each: `out[col][pixel] =
/// yt[row][col]` for the `(pixel, row)` pairs of `order(count, local)` (image `local` of a job
/// of `count`), 16 columns at a time (one line of `yt` read whole, 16 rows of `out` written
/// along).
fn from_pixels<T: Element>(
    yts: &[Vec<f32>],
    (n, cols, p): (usize, usize, usize),
    (group, parts): (usize, usize),
    order: impl Fn(usize, usize) -> Vec<(usize, usize)> + Sync,
    epilogue: &(dyn Fn(usize, &mut [T]) + Sync),
) -> Vec<T> {
    let part = cols / parts;
    let image = |_: &mut (), i: usize, out: &mut [MaybeUninit<T>]| {
        let (t, local) = (i / group, i % group);
        let order = order(group.min(n - t * group), local);
        debug_assert_eq!(order.len(), p);
        let dst = T::as_f32_uninit(out).expect("f32");
        for (c, yt) in yts[t * parts..(t + 1) * parts].iter().enumerate() {
            for k0 in (0..part).step_by(16) {
                let k1 = (k0 + 16).min(part);
                for &(pixel, r) in &order {
                    let src = &yt[r * part..][k0..k1];
                    for (col, &v) in (c * part + k0..c * part + k1).zip(src) {
                        dst[col * p + pixel].write(v);
                    }
                }
            }
        }
        // SAFETY: every element was written (`cols` columns by the `p` pixels of `order`).
        epilogue(i, unsafe { crate::assume_init_mut(out) });
    };
    // SAFETY: each task writes its whole chunk.
    unsafe { crate::par_chunks_uninit(n * cols * p, cols * p, || (), image) }
}

/// Bytes of weights from which a pixel-major convolution splits its work between threads by
/// output columns instead of by images (see `conv3x3`).
const SPLIT_WEIGHTS: usize = 4 << 20;

/// The most images per job of a pixel-major convolution split by images ([`Jobs`]): at batch 32
/// on two threads, 16 images per job read their runs from further away than 4 do (ResNet's
/// 256x14 forward 37.2 -> 35.2 ms, input gradient 36.5 -> 36.4; 128 -> 256 k3/2 forward 21.4 ->
/// 19.5, input gradient 23.6 -> 22.6; medians of five alternating runs), and the smaller jobs
/// share out better between threads. Batch 8 on two threads is 4 already.
const JOB_IMAGES: usize = 4;

/// The same for a split by columns, where each job streams its part of the weights once: 8
/// (ResNet's 512x7 forward at batch 32 30.4 -> 29.9 ms, input gradient 30.5 -> 30.0; four
/// alternating runs).
const JOB_IMAGES_BY_COLUMNS: usize = 8;

/// A 3x3 convolution's weights as the pixel-major GEMMs read them: the `k x cols` right
/// operand (row `(ki, t, ch)`: kernel row, run pixel, source channel) in panels of the tile
/// kernel's width (`gather::panel_width`: 64 columns with AVX-512, 16 with AVX2), each panel's
/// rows one after the other (`width` values each, zeros past the last column). A GEMM's rows
/// are consecutive rows of each panel, so that a tile streams one contiguous block of the
/// weights: read from the transposed matrix, with rows of a few kilobytes and the taps of one
/// channel next to each other, each inner step of a tile jumped 9 rows (19 KiB at 512
/// channels) and its slice of the operand spread over hundreds of pages; and AVX2's tiles,
/// which copied their slice first (rows a power-of-two stride apart), read it in place.
struct Panels {
    data: Vec<f32>,
    k: usize,
    cols: usize,
    /// Columns per panel.
    width: usize,
}

impl Panels {
    /// `fill(p, live, panel)` writes panel `p`'s first `live` columns (all `k` rows, `width`
    /// apart), on rayon's threads; the columns past the last are zeroed here.
    fn build(
        (k, cols, width): (usize, usize, usize),
        fill: impl Fn(usize, usize, &mut [MaybeUninit<f32>]) + Sync,
    ) -> Self {
        let panel = |_: &mut (), p: usize, out: &mut [MaybeUninit<f32>]| {
            let live = width.min(cols - p * width);
            fill(p, live, out);
            if live < width {
                for row in out.chunks_exact_mut(width) {
                    row[live..].fill(MaybeUninit::new(0.0));
                }
            }
        };
        let len = cols.div_ceil(width) * k * width;
        // SAFETY: `fill` writes the first `live` values of each of the panel's `k` rows (its
        // promise), and the rest of each row is zeroed above.
        let data = unsafe { crate::par_chunks_uninit(len, k * width, || (), panel) };
        Self { data, k, cols, width }
    }

    /// The weights `w` (`o x c x 3 x 3`) of an input gradient: row `(ki, at(kj), oo)` of column
    /// `ch` is `w[oo][ch][ki][kj]`, each output channel's `c x 9` weights transposed into the
    /// panels.
    fn input_grad(w: &[f32], (o, c): (usize, usize), at: impl Fn(usize) -> usize + Sync) -> Self {
        let pw = gather::panel_width();
        let fill = |p: usize, live: usize, out: &mut [MaybeUninit<f32>]| {
            for oo in 0..o {
                let row = |s: usize| ((s / 3 * 3 + at(s % 3)) * o + oo) * pw;
                let first = (oo * c + p * pw) * 9;
                gather::transpose(&w[first..], (live, 9, 9), (&mut *out, row));
            }
        };
        Self::build((9 * o, c, pw), fill)
    }

    /// The panels from column `j` on (a panel's first).
    fn from(&self, j: usize) -> &[f32] {
        debug_assert!(j.is_multiple_of(self.width));
        &self.data[j / self.width * self.k * self.width..]
    }
}

/// The forward pass of a 3x3 convolution (padding 1, any stride) of `map(x)` pixel-major (see
/// [`takes_forward`]).
pub(super) fn forward3x3<T: Element>(
    d: &Dims,
    x: &[T],
    w: &[T],
    map: &impl InputMap<T>,
    epilogue: &(dyn Fn(usize, &mut [T]) + Sync),
) -> Vec<T> {
    let (o, c) = (d.o, d.c);
    let w = T::as_f32(w).expect("f32");
    // Row (ki, kj, ch) of column oo is w[oo][ch][ki][kj]: each panel is its output channels'
    // rows of `9 c` weights transposed, column q = ch 9 + ki 3 + kj to row (ki 3 + kj) c + ch.
    let pw = gather::panel_width();
    let fill = |p: usize, live: usize, out: &mut [MaybeUninit<f32>]| {
        let row = |q: usize| ((q % 9) * c + q / 9) * pw;
        gather::transpose(&w[p * pw * 9 * c..], (live, 9 * c, 9 * c), (out, row));
    };
    let wt = Panels::build((9 * c, o, pw), fill);
    let out = (d.ho, d.wo, d.stride);
    conv3x3((d.n, c, d.h, d.w), out, x, map, &wt, false, epilogue)
}

/// The input gradient of a "same" 3x3 convolution pixel-major (see [`takes_input_grad`]).
pub(super) fn input_grad_same3x3<T: Element>(
    d: &Dims,
    dy: &[T],
    w: &[T],
    epilogue: &(dyn Fn(usize, &[T]) + Sync),
) -> Vec<T> {
    let (o, c) = (d.o, d.c);
    let w = T::as_f32(w).expect("f32");
    // Row (ki, t, oo) of column ch is w[oo][ch][ki][2 - t]: run pixel t of kernel row ki is
    // kernel column 2 - t.
    let wt = Panels::input_grad(w, (o, c), |kj| 2 - kj);
    let plain = super::lower::Plain;
    let epilogue = |i: usize, dx: &mut [T]| epilogue(i, dx);
    let out = (d.h, d.w, 1);
    conv3x3((d.n, o, d.h, d.w), out, dy, &plain, &wt, true, &epilogue)
}

/// Whether a 3x3 convolution of stride 2 and padding 1 runs its input gradient pixel-major:
/// f32 on the gather GEMM, at least [`PIXEL_MAJOR_STRIDED_CHANNELS`] channels.
pub(super) fn takes_input_grad_strided<T: Element>(d: &Dims) -> bool {
    (d.kh, d.kw, d.pad, d.stride) == (3, 3, 1, 2)
        && d.gather
        && d.c.min(d.o) >= PIXEL_MAJOR_STRIDED_CHANNELS
        && T::as_f32(&[]).is_some()
}

/// The input gradient of a 3x3 convolution of stride 2 and padding 1, pixel-major (see
/// [`takes_input_grad_strided`]): `dx[y][x][ch] = sum dy[yo][xo][oo] w[oo][ch][ki][kj]` over
/// the taps with `2 yo + ki = y + 1` and `2 xo + kj = x + 1`.
///
/// By the parity of `y`, an input row takes kernel row 1 (`y` even, `yo = y / 2`) or kernel
/// rows 0 and 2 (`y` odd, `yo = (y + 1) / 2` and `yo = (y - 1) / 2`); by the parity of `x`, an
/// input pixel takes kernel column 1 from output pixel `x / 2`, or columns 2 and 0 from the
/// two output pixels from `(x - 1) / 2` on: a run of one or two pixels of the output gradient
/// stored pixel-major on a [`Grid`], whose zero border stands for the output pixels past the
/// last. So the input pixels of each of the four parities are one GEMM per kernel row on runs,
/// as [`conv3x3`]'s, with the weights' columns ordered 2, 0, 1 so that each run's weights are
/// consecutive rows of the panels. The channel-major GEMM and `col2im` it replaces read all
/// the weights for each image's few output pixels (49 at ResNet's 14 -> 7 layer) and
/// scattered the result back.
pub(super) fn input_grad_strided3x3<T: Element>(d: &Dims, dy: &[T], w: &[T]) -> Vec<T> {
    let (n, o, c, h, wd, ho, wo) = (d.n, d.o, d.c, d.h, d.w, d.ho, d.wo);
    let w = T::as_f32(w).expect("f32");
    // The position of kernel column kj among a kernel row's weights: 2, 0, 1.
    let b = Panels::input_grad(w, (o, c), |kj| [1, 2, 0][kj]);
    let grid = Grid::new(o, ho, wo);
    let grids = grid.build(n, dy, &super::lower::Plain);
    // The four parities (py, px) of the input pixels, with their rows and columns.
    let classes: Vec<(usize, usize, usize, usize)> = [(0, 0), (0, 1), (1, 0), (1, 1)]
        .into_iter()
        .map(|(py, px)| (py, px, (h - py).div_ceil(2), (wd - px).div_ceil(2)))
        .filter(|&(_, _, hc, wc)| hc * wc > 0)
        .collect();
    let Jobs { group, parts, part, jobs } = Jobs::new(n, &b);
    // A job's GEMM rows are its input pixels in the order (parity, image, y, x): row `(k, i, yc,
    // xc)` of a job of `count` images is `starts(count)[k] + (i hc + yc) wc + xc`.
    let starts = |count: usize| starts_of(classes.iter().map(|&(_, _, hc, wc)| count * hc * wc));
    let job = |&(t, cc): &(usize, usize)| {
        let (first, count) = (t * group, group.min(n - t * group));
        let start = starts(count);
        let mut yt = vec![MaybeUninit::<f32>::uninit(); count * h * wd * part];
        let mut runs = vec![];
        for (k, &(py, px, hc, wc)) in classes.iter().enumerate() {
            // One run pixel (kernel column 1) or two (columns 2, 0).
            let (p0, p1) = if px == 0 { (2, 3) } else { (0, 2) };
            let kis: &[usize] = if py == 0 { &[1] } else { &[0, 2] };
            let rows = start[k]..start[k] + count * hc * wc;
            for (pass, &ki) in kis.iter().enumerate() {
                runs.clear();
                for i in first..first + count {
                    for yc in 0..hc {
                        // Output row (y + 1 - ki) / 2, grid row one more.
                        let y1 = (py + 2 * yc + 1 - ki) / 2 + 1;
                        // The run's first output pixel: x / 2 or (x - 1) / 2, grid column one
                        // more.
                        runs.extend((0..wc).map(|xc| i * grid.len() + grid.at(y1, xc + 1)));
                    }
                }
                let first_row = (ki * 3 + p0) * o;
                let b_rows: Vec<usize> =
                    (first_row..first_row + (p1 - p0) * o).map(|r| r * b.width).collect();
                let yt = &mut yt[rows.start * part..rows.end * part];
                let b = (b.from(cc * part), &b_rows[..], (b.width, b.k * b.width));
                gather::gather_gemm_panels((&grids, &runs), b, part, (yt, part), pass > 0);
            }
        }
        // SAFETY: each parity's first kernel row wrote its rows (`count h w x part` in all).
        unsafe { crate::assume_init_vec(yt) }
    };
    let yts: Vec<Vec<f32>> = jobs.par_iter().map(job).collect();
    let order = |count: usize, local: usize| {
        let start = starts(count);
        let mut order = Vec::with_capacity(h * wd);
        for (k, &(py, px, hc, wc)) in classes.iter().enumerate() {
            for yc in 0..hc {
                let row = start[k] + (local * hc + yc) * wc;
                order.extend((0..wc).map(|xc| ((py + 2 * yc) * wd + px + 2 * xc, row + xc)));
            }
        }
        order
    };
    from_pixels(&yts, (n, c, h * wd), (group, parts), order, &|_, _| {})
}
