//! Max pooling on the CPU as one op, for first-order gradients: the maxima in one pass over the
//! input, and in the backward pass each output's gradient added at its window's maximum, found
//! again from the input (cheaper than storing and reading indices). Each (image, channel) plane
//! is one task, so planes never write to the same memory.
//!
//! A window's maximum is its first in row-major order by `v > best`, where a NaN beats
//! everything (PyTorch's rule: a NaN input gives a NaN output, not a silent maximum of the
//! rest); padding is never a maximum. It is found in two passes, each a loop with no
//! data-dependent branch: every input row's maximum over each window's columns, then over the
//! window's rows the first row whose maximum beats the ones above, which is the row-major first.
//! At ResNet's stem (8 x 64 x 112 x 112, 3x3 stride 2) that took the forward pass from 10.6 to
//! 3.9 ms and the backward from 12 to 5.2 ms (one window at a time with a branch per element
//! before; PyTorch 29 and 4.2 ms, with indices).
//!
//! **Decision**: at-models' max pool (an `index_select` of every window, `argmax`, `gather`, and
//! `scatter_add` backward) made several passes over 2.25 times the input; at ResNet's stem
//! (8 x 64 x 112 x 112) it was 5% of a 224-pixel ResNet-18 step. Its backward builds no graph, so
//! at-models keeps its own ops on second-order threads and off the CPU.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};

/// The geometry of a pooling: kernel, stride, padding, and the input's and output's sides.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    kernel: usize,
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

/// The output's `(height, width)` of a max pool of `(kernel, stride, padding)` over an `h x w`
/// input, or the error that says it does not fit (at-models' pooling paths ask here too).
pub fn pool_output(
    (h, w): (usize, usize),
    (kernel, stride, padding): (usize, usize, usize),
) -> Result<(usize, usize)> {
    if kernel == 0
        || stride == 0
        || padding * 2 > kernel
        || h + 2 * padding < kernel
        || w + 2 * padding < kernel
    {
        bail!(
            "max_pool2d: kernel {kernel}, stride {stride}, padding {padding} do not fit an input of {h}x{w}"
        )
    }
    Ok(((h + 2 * padding - kernel) / stride + 1, (w + 2 * padding - kernel) / stride + 1))
}

impl Window {
    pub(crate) fn new(
        (h, w): (usize, usize),
        (kernel, stride, padding): (usize, usize, usize),
    ) -> Result<Self> {
        let (oh, ow) = pool_output((h, w), (kernel, stride, padding))?;
        Ok(Self { kernel, stride, padding, h, w, oh, ow })
    }

    /// The rows (or columns) of the input that output row `i` reads: `lo..hi`.
    #[inline]
    fn span(&self, i: usize, side: usize) -> (usize, usize) {
        let start = (i * self.stride) as isize - self.padding as isize;
        let lo = start.max(0) as usize;
        let hi = ((start + self.kernel as isize) as usize).min(side);
        (lo, hi)
    }

