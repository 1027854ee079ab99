//! Data-parallel training: every rank holds the whole model, runs its contiguous part of each
//! global batch, and the gradients are summed over the ranks (weighted by each part's share of
//! the batch, so the result is the gradient of the global batch's mean loss) in one flat buffer
//! through an `at_dist::Collective` (MPI; NCCL on GPUs). The global batch is the config's
//! `batch_size` whatever the number of ranks, and its order and augmentations are those of one
//! process, so a run (and its resume) does not depend on how many ranks ran it, up to the
//! float rounding of the sums, and batch norm, whose statistics are each part's as in PyTorch's
//! DDP.
//!
//! Rules every rank keeps, so that no rank ever waits alone in a collective:
//! - the collectives run in the same order on every rank: the start (the config's hash, then
//!   the parameters and momentum broadcast from rank 0), each step (the flat gradients, the
//!   step's metric sums, then the stop and checkpoint flags), before each evaluation and
//!   checkpoint (rank 0's batch-norm statistics), each evaluation (its counts);
//! - what decides control flow is global: the metric sums (a NaN loss stops every rank at the
//!   same read), the stop flag (Ctrl-C on one rank stops all after the same batch), the timed
//!   checkpoint inside an epoch (any rank's clock past the interval checkpoints all after the
//!   same batch); no rank's clock alone decides anything;
//! - rank 0 alone writes (config, checkpoints, metrics, the final weights and result); every
//!   rank resumes from the same checkpoint, which must be on a filesystem all ranks see; every
//!   rank returns from a run only once rank 0 has written them (a barrier: the next run of a
//!   `repro` job may be a student that reads the teacher's weights);
//! - an error on one rank alone (a missing file) is the caller's to end the job with
//!   `Collective::abort`, which the `at-train` binary does.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{Result, bail};
use at_dist::{Collective, part_of};
use candle_core::{DType, Tensor};

use super::Run;
use super::metrics::{DeviceSums, FIXED, Sums, step_vector};
use crate::config::{DeviceSpec, RunConfig};

/// How this process takes part in data-parallel training.
#[derive(Clone)]
pub struct Parallel {
    /// The ranks.
    pub world: Arc<dyn Collective>,
    /// Parts of each batch this process runs one after the other, summing their gradients
    /// (1 normally). With `n` ranks of `k` parts each, a batch is cut into `n * k` contiguous
    /// parts; one process with `k = n` computes what `n` ranks do (the tests' reference).
    pub local_parts: usize,
}

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parallel")
            .field("world", &self.world.describe())
            .field("rank", &self.world.rank())
            .field("local_parts", &self.local_parts)
            .finish()
    }
}

impl Parallel {
    /// Every rank of `world`, one part each.
    pub fn new(world: Arc<dyn Collective>) -> Self {
        Self { world, local_parts: 1 }
    }

    /// Whether this is rank 0, the one that writes.
    pub fn is_leader(&self) -> bool {
        self.world.rank() == 0
    }

    /// The share of every batch this process's loader serves.
    pub(super) fn share(&self) -> at_data::Share {
        at_data::Share { index: self.world.rank(), of: self.world.size() }
    }

    /// The parts this process runs of a batch of `whole` items whose share it holds from
    /// `offset` on, as ranges of that share.
    pub(super) fn local_ranges(&self, whole: usize, offset: usize) -> Vec<Range<usize>> {
        let k = self.local_parts.max(1);
        let parts = self.world.size() * k;
        (0..k)
            .map(|j| {
                let part = part_of(whole, self.world.rank() * k + j, parts);
                part.start - offset..part.end - offset
            })
            .collect()
    }
}

