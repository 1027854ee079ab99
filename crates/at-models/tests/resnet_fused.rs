//! ResNet's training-mode layers as at-kernels' fused basic blocks (`forward_deferred`, the
//! parameters' gradients handed over outside candle's graph and merged after `backward`)
//! against the same network from separate ops (`forward_t`): the logits, every parameter's
//! gradient and every running statistic; and a frozen ResNet, whose layers do not fuse, gets
//! the same gradients either way.

mod common;

use at_models::{AttentionModel, ModelOptions, ParamGrads, build, is_buffer};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{formula_weights, rel_err};

fn resnet(name: &str, options: &ModelOptions) -> (VarMap, Box<dyn AttentionModel>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = build(name, options, vb).unwrap();
    formula_weights(&varmap);
    (varmap, model)
}

/// One training step's gradients and the running statistics after it, fused or not.
fn step(name: &str, options: &ModelOptions, fused: bool) -> Vec<(String, Option<Tensor>)> {
    let (varmap, model) = resnet(name, options);
    let values: Vec<f32> = (0..2 * 3 * 64 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    let x = Tensor::from_vec(values, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let deferred = ParamGrads::new();
    let out = if fused {
        model.forward_deferred(&x, &[], &deferred).unwrap()
    } else {
        model.forward_t(&x, true).unwrap()
    };
    let r = Tensor::arange(0f32, out.logits.elem_count() as f32, &Device::Cpu)
        .unwrap()
        .reshape(out.logits.shape())
        .unwrap()
        .affine(0.01, -0.05)
        .unwrap();
    let loss = (out.logits * r).unwrap().sum_all().unwrap();
    let mut grads = loss.backward().unwrap();
    deferred.merge_into(&mut grads).unwrap();
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let var = &data[&name];
            let value = if is_buffer(&name) {
                Some(var.as_tensor().copy().unwrap())
            } else {
                grads.get(var).cloned()
            };
            (name, value)
        })
        .collect()
}

fn compare(name: &str, options: &ModelOptions) -> usize {
    let (fused, separate) = (step(name, options, true), step(name, options, false));
    let mut compared = 0;
    for ((n, a), (_, b)) in fused.iter().zip(&separate) {
        match (a, b) {
            (Some(a), Some(b)) => {
                let err = rel_err(a, b);
                assert!(err < 1e-3, "{name}: {n} differs by {err:e}");
                compared += 1;
            }
            (None, None) => {}
            (a, b) => panic!(
                "{name}: {n} has a gradient on one side only: fused {} separate {}",
                a.is_some(),
                b.is_some()
            ),
        }
    }
    compared
}

#[test]
fn fused_resnet18_layers_give_every_gradient_and_statistic_of_the_separate_ops() {
    let options = ModelOptions::default();
    let (varmap, _) = resnet("resnet18", &options);
    let all = varmap.data().lock().unwrap().len();
    assert_eq!(compare("resnet18", &options), all, "every parameter and buffer compared");
}

#[test]
fn a_frozen_resnet_gets_the_same_gradients_with_deferred_gradients_asked_for() {
    let options =
        ModelOptions { freeze_bn: true, freeze_first_group: true, ..ModelOptions::default() };
    assert!(compare("resnet18", &options) > 0);
}
