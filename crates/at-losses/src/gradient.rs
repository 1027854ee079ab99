//! Gradient-based attention (section 3.2 of the paper): the gradient of the loss with respect to
//! the input, `J = dL/dx`, penalised or transferred by double backpropagation (Drucker & LeCun,
//! 1992). Each function returns the cross-entropy and a penalty whose gradient with respect to
//! the weights goes through `J`: they must run inside
//! [`with_second_order`](crate::second_order::with_second_order), and fail otherwise.
//!
//! With `L` the batch-mean cross-entropy of the student, `J_S = dL/dx`:
//! - [`jacobian_norm`]: `1/2 ||J_S||^2` (double backpropagation);
//! - [`symmetry_norm`]: `1/2 (||J_S - flip(J_S')||^2 + ||z - z'||^2)` where `'` marks the
//!   horizontally flipped batch, `J_S'` is taken with respect to the flipped input and flipped
//!   back, and `z` are the logits;
//! - [`gradient_transfer`]: `1/2 ||J_S - J_T||^2` with the teacher's `J_T` ([`teacher_jacobian`]).
//!
//! Norms are sums of squares over the whole batch; the trainer multiplies the penalty by beta.

use candle_core::{Result, Tensor, Var};

use crate::cross_entropy;
use crate::second_order::ensure_second_order;

/// A network as a function from images to logits.
pub type Forward<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// The parts of a gradient-based loss.
#[derive(Clone, Debug)]
pub struct GradientLoss {
    /// Batch-mean cross-entropy of the (unflipped) batch.
    pub ce: Tensor,
    /// The logits of the (unflipped) batch.
    pub logits: Tensor,
    /// The penalty, before beta.
    pub penalty: Tensor,
}

/// `(L, logits, dL/dx)` for `x`; `dL/dx` keeps its graph when second-order gradients are on.
fn loss_and_input_gradient(
    forward: Forward,
    x: &Tensor,
    labels: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let input = Var::from_tensor(&x.detach())?;
    let logits = forward(input.as_tensor())?;
    let ce = cross_entropy(&logits, labels)?;
    let grads = ce.backward()?;
    let jacobian = grads.get(&input).cloned().ok_or_else(|| {
        candle_core::Error::Msg("the loss does not depend on the input: no input gradient".into())
    })?;
    Ok((ce, logits, jacobian))
}

fn half_sum_sq(t: &Tensor) -> Result<Tensor> {
    t.sqr()?.sum_all()? * 0.5
}

/// `1/2 ||dL/dx||^2`: Drucker & LeCun's double backpropagation.
pub fn jacobian_norm(student: Forward, x: &Tensor, labels: &Tensor) -> Result<GradientLoss> {
    ensure_second_order("the input-gradient norm")?;
    let (ce, logits, j) = loss_and_input_gradient(student, x, labels)?;
    Ok(GradientLoss { ce, logits, penalty: half_sum_sq(&j)? })
}

/// `1/2 (||J - flip(J')||^2 + ||z - z'||^2)`: the gradient maps and outputs of a batch and of its
/// horizontal mirror should agree.
pub fn symmetry_norm(student: Forward, x: &Tensor, labels: &Tensor) -> Result<GradientLoss> {
    ensure_second_order("the symmetry norm")?;
    let (ce, logits, j) = loss_and_input_gradient(student, x, labels)?;
    let (_, logits_flipped, j_flipped) = loss_and_input_gradient(student, &hflip(x)?, labels)?;
    let penalty =
        (half_sum_sq(&(j - hflip(&j_flipped)?)?)? + half_sum_sq(&(&logits - logits_flipped)?)?)?;
    Ok(GradientLoss { ce, logits, penalty })
}

/// `1/2 ||J_S - J_T||^2`: gradient-based attention transfer from a teacher's `J_T`.
pub fn gradient_transfer(
    student: Forward,
    x: &Tensor,
    labels: &Tensor,
    teacher_jacobian: &Tensor,
) -> Result<GradientLoss> {
    ensure_second_order("gradient attention transfer")?;
    let (ce, logits, j) = loss_and_input_gradient(student, x, labels)?;
    Ok(GradientLoss { ce, logits, penalty: half_sum_sq(&(j - teacher_jacobian.detach())?)? })
}

/// The teacher's `dL/dx` on `x`, as a constant (first-order: no switch needed).
pub fn teacher_jacobian(teacher: Forward, x: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(loss_and_input_gradient(teacher, x, labels)?.2.detach())
}

/// Mirrors `[B, C, H, W]` left to right, with `index_select` (twice differentiable in candle,
/// unlike `gather`).
pub fn hflip(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(3)?;
    let reversed: Vec<u32> = (0..w as u32).rev().collect();
    x.index_select(&Tensor::from_vec(reversed, w, x.device())?, 3)
}
