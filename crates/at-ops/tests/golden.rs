//! at-ops against PyTorch: maps, losses and student gradients from `golden/at_ops.safetensors`,
//! written by `golden/make_golden.py` (`cargo xtask golden`) with PyTorch in float64 from the same
//! float32 inputs the tests feed in. Agreement is measured as `max|ours - ref| / max|ref|`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use at_ops::{
    AtConfig, ChannelReduce, Distance, MapSpec, Normalization, Resize, at_loss, at_loss_sum,
    attention_map, resize_map,
};
use candle_core::{DType, Device, Tensor, Var};

const REL_TOL: f64 = 1e-5;

fn fixtures() -> &'static HashMap<String, Tensor> {
    static FIXTURES: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/at_ops.safetensors");
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| {
            panic!("cannot read {}: {e} (run `cargo xtask golden`)", path.display())
        })
    })
}

fn fixture(name: &str) -> Tensor {
    fixtures()
        .get(name)
        .unwrap_or_else(|| panic!("fixture {name} is missing: rerun `cargo xtask golden`"))
        .clone()
}

/// `max|ours - ref| / max|ref|`, in f64.
fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shape of ours vs the reference");
    let ours = ours.to_dtype(DType::F64).unwrap();
    let reference = reference.to_dtype(DType::F64).unwrap();
    let diff = (ours - &reference).unwrap().abs().unwrap().max_all().unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap().max(f64::MIN_POSITIVE)
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let err = rel_err(ours, reference);
    assert!(err <= REL_TOL, "{what}: relative error {err:e} > {REL_TOL:e}");
}

/// One row of the table mirrored from `make_golden.py`'s `CASES`.
fn check(name: &str, config: AtConfig) {
    let student = Var::from_tensor(&fixture(&format!("{name}.student"))).unwrap();
    let teacher = fixture(&format!("{name}.teacher"));

    let map_s = attention_map(&student, &config.map).unwrap();
    assert_close(&format!("{name}: student map"), &map_s, &fixture(&format!("{name}.map_student")));
    let map_t = attention_map(&teacher, &config.map).unwrap();
    assert_close(&format!("{name}: teacher map"), &map_t, &fixture(&format!("{name}.map_teacher")));

    let loss = at_loss(&student, &teacher, &config).unwrap();
    assert_eq!(loss.dims(), &[] as &[usize], "{name}: the loss is a scalar");
    assert_close(
        &format!("{name}: loss"),
        &loss.reshape(1).unwrap(),
        &fixture(&format!("{name}.loss")),
    );

    let grads = loss.backward().unwrap();
    let grad = grads.get(&student).expect("the student gets a gradient");
    assert_close(
        &format!("{name}: d loss / d student"),
        grad,
        &fixture(&format!("{name}.grad_student")),
    );
}

fn spec(reduce: ChannelReduce, p: f64, norm: Normalization) -> MapSpec {
    MapSpec { reduce, p, norm }
}

fn code(map: MapSpec) -> AtConfig {
    AtConfig { map, ..AtConfig::default() }
}

fn paper(map: MapSpec, p: f64) -> AtConfig {
    AtConfig { map, distance: Distance::Paper { p }, ..AtConfig::default() }
}

use ChannelReduce::{Max, Sum};
use Normalization::{L1, L2};

#[test]
fn default_map_and_loss_match_torch_for_batch_of_one_and_non_square_maps() {
    check("code_default_b1_h5_w7", AtConfig::default());
}

#[test]
fn sum_of_abs_p1_matches_torch() {
    check("code_sum_p1", code(spec(Sum, 1.0, L2)));
}

#[test]
fn sum_of_fourth_powers_matches_torch() {
    check("code_sum_p4_h4_w6", code(spec(Sum, 4.0, L2)));
}

#[test]
fn max_of_squares_matches_torch() {
    check("code_max_p2", code(spec(Max, 2.0, L2)));
}

#[test]
fn unnormalised_fractional_path_p3_matches_torch() {
    check("code_sum_p3_unnormalised", code(spec(Sum, 3.0, Normalization::None)));
}

