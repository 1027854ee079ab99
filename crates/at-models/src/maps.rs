//! The attention maps a network makes of its own groups, `mean_c A_c^2` before normalisation
//! (at-ops' default map), cheaper than computing them from the activations afterwards:
//!
//! - in training, a map's gradient is added to its activation's by the op that consumes the
//!   activation (the next group's fused blocks, or the final batch norm) in the pass that
//!   writes that gradient anyway (`at_kernels::channel_power_deferred`), instead of a gradient
//!   of its own that candle would add in two more passes over the activation;
//! - in evaluation (a teacher), the map is taken from each image's output while the group's last
//!   block computes it (`at_kernels::preact_block_eval_map`).
//!
//! [`MapTaps`] is the whole mechanism, owned by this module: a network's forward pass creates
//! one, hands it to each group and to the final batch norm, and finishes it with the logits;
//! what comes out ([`Output::maps`](crate::Output::maps)) is plain map tensors, equal in value
//! and gradient to the maps computed from the activations.
//!
//! **Invariant** (why the deferred gradient is right): a map whose gradient waits for the
//! consumer's backward is made with the logits as a second operand (its *anchor*), which is
//! computed from the consumer's output, so candle's reverse topological order runs the map's
//! backward before the consumer's. A slot is handed to a deferred map only when the consumer's
//! kernel took it; otherwise the map is computed with ordinary differentiable ops. Tested by
//! at-trainer's `tests/fused_maps.rs` (a whole WRN step against maps from the activations, every
//! gradient) and at-kernels' `tests/attention.rs`.

use at_kernels::{Backend, MapGradient};
use candle_core::{Result, Tensor};

/// The maps one forward pass was asked for, and how far each has come.
#[derive(Debug)]
pub(crate) struct MapTaps {
    train: bool,
    backend: Backend,
    taps: Vec<Tap>,
}

#[derive(Debug, Default)]
enum Tap {
    /// Not asked for.
    #[default]
    Off,
    /// Asked for; nothing made yet.
    Wanted,
    /// Training: a slot offered to the consumer of the group's activation.
    Offered(MapGradient),
    /// Training: the consumer's kernel took the slot.
    Taken(MapGradient),
    /// Evaluation: the map, taken from the group's last block.
    Made(Tensor),
}

impl MapTaps {
    /// Taps for a network of `groups` groups, of which `wanted` are asked for.
    pub(crate) fn new(train: bool, backend: Backend, groups: usize, wanted: &[usize]) -> Self {
        let mut taps: Vec<Tap> = (0..groups).map(|_| Tap::Off).collect();
        for &g in wanted {
            if let Some(tap) = taps.get_mut(g) {
                *tap = Tap::Wanted;
            }
        }
        Self { train, backend, taps }
    }

    /// For the consumer of group `g`'s activation, in training: the slot its kernel should
    /// take (then [`took`](Self::took)), if group `g`'s map is asked for.
    pub(crate) fn gradient_slot(&mut self, g: usize) -> Option<MapGradient> {
        let tap = self.taps.get_mut(g)?;
        if !(self.train && self.backend.kernels()) || !matches!(tap, Tap::Wanted) {
            return None;
        }
        let slot = MapGradient::new();
        *tap = Tap::Offered(slot.clone());
        Some(slot)
    }

    /// The consumer's kernel took group `g`'s slot: its backward adds the map's gradient.
    pub(crate) fn took(&mut self, g: usize) {
        if let Some(tap) = self.taps.get_mut(g)
            && let Tap::Offered(slot) = std::mem::take(tap)
        {
            *tap = Tap::Taken(slot);
        }
    }

    /// Whether group `g`'s last block should make its map, in evaluation.
    pub(crate) fn wants_made(&self, g: usize) -> bool {
        !self.train && self.backend.kernels() && matches!(self.taps.get(g), Some(Tap::Wanted))
    }

    /// Group `g`'s map, made by its last block in evaluation.
    pub(crate) fn made(&mut self, g: usize, map: Tensor) {
        if let Some(tap) = self.taps.get_mut(g) {
            *tap = Tap::Made(map);
        }
    }

    /// The maps asked for, by group (`None` for the others), from the group activations and
    /// the logits (the anchor of the deferred maps).
    pub(crate) fn finish(self, groups: &[Tensor], logits: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut maps = Vec::with_capacity(self.taps.len());
        for (tap, activation) in self.taps.into_iter().zip(groups) {
            let scale = 1.0 / activation.dim(1)? as f64;
            maps.push(match tap {
                Tap::Off => None,
                Tap::Made(map) => Some(map),
                Tap::Taken(slot) => {
                    match at_kernels::channel_power_deferred(activation, scale, logits, &slot)? {
                        Some(map) => Some(map),
                        // A thread with second-order gradients: the consumer's backward finds
                        // its slot empty, and the map has its own gradient.
                        None => Some(plain_map(activation, self.backend)?),
                    }
                }
                Tap::Wanted | Tap::Offered(_) => Some(plain_map(activation, self.backend)?),
            });
        }
        Ok(maps)
    }
}

/// `mean_c A_c^2` of `[B, C, H, W]` as `[B, H, W]` with its own gradient: at-kernels' channel
/// reduction where it applies, candle's ops otherwise.
fn plain_map(activation: &Tensor, backend: Backend) -> Result<Tensor> {
    let scale = 1.0 / activation.dim(1)? as f64;
    if backend.kernels()
        && let Some(map) = at_kernels::channel_power(activation, 2.0, scale)?
    {
        return Ok(map);
    }
    let dtype = match activation.dtype() {
        candle_core::DType::F64 => candle_core::DType::F64,
        _ => candle_core::DType::F32,
    };
    activation.to_dtype(dtype)?.sqr()?.mean(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In training with the kernels, a slot is offered to the consumer of each group asked for,
    /// and none otherwise; in evaluation the last block makes the maps asked for; with candle's
    /// ops nothing is offered or made, and the maps come from the activations.
    #[test]
    fn taps_offer_slots_and_make_maps_only_where_asked_and_the_kernels_run() {
        let mut train = MapTaps::new(true, Backend::Kernels, 3, &[0, 2]);
        assert!(train.gradient_slot(0).is_some() && train.gradient_slot(1).is_none());
        assert!(train.gradient_slot(0).is_none(), "a slot is offered once");
        assert!(!train.wants_made(2), "training makes no map in a block");
        let eval = MapTaps::new(false, Backend::Kernels, 3, &[1]);
        assert!(eval.wants_made(1) && !eval.wants_made(0));
        let mut candle = MapTaps::new(true, Backend::Candle, 3, &[0, 1, 2]);
        assert!((0..3).all(|g| candle.gradient_slot(g).is_none()));
        let candle_eval = MapTaps::new(false, Backend::Candle, 3, &[0]);
        assert!(!candle_eval.wants_made(0));

        let dev = candle_core::Device::Cpu;
        let groups: Vec<Tensor> =
            (0..3).map(|_| Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap()).collect();
        let logits = Tensor::zeros((2, 10), candle_core::DType::F32, &dev).unwrap();
        let maps = candle.finish(&groups, &logits).unwrap();
        for (map, g) in maps.iter().zip(&groups) {
            let want = g.sqr().unwrap().mean(1).unwrap();
            let diff = (map.as_ref().unwrap() - want).unwrap().abs().unwrap();
            assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        }
    }
}
