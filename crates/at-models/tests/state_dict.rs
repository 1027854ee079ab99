//! Loading and saving weights under PyTorch state-dict names: torchvision's ResNet layout loads
//! with nothing missing and nothing left over, errors name the tensor, and a save/load round trip
//! is exact, running statistics included.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use at_models::{ModelOptions, build, load, save};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// `{model: {name: shape}}` of torchvision's state dicts, written by `golden/make_golden.py`.
fn torchvision_shapes() -> HashMap<String, HashMap<String, Vec<usize>>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/torchvision_resnet_state_dicts.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Writes a state dict with the given names and shapes, each tensor filled with its index, and
/// `num_batches_tracked` as PyTorch stores it (a 0-d int64).
fn write_state_dict(path: &Path, shapes: &HashMap<String, Vec<usize>>) {
    let mut tensors = HashMap::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let t = if name.ends_with("num_batches_tracked") {
            Tensor::new(7i64, &Device::Cpu).unwrap()
        } else {
            Tensor::full(i as f32, shape.as_slice(), &Device::Cpu).unwrap()
        };
        tensors.insert(name.clone(), t);
    }
    candle_core::safetensors::save(&tensors, path).unwrap();
}

fn model(name: &str, num_classes: usize) -> VarMap {
    let varmap = VarMap::new();
    let options = ModelOptions { num_classes, ..ModelOptions::default() };
    build(name, &options, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    varmap
}

#[test]
fn torchvision_state_dicts_load_into_resnet18_and_resnet34_with_nothing_missing_or_left_over() {
    let dir = tempfile::tempdir().unwrap();
    for (name, shapes) in torchvision_shapes() {
        let path = dir.path().join(format!("{name}.safetensors"));
        write_state_dict(&path, &shapes);
        let varmap = model(&name, 1000);
        let report = load(&varmap, &path, &[]).unwrap();
        let tracked = shapes.keys().filter(|k| k.ends_with("num_batches_tracked")).count();
        assert_eq!(report.loaded.len() + tracked, shapes.len(), "{name}");
        assert_eq!(report.ignored.len(), tracked, "{name}: only num_batches_tracked is ignored");
        assert!(report.kept.is_empty());
        // The values landed where the names say.
        let data = varmap.data().lock().unwrap();
        let index = shapes.keys().position(|k| k == "layer2.0.downsample.0.weight").unwrap();
        let value = data["layer2.0.downsample.0.weight"].flatten_all().unwrap().get(0).unwrap();
        assert_eq!(value.to_scalar::<f32>().unwrap(), index as f32);
    }
}

#[test]
fn a_new_classifier_head_is_kept_when_fine_tuning_and_refused_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet18.safetensors");
    write_state_dict(&path, &torchvision_shapes()["resnet18"]);
    let varmap = model("resnet18", 200);
    let err = load(&varmap, &path, &[]).unwrap_err().to_string();
    assert!(err.contains("`fc.bias`") && err.contains("[1000]") && err.contains("[200]"), "{err}");
    let report = load(&varmap, &path, &["fc."]).unwrap();
    assert_eq!(report.kept, ["fc.bias", "fc.weight"]);
    assert!(report.ignored.contains(&"fc.weight".to_owned()));
}

#[test]
fn a_wrong_shape_is_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    let mut shapes = torchvision_shapes()["resnet34"].clone();
    shapes.insert("layer3.4.conv2.weight".into(), vec![256, 256, 1, 1]);
    write_state_dict(&path, &shapes);
    let err = load(&model("resnet34", 1000), &path, &[]).unwrap_err().to_string();
    assert!(err.contains("`layer3.4.conv2.weight`"), "{err}");
    assert!(err.contains("[256, 256, 1, 1]") && err.contains("[256, 256, 3, 3]"), "{err}");
    assert!(err.contains("bad.safetensors"), "{err}");
}

#[test]
fn missing_and_unexpected_tensors_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    let mut shapes = torchvision_shapes()["resnet18"].clone();
    shapes.remove("layer4.1.bn2.running_var");
    shapes.insert("layer5.0.conv1.weight".into(), vec![3, 3]);
    write_state_dict(&path, &shapes);
    let err = load(&model("resnet18", 1000), &path, &[]).unwrap_err().to_string();
    assert!(err.contains("missing [\"layer4.1.bn2.running_var\"]"), "{err}");
    assert!(err.contains("unexpected {\"layer5.0.conv1.weight\"}"), "{err}");
    let err =
        load(&model("resnet18", 1000), &dir.path().join("absent.safetensors"), &[]).unwrap_err();
    assert!(err.to_string().contains("no weights file at"), "{err}");
}

#[test]
fn save_then_load_restores_weights_and_running_statistics_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrn.safetensors");
    let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu).unwrap();

    let trained = VarMap::new();
    let vb = VarBuilder::from_varmap(&trained, DType::F32, &Device::Cpu);
    let net = build("wrn-16-1", &ModelOptions::default(), vb).unwrap();
    net.forward_t(&x, true).unwrap(); // moves the running statistics off their initial values
    save(&trained, &path).unwrap();

    let restored = VarMap::new();
    let vb = VarBuilder::from_varmap(&restored, DType::F32, &Device::Cpu);
    let net2 = build("wrn-16-1", &ModelOptions::default(), vb).unwrap();
    load(&restored, &path, &[]).unwrap();

    let a = trained.data().lock().unwrap();
    let b = restored.data().lock().unwrap();
    assert_eq!(a.len(), b.len());
    for (name, var) in a.iter() {
        let va: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(va, vb, "{name}");
    }
    let la: Vec<Vec<f32>> = net.forward_t(&x, false).unwrap().logits.to_vec2().unwrap();
    let lb: Vec<Vec<f32>> = net2.forward_t(&x, false).unwrap().logits.to_vec2().unwrap();
    assert_eq!(la, lb);
    assert!(!path.with_extension("safetensors.tmp").exists(), "the temporary file is gone");
}
