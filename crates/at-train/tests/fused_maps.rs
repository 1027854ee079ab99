//! The student's fused attention maps (`at_models::FusedMap`: the map's backward done by the op
//! after the group) against maps computed from the group activations: the same loss and the same
//! gradient for every parameter of a WRN, with attention transfer on all three groups (the
//! first two maps' gradients go through the next group's fused blocks, the last one's through
//! the final batch norm).

use at_losses::{LossConfig, student_loss, student_loss_with_maps};
use at_models::{ModelOptions, build};
use at_train::init::seeded_var_builder;
use at_train::train::{fused_maps, use_kernels};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;

#[test]
fn fused_maps_give_the_loss_and_gradients_of_plain_maps() {
    use_kernels();
    let device = Device::Cpu;
    let options = ModelOptions::default();
    let varmap = VarMap::new();
    let student = build("wrn-16-1", &options, seeded_var_builder(&varmap, 1, &device)).unwrap();
    let teacher_map = VarMap::new();
    let teacher =
        build("wrn-16-2", &options, seeded_var_builder(&teacher_map, 2, &device)).unwrap();
    let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &device).unwrap();
    let labels = Tensor::new(&[1u32, 3, 5, 7], &device).unwrap();
    let t = teacher.forward_t(&x, false).unwrap();
    let loss = LossConfig { beta: 1e3, pairs: vec![(0, 0), (1, 1), (2, 2)], ..Default::default() };

    let out = student.forward_t(&x, true).unwrap();
    let maps = fused_maps(&out, true, &loss).unwrap();
    assert_eq!(maps.iter().filter(|m| m.is_some()).count(), 3, "every group has a fused map");
    let teacher_parts = Some((&t.logits, &t.groups[..]));
    let ours =
        student_loss_with_maps(&out.logits, &labels, &out.groups, &maps, teacher_parts, &loss)
            .unwrap();
    let grads_ours = ours.total.backward().unwrap();

    let out = student.forward_t(&x, true).unwrap();
    let theirs = student_loss(&out.logits, &labels, &out.groups, teacher_parts, &loss).unwrap();
    let grads_theirs = theirs.total.backward().unwrap();

    for (a, b) in ours.at.iter().zip(&theirs.at) {
        let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() <= 1e-6 * b.abs(), "attention distance {a} against {b}");
    }
    let vars = varmap.all_vars();
    assert!(vars.len() > 30);
    let mut checked = 0;
    for var in &vars {
        let (Some(a), Some(b)) = (grads_ours.get(var), grads_theirs.get(var)) else {
            assert!(grads_theirs.get(var).is_none(), "a gradient exists on one side only");
            continue;
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

/// Without a teacher or attention transfer, or with another map, no fused maps are made.
#[test]
fn fused_maps_only_for_the_default_map_with_a_teacher() {
    use_kernels();
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let student =
        build("wrn-16-1", &ModelOptions::default(), seeded_var_builder(&varmap, 1, &device))
            .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &device).unwrap();
    let out = student.forward_t(&x, true).unwrap();
    let at = LossConfig { beta: 1e3, pairs: vec![(1, 1)], ..Default::default() };
    let maps = fused_maps(&out, true, &at).unwrap();
    assert!(maps[1].is_some() && maps[0].is_none() && maps[2].is_none(), "only the paired group");
    assert!(fused_maps(&out, false, &at).unwrap().is_empty(), "no teacher");
    let mut p4 = at.clone();
    p4.at.map = at_ops::MapSpec::sum_pow(4.0);
    assert!(fused_maps(&out, true, &p4).unwrap().is_empty(), "another map");
    let eval = student.forward_t(&x, false).unwrap();
    assert!(eval.maps.iter().all(Option::is_none), "none in evaluation mode");
}
