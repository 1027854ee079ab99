//! Seeded parameter initialisation. candle cannot seed its CPU generator, so a run's initial
//! weights would differ from run to run; this backend draws each tensor from its own generator,
//! seeded by the run's seed and the tensor's name, so the weights do not depend on the order the
//! model creates them in either.

use candle_core::{DType, Device, Result, Shape, Tensor, Var, bail};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Creates the model's variables in `varmap`, drawn from generators seeded by `seed` and the
/// variable's name. Variables already in `varmap` are returned as they are.
struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

/// A [`VarBuilder`] whose new variables land in `varmap`, initialised reproducibly from `seed`.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = Box::new(SeededInit { varmap: varmap.clone(), seed });
    VarBuilder::from_backend(backend, DType::F32, device.clone())
}

/// FNV-1a of a name: a stable per-tensor seed.
fn name_hash(name: &str) -> u64 {
    name.bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("the VarMap lock is not poisoned");
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let n = shape.elem_count();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ name_hash(name));
        let values: Vec<f32> = match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| {
                    // Box-Muller: one normal from two uniforms.
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random();
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (mean + stdev * z) as f32
                })
                .collect(),
            other => bail!("seeded initialisation has no rule for {other:?} (tensor {name})"),
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        data.insert(name.to_owned(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.varmap.data().lock().expect("the VarMap lock is not poisoned");
        match data.get(name) {
            Some(var) => Ok(var.as_tensor().clone()),
            None => bail!("no tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("the VarMap lock is not poisoned").contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(seed: u64) -> Vec<f32> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, &Device::Cpu);
        vb.get_with_hints(1000, "w", Init::Randn { mean: 0.0, stdev: 2.0 })
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_weights_and_another_seed_others() {
        assert_eq!(init(3), init(3));
        assert_ne!(init(3), init(4));
        let v = init(5);
        let mean = v.iter().sum::<f32>() / 1000.0;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 1000.0).sqrt();
        assert!(mean.abs() < 0.2 && (std - 2.0).abs() < 0.2, "mean {mean}, std {std}");
    }
}