    /// Each of `plane`'s rows' maxima over every output column's window, into `row_max` (`h x
    /// ow`), and their columns into `cols`; `phases` is scratch.
    ///
    /// The windows that lie inside the row are done together, one window element at a time:
    /// element `t` of window `j` is column `first + j s + t`, so over all `j` it is a contiguous
    /// run of the row's phase `(first + t) mod s` (the row split into its `s` phases once), and
    /// each element is one loop of selects over contiguous values, which the compiler
    /// vectorises.
    fn row_maxima(
        &self,
        plane: &[f32],
        (row_max, cols): (&mut Vec<f32>, &mut Vec<u32>),
        phases: &mut Vec<f32>,
    ) {
        let (w, ow, k, s, p) = (self.w, self.ow, self.kernel, self.stride, self.padding);
        row_max.resize(self.h * ow, 0.0);
        cols.resize(self.h * ow, 0);
        // Output columns `lo..hi` have their whole window inside the row.
        let lo = p.div_ceil(s).min(ow);
        let hi = if w + p >= k { ((w + p - k) / s + 1).clamp(lo, ow) } else { lo };
        let (n, first, phase_len) = (hi - lo, (lo * s).saturating_sub(p), w.div_ceil(s));
        phases.resize(if s > 1 { s * phase_len } else { 0 }, 0.0);
        for ((row, out), at) in
            plane.chunks_exact(w).zip(row_max.chunks_exact_mut(ow)).zip(cols.chunks_exact_mut(ow))
        {
            for j in (0..lo).chain(hi..ow) {
                let (x0, x1) = self.span(j, w);
                (out[j], at[j]) = first_max(&row[x0..x1], x0);
            }
            if n == 0 {
                continue;
            }
            if s == 2 {
                // ResNet's and NiN's pools: pairs of values, which the compiler vectorises.
                let (even, odd) = phases.split_at_mut(phase_len);
                for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2)) {
                    (*e, *o) = (pair[0], pair[1]);
                }
                if w % 2 == 1 {
                    even[phase_len - 1] = row[w - 1];
                }
            } else if s > 2 {
                for (q, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
                    for (d, &v) in phase.iter_mut().zip(row[q..].iter().step_by(s)) {
                        *d = v;
                    }
                }
            }
            let element = |t: usize| -> &[f32] {
                let x = first + t;
                if s == 1 { &row[x..x + n] } else { &phases[x % s * phase_len + x / s..][..n] }
            };
            let (out, at) = (&mut out[lo..hi], &mut at[lo..hi]);
            out.copy_from_slice(element(0));
            at.fill(0);
            for t in 1..k {
                for ((o, a), &v) in out.iter_mut().zip(at.iter_mut()).zip(element(t)) {
                    challenge((o, a), (v, t as u32));
                }
            }
            for (j, a) in at.iter_mut().enumerate() {
                *a += (first + j * s) as u32;
            }
        }
    }

    /// Output row `i`'s maxima into `out` and, where `at` is given, their indices in the plane,
    /// from [`Window::row_maxima`]'s: per output column, the first input row whose maximum
    /// beats those above it.
    fn output_row(
        &self,
        i: usize,
        (row_max, cols): (&[f32], &[u32]),
        out: &mut [f32],
        mut at: Option<&mut [u32]>,
    ) {
        let (y0, y1) = self.span(i, self.h);
        let ow = self.ow;
        out.copy_from_slice(&row_max[y0 * ow..(y0 + 1) * ow]);
        if let Some(at) = at.as_deref_mut() {
            for (a, &c) in at.iter_mut().zip(&cols[y0 * ow..(y0 + 1) * ow]) {
                *a = (y0 * self.w) as u32 + c;
            }
        }
        for y in y0 + 1..y1 {
            let row = &row_max[y * ow..(y + 1) * ow];
            match at.as_deref_mut() {
                None => {
                    for (o, &v) in out.iter_mut().zip(row) {
                        challenge((o, &mut 0), (v, 0));
                    }
                }
                Some(at) => {
                    let cols = &cols[y * ow..(y + 1) * ow];
                    let above = (y * self.w) as u32;
                    for ((o, a), (&v, &c)) in out.iter_mut().zip(at).zip(row.iter().zip(cols)) {
                        challenge((o, a), (v, above + c));
                    }
                }
            }
        }
    }

    /// The output's `(height, width)`.
    pub(crate) fn output(&self) -> (usize, usize) {
        (self.oh, self.ow)
    }

    /// The max pool of the `h x w` planes of `x` (contiguous): as many `oh x ow` planes, each
    /// plane one task on rayon's threads.
    pub(crate) fn forward(&self, x: &[f32], planes: usize) -> Vec<f32> {
        let Window { h, w, oh, ow, .. } = *self;
        crate::par_chunks_zeroed(
            planes * oh * ow,
            oh * ow,
            || (Vec::new(), Vec::new(), Vec::new()),
            |(row_max, cols, phases), n, out: &mut [f32]| {
                self.row_maxima(&x[n * h * w..(n + 1) * h * w], (row_max, cols), phases);
                for (i, out) in out.chunks_exact_mut(ow).enumerate() {
                    self.output_row(i, (row_max, &[]), out, None);
                }
            },
        )
    }

    /// The input gradient of [`Window::forward`] from its input `x` and the output's gradient
    /// `g`: each output's gradient added at its window's maximum, found again from `x`.
    pub(crate) fn backward(&self, x: &[f32], g: &[f32]) -> Vec<f32> {
        let Window { h, w, oh, ow, .. } = *self;
        // Zeroed chunks, one plane each: the gradients are added into them.
        crate::par_chunks_zeroed(
            x.len(),
            h * w,
            || (Vec::new(), Vec::new(), Vec::new(), vec![0f32; ow], vec![0u32; ow]),
            |(row_max, cols, phases, maxima, at), n, dplane: &mut [f32]| {
                self.row_maxima(&x[n * h * w..(n + 1) * h * w], (row_max, cols), phases);
                let gplane = &g[n * oh * ow..(n + 1) * oh * ow];
                for (i, g) in gplane.chunks_exact(ow).enumerate() {
                    self.output_row(i, (row_max, cols), maxima, Some(at));
                    for (&at, &g) in at.iter().zip(g) {
                        dplane[at as usize] += g;
                    }
                }
            },
        )
    }
}

