//! The attention maps a WRN makes itself (`forward_with_maps`: the student's with their backward
//! done by the op after the group, the teacher's taken from its blocks' outputs in the same
//! pass) against maps computed from the group activations: the same loss and the same gradient
//! for every parameter, with attention transfer on all three groups (the first two maps'
//! gradients go through the next group's fused blocks, the last one's through the final batch
//! norm). A consumer that dropped a map's gradient, or a gradient on one side only, fails it.

use at_losses::{GroupMaps, LossConfig, student_loss, student_loss_with_maps};
use at_models::AttentionModel;
use at_models::{ModelOptions, build};
use at_trainer::init::seeded_var_builder;
use at_trainer::train::wanted_maps;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// The trainer's attention config: at-kernels' channel reduction and distance.
fn kernels_at() -> at_ops::AtConfig {
    at_ops::AtConfig {
        backend: at_ops::AtBackend::Kernels(&at_kernels::AT_OPS_KERNELS),
        ..at_ops::AtConfig::default()
    }
}

/// A model whose weights are plain tensors, as the trainer holds a teacher.
fn frozen(name: &str, seed: u64, device: &Device) -> Box<dyn AttentionModel> {
    let varmap = VarMap::new();
    build(name, &ModelOptions::default(), seeded_var_builder(&varmap, seed, device)).unwrap();
    let data = varmap.data().lock().unwrap();
    let tensors = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
    build(name, &ModelOptions::default(), VarBuilder::from_tensors(tensors, DType::F32, device))
        .unwrap()
}

#[test]
fn fused_maps_give_the_loss_and_gradients_of_plain_maps() {
    let device = Device::Cpu;
    let options = ModelOptions::default();
    let varmap = VarMap::new();
    let student = build("wrn-16-1", &options, seeded_var_builder(&varmap, 1, &device)).unwrap();
    let teacher = frozen("wrn-16-2", 2, &device);
    let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &device).unwrap();
    let labels = Tensor::new(&[1u32, 3, 5, 7], &device).unwrap();
    let t = teacher.forward_with_maps(&x, false, &[0, 1, 2]).unwrap();
    let loss = LossConfig {
        beta: 1e3,
        pairs: vec![(0, 0), (1, 1), (2, 2)],
        at: kernels_at(),
        ..Default::default()
    };

    let out = student.forward_with_maps(&x, true, &[0, 1, 2]).unwrap();
    assert_eq!(out.maps.iter().flatten().count(), 3, "every student group has its map");
    assert_eq!(t.maps.iter().flatten().count(), 3, "every teacher group has its map");
    let teacher_parts = Some((&t.logits, &t.groups[..]));
    let (logits, groups) = (&out.logits, &out.groups);
    let maps = GroupMaps { student: &out.maps, teacher: &t.maps };
    let ours = student_loss_with_maps(logits, &labels, groups, teacher_parts, &loss, maps).unwrap();
    let grads_ours = ours.total.backward().unwrap();

    let out = student.forward_t(&x, true).unwrap();
    let theirs = student_loss(&out.logits, &labels, &out.groups, teacher_parts, &loss).unwrap();
    let grads_theirs = theirs.total.backward().unwrap();

    for (a, b) in ours.at.iter().zip(&theirs.at) {
        let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() <= 1e-6 * b.abs(), "attention distance {a} against {b}");
    }
    let vars = varmap.all_vars();
    let mut checked = 0;
    for var in &vars {
        let (a, b) = match (grads_ours.get(var), grads_theirs.get(var)) {
            (Some(a), Some(b)) => (a, b),
            (None, None) => continue,
            (ours, theirs) => panic!(
                "a gradient of a {:?} parameter exists on one side only (fused maps: {}, plain \
                 maps: {})",
                var.dims(),
                ours.is_some(),
                theirs.is_some()
            ),
        };
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
        let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            err <= 1e-4 * scale,
            "a gradient of shape {:?} differs by {err} (scale {scale})",
            b.dims()
        );
        checked += 1;
    }
    assert!(checked > 30, "checked {checked} gradients");
}

/// The networks make the maps asked for and no others; the trainer asks for the paired groups
/// only, with a teacher, attention transfer and the map they make (p = 2, channel mean).
#[test]
fn maps_only_for_the_groups_asked_and_the_default_map() {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let student =
        build("wrn-16-1", &ModelOptions::default(), seeded_var_builder(&varmap, 1, &device))
            .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &device).unwrap();
    let some = |maps: &[Option<Tensor>]| maps.iter().map(Option::is_some).collect::<Vec<_>>();
    let out = student.forward_with_maps(&x, true, &[1]).unwrap();
    assert_eq!(some(&out.maps), [false, true, false], "only the student group asked for");
    let eval = frozen("wrn-16-1", 2, &device).forward_with_maps(&x, false, &[2]).unwrap();
    assert_eq!(some(&eval.maps), [false, false, true], "only the teacher group asked for");
    assert!(student.forward_t(&x, true).unwrap().maps.iter().all(Option::is_none));

    let at = LossConfig { beta: 1e3, pairs: vec![(1, 2)], at: kernels_at(), ..Default::default() };
    assert_eq!(wanted_maps(&at, true), (vec![1], vec![2]));
    assert_eq!(wanted_maps(&at, false), (vec![], vec![]), "no teacher");
    let mut p4 = at.clone();
    p4.at.map = at_ops::MapSpec::sum_pow(4.0);
    assert_eq!(wanted_maps(&p4, true), (vec![], vec![]), "another map");
    let plain = LossConfig { beta: 0.0, ..at.clone() };
    assert_eq!(wanted_maps(&plain, true), (vec![], vec![]), "no attention transfer");
}