/// A hash of what must be the same on every rank: the config, with the device's kind only
/// (each rank takes its own GPU). FNV-1a, stable across builds and machines.
pub(super) fn config_hash(config: &RunConfig) -> u64 {
    let mut config = config.clone();
    if let DeviceSpec::Cuda(_) = config.device {
        config.device = DeviceSpec::Cuda(0);
    }
    config
        .to_toml()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

impl Run {
    /// The start of a data-parallel run: the config must hash alike on every rank (else every
    /// rank stops, the ones that differ saying so), then rank 0's parameters, batch-norm
    /// statistics and momentum go to every rank.
    pub(super) fn start_parallel(&mut self, parallel: &Parallel) -> Result<()> {
        let world = parallel.world.as_ref();
        let hash = config_hash(&self.config);
        let halves = [(hash >> 32) as f64, (hash & 0xffff_ffff) as f64];
        let ours = Tensor::new(&halves, &candle_core::Device::Cpu)?;
        let theirs: Vec<f64> = world.broadcast(&ours, 0)?.to_vec1()?;
        let differs = theirs != halves;
        if at_dist::any(world, differs)? {
            if differs {
                bail!(
                    "rank {}: this rank's config differs from rank 0's (hash {hash:016x}); every \
                     rank must run the same config: start them with the same files and options",
                    world.rank()
                )
            }
            bail!(
                "rank {}: another rank's config differs from rank 0's; see its message",
                world.rank()
            )
        }
        self.broadcast_vars(parallel, false)?;
        let mut momentum: Vec<(String, Tensor)> =
            self.sgd.state().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        momentum.sort_by(|a, b| a.0.cmp(&b.0));
        // Every rank holds the same momentum names (from the same checkpoint, or none).
        let mut state = std::collections::HashMap::new();
        for (name, buf) in momentum {
            state.insert(name, world.broadcast(&buf, 0)?);
        }
        if !state.is_empty() {
            self.sgd.load_state(state)?;
        }
        Ok(())
    }

    /// Sets every rank's weights (or, with `buffers_only`, its batch-norm statistics) to rank
    /// 0's, in name order.
    pub(super) fn broadcast_vars(&self, parallel: &Parallel, buffers_only: bool) -> Result<()> {
        if parallel.world.size() == 1 {
            return Ok(()); // Rank 0's are this process's.
        }
        for var in self.vars(buffers_only) {
            let value = parallel.world.broadcast(var.as_tensor(), 0)?;
            var.set(&value)?;
        }
        Ok(())
    }

    /// The student's variables in name order: all, or the batch-norm statistics only.
    fn vars(&self, buffers_only: bool) -> Vec<candle_core::Var> {
        let mut vars: Vec<(String, candle_core::Var)> = self
            .varmap
            .data()
            .lock()
            .expect("the VarMap lock is not poisoned")
            .iter()
            .filter(|(name, _)| !buffers_only || at_models::is_buffer(name))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.into_iter().map(|(_, v)| v).collect()
    }

    /// One data-parallel step: this process's parts of the global batch, their gradients
    /// weighted by their share and summed over the parts and the ranks in one flat buffer
    /// (with a mask of the parameters that have a gradient), SGD, and the step's metric sums
    /// summed over the ranks.
    pub(super) fn parallel_step(
        &mut self,
        parallel: &Parallel,
        batch: &at_data::Batch,
        (sums, totals): (&mut DeviceSums, &mut Sums),
    ) -> Result<()> {
        let (images, labels) = (&batch.images, &batch.labels);
        let len = batch.whole;
        let device = self.device.clone();
        let params: Vec<candle_core::Var> =
            self.sgd.params().iter().map(|(_, v)| v.clone()).collect();
        let sizes: Vec<usize> = params.iter().map(|v| v.elem_count()).collect();
        let total: usize = sizes.iter().sum();
        let mut flat: Option<Tensor> = None;
        let pairs = if self.loss.beta > 0.0 { self.loss.pairs.len() } else { 0 };
        let mut metric = Tensor::zeros(FIXED + pairs, DType::F64, &device)?;
        // With several parts here, the batch-norm statistics kept are the first part's, as a
        // rank keeps its own part's (and rank 0's are everyone's at the next evaluation).
        let mut first_statistics: Option<Vec<(candle_core::Var, Tensor)>> = None;
        for (j, range) in parallel.local_ranges(len, batch.offset).into_iter().enumerate() {
            if j == 1 {
                let mut kept = vec![];
                for var in self.vars(true) {
                    let value = var.as_tensor().copy()?;
                    kept.push((var, value));
                }
                first_statistics = Some(kept);
            }
            if range.is_empty() {
                continue; // A batch smaller than the parts: this one adds nothing.
            }
            let part_images = images.narrow(0, range.start, range.len())?;
            let part_labels = labels.narrow(0, range.start, range.len())?;
            let share = range.len() as f64 / len as f64;
            // The plain step scales its loss by the share, so that backward makes the weighted
            // gradients; the gradient-based step's are scaled after.
            let (parts, grads, scaled) =
                self.loss_and_grads_scaled(&part_images, &part_labels, share)?;
            let mut pieces = Vec::with_capacity(params.len() + 1);
            let mut mask = vec![0f32; params.len()];
            for (i, var) in params.iter().enumerate() {
                match grads.get(var) {
                    Some(g) => {
                        pieces.push(g.flatten_all()?.to_dtype(DType::F32)?);
                        mask[i] = 1.0;
                    }
                    None => pieces.push(Tensor::zeros(sizes[i], DType::F32, &device)?),
                }
            }
            pieces.push(Tensor::from_vec(mask, params.len(), &device)?);
            let mut piece = Tensor::cat(&pieces, 0)?;
            if !scaled && share != 1.0 {
                // The mask is scaled too: only its sign is read.
                piece = piece.affine(share, 0.0)?;
            }
            flat = Some(match flat {
                None => piece,
                Some(flat) => (flat + piece)?,
            });
            metric = (metric + step_vector(&parts, &part_labels)?)?;
        }
        for (var, value) in first_statistics.into_iter().flatten() {
            var.set(&value)?;
        }
        let flat = match flat {
            Some(flat) => flat,
            None => Tensor::zeros(total + params.len(), DType::F32, &device)?,
        };
        let flat = parallel.world.all_reduce_sum(&flat)?;
        let metric = parallel.world.all_reduce_sum(&metric)?;
        let mask: Vec<f32> = flat.narrow(0, total, params.len())?.to_vec1()?;
        let mut grads = Vec::with_capacity(params.len());
        let mut at = 0;
        for (i, var) in params.iter().enumerate() {
            let grad = match mask[i] > 0.0 {
                true => Some(
                    flat.narrow(0, at, sizes[i])?.reshape(var.shape())?.to_dtype(var.dtype())?,
                ),
                false => None,
            };
            grads.push(grad);
            at += sizes[i];
        }
        self.sgd.step_each(&grads)?;
        sums.add_vector(totals, metric, len)?;
        Ok(())
    }

    /// Test cross-entropy and top-1/top-5 (%) with each rank evaluating its parts of every
    /// test batch (rank 0's batch-norm statistics, which the caller broadcast), the counts
    /// summed over the ranks.
    pub(super) fn parallel_evaluate(
        &self,
        parallel: &Parallel,
        loader: &at_data::Loader,
    ) -> Result<(f64, f64, f64)> {
        let mut counts = [0f64; 4]; // loss * n, top-1, top-5, n
        for batch in loader.share_from(0, 0, &self.device, parallel.share()) {
            let batch = batch?;
            for range in parallel.local_ranges(batch.whole, batch.offset) {
                if range.is_empty() {
                    continue;
                }
                let images = batch.images.narrow(0, range.start, range.len())?;
                let labels = batch.labels.narrow(0, range.start, range.len())?;
                let logits = self.student.forward_t(&images, false)?.logits.detach();
                let n = range.len() as f64;
                counts[0] += at_losses::cross_entropy(&logits, &labels)?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    * n;
                let (c1, c5) = super::top_k_correct(&logits, &labels)?;
                counts[1] += c1 as f64;
                counts[2] += c5 as f64;
                counts[3] += n;
            }
        }
        parallel.world.sum_f64(&mut counts)?;
        let seen = counts[3].max(1.0);
        Ok((counts[0] / seen, 100.0 * counts[1] / seen, 100.0 * counts[2] / seen))
    }
}
