//! Max pooling on the CPU as one op, for first-order gradients: the maxima in one pass over the
//! input, and in the backward pass each output's gradient added at its window's maximum, found
//! again from the input (nine comparisons an output for ResNet's 3x3 pool, less than storing
//! and reading indices). Each (image, channel) plane is one task, so planes never write to the
//! same memory. The first maximum of a window in row-major order is its maximum, as
//! `argmax` picks it; padding is never a maximum.
//!
//! **Decision**: at-models' max pool (an `index_select` of every window, `argmax`, `gather`, and
//! `scatter_add` backward) made several passes over 2.25 times the input; at ResNet's stem
//! (8 x 64 x 112 x 112) it was 5% of a 224-pixel ResNet-18 step. Its backward builds no graph, so
//! at-models keeps its own ops on second-order threads and off the CPU.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};

/// The geometry of a pooling: kernel, stride, padding, and the input's and output's sides.
#[derive(Clone, Copy, Debug)]
struct Window {
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
    fn new(
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

    /// The index in `plane` of the first maximum of output `(i, j)`'s window.
    #[inline]
    fn argmax(&self, plane: &[f32], i: usize, j: usize) -> usize {
        let (y0, y1) = self.span(i, self.h);
        let (x0, x1) = self.span(j, self.w);
        let (mut at, mut best) = (y0 * self.w + x0, plane[y0 * self.w + x0]);
        for y in y0..y1 {
            let row = &plane[y * self.w..(y + 1) * self.w];
            for (x, &v) in row.iter().enumerate().take(x1).skip(x0) {
                if v > best {
                    (at, best) = (y * self.w + x, v);
                }
            }
        }
        at
    }
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
        let Window { h, w, oh, ow, .. } = self.0;
        let y = crate::par_chunks_zeroed(
            b * c * oh * ow,
            oh * ow,
            || (),
            |_, n, out: &mut [f32]| {
                let plane = &x[n * h * w..(n + 1) * h * w];
                for i in 0..oh {
                    for j in 0..ow {
                        out[i * ow + j] = plane[self.0.argmax(plane, i, j)];
                    }
                }
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
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
        let Window { h, w, oh, ow, .. } = self.0;
        // Zeroed chunks, one plane each: the gradients are added into them.
        let dx = crate::par_chunks_zeroed(
            x.len(),
            h * w,
            || (),
            |_, n, dplane: &mut [f32]| {
                let plane = &x[n * h * w..(n + 1) * h * w];
                let gplane = &g[n * oh * ow..(n + 1) * oh * ow];
                for i in 0..oh {
                    for j in 0..ow {
                        dplane[self.0.argmax(plane, i, j)] += gplane[i * ow + j];
                    }
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
