//! One training step: the forward passes, the loss (with the attention maps the networks make
//! themselves), the backward pass and SGD; and the step with a gradient-based penalty, whose
//! loss is built on the second-order thread.

use anyhow::{Context, Result};
use at_losses::gradient::{
    GradientConfig, GradientPenalty, TeacherBatch, gradient_student_loss, teacher_outputs,
};
use at_losses::second_order::SecondOrder;
use at_losses::{GroupMaps, LossConfig, LossParts, student_loss_with_maps};
use at_models::{AttentionModel, ParamGrads};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use super::Run;
use super::metrics::{DeviceSums, Sums};

impl Run {
    pub(super) fn step(
        &mut self,
        batch: &at_data::Batch,
        (sums, totals): (&mut DeviceSums, &mut Sums),
    ) -> Result<()> {
        if let Some(parallel) = self.parallel.clone() {
            return self.parallel_step(&parallel, batch, (sums, totals));
        }
        let (images, labels) = (&batch.images, &batch.labels);
        let (parts, grads) = self.loss_and_grads(images, labels)?;
        self.sgd.step(&grads)?;
        // The sums stay on the device; the epoch loop reads them back now and then.
        sums.add(totals, &parts, labels)?;
        Ok(())
    }

    /// [`Run::loss_and_grads`] with the gradients of `scale` times the loss where the step can
    /// scale its loss before backward (the plain step: then `true`); the gradient-based step's
    /// are returned unscaled (`false`). The parts are the loss's, unscaled.
    pub(super) fn loss_and_grads_scaled(
        &self,
        images: &Tensor,
        labels: &Tensor,
        scale: f64,
    ) -> Result<(LossParts, GradStore, bool)> {
        if self.gradient.is_some() || scale == 1.0 {
            let (parts, grads) = self.loss_and_grads(images, labels)?;
            return Ok((parts, grads, scale == 1.0));
        }
        let deferred = ParamGrads::new();
        let parts = student_loss(
            self.student.as_ref(),
            self.teacher.as_deref(),
            (images, labels),
            &self.loss,
            Some(&deferred),
        )?;
        let grads = backward_merged(&parts.total.affine(scale, 0.0)?, &deferred)?;
        Ok((parts, grads, true))
    }

    /// The loss of `images` and its gradients: the plain step's, or with a gradient-based
    /// penalty (built on the second-order thread).
    pub(super) fn loss_and_grads(
        &self,
        images: &Tensor,
        labels: &Tensor,
    ) -> Result<(LossParts, GradStore)> {
        Ok(match &self.gradient {
            Some(config) => {
                let second_order =
                    self.second_order.as_ref().context("checked when the run started")?;
                gradient_step(
                    self.student.as_ref(),
                    self.teacher.as_deref(),
                    (images, labels),
                    config,
                    self.config.loss.gradient_chunks,
                    second_order,
                )?
            }
            None => {
                let (teacher, deferred) = (self.teacher.as_deref(), ParamGrads::new());
                let batch = (images, labels);
                let parts = student_loss(
                    self.student.as_ref(),
                    teacher,
                    batch,
                    &self.loss,
                    Some(&deferred),
                )?;
                let grads = backward_merged(&parts.total, &deferred)?;
                (parts, grads)
            }
        })
    }
}

/// `total.backward()` with the parameter gradients the student's fused kernels handed to
/// `deferred` merged in: the gradients of every parameter.
pub fn backward_merged(total: &Tensor, deferred: &ParamGrads) -> Result<GradStore> {
    let mut grads = total.backward()?;
    deferred.merge_into(&mut grads)?;
    Ok(grads)
}

/// The loss of one step without a gradient-based penalty: the student's forward in training mode
/// (making the paired groups' maps itself), the teacher's in evaluation where distillation or
/// attention transfer needs it, and the combined loss with each part. With `deferred`, the
/// student's fused kernels may hand their parameters' gradients to it instead of candle's
/// graph: take the gradients with [`backward_merged`].
pub fn student_loss(
    student: &dyn AttentionModel,
    teacher: Option<&dyn AttentionModel>,
    (images, labels): (&Tensor, &Tensor),
    loss: &LossConfig,
    deferred: Option<&ParamGrads>,
) -> Result<LossParts> {
    let (maps_s, maps_t) = wanted_maps(loss, teacher.is_some());
    let out = match deferred {
        Some(grads) => student.forward_deferred(images, &maps_s, grads)?,
        None => student.forward_with_maps(images, true, &maps_s)?,
    };
    let teacher_out = match teacher {
        Some(t) if loss.alpha > 0.0 || loss.beta > 0.0 => {
            Some(t.forward_with_maps(images, false, &maps_t)?)
        }
        _ => None,
    };
    let t = teacher_out.as_ref().map(|o| (&o.logits, &o.groups[..]));
    let maps =
        GroupMaps { student: &out.maps, teacher: teacher_out.as_ref().map_or(&[], |t| &t.maps) };
    Ok(student_loss_with_maps(&out.logits, labels, &out.groups, t, loss, maps)?)
}

