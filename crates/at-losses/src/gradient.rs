//! Gradient-based attention (section 3.2 of the paper): the gradient of the loss with respect to
//! the input, `J = dL/dx`, penalised or transferred by double backpropagation (Drucker & LeCun,
//! 1992). Each function returns the cross-entropy and a penalty whose gradient with respect to
//! the weights goes through `J`: they must run inside
//! [`SecondOrder::run`](crate::second_order::SecondOrder::run), and fail otherwise.
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

use crate::second_order::ensure_second_order;
use crate::{LossParts, cross_entropy, distillation};

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

/// `(L, logits, dL/dx)` for `x`, where `L` is the batch-mean cross-entropy times `scale` (the
/// share of the whole batch that `x` is, when a batch is split); `dL/dx` keeps its graph when
/// second-order gradients are on. The returned `L` is not scaled.
fn loss_and_input_gradient(
    forward: Forward,
    x: &Tensor,
    labels: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let input = Var::from_tensor(&x.detach())?;
    let logits = forward(input.as_tensor())?;
    let ce = cross_entropy(&logits, labels)?;
    let grads = if scale == 1.0 { ce.backward()? } else { (&ce * scale)?.backward()? };
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
    jacobian_norm_scaled(student, x, labels, 1.0)
}

fn jacobian_norm_scaled(
    student: Forward,
    x: &Tensor,
    labels: &Tensor,
    scale: f64,
) -> Result<GradientLoss> {
    ensure_second_order("the input-gradient norm")?;
    let (ce, logits, j) = loss_and_input_gradient(student, x, labels, scale)?;
    Ok(GradientLoss { ce, logits, penalty: half_sum_sq(&j)? })
}

/// `1/2 (||J - flip(J')||^2 + ||z - z'||^2)`: the gradient maps and outputs of a batch and of its
/// horizontal mirror should agree.
pub fn symmetry_norm(student: Forward, x: &Tensor, labels: &Tensor) -> Result<GradientLoss> {
    symmetry_norm_scaled(student, x, labels, 1.0)
}

fn symmetry_norm_scaled(
    student: Forward,
    x: &Tensor,
    labels: &Tensor,
    scale: f64,
) -> Result<GradientLoss> {
    ensure_second_order("the symmetry norm")?;
    let (ce, logits, j) = loss_and_input_gradient(student, x, labels, scale)?;
    let (_, logits_flipped, j_flipped) =
        loss_and_input_gradient(student, &hflip(x)?, labels, scale)?;
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
    gradient_transfer_scaled(student, x, labels, teacher_jacobian, 1.0)
}

fn gradient_transfer_scaled(
    student: Forward,
    x: &Tensor,
    labels: &Tensor,
    teacher_jacobian: &Tensor,
    scale: f64,
) -> Result<GradientLoss> {
    ensure_second_order("gradient attention transfer")?;
    let (ce, logits, j) = loss_and_input_gradient(student, x, labels, scale)?;
    Ok(GradientLoss { ce, logits, penalty: half_sum_sq(&(j - teacher_jacobian.detach())?)? })
}

/// The teacher's `dL/dx` on `x`, as a constant (first-order: no switch needed).
pub fn teacher_jacobian(teacher: Forward, x: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(teacher_outputs(teacher, x, labels)?.1)
}

/// The teacher's logits and `dL/dx` on `x`, both constants, from one forward pass.
pub fn teacher_outputs(teacher: Forward, x: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, logits, jacobian) = loss_and_input_gradient(teacher, x, labels, 1.0)?;
    Ok((logits.detach(), jacobian.detach()))
}

/// Which gradient-based penalty a run adds (Table 3 of the paper).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientPenalty {
    /// `1/2 ||J_S||^2` ([`jacobian_norm`], "min" in Table 3).
    Jacobian,
    /// [`symmetry_norm`].
    Symmetry,
    /// `1/2 ||J_S - J_T||^2` ([`gradient_transfer`], "AT-NIN-wide").
    Transfer,
}

/// The weights of a gradient-based run: `(1 - alpha) CE + alpha KD + beta * penalty`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradientConfig {
    /// The penalty.
    pub penalty: GradientPenalty,
    /// Its weight.
    pub beta: f64,
    /// Weight of knowledge distillation (`0`: none).
    pub alpha: f64,
    /// Distillation temperature.
    pub temperature: f64,
}

/// The teacher's constants for one batch: its logits (for distillation) and its input gradient
/// (for [`GradientPenalty::Transfer`]), from [`teacher_outputs`].
#[derive(Clone, Copy, Debug)]
pub struct TeacherBatch<'a> {
    /// The teacher's logits.
    pub logits: &'a Tensor,
    /// The teacher's `dL/dx`.
    pub jacobian: &'a Tensor,
}

/// The student's loss with a gradient-based penalty, combined with distillation as
/// [`student_loss`](crate::student_loss) combines activation AT. Must run inside
/// [`SecondOrder::run`](crate::second_order::SecondOrder::run); the `backward` of the returned
/// total is best called outside it (see ARCHITECTURE.md): it needs no graph of its own.
///
/// `batch` is the size of the whole batch the loss averages over: `x` may be one chunk of it
/// (for a network without batch norm, where samples do not interact, the chunks' totals and
/// penalties then add up to the whole batch's, and so do their gradients). `ce`, `kd` and
/// `logits` in the result are the chunk's own; `total` and `gradient` are its share.
pub fn gradient_student_loss(
    student: Forward,
    x: &Tensor,
    labels: &Tensor,
    teacher: Option<TeacherBatch>,
    config: &GradientConfig,
    batch: usize,
) -> Result<LossParts> {
    let n = x.dim(0)?;
    if n == 0 || batch < n {
        candle_core::bail!("a chunk of {n} images cannot be part of a batch of {batch}")
    }
    let scale = n as f64 / batch as f64;
    let needs_teacher = config.alpha > 0.0 || config.penalty == GradientPenalty::Transfer;
    let teacher = match teacher {
        Some(t) => Some(t),
        None if needs_teacher => {
            candle_core::bail!("distillation or gradient attention transfer needs a teacher")
        }
        None => None,
    };
    let parts = match config.penalty {
        GradientPenalty::Jacobian => jacobian_norm_scaled(student, x, labels, scale)?,
        GradientPenalty::Symmetry => symmetry_norm_scaled(student, x, labels, scale)?,
        GradientPenalty::Transfer => {
            let t = teacher.expect("checked above");
            gradient_transfer_scaled(student, x, labels, t.jacobian, scale)?
        }
    };
    let mut total = (&parts.ce * ((1.0 - config.alpha) * scale))?;
    let kd = match teacher {
        Some(t) if config.alpha > 0.0 => {
            let kd = distillation(&parts.logits, t.logits, config.temperature)?;
            total = (total + (&kd * (config.alpha * scale))?)?;
            Some(kd)
        }
        _ => None,
    };
    total = (total + (&parts.penalty * config.beta)?)?;
    Ok(LossParts {
        total,
        ce: parts.ce,
        kd,
        at: vec![],
        gradient: Some(parts.penalty),
        logits: parts.logits,
    })
}

/// Mirrors `[B, C, H, W]` left to right, with `index_select` (twice differentiable in candle,
/// unlike `gather`).
pub fn hflip(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(3)?;
    let reversed: Vec<u32> = (0..w as u32).rev().collect();
    x.index_select(&Tensor::from_vec(reversed, w, x.device())?, 3)
}