/// The first maximum of `values` and its column (`first` is the column of `values[0]`).
#[inline]
fn first_max(values: &[f32], first: usize) -> (f32, u32) {
    let (mut best, mut col) = (values[0], 0);
    for (x, &v) in values.iter().enumerate().skip(1) {
        challenge((&mut best, &mut col), (v, x as u32));
    }
    (best, first as u32 + col)
}

/// `(best, at)` becomes `(v, v_at)` where `v` beats `best` as a window's maximum: greater, or
/// NaN. By bit masks: written as a branch or a select, the compiler kept the loops over windows
/// scalar with a branch per element (ResNet's stem forward pass 18-23 ms, against 3.9 so).
#[inline(always)]
fn challenge((best, at): (&mut f32, &mut u32), (v, v_at): (f32, u32)) {
    let keep = (((v > *best) | v.is_nan()) as u32).wrapping_sub(1);
    *best = f32::from_bits(v.to_bits() & !keep | best.to_bits() & keep);
    *at = v_at & !keep | *at & keep;
}

/// The f32 values of a contiguous CPU tensor's storage.
fn values<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = storage else { bail!("at-kernels' max pool takes f32") };
    crate::contiguous(v, layout, what)
}

/// `y = max_pool2d(x)` (f32, `[B, C, H, W]`, on the CPU), differentiable once; see the module.
pub fn max_pool2d(x: &Tensor, (kernel, stride, padding): (usize, usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let window = Window::new((h, w), (kernel, stride, padding))?;
    x.contiguous()?.apply_op1(MaxPool(window))
}

struct MaxPool(Window);

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "at-max-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(storage, layout, "the max pool's input")?;
        let (b, c, _, _) = layout.shape().dims4()?;
        let y = self.0.forward(x, b * c);
        Ok((CpuStorage::F32(y), Shape::from((b, c, self.0.oh, self.0.ow))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if crate::second_order::is_second_order_thread() {
            bail!("at-kernels' max pool has a first-order backward only; use candle's ops here")
        }
        let g = g.contiguous()?;
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&g, &MaxPoolGrad(self.0))?))
    }
}

/// The input gradient: each output's gradient added at its window's maximum.
struct MaxPoolGrad(Window);

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "at-max-pool-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = values(s1, l1, "the max pool's input")?;
        let g = values(s2, l2, "the max pool's output gradient")?;
        let dx = self.0.backward(x, g);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
