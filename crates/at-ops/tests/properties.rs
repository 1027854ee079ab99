//! Properties of the maps and distances that hold whatever the inputs: invariances, zeros,
//! symmetry, precision, error messages, and gradients checked by finite differences.

use at_ops::{
    AtConfig, ChannelReduce, Distance, MapSpec, Normalization, Resize, at_loss, at_loss_sum,
    attention_map, attention_map_flat,
};
use candle_core::{DType, Device, Tensor, Var};

fn randn(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    // A small deterministic generator keeps the tests reproducible without a seeded device RNG.
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Uniform in [-2, 2): enough for maps; the Gaussian shape does not matter here.
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    scalar(&(a - b).unwrap().abs().unwrap().max_all().unwrap())
}

fn all_finite(t: &Tensor) -> bool {
    let v: Vec<f64> = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    v.iter().all(|x| x.is_finite())
}

fn all_specs() -> Vec<MapSpec> {
    let mut specs = vec![];
    for reduce in [ChannelReduce::Sum, ChannelReduce::Mean, ChannelReduce::Max] {
        for p in [0.5, 1.0, 2.0, 3.0, 4.0] {
            for norm in [Normalization::L2, Normalization::L1] {
                specs.push(MapSpec { reduce, p, norm });
            }
        }
    }
    specs
}

fn all_distances() -> [Distance; 4] {
    [
        Distance::Code,
        Distance::Paper { p: 1.0 },
        Distance::Paper { p: 2.0 },
        Distance::Paper { p: 3.0 },
    ]
}

#[test]
fn normalised_maps_are_invariant_to_scaling_the_activation() {
    let a = randn((3, 5, 6, 4), 1);
    let scaled = (&a * 7.5).unwrap();
    for spec in all_specs() {
        let q = attention_map(&a, &spec).unwrap();
        let q_scaled = attention_map(&scaled, &spec).unwrap();
        let diff = max_abs_diff(&q, &q_scaled);
        assert!(diff < 1e-6, "{spec:?}: maps differ by {diff:e} after scaling");
    }
}

#[test]
fn map_shapes_are_batch_by_positions() {
    let a = randn((2, 3, 5, 7), 2);
    let spec = MapSpec::default();
    assert_eq!(attention_map(&a, &spec).unwrap().dims(), &[2, 5, 7]);
    assert_eq!(attention_map_flat(&a, &spec).unwrap().dims(), &[2, 35]);
}

#[test]
fn l2_and_l1_maps_have_unit_norm_per_sample() {
    let a = randn((4, 3, 5, 5), 3);
    let l2 = attention_map_flat(&a, &MapSpec::default()).unwrap();
    let norms: Vec<f32> = l2.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
    let l1_spec = MapSpec::default().with_norm(Normalization::L1);
    let l1 = attention_map_flat(&a, &l1_spec).unwrap();
    let sums: Vec<f32> = l1.abs().unwrap().sum(1).unwrap().to_vec1().unwrap();
    assert!(sums.iter().all(|n| (n - 1.0).abs() < 1e-5), "{sums:?}");
}

#[test]
fn mean_and_sum_over_channels_agree_after_normalisation_but_not_before() {
    let a = randn((2, 6, 4, 4), 4);
    let sum = attention_map(&a, &MapSpec::sum_pow(2.0)).unwrap();
    let mean = attention_map(&a, &MapSpec::default()).unwrap();
    assert!(max_abs_diff(&sum, &mean) < 1e-6);
    let raw_sum = attention_map(&a, &MapSpec::sum_pow(2.0).with_norm(Normalization::None)).unwrap();
    let raw_mean = attention_map(&a, &MapSpec::default().with_norm(Normalization::None)).unwrap();
    assert!(max_abs_diff(&(raw_mean * 6.0).unwrap(), &raw_sum) < 1e-5);
}