/// The groups whose attention maps the networks should make themselves for `loss`, as
/// `(student's, teacher's)`: the paired ones, with a teacher and attention transfer, when the
/// map is the one they make (`p = 2`, channel mean); none otherwise.
pub fn wanted_maps(loss: &LossConfig, teacher: bool) -> (Vec<usize>, Vec<usize>) {
    if !teacher || loss.beta <= 0.0 || !loss.at.map.is_mean_square() {
        return (vec![], vec![]);
    }
    loss.pairs.iter().map(|&(s, t)| (s, t)).unzip()
}

/// The loss and gradients of one step with a gradient-based penalty (`loss.gradient`): the
/// teacher's logits and input gradient on this thread (first-order, and only when distillation
/// or gradient transfer needs them), the student's double-backpropagation graph on a
/// second-order one, and its `backward` back on this thread, where gradients are detached as
/// they are built (no third graph). With `chunks > 1` the batch is processed in chunks whose
/// gradients are summed (exact for a student without batch norm).
pub fn gradient_step(
    student: &dyn AttentionModel,
    teacher: Option<&dyn AttentionModel>,
    (images, labels): (&Tensor, &Tensor),
    config: &GradientConfig,
    chunks: usize,
    second_order: &SecondOrder,
) -> Result<(LossParts, GradStore)> {
    let teacher_out = match teacher {
        Some(t) if config.alpha > 0.0 || config.penalty == GradientPenalty::Transfer => {
            let forward = |x: &Tensor| Ok(t.forward_t(x, false)?.logits);
            Some(teacher_outputs(&forward, images, labels)?)
        }
        _ => None,
    };
    let batch = images.dim(0)?;
    let size = batch.div_ceil(chunks.clamp(1, batch));
    let value = |t: &Tensor| -> Result<f64> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
    };
    let (mut total, mut ce, mut kd, mut penalty) = (0f64, 0f64, 0f64, 0f64);
    let mut logits = vec![];
    let mut grads: Option<GradStore> = None;
    for start in (0..batch).step_by(size) {
        let len = size.min(batch - start);
        let x = images.narrow(0, start, len)?;
        let y = labels.narrow(0, start, len)?;
        let chunk = match &teacher_out {
            Some((l, j)) => Some((l.narrow(0, start, len)?, j.narrow(0, start, len)?)),
            None => None,
        };
        let teacher = chunk.as_ref().map(|(logits, jacobian)| TeacherBatch { logits, jacobian });
        let parts = second_order.run(|| {
            let forward = |x: &Tensor| Ok(student.forward_t(x, true)?.logits);
            gradient_student_loss(&forward, &x, &y, teacher, config, batch)
        })?;
        // Detached: a weight's gradient (the weight-gradient op of a convolution, say) refers
        // to the chunk's activations, and would keep the whole chunk's graph alive.
        let chunk_grads = detach_all(parts.total.backward()?)?;
        match &mut grads {
            Some(sum) => sum.extend(chunk_grads)?,
            None => grads = Some(chunk_grads),
        }
        let share = len as f64 / batch as f64;
        total += value(&parts.total)?;
        ce += value(&parts.ce)? * share;
        if let Some(k) = &parts.kd {
            kd += value(k)? * share;
        }
        if let Some(p) = &parts.gradient {
            penalty += value(p)?;
        }
        logits.push(parts.logits.detach());
    }
    let device = images.device();
    let parts = LossParts {
        total: Tensor::new(total, device)?,
        ce: Tensor::new(ce, device)?,
        kd: (config.alpha > 0.0).then(|| Tensor::new(kd, device)).transpose()?,
        at: vec![],
        gradient: Some(Tensor::new(penalty, device)?),
        logits: Tensor::cat(&logits, 0)?,
    };
    Ok((parts, grads.expect("a batch has at least one chunk")))
}

/// The same gradients without the graphs they were computed through.
pub fn detach_all(mut grads: GradStore) -> candle_core::Result<GradStore> {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        let detached = grads.get_id(id).expect("listed").detach();
        grads.insert_id(id, detached);
    }
    Ok(grads)
}
