//! Student/teacher attention-transfer distances (eq. (2) of the paper and the authors' code).

use candle_core::{Result, Tensor, bail};

use crate::kernels::AtBackend;
use crate::map::{MapSpec, Normalization, abs, normalize, raw_map};
use crate::resize::{Resize, resize_map};

/// How the normalised student and teacher maps `Q_S`, `Q_T` (`[B, N]`) are compared.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Distance {
    /// `mean over b, n of (Q_S - Q_T)^2`: the authors' code, which the published numbers (and
    /// beta = 1e3) belong to.
    #[default]
    Code,
    /// `1/2 ||Q_S - Q_T||_p` per sample, averaged over the batch: eq. (2) of the paper (p = 1 or 2;
    /// any finite p >= 1 is accepted). The gradient at a zero difference is zero, as PyTorch's norm.
    Paper {
        /// The norm's order.
        p: f64,
    },
}

/// Everything that defines one attention-transfer loss term.
///
/// `AtConfig::default()` is the authors' code: `mean_c A^2`, L2-normalised, squared distance,
/// area resizing when the sizes differ.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct AtConfig {
    /// The attention mapping function and its normalisation.
    pub map: MapSpec,
    /// How the two normalised maps are compared.
    pub distance: Distance,
    /// How maps of different spatial sizes are brought together.
    pub resize: Resize,
    /// The size both maps are resized to; `None` resizes the larger map to the smaller one.
    pub size: Option<(usize, usize)>,
    /// Which ops compute the channel reduction and the distance: candle's (the default) or a
    /// kernel crate's, chosen here and nowhere else.
    pub backend: AtBackend,
}

impl AtConfig {
    /// The map of `activation` (`[B, C, H, W]`) before normalisation, `F(A)` as `[B, H, W]`,
    /// with this config's map and backend: what [`at_loss_from_maps`] takes.
    pub fn raw_map(&self, activation: &Tensor) -> Result<Tensor> {
        raw_map(activation, &self.map, self.backend)
    }
}

/// The attention-transfer distance between a student activation `[B, Cs, Hs, Ws]` and a teacher
/// activation `[B, Ct, Ht, Wt]`: a scalar in the student's dtype.
///
/// The channel counts may differ. When the spatial sizes differ, the unnormalised maps are resized
/// (to `config.size`, or the larger to the smaller) before they are normalised and compared.
/// The teacher is treated as a constant: no gradient flows into it.
pub fn at_loss(student: &Tensor, teacher: &Tensor, config: &AtConfig) -> Result<Tensor> {
    check_pair(student, teacher, (4, "activations [B, C, H, W]"))?;
    let raw_s = raw_map(student, &config.map, config.backend)?;
    let raw_t = raw_map(&teacher.detach(), &config.map, config.backend)?;
    at_loss_from_maps(&raw_s, &raw_t, config)?.to_dtype(student.dtype())
}

/// [`at_loss`] from the two maps before normalisation, `[B, H, W]` each (what
/// [`raw_attention_map`](crate::raw_attention_map) gives with `config.map`, or a kernel that
/// computed the same): resized, normalised and compared as `config` says. The teacher's map is
/// a constant. A scalar in the student map's dtype.
pub fn at_loss_from_maps(student: &Tensor, teacher: &Tensor, config: &AtConfig) -> Result<Tensor> {
    check_pair(student, teacher, (3, "maps [B, H, W]"))?;
    let ((_, hs, ws), (_, ht, wt)) = (student.dims3()?, teacher.dims3()?);
    let size = config.size.unwrap_or((hs.min(ht), ws.min(wt)));
    let flat = |q: &Tensor| resize_map(q, size, config.resize)?.flatten_from(1); // [b, n]
    let (raw_s, raw_t) = (flat(student)?, flat(&teacher.detach())?);
    if config.map.norm == Normalization::L2
        && config.distance == Distance::Code
        && let Some(kernels) = config.backend.kernels()
        && let Some(loss) = (kernels.distance)(&raw_s, &raw_t.to_dtype(raw_s.dtype())?)?
    {
        return Ok(loss);
    }
    let qs = normalize(&raw_s, config.map.norm)?;
    let qt = normalize(&raw_t, config.map.norm)?.to_dtype(qs.dtype())?;
    let diff = (qs - qt)?;
    match config.distance {
        Distance::Code => diff.sqr()?.mean_all(),
        Distance::Paper { p } => (p_norm(&diff, p)? * 0.5)?.mean_all(),
    }
}

/// The attention-transfer distances of several group pairs, in order: what a trainer logs.
pub fn at_losses(pairs: &[(Tensor, Tensor)], config: &AtConfig) -> Result<Vec<Tensor>> {
    pairs.iter().map(|(s, t)| at_loss(s, t, config)).collect()
}

/// `beta * sum_j at_loss(S_j, T_j)` over the group pairs `(student, teacher)`: the term added to
/// the task loss (eq. (2) with the paper's beta; the authors use beta = 1e3 with
/// [`Distance::Code`]).
pub fn at_loss_sum(pairs: &[(Tensor, Tensor)], config: &AtConfig, beta: f64) -> Result<Tensor> {
    if pairs.is_empty() {
        bail!("attention transfer needs at least one (student, teacher) group pair")
    }
    let losses = at_losses(pairs, config)?;
    Tensor::stack(&losses, 0)?.sum_all()? * beta
}

/// `||x_b||_p` for each row of `x` (`[B, N]`): `[B]`.
fn p_norm(x: &Tensor, p: f64) -> Result<Tensor> {
    if !(p.is_finite() && p >= 1.0) {
        bail!("the paper's distance needs a finite norm order p >= 1, got {p}")
    }
    if p == 1.0 {
        return abs(x)?.sum(1);
    }
    let s = if p == 2.0 { x.sqr()? } else { abs(x)?.powf(p)? }.sum(1)?; // [b]
    // s^(1/p) written as s * max(s, tiny)^(1/p - 1): equal for s >= tiny, exactly 0 at s = 0, and
    // with a finite gradient there (the plain power has an infinite one). tiny^(1/p - 2), which
    // the backward pass of the power computes, must stay finite in f32: hence 1e-18, not less.
    let tiny = 1e-18;
    s.clone() * s.maximum(tiny)?.powf(1.0 / p - 1.0)?
}

/// The checks both ends of a pair must pass: the rank (`what` names the operands, e.g.
/// `"maps [B, H, W]"`), the same batch size, the same device.
fn check_pair(student: &Tensor, teacher: &Tensor, (rank, what): (usize, &str)) -> Result<()> {
    if student.rank() != rank || teacher.rank() != rank {
        bail!(
            "attention transfer needs {what}, got student {:?} and teacher {:?}",
            student.dims(),
            teacher.dims()
        )
    }
    if student.dim(0)? != teacher.dim(0)? {
        bail!(
            "attention transfer needs the same batch size, got student {what} {:?} and \
             teacher {:?}",
            student.dims(),
            teacher.dims()
        )
    }
    if !student.device().same_device(teacher.device()) {
        bail!(
            "student and teacher {what} must be on the same device, got {:?} and {:?}",
            student.device().location(),
            teacher.device().location()
        )
    }
    Ok(())
}
