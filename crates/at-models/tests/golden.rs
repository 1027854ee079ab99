//! Forward passes against PyTorch reference models with the same weights, in evaluation mode,
//! in training mode, and after a training-mode forward has updated the running statistics.
//! Fixtures: `golden/models.safetensors` from `golden/make_golden.py` (ResNet-18 is torchvision's).

mod common;

use at_models::{ModelOptions, build};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, formula_weights, golden};

const TOL: f64 = 1e-4;

fn check(tag: &str, name: &str, options: ModelOptions) {
    let fixtures = golden("models.safetensors");
    let get = |k: &str| -> &Tensor {
        fixtures
            .get(&format!("{tag}.{k}"))
            .unwrap_or_else(|| panic!("fixture {tag}.{k} is missing"))
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = build(name, &options, vb).unwrap();
    formula_weights(&varmap);
    let x = get("input");

    for (mode, train) in [("eval", false), ("train", true)] {
        let out = model.forward_t(x, train).unwrap();
        assert_close(
            &format!("{tag} {mode} logits"),
            &out.logits,
            get(&format!("{mode}.logits")),
            TOL,
        );
        for (i, g) in out.groups.iter().enumerate() {
            assert_close(
                &format!("{tag} {mode} group{i}"),
                g,
                get(&format!("{mode}.group{i}")),
                TOL,
            );
        }
    }
    let data = varmap.data().lock().unwrap();
    let mut checked = 0;
    for (key, reference) in
        fixtures.iter().filter(|(k, _)| k.starts_with(&format!("{tag}.after_train.")))
    {
        let name = key.trim_start_matches(&format!("{tag}.after_train."));
        let ours = data.get(name).unwrap_or_else(|| panic!("{tag}: no tensor {name} in the model"));
        assert_close(&format!("{tag} running statistic {name}"), ours.as_tensor(), reference, TOL);
        checked += 1;
    }
    assert_eq!(checked > 0, options_have_bn(name), "{tag}: running statistics checked");
    drop(data);
    let out = model.forward_t(x, false).unwrap();
    assert_close(
        &format!("{tag} eval logits after a train step"),
        &out.logits,
        get("eval_after_train.logits"),
        TOL,
    );
}

fn options_have_bn(name: &str) -> bool {
    !name.ends_with("-nobn")
}

#[test]
fn wrn_16_1_matches_torch_in_eval_and_train_mode() {
    check("wrn_16_1", "wrn-16-1", ModelOptions::default());
}

#[test]
fn wrn_16_2_with_one_input_channel_and_seven_classes_matches_torch() {
    let options = ModelOptions { in_channels: 1, num_classes: 7, ..ModelOptions::default() };
    check("wrn_16_2_gray_7_classes", "wrn-16-2", options);
}

#[test]
fn nin_thin_with_batch_norm_matches_torch() {
    check("nin_thin", "nin-thin", ModelOptions::default());
}

#[test]
fn nin_thin_without_batch_norm_matches_torch() {
    check("nin_thin_nobn", "nin-thin-nobn", ModelOptions::default());
}

#[test]
fn resnet18_matches_torchvision() {
    check("resnet18", "resnet18", ModelOptions { num_classes: 1000, ..ModelOptions::default() });
}
