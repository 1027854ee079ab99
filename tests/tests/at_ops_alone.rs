//! at-ops computes the same thing whatever else the process links and does: its default config
//! runs candle's ops, and nothing at-kernels or the trainer do (at-kernels' own attention
//! kernels chosen in another config, its convolutions, a whole WRN training step) changes what
//! a later call with that config returns, down to the last bit. The kernels are a value chosen
//! per loss (`AtConfig::backend`), not a process-wide switch.

use at_kernels::AT_OPS_KERNELS;
use at_models::{ModelOptions, build};
use at_ops::{AtBackend, AtConfig, MapSpec, at_loss, attention_map};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

/// The loss, the student's gradient and a map, as bits, for fixed inputs and `config`.
fn at_ops_values(config: &AtConfig) -> Vec<u32> {
    let dev = Device::Cpu;
    let values = |n: usize, seed: f32| -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + 1.0) * (seed + 0.37)).sin()).collect()
    };
    let s = Var::from_vec(values(2 * 8 * 6 * 6, 1.0), (2, 8, 6, 6), &dev).unwrap();
    let t = Tensor::from_vec(values(2 * 16 * 6 * 6, 2.0), (2, 16, 6, 6), &dev).unwrap();
    let loss = at_loss(s.as_tensor(), &t, config).unwrap();
    let grad = loss.backward().unwrap().get(&s).unwrap().flatten_all().unwrap();
    let map = attention_map(&t, &MapSpec::default()).unwrap().flatten_all().unwrap();
    let mut bits = vec![loss.to_scalar::<f32>().unwrap().to_bits()];
    for t in [grad, map] {
        bits.extend(t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()));
    }
    bits
}

/// One WRN-16-1 training step on at-kernels' ops, attention transfer included.
fn use_the_kernels_elsewhere() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = build("wrn-16-1", &ModelOptions::default(), vb).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
    let out = model.forward_t(&x, true).unwrap();
    let kernels = AtConfig { backend: AtBackend::Kernels(&AT_OPS_KERNELS), ..AtConfig::default() };
    let at = at_loss(&out.groups[1], &out.groups[1].detach(), &kernels).unwrap();
    (out.logits.sum_all().unwrap() + at).unwrap().backward().unwrap();
}

#[test]
fn at_ops_gives_identical_bits_before_and_after_at_kernels_is_used() {
    let config = AtConfig::default();
    assert_eq!(config.backend, AtBackend::Candle, "at-ops alone runs candle's ops");
    let before = at_ops_values(&config);
    use_the_kernels_elsewhere();
    let with_kernels =
        at_ops_values(&AtConfig { backend: AtBackend::Kernels(&AT_OPS_KERNELS), ..config });
    let after = at_ops_values(&config);
    assert!(before == after, "at-ops' default results changed after at-kernels ran");
    // The kernels, where chosen, compute the same values up to rounding.
    for (a, b) in before.iter().zip(&with_kernels) {
        let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

/// The teacher side of an attention-transfer loss is a constant: a teacher that is a variable
/// gets no gradient, with candle's ops or the kernels.
#[test]
fn the_teacher_side_of_an_at_loss_gets_no_gradient() {
    let dev = Device::Cpu;
    let s = Var::randn(0f32, 1.0, (2, 4, 5, 5), &dev).unwrap();
    let t = Var::randn(0f32, 1.0, (2, 6, 5, 5), &dev).unwrap();
    for backend in [AtBackend::Candle, AtBackend::Kernels(&AT_OPS_KERNELS)] {
        let config = AtConfig { backend, ..AtConfig::default() };
        let grads = at_loss(s.as_tensor(), t.as_tensor(), &config).unwrap().backward().unwrap();
        assert!(grads.get(&s).is_some(), "{backend:?}: the student gets a gradient");
        assert!(grads.get(&t).is_none(), "{backend:?}: the teacher gets none");
    }
}
