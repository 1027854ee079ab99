//! ResNet's stem in training mode as one candle custom op: the 7x7 convolution, the batch norm
//! with the batch's statistics, the ReLU and the max pool, with a hand-written backward.
//!
//! Built from separate ops (`conv2d`, `batch_norm_train_with`, `max_pool2d`), the stem has two
//! graph edges between them, each carrying the gradient of an activation of 64 channels at 112 x
//! 112 pixels (26 MB per edge at batch 8), and candle's backward gives every edge a zero tensor
//! and adds the edge's gradient into it: three passes over 26 MB per edge, about 2% of a
//! 224-pixel ResNet-18 step. As one op the stem has no such edge; inside, each gradient is
//! written once. The only edge left is its output's (the pooled activation, a quarter of the
//! size), into the first layer.
//!
//! The op's input is the images, which take no gradient (the op applies only where they track
//! none); its parameters' gradients go to a [`ParamGrads`], as the fused basic blocks' do (see
//! [`crate::basic_block`]). The backward builds no graph: on a thread with second-order
//! gradients [`stem_train`] returns `None`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};

use crate::basic_block::ParamGrads;
use crate::block::{f32_slice, with_f32};
use crate::conv::{self, Dims};
use crate::norm::{self, BatchStats};
use crate::pool::Window;

/// The parameters and shape of a stem: a convolution without bias, a batch norm and a ReLU,
/// then a max pool.
#[derive(Clone, Copy, Debug)]
pub struct Stem<'a> {
    /// The convolution's weight, `[c_out, c_in, kh, kw]`.
    pub conv: &'a Tensor,
    /// The convolution's stride.
    pub stride: usize,
    /// The convolution's padding.
    pub padding: usize,
    /// The batch norm's weight and bias (`c_out` each).
    pub bn: (&'a Tensor, &'a Tensor),
    /// The batch-norm epsilon.
    pub eps: f64,
    /// The max pool's kernel, stride and padding.
    pub pool: (usize, usize, usize),
}

/// What the backward pass keeps from the forward pass.
struct Saved {
    conv: Dims,
    window: Window,
    /// The convolution's output.
    z: Vec<f32>,
    /// `relu(bn(z))`, the max pool's input.
    a: Vec<f32>,
    stats: BatchStats,
}

struct Op {
    stride: usize,
    padding: usize,
    eps: f64,
    pool: (usize, usize, usize),
    /// The convolution's weight, the batch norm's weight and bias.
    params: [Tensor; 3],
    saved: Mutex<Option<Saved>>,
    stats: Arc<Mutex<Option<BatchStats>>>,
    grads: ParamGrads,
}

/// The op's operands are the images and an *anchor*: the convolution's weight, read through
/// `params`, given no gradient, there so that candle records the op (and runs its backward),
/// since the images track no gradient. The parameters' gradients go to the op's `ParamGrads`.
impl CustomOp2 for Op {
    fn name(&self) -> &'static str {
        "at-stem"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _anchor: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "the stem's input")?;
        let [w, gamma, beta] = &self.params;
        let conv = Dims::new(l1.shape().dims4()?, w.dims4()?, self.stride, self.padding)?;
        let window = Window::new((conv.ho, conv.wo), self.pool)?;
        let (n, c, hw) = (conv.n, conv.o, conv.p());
        let what = ["the stem's weight", "the stem's batch-norm weight", "its bias"];
        let (y, saved) = with_f32(&[w, gamma, beta], &what, |p| {
            let &[w, gamma, beta] = p else { unreachable!("three parameters") };
            let z = conv::forward(&conv, x, w);
            let (a, stats) = norm::train_forward(&z, (n, c, hw), (gamma, beta), self.eps, true);
            let y = window.forward(&a, n * c);
            Ok((y, Saved { conv, window, z, a, stats }))
        })?;
        let (oh, ow) = window.output();
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved.stats.clone());
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if crate::second_order::is_second_order_thread() {
            bail!("the fused stem is not twice differentiable; build it from separate ops there")
        }
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Saved { conv, window, z, a, stats }) = saved.as_ref() else {
            bail!("the stem's backward ran before its forward")
        };
        let [w, gamma, beta] = &self.params;
        let what = ["the stem's input", "its output gradient", "its batch-norm weight", "its bias"];
        let (dw, dgamma, dbeta) = with_f32(&[x, &g, gamma, beta], &what, |operands| {
            let &[x, g, gamma, beta] = operands else { unreachable!("four operands") };
            let da = window.backward(a, g);
            let backward = norm::Backward {
                dims: (conv.n, conv.o, conv.p()),
                affine: (gamma, beta),
                stats,
                eps: self.eps,
                relu: true,
                precomputed: None,
                residual: None,
                map_grad: None,
            };
            let (dz, dgamma, dbeta) = norm::train_backward(z, &da, &backward);
            Ok((conv::weight_grad(conv, x, &dz), dgamma, dbeta))
        })?;
        for (t, d) in [(w, dw), (gamma, dgamma), (beta, dbeta)] {
            self.grads.push(t, Tensor::from_vec(d, t.shape(), t.device())?);
        }
        Ok((None, None))
    }
}

/// ResNet's stem (`stem`) on the images `x` (`[N, C, H, W]`) in training mode as one op: the
/// pooled activation and the batch norm's statistics (for its running averages). The
/// parameters' gradients go to `grads` in the backward pass (merge them into the `GradStore`
/// after `backward`: [`ParamGrads::merge_into`]). `None` where the op does not apply: not f32
/// on the CPU, images that track a gradient (the op gives them none), a thread with
/// second-order gradients; the caller then builds the stem from separate ops.
///
/// # Errors
///
/// Shapes that do not make a stem (named in the message), or what candle refuses.
pub fn stem_train(
    x: &Tensor,
    stem: &Stem,
    grads: &ParamGrads,
) -> Result<Option<(Tensor, BatchStats)>> {
    let params = [stem.conv, stem.bn.0, stem.bn.1];
    let applies = x.device().is_cpu()
        && x.rank() == 4
        && x.dtype() == DType::F32
        && !x.track_op()
        && params.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
        && !crate::second_order::is_second_order_thread();
    if !applies {
        return Ok(None);
    }
    let c_out = stem.conv.dims4()?.0;
    if let Some(t) = [stem.bn.0, stem.bn.1].iter().find(|t| t.elem_count() != c_out) {
        bail!("the stem's batch norm must have {c_out} channels, got {:?}", t.dims())
    }
    let stats = Arc::new(Mutex::new(None));
    let op = Op {
        stride: stem.stride,
        padding: stem.padding,
        eps: stem.eps,
        pool: stem.pool,
        params: params.map(|t| t.clone()),
        saved: Mutex::new(None),
        stats: stats.clone(),
        grads: grads.clone(),
    };
    let y = x.contiguous()?.apply_op2(stem.conv, op)?;
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(Some((y, stats.expect("the forward pass stored its statistics"))))
}
