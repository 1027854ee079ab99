//! The training losses of "Paying More Attention to Attention" (Zagoruyko & Komodakis, ICLR 2017)
//! for candle: cross-entropy, knowledge distillation (Hinton et al., 2015) and activation-based
//! attention transfer, combined as the authors' `cifar.py` combines them:
//!
//! `loss = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + beta * sum_j AT_j`
//!
//! with the KL divergence summed over classes and averaged over the batch. With `alpha = 0` the
//! first terms are plain cross-entropy; with `beta = 0` there is no attention transfer. The
//! teacher's logits and activations are constants: no gradient reaches them.
#![deny(missing_docs)]

pub mod gradient;
pub mod second_order;

use at_ops::{AtConfig, at_loss, at_loss_from_maps};
use candle_core::{DType, Result, Tensor, bail};
use candle_nn::ops::log_softmax;

/// Mean cross-entropy of `logits` (`[B, classes]`) against integer `labels` (`[B]`).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    check_logits(logits)?;
    candle_nn::loss::cross_entropy(logits, &labels.to_dtype(DType::U32)?)
}

/// `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, summed over classes and averaged
/// over the batch (`reduction="batchmean"`). The teacher is detached.
pub fn distillation(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    check_logits(student)?;
    if student.dims() != teacher.dims() {
        bail!(
            "distillation needs logits of one shape, got student {:?} and teacher {:?}",
            student.dims(),
            teacher.dims()
        )
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("the distillation temperature must be positive, got {temperature}")
    }
    let log_q = log_softmax(&(student / temperature)?, 1)?;
    let log_p = log_softmax(&(teacher.detach() / temperature)?, 1)?;
    let p = log_p.exp()?;
    let kl = (p * (log_p - log_q)?)?.sum_all()?; // [], summed over batch and classes
    kl * (temperature * temperature / student.dim(0)? as f64)
}

fn check_logits(logits: &Tensor) -> Result<()> {
    match logits.dims() {
        [b, c] if *b > 0 && *c > 0 => Ok(()),
        dims => bail!("logits must be [batch, classes], got {dims:?}"),
    }
}

/// The weights of the terms and how the attention maps are compared.
#[derive(Clone, Debug, PartialEq)]
pub struct LossConfig {
    /// Weight of the distillation term (`0` disables it).
    pub alpha: f64,
    /// Distillation temperature.
    pub temperature: f64,
    /// Weight of the attention-transfer term (`0` disables it); the authors use 1e3 with the
    /// `Code` distance.
    pub beta: f64,
    /// How each attention pair is compared.
    pub at: AtConfig,
    /// The (student group, teacher group) pairs to transfer, by index into each model's groups.
    pub pairs: Vec<(usize, usize)>,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { alpha: 0.0, temperature: 4.0, beta: 0.0, at: AtConfig::default(), pairs: vec![] }
    }
}

/// The total loss and its parts, for logging.
#[derive(Clone, Debug)]
pub struct LossParts {
    /// What to call `backward` on.
    pub total: Tensor,
    /// Cross-entropy (before its `1 - alpha` weight).
    pub ce: Tensor,
    /// The distillation term `T^2 KL` (before its `alpha` weight), when `alpha > 0`.
    pub kd: Option<Tensor>,
    /// Each pair's attention distance (before `beta`), in the order of `pairs`.
    pub at: Vec<Tensor>,
    /// The gradient-based penalty (before its beta), for
    /// [`gradient_student_loss`](gradient::gradient_student_loss).
    pub gradient: Option<Tensor>,
    /// The student's logits the loss was computed from.
    pub logits: Tensor,
}

/// The student's loss: cross-entropy, plus distillation from `teacher_logits` when
/// `alpha > 0`, plus attention transfer between the chosen groups when `beta > 0`.
pub fn student_loss(
    logits: &Tensor,
    labels: &Tensor,
    groups: &[Tensor],
    teacher: Option<(&Tensor, &[Tensor])>,
    config: &LossConfig,
) -> Result<LossParts> {
    student_loss_with_maps(logits, labels, groups, teacher, config, GroupMaps::default())
}

/// Attention maps the networks made themselves (`at_models::Output::maps`): per group,
/// `mean_c A_c^2` before normalisation (`[B, H, W]`); empty, or `None` for a group without one.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupMaps<'a> {
    /// The student's, by group.
    pub student: &'a [Option<Tensor>],
    /// The teacher's, by group.
    pub teacher: &'a [Option<Tensor>],
}

/// [`student_loss`] taking the groups' attention maps from `maps` where they are there, instead
/// of computing them from the activations, when `config.at.map` is the map they are (`p = 2`,
/// channel mean; any normalisation).
pub fn student_loss_with_maps(
    logits: &Tensor,
    labels: &Tensor,
    groups: &[Tensor],
    teacher: Option<(&Tensor, &[Tensor])>,
    config: &LossConfig,
    maps: GroupMaps,
) -> Result<LossParts> {
    let ce = cross_entropy(logits, labels)?;
    let needs_teacher = config.alpha > 0.0 || (config.beta > 0.0 && !config.pairs.is_empty());
    let Some((teacher_logits, teacher_groups)) = teacher.filter(|_| needs_teacher) else {
        if needs_teacher {
            bail!("alpha > 0 or beta > 0 with attention pairs needs a teacher")
        }
        return Ok(LossParts {
            total: ce.clone(),
            ce,
            kd: None,
            at: vec![],
            gradient: None,
            logits: logits.clone(),
        });
    };
    let mut total = (&ce * (1.0 - config.alpha))?;
    let kd = if config.alpha > 0.0 {
        let kd = distillation(logits, teacher_logits, config.temperature)?;
        total = (total + (&kd * config.alpha)?)?;
        Some(kd)
    } else {
        None
    };
    let at = if config.beta > 0.0 {
        let fused_map = config.at.map.is_mean_square();
        let mut at = Vec::with_capacity(config.pairs.len());
        for &(s, t) in &config.pairs {
            let (Some(gs), Some(gt)) = (groups.get(s), teacher_groups.get(t)) else {
                bail!(
                    "attention pair ({s}, {t}) is out of range: the student has {} groups, the teacher {}",
                    groups.len(),
                    teacher_groups.len()
                )
            };
            let given = |maps: &[Option<Tensor>], g: usize| match maps.get(g) {
                Some(Some(map)) if fused_map => Some(map.clone()),
                _ => None,
            };
            at.push(match (given(maps.student, s), given(maps.teacher, t)) {
                (None, None) => at_loss(gs, gt, &config.at)?,
                (map_s, map_t) => {
                    let map_s = map_s.map_or_else(|| config.at.raw_map(gs), Ok)?;
                    let map_t = map_t.map_or_else(|| config.at.raw_map(&gt.detach()), Ok)?;
                    at_loss_from_maps(&map_s, &map_t, &config.at)?.to_dtype(gs.dtype())?
                }
            });
        }
        for term in &at {
            total = (total + (term * config.beta)?)?;
        }
        at
    } else {
        vec![]
    };
    Ok(LossParts { total, ce, kd, at, gradient: None, logits: logits.clone() })
}
