//! The op mix a CUDA or Metal device runs (`Backend::Device`: the device convolution with its
//! backward made of convolutions, candle's batch norm, the maps from the group outputs), run on
//! the CPU against the CPU kernels: one step's loss, every gradient, the running statistics and
//! the evaluation logits. (Table 3's second-order losses on that mix are checked in
//! tests/tests/gradient_train.rs, which has the second-order thread.)

use at_models::Backend;
use at_trainer::check::{CHECKS, Check, CheckedStep, Tolerance, check_step};
use candle_core::Device;

fn on_the_mix(check: Check, batch: usize) -> at_trainer::check::DeviceCheck {
    let result = check_step(check, batch, &(Device::Cpu, Backend::Device), None).unwrap();
    assert!(result.agrees(Tolerance::default()), "{result:?}");
    assert!(result.loss_difference() < 1e-5, "{result:?}");
    assert!(result.running_stats.0 < 1e-4 && result.eval_logits < 1e-5, "{result:?}");
    result
}

#[test]
fn the_device_op_mix_matches_the_cpu_kernels_on_a_wrn_step() {
    let result = on_the_mix(CHECKS[0], 8);
    assert_eq!(result.parameters, 43, "every WRN-16-1 parameter compared");
    assert!(result.running_stats.1.contains("running_"), "{result:?}");
}

#[test]
fn the_device_op_mix_matches_the_cpu_kernels_on_attention_transfer_and_distillation() {
    on_the_mix(CHECKS[1], 8);
}

#[test]
fn the_device_op_mix_matches_the_cpu_kernels_on_a_frozen_resnet() {
    let frozen =
        Check { student: "resnet18", teacher: None, step: CheckedStep::Student, frozen: true };
    let result = on_the_mix(frozen, 2);
    assert_eq!(result.running_stats.0, 0.0, "frozen batch norm keeps its statistics");
    assert!(result.parameters > 0 && !result.gradient.1.starts_with("layer1."), "{result:?}");
}