#[test]
fn paper_distance_p2_matches_torch() {
    check("paper_p2_l2", paper(MapSpec::default(), 2.0));
}

#[test]
fn paper_distance_p1_with_l1_normalisation_matches_torch() {
    check("paper_p1_l1_h6_w4", paper(spec(Sum, 1.0, L1), 1.0));
}

#[test]
fn sum_of_abs_passes_zero_gradient_at_exact_zeros_after_relu_as_torch() {
    check("paper_p1_l1_sum_p1_relu", paper(spec(Sum, 1.0, L1), 1.0));
}

#[test]
fn larger_teacher_map_is_area_resized_to_the_student_as_torch() {
    check("area_16_to_8", AtConfig::default());
}

#[test]
fn larger_teacher_map_is_bilinear_resized_to_the_student_as_torch() {
    check("bilinear_16_to_8", AtConfig { resize: Resize::Bilinear, ..AtConfig::default() });
}

#[test]
fn both_maps_area_resized_to_a_given_non_integer_size_as_torch() {
    check("area_to_6x5", AtConfig { size: Some((6, 5)), ..AtConfig::default() });
}

#[test]
fn both_maps_bilinear_resized_up_and_down_to_a_given_size_as_torch() {
    let config = AtConfig { resize: Resize::Bilinear, size: Some((12, 10)), ..AtConfig::default() };
    check("bilinear_to_12x10", config);
}

#[test]
fn paper_distance_with_max_p4_and_bilinear_resize_matches_torch() {
    let config = AtConfig { resize: Resize::Bilinear, ..paper(spec(Max, 4.0, L2), 2.0) };
    check("paper_p2_max_p4_bilinear_7_14", config);
}

#[test]
fn beta_weighted_sum_over_three_groups_matches_torch() {
    let students: Vec<Var> =
        (0..3).map(|i| Var::from_tensor(&fixture(&format!("sum.student{i}"))).unwrap()).collect();
    let pairs: Vec<(Tensor, Tensor)> = students
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_tensor().clone(), fixture(&format!("sum.teacher{i}"))))
        .collect();
    let loss = at_loss_sum(&pairs, &AtConfig::default(), 1e3).unwrap();
    assert_close("sum: loss", &loss.reshape(1).unwrap(), &fixture("sum.loss"));
    let grads = loss.backward().unwrap();
    for (i, s) in students.iter().enumerate() {
        let reference = fixture(&format!("sum.grad_student{i}"));
        assert_close(&format!("sum: grad of student {i}"), grads.get(s).unwrap(), &reference);
    }
}

#[test]
fn resize_map_matches_torch_interpolate_both_ways_in_both_modes() {
    let q = fixture("resize.input");
    for (mode, tag) in [(Resize::Area, "area"), (Resize::Bilinear, "bilinear")] {
        for (h, w) in [(3, 4), (10, 13)] {
            let name = format!("resize.{tag}_{h}x{w}");
            assert_close(&name, &resize_map(&q, (h, w), mode).unwrap(), &fixture(&name));
        }
    }
}

#[test]
fn every_fixture_case_is_checked() {
    // The names used above; a case added to make_golden.py must get a test here too.
    let checked = [
        "code_default_b1_h5_w7",
        "code_sum_p1",
        "code_sum_p4_h4_w6",
        "code_max_p2",
        "code_sum_p3_unnormalised",
        "paper_p2_l2",
        "paper_p1_l1_h6_w4",
        "paper_p1_l1_sum_p1_relu",
        "area_16_to_8",
        "bilinear_16_to_8",
        "area_to_6x5",
        "bilinear_to_12x10",
        "paper_p2_max_p4_bilinear_7_14",
    ];
    let mut cases: Vec<&str> =
        fixtures().keys().filter_map(|k| k.strip_suffix(".grad_student")).collect();
    cases.sort();
    let mut expected = checked.to_vec();
    expected.sort();
    assert_eq!(cases, expected);
}
