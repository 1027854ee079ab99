//! The fused batch norm (+ ReLU) against the same formula in candle's own ops: output,
//! statistics, and the gradients of input, weight and bias (f32, 1e-4).

use at_kernels::batch_norm_train;
use candle_core::{DType, Device, Result, Tensor, Var};

fn values(shape: &[usize], seed: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> =
        (0..n).map(|i| (((i as f64 + 1.0) * (seed + 0.618)).sin() * 2.0 + 0.3) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, relu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
    let y = centred
        .broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1, 1))?)?;
    if relu { y.relu() } else { Ok(y) }
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30)
}

#[test]
fn fused_batch_norm_matches_candle_ops_with_and_without_relu() {
    for relu in [false, true] {
        let x = Var::from_tensor(&values(&[4, 3, 5, 6], 1.0)).unwrap();
        let gamma = Var::from_tensor(&values(&[3], 2.0)).unwrap();
        let beta = Var::from_tensor(&values(&[3], 3.0)).unwrap();
        let (ours, stats) =
            batch_norm_train(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5, relu)
                .unwrap()
                .expect("f32 on the CPU takes the kernel");
        let theirs = reference(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), relu).unwrap();
        assert!(max_rel(&ours, &theirs) < 1e-5, "relu {relu}: output");
        let mean = x.as_tensor().mean((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in stats.mean.iter().zip(&mean) {
            assert!((*a as f32 - b).abs() < 1e-5, "mean {a} vs {b}");
        }
        assert_eq!(stats.count, 4 * 5 * 6);
        let r = values(&[4, 3, 5, 6], 4.0);
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
            let err = max_rel(g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
            assert!(err < 1e-4, "relu {relu}: d/d{name} relative error {err:e}");
        }
    }
}

#[test]
fn other_dtypes_are_left_to_the_caller() {
    let x = values(&[2, 3, 4, 4], 1.0).to_dtype(DType::F64).unwrap();
    let g = values(&[3], 2.0).to_dtype(DType::F64).unwrap();
    assert!(batch_norm_train(&x, &g, &g, 1e-5, true).unwrap().is_none());
}

#[test]
fn evaluation_batch_norm_matches_candle_ops_and_its_input_gradient() {
    for relu in [false, true] {
        let x = Var::from_tensor(&values(&[2, 3, 4, 5], 5.0)).unwrap();
        let gamma = values(&[3], 6.0);
        let beta = values(&[3], 7.0);
        let mean = values(&[3], 8.0);
        let var = (values(&[3], 9.0).abs().unwrap() + 0.5).unwrap();
        let ours =
            at_kernels::batch_norm_eval(x.as_tensor(), &gamma, &beta, &mean, &var, 1e-5, relu)
                .unwrap()
                .expect("constant weights take the kernel");
        let shape = (1, 3, 1, 1);
        let theirs = x
            .as_tensor()
            .broadcast_sub(&mean.reshape(shape).unwrap())
            .unwrap()
            .broadcast_div(&(var.reshape(shape).unwrap() + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&gamma.reshape(shape).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape(shape).unwrap())
            .unwrap();
        let theirs = if relu { theirs.relu().unwrap() } else { theirs };
        assert!(max_rel(&ours, &theirs) < 1e-5, "relu {relu}: output");
        let r = values(&[2, 3, 4, 5], 10.0);
        let a = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let b = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_rel(a.get(&x).unwrap(), b.get(&x).unwrap()) < 1e-5, "relu {relu}: d/dx");
    }
    // Trainable weights get their gradients too.
    let x = values(&[2, 3, 4, 5], 11.0);
    let gamma = Var::from_tensor(&values(&[3], 12.0)).unwrap();
    let beta = Var::from_tensor(&values(&[3], 13.0)).unwrap();
    let mean = values(&[3], 14.0);
    let var = (values(&[3], 15.0).abs().unwrap() + 0.5).unwrap();
    let ours =
        at_kernels::batch_norm_eval(&x, &gamma, &beta, &mean, &var, 1e-5, true).unwrap().unwrap();
    let shape = (1, 3, 1, 1);
    let theirs = x
        .broadcast_sub(&mean.reshape(shape).unwrap())
        .unwrap()
        .broadcast_div(&(var.reshape(shape).unwrap() + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&gamma.as_tensor().reshape(shape).unwrap())
        .unwrap()
        .broadcast_add(&beta.as_tensor().reshape(shape).unwrap())
        .unwrap()
        .relu()
        .unwrap();
    let r = values(&[2, 3, 4, 5], 16.0);
    let a = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let b = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for v in [&gamma, &beta] {
        assert!(max_rel(a.get(v).unwrap(), b.get(v).unwrap()) < 1e-5);
    }
}