#[test]
fn distance_is_zero_with_zero_finite_gradient_for_identical_inputs() {
    let a = randn((2, 4, 6, 6), 5);
    for distance in all_distances() {
        let student = Var::from_tensor(&a).unwrap();
        let config = AtConfig { distance, ..AtConfig::default() };
        let loss = at_loss(&student, &a, &config).unwrap();
        assert_eq!(scalar(&loss), 0.0, "{distance:?}");
        let grad = loss.backward().unwrap().get(&student).unwrap().clone();
        assert!(all_finite(&grad), "{distance:?}: gradient at zero distance is not finite");
        assert_eq!(scalar(&grad.abs().unwrap().max_all().unwrap()), 0.0, "{distance:?}");
    }
}

#[test]
fn distance_is_symmetric_in_student_and_teacher() {
    let a = randn((3, 4, 5, 6), 6);
    let b = randn((3, 8, 5, 6), 7);
    for distance in all_distances() {
        for spec in [MapSpec::default(), MapSpec::max_pow(4.0), MapSpec::sum_abs()] {
            let config = AtConfig { map: spec, distance, ..AtConfig::default() };
            let ab = scalar(&at_loss(&a, &b, &config).unwrap());
            let ba = scalar(&at_loss(&b, &a, &config).unwrap());
            assert!(ab > 0.0);
            assert!((ab - ba).abs() <= 1e-6 * ab, "{config:?}: {ab} vs {ba}");
        }
    }
}

#[test]
fn zero_activations_give_zero_maps_and_finite_losses_and_gradients() {
    let zeros = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let teacher = randn((2, 5, 8, 8), 8);
    for spec in all_specs().into_iter().filter(|s| s.p >= 1.0) {
        let q = attention_map(&zeros, &spec).unwrap();
        assert_eq!(scalar(&q.abs().unwrap().max_all().unwrap()), 0.0, "{spec:?}");
        for distance in all_distances() {
            for resize in [Resize::Area, Resize::Bilinear] {
                let config = AtConfig { map: spec, distance, resize, ..AtConfig::default() };
                for t in [&teacher, &zeros] {
                    let student = Var::from_tensor(&zeros).unwrap();
                    let loss = at_loss(&student, t, &config).unwrap();
                    assert!(scalar(&loss).is_finite(), "{config:?}: loss is not finite");
                    let grads = loss.backward().unwrap();
                    let grad = grads.get(&student).unwrap();
                    assert!(all_finite(grad), "{config:?}: gradient is not finite");
                }
            }
        }
    }
}

#[test]
fn teacher_receives_no_gradient() {
    let student = Var::from_tensor(&randn((2, 3, 4, 4), 9)).unwrap();
    let teacher = Var::from_tensor(&randn((2, 3, 4, 4), 10)).unwrap();
    let loss = at_loss(&student, &teacher, &AtConfig::default()).unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(&student).is_some());
    assert!(grads.get(&teacher).is_none(), "the teacher must be treated as a constant");
}

#[test]
fn half_precision_agrees_with_f32_within_its_precision() {
    let s = randn((4, 8, 8, 8), 11);
    let t = randn((4, 16, 16, 16), 12);
    let config = AtConfig::default();
    let map32 = attention_map(&s, &config.map).unwrap();
    let loss32 = scalar(&at_loss(&s, &t, &config).unwrap());
    // Rounding the inputs costs about 2^-11 (f16) and 2^-8 (bf16) relative per element.
    for (dtype, map_tol, loss_tol) in [(DType::F16, 2e-3, 1e-2), (DType::BF16, 1.5e-2, 5e-2)] {
        let sh = Var::from_tensor(&s.to_dtype(dtype).unwrap()).unwrap();
        let th = t.to_dtype(dtype).unwrap();
        let map = attention_map(&sh, &config.map).unwrap();
        assert_eq!(map.dtype(), dtype);
        let map_err = max_abs_diff(&map, &map32) / scalar(&map32.max_all().unwrap());
        assert!(map_err < map_tol, "{dtype:?}: map relative error {map_err:e}");
        let loss = at_loss(&sh, &th, &config).unwrap();
        assert_eq!(loss.dtype(), dtype);
        let loss_err = (scalar(&loss) - loss32).abs() / loss32;
        assert!(loss_err < loss_tol, "{dtype:?}: loss relative error {loss_err:e}");
        let grads = loss.backward().unwrap();
        let grad = grads.get(&sh).unwrap();
        assert_eq!(grad.dtype(), dtype);
        assert!(all_finite(grad));
    }
}

