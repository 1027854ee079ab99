//! Every registered model: exact parameter counts, forward and backward, group shapes.

use at_models::{ModelOptions, build, find, parameter_count, registry};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

fn count(name: &str, options: &ModelOptions) -> usize {
    let varmap = VarMap::new();
    build(name, options, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    parameter_count(&varmap)
}

#[test]
fn parameter_counts_are_exact_and_close_to_the_papers() {
    // (name, exact count for 10 classes, the paper's rounded count in millions)
    let expected = [
        ("wrn-16-1", 175_066, 0.2),
        ("wrn-16-2", 691_674, 0.7),
        ("wrn-40-1", 563_930, 0.6),
        ("wrn-40-2", 2_243_546, 2.2),
        ("nin-thin", 225_026, 0.2),
        ("nin-wide", 1_005_642, 1.0),
        ("nin-thin-nobn", 224_290, 0.2),
        ("nin-wide-nobn", 1_004_042, 1.0),
        ("resnet18", 11_181_642, 11.2),
        ("resnet34", 21_289_802, 21.3),
    ];
    for (name, exact, paper_millions) in expected {
        let n = count(name, &ModelOptions::default());
        assert_eq!(n, exact, "{name}");
        let millions = n as f64 / 1e6;
        assert!(
            (millions - paper_millions).abs() < 0.06,
            "{name}: {millions:.3}M vs the paper's {paper_millions}M"
        );
    }
    assert_eq!(expected.len(), registry().len(), "every registered model has an expected count");
}

#[test]
fn imagenet_resnets_have_torchvisions_parameter_counts() {
    let options = ModelOptions { num_classes: 1000, ..ModelOptions::default() };
    assert_eq!(count("resnet18", &options), 11_689_512); // ResNet-18's 11.7M in the paper.
    assert_eq!(count("resnet34", &options), 21_797_672); // ResNet-34's 21.8M.
}

/// The input size a family is tested at (ResNets are ImageNet networks; 64x64 keeps it quick).
fn input_size(name: &str) -> usize {
    if name.starts_with("resnet") { 64 } else { 32 }
}

#[test]
fn every_model_runs_forward_and_backward_with_finite_gradients_and_right_group_shapes_and_count() {
    for spec in registry() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = spec.build(&ModelOptions::default(), vb).unwrap();
        let s = input_size(spec.name);
        let x = Tensor::randn(0f32, 1.0, (2, 3, s, s), &Device::Cpu).unwrap();
        let out = model.forward_t(&x, true).unwrap();
        assert_eq!(out.logits.dims(), &[2, 10], "{}", spec.name);

        let shapes: Vec<Vec<usize>> = out.groups.iter().map(|g| g.dims().to_vec()).collect();
        let expected: Vec<Vec<usize>> = match spec.name {
            "wrn-16-1" | "wrn-40-1" => {
                vec![vec![2, 16, 32, 32], vec![2, 32, 16, 16], vec![2, 64, 8, 8]]
            }
            "wrn-16-2" | "wrn-40-2" => {
                vec![vec![2, 32, 32, 32], vec![2, 64, 16, 16], vec![2, 128, 8, 8]]
            }
            "nin-thin" | "nin-thin-nobn" => {
                vec![vec![2, 48, 32, 32], vec![2, 88, 16, 16], vec![2, 88, 8, 8]]
            }
            "nin-wide" | "nin-wide-nobn" => {
                vec![vec![2, 96, 32, 32], vec![2, 192, 16, 16], vec![2, 192, 8, 8]]
            }
            "resnet18" | "resnet34" => vec![
                vec![2, 64, 16, 16],
                vec![2, 128, 8, 8],
                vec![2, 256, 4, 4],
                vec![2, 512, 2, 2],
            ],
            other => panic!("no expected group shapes for {other}"),
        };
        assert_eq!(shapes, expected, "{}", spec.name);
        assert_eq!(model.group_count(), out.groups.len(), "{}: group_count", spec.name);

        // A loss that touches the logits and every group, so every parameter gets a gradient.
        let mut loss = out.logits.sqr().unwrap().mean_all().unwrap();
        for g in &out.groups {
            loss = (loss + g.sqr().unwrap().mean_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        for (name, var) in data.iter() {
            if at_models::is_buffer(name) {
                assert!(grads.get(var).is_none(), "{}: buffer {name} got a gradient", spec.name);
                continue;
            }
            let g =
                grads.get(var).unwrap_or_else(|| panic!("{}: no gradient for {name}", spec.name));
            let sum = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(sum.is_finite(), "{}: gradient of {name} is not finite", spec.name);
        }
    }
}

#[test]
fn frozen_resnet_passes_no_gradient_to_batch_norm_or_the_first_group() {
    let options =
        ModelOptions { freeze_bn: true, freeze_first_group: true, ..ModelOptions::default() };
    let varmap = VarMap::new();
    let model =
        build("resnet18", &options, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))
            .unwrap();
    let before: Vec<f32> = varmap.data().lock().unwrap()["layer2.0.bn1.running_mean"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let out = model.forward_t(&x, true).unwrap();
    let grads = out.logits.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let frozen = name.contains("bn")
            || name.contains("downsample.1")
            || name.starts_with("conv1")
            || name.starts_with("layer1");
        assert_eq!(grads.get(var).is_some(), !frozen && !at_models::is_buffer(name), "{name}");
    }
    let after: Vec<f32> =
        data["layer2.0.bn1.running_mean"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(before, after, "frozen batch norm keeps its running statistics");
}

#[test]
fn train_mode_updates_running_statistics_and_eval_mode_does_not() {
    let varmap = VarMap::new();
    let model = build(
        "wrn-16-1",
        &ModelOptions::default(),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let read = || -> Vec<f32> {
        varmap.data().lock().unwrap()["group0.block0.bn0.running_var"].to_vec1().unwrap()
    };
    let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu).unwrap();
    let initial = read();
    model.forward_t(&x, false).unwrap();
    assert_eq!(read(), initial);
    model.forward_t(&x, true).unwrap();
    assert_ne!(read(), initial);
}

#[test]
fn unknown_model_lists_the_known_ones() {
    let err = find("wrn-28-10").err().unwrap().to_string();
    assert!(err.contains("unknown model `wrn-28-10`"), "{err}");
    for spec in registry() {
        assert!(err.contains(spec.name), "{err}");
    }
}

#[test]
fn freezing_is_refused_for_models_without_pretrained_groups() {
    let options = ModelOptions { freeze_bn: true, ..ModelOptions::default() };
    let varmap = VarMap::new();
    let err =
        build("wrn-16-1", &options, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))
            .err()
            .unwrap();
    assert!(err.to_string().contains("only supported for ResNets"), "{err}");
}
