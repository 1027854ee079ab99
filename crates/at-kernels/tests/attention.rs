//! The channel reduction of attention maps against candle's ops: `scale * sum_c x^2`, values and
//! input gradient (f32, 1e-5); other powers and dtypes are left to the caller. And the fused
//! normalisation + distance (`at_distance`) against the same formula in candle's ops.

use at_kernels::channel_power;
use candle_core::{DType, Device, Tensor, Var};

fn values(shape: &[usize], seed: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> =
        (0..n).map(|i| (((i as f64 + 1.0) * (seed + 0.618)).sin() * 1.7) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30)
}

#[test]
fn channel_sum_of_squares_matches_candle_ops_and_its_gradient() {
    let x = Var::from_tensor(&values(&[3, 5, 4, 6], 1.0)).unwrap();
    let ours = channel_power(x.as_tensor(), 2.0, 0.2).unwrap().expect("p = 2 in f32 on the CPU");
    let theirs = (x.as_tensor().sqr().unwrap().sum(1).unwrap() * 0.2).unwrap();
    assert_eq!(ours.dims(), &[3, 4, 6]);
    assert!(max_rel(&ours, &theirs) < 1e-5);
    let r = values(&[3, 4, 6], 2.0);
    let a = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let b = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_rel(a.get(&x).unwrap(), b.get(&x).unwrap()) < 1e-5);
}

#[test]
fn other_powers_and_dtypes_are_left_to_the_caller() {
    let x = values(&[2, 3, 4, 4], 1.0);
    assert!(channel_power(&x, 1.0, 1.0).unwrap().is_none());
    assert!(channel_power(&x.to_dtype(DType::F64).unwrap(), 2.0, 1.0).unwrap().is_none());
}

/// `at_distance` against the same formula in candle's ops (at-ops' L2 normalisation, clamped at
/// 1e-12, and mean squared difference): value and the student's gradient, with a row of zeros
/// (the clamped norm) and rows of very different scales; the teacher gets no gradient.
#[test]
fn at_distance_matches_normalise_then_mean_squared_difference() {
    use candle_core::{Device, Var};
    let (b, n) = (5, 37);
    let value = |i: usize, seed: usize| ((i * 7919 + seed * 104_729) % 1000) as f32 / 250.0 - 2.0;
    let mut s: Vec<f32> = (0..b * n).map(|i| value(i, 1) * (1 + i / n) as f32).collect();
    s[2 * n..3 * n].fill(0.0);
    let t: Vec<f32> = (0..b * n).map(|i| value(i, 2).abs()).collect();
    let s = Var::from_vec(s, (b, n), &Device::Cpu).unwrap();
    let t = Var::from_vec(t, (b, n), &Device::Cpu).unwrap();

    let ours = at_kernels::at_distance(s.as_tensor(), t.as_tensor()).unwrap().expect("f32, CPU");
    let normalise = |q: &Tensor| {
        let norm = q.sqr().unwrap().sum_keepdim(1).unwrap().maximum(1e-24).unwrap().sqrt().unwrap();
        q.broadcast_div(&norm).unwrap()
    };
    let theirs = (normalise(s.as_tensor()) - normalise(&t.as_tensor().detach()))
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let (a, c) = (ours.to_vec0::<f32>().unwrap(), theirs.to_vec0::<f32>().unwrap());
    assert!((a - c).abs() <= 1e-6 * c.abs().max(1e-6), "value: {a} vs {c}");

    let (g_ours, g_theirs) =
        ((ours * 3.0).unwrap().backward().unwrap(), (theirs * 3.0).unwrap().backward().unwrap());
    let (da, dc) = (g_ours.get(&s).expect("student gradient"), g_theirs.get(&s).unwrap());
    let (da, dc) = (
        da.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        dc.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    let scale = dc.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in da.iter().zip(&dc).enumerate() {
        assert!((x - y).abs() <= 1e-5 * scale, "gradient at {i}: {x} vs {y}");
    }
    assert!(g_ours.get(&t).is_none(), "the teacher's map is a constant");
}

/// A deferred map (`channel_power_deferred`) whose gradient the batch norm consuming `x` adds
/// (`batch_norm_train_with`) gives the loss and every gradient of the plain map
/// (`channel_power`) and plain batch norm, with the map used twice (its gradients add up in the
/// slot); a step that does not use the map leaves the batch norm's gradients as they are.
#[test]
fn deferred_map_gradient_reaches_x_through_its_consumer() {
    use at_kernels::{
        MapGradient, batch_norm_train, batch_norm_train_with, channel_power_deferred,
    };
    let x = Var::from_tensor(&values(&[2, 3, 4, 5], 1.0)).unwrap();
    let gamma = Var::from_tensor(&(values(&[3], 2.0) + 1.5).unwrap()).unwrap();
    let beta = Var::from_tensor(&values(&[3], 3.0)).unwrap();
    let (ra, rm) = (values(&[2, 3], 4.0), values(&[2, 4, 5], 5.0));
    let xt = x.as_tensor();
    let weighted = |t: &Tensor, r: &Tensor| (t * r).unwrap().sum_all().unwrap();

    for uses in [0, 1, 2] {
        let slot = MapGradient::new();
        let (y, _) =
            batch_norm_train_with(xt, gamma.as_tensor(), beta.as_tensor(), 1e-5, true, Some(&slot))
                .unwrap()
                .expect("f32 on the CPU");
        let anchor = y.sum((2, 3)).unwrap(); // computed from the consumer's output
        let mut loss = weighted(&anchor, &ra);
        for _ in 0..uses {
            let map = channel_power_deferred(xt, 0.25, &anchor, &slot).unwrap().expect("applies");
            loss = (loss + weighted(&map, &rm)).unwrap();
        }
        let ours = loss.backward().unwrap();

        let (y, _) =
            batch_norm_train(xt, gamma.as_tensor(), beta.as_tensor(), 1e-5, true).unwrap().unwrap();
        let mut loss_ref = weighted(&y.sum((2, 3)).unwrap(), &ra);
        if uses > 0 {
            let map = channel_power(xt, 2.0, 0.25).unwrap().unwrap();
            loss_ref = (loss_ref + (weighted(&map, &rm) * uses as f64).unwrap()).unwrap();
        }
        let theirs = loss_ref.backward().unwrap();
        assert!(max_rel(&loss, &loss_ref) < 1e-6, "loss with the map used {uses} times");
        for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
            let err = max_rel(ours.get(v).unwrap(), theirs.get(v).unwrap());
            assert!(err < 1e-5, "d{name} with the map used {uses} times differs by {err}");
        }
    }
}