#[test]
fn fourth_powers_of_large_half_precision_activations_do_not_overflow() {
    // 40^4 * 64 channels is 1.6e8, far beyond f16's 65504: the sum must not be taken in f16.
    let a = (Tensor::ones((1, 64, 2, 2), DType::F16, &Device::Cpu).unwrap() * 40.0).unwrap();
    let q = attention_map(&a, &MapSpec::sum_pow(4.0)).unwrap();
    assert!(all_finite(&q));
    assert!((scalar(&q.max_all().unwrap()) - 0.5).abs() < 1e-3);
}

#[test]
fn gradients_match_central_differences_in_f64() {
    // Paths the PyTorch fixtures do not cover: fractional and odd p, paper distance with p = 3.
    let s = randn((2, 3, 4, 5), 13).to_dtype(DType::F64).unwrap();
    let t = randn((2, 2, 8, 10), 14).to_dtype(DType::F64).unwrap();
    let configs = [
        AtConfig {
            map: MapSpec::sum_pow(1.5),
            distance: Distance::Paper { p: 3.0 },
            ..Default::default()
        },
        AtConfig { map: MapSpec::max_pow(3.0), resize: Resize::Bilinear, ..Default::default() },
        AtConfig { map: MapSpec::sum_pow(0.5).with_norm(Normalization::L1), ..Default::default() },
    ];
    for config in configs {
        let sv = Var::from_tensor(&s).unwrap();
        let loss = at_loss(&sv, &t, &config).unwrap();
        let grad: Vec<f64> =
            loss.backward().unwrap().get(&sv).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = s.flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-6;
        let eval = |values: &[f64]| {
            let x = Tensor::from_slice(values, s.shape(), &Device::Cpu).unwrap();
            scalar(&at_loss(&x, &t, &config).unwrap())
        };
        let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
        for i in (0..base.len()).step_by(7) {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let numeric = (eval(&plus) - eval(&minus)) / (2.0 * h);
            assert!(
                (numeric - grad[i]).abs() <= 1e-6 * scale.max(1e-12),
                "{config:?}: element {i}: autograd {} vs central difference {numeric}",
                grad[i]
            );
        }
    }
}

#[test]
fn batch_mismatch_is_an_error_naming_both_shapes() {
    let s = randn((2, 3, 4, 4), 15);
    let t = randn((3, 3, 4, 4), 16);
    let err = at_loss(&s, &t, &AtConfig::default()).unwrap_err().to_string();
    assert!(err.contains("same batch size"), "{err}");
    assert!(err.contains("[2, 3, 4, 4]") && err.contains("[3, 3, 4, 4]"), "{err}");
}

#[test]
fn wrong_rank_and_bad_parameters_are_errors() {
    let flat = Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap();
    let a = randn((2, 3, 4, 4), 17);
    let err = attention_map(&flat, &MapSpec::default()).unwrap_err().to_string();
    assert!(err.contains("[B, C, H, W]") && err.contains("[2, 16]"), "{err}");
    let err = at_loss(&a, &flat, &AtConfig::default()).unwrap_err().to_string();
    assert!(err.contains("[2, 16]"), "{err}");
    for p in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let err = attention_map(&a, &MapSpec::sum_pow(p)).unwrap_err().to_string();
        assert!(err.contains("power p"), "{err}");
    }
    let paper_half = AtConfig { distance: Distance::Paper { p: 0.5 }, ..AtConfig::default() };
    let err = at_loss(&a, &a, &paper_half).unwrap_err().to_string();
    assert!(err.contains("p >= 1"), "{err}");
    let err = at_loss_sum(&[], &AtConfig::default(), 1e3).unwrap_err().to_string();
    assert!(err.contains("at least one"), "{err}");
}
