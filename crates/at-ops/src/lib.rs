//! Attention maps and attention-transfer distances for [candle], after Zagoruyko & Komodakis,
//! "Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks
//! via Attention Transfer" (ICLR 2017).
//!
//! A student network learns to mimic the *spatial attention* of a stronger teacher: at a few
//! points of both networks (typically the output of each group of residual blocks) an activation
//! `A` of shape `[B, C, H, W]` is reduced over its channels to a map `Q = F(A)` of shape `[B, H, W]`,
//! normalised per sample, and the distance between the student's and the teacher's maps is added
//! to the training loss with a weight beta.
//!
//! This crate depends on `candle-core` alone, so it can be added to any candle model:
//!
//! - [`attention_map`] / [`attention_map_flat`]: `F_sum`, `F_sum^p` and `F_max^p` of section 3.1
//!   ([`MapSpec`]), with channel sum or mean, and L2, L1 or no normalisation ([`Normalization`]).
//! - [`at_loss`]: the distance of one student/teacher pair ([`AtConfig`]): the authors' code
//!   (mean squared difference of L2-normalised maps, [`Distance::Code`], the default) or eq. (2)
//!   of the paper (`1/2 ||Q_S/||Q_S|| - Q_T/||Q_T|| ||_p`, [`Distance::Paper`]). Maps of different
//!   spatial sizes are resized by area or bilinear interpolation ([`Resize`]).
//! - [`at_loss_sum`]: `beta * sum_j at_loss(S_j, T_j)` over several group pairs.
//! - [`AtBackend`]: candle's ops (the default) or a kernel crate's [`AtKernels`] for the channel
//!   reduction and the distance, chosen in the [`AtConfig`] of each loss: no global state, so a
//!   call gives the same result whatever else the process does.
//!
//! Everything is differentiable through candle's autograd with respect to the student activation;
//! the teacher is detached. Inputs may be f32, f64, f16 or bf16 on any device candle supports
//! (half precision is computed in f32 and returned in the input's dtype).
//!
//! # Example: an AT loss on a tiny model
//!
//! ```
//! use at_ops::{AtConfig, at_loss_sum};
//! use candle_core::{DType, Device, Tensor, Var};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let x = Tensor::randn(0f32, 1., (8, 3, 16, 16), &dev)?; // [b, c, h, w]
//!
//! // A one-layer student and a wider, frozen teacher.
//! let w_student = Var::randn(0f32, 0.1, (4, 3, 3, 3), &dev)?;
//! let w_teacher = Tensor::randn(0f32, 0.1, (16, 3, 3, 3), &dev)?;
//! let student = x.conv2d(&w_student, 1, 1, 1, 1)?.relu()?; // [8, 4, 16, 16]
//! let teacher = x.conv2d(&w_teacher, 1, 2, 1, 1)?.relu()?; // [8, 16, 8, 8]: resized to match
//!
//! // The authors' recipe: mean of squared differences of L2-normalised A^2 maps, beta = 1e3.
//! let loss = at_loss_sum(&[(student, teacher)], &AtConfig::default(), 1e3)?;
//! let grads = loss.backward()?;
//! let dw = grads.get(&w_student).expect("the student weight gets a gradient");
//! assert_eq!(dw.dims(), &[4, 3, 3, 3]);
//! assert!(loss.to_dtype(DType::F64)?.to_scalar::<f64>()? > 0.0);
//! # Ok(())
//! # }
//! ```
//!
//! [candle]: https://github.com/huggingface/candle
#![deny(missing_docs)]

mod distance;
mod kernels;
mod map;
mod resize;

pub use distance::{AtConfig, Distance, at_loss, at_loss_from_maps, at_loss_sum, at_losses};
pub use kernels::{AtBackend, AtKernels};
pub use map::{
    ChannelReduce, MapSpec, NORM_EPS, Normalization, attention_map, attention_map_flat, normalize,
    raw_attention_map,
};
pub use resize::{Resize, resize_map};

// The workspace README shows the same example under "Using at-ops alone": run it as a doctest too,
// so the two cannot drift apart.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct WorkspaceReadme;
