//! Table 3's losses end to end, by double backpropagation: they need the process's
//! second-order thread, which starts before any other thread, so this binary runs without
//! libtest's harness.

mod common;

use at_losses::second_order::SecondOrder;
use at_trainer::config::{GradientKind, LossSection, OptimConfig, RunConfig, TeacherConfig};
use at_trainer::train::{RunOptions, read_metrics, resume, train};
use common::{config, metrics, write_dataset};

/// Table 3's losses in the trainer: the double-backpropagation step trains, reports its penalty,
/// and resumes mid-epoch to the same weights; gradient transfer combines with distillation.
fn gradient_penalties_train_and_resume_identically(so: &SecondOrder) {
    let quiet = || RunOptions { second_order: Some(so.clone()), ..common::quiet() };
    let data = tempfile::tempdir().unwrap();
    write_dataset(data.path(), "train", 96, 3);
    write_dataset(data.path(), "t10k", 32, 4);
    let runs = tempfile::tempdir().unwrap();
    let config = RunConfig {
        student: "nin-thin-nobn".into(),
        loss: LossSection {
            gradient: GradientKind::Jacobian,
            gradient_beta: 1e3,
            ..LossSection::default()
        },
        optim: OptimConfig { lr: 0.02, weight_decay: 0.0, ..config(data.path()).optim },
        epochs: 1,
        ..config(data.path())
    };

    let straight = runs.path().join("jacobian");
    train(&config, &straight, &quiet()).unwrap();
    let m = read_metrics(&straight).unwrap();
    let penalty = m[0].train_gradient.expect("the penalty is reported");
    assert!(penalty.is_finite() && penalty > 0.0, "penalty {penalty}");
    assert!(m[0].train_loss > m[0].train_ce, "the total includes beta * penalty");
    let weights = std::fs::read(straight.join("model.safetensors")).unwrap();

    let mid = runs.path().join("jacobian-mid");
    train(&config, &mid, &RunOptions { stop_after_batches: Some(2), ..quiet() }).unwrap();
    resume(&mid, &quiet()).unwrap();
    assert_eq!(metrics(&mid), metrics(&straight));
    assert_eq!(std::fs::read(mid.join("model.safetensors")).unwrap(), weights);

    // Chunks of a batch add up to the same step (NIN without batch norm: samples do not
    // interact), up to float rounding.
    let chunked = RunConfig {
        loss: LossSection { gradient_chunks: 4, ..config.loss.clone() },
        ..config.clone()
    };
    let dir = runs.path().join("jacobian-chunked");
    train(&chunked, &dir, &quiet()).unwrap();
    let (a, b) = (&read_metrics(&dir).unwrap()[0], &read_metrics(&straight).unwrap()[0]);
    for (x, y) in [(a.train_loss, b.train_loss), (a.train_gradient.unwrap(), penalty)] {
        assert!((x - y).abs() <= 1e-4 * y.abs(), "chunked {x} vs whole {y}");
    }
    let with_bn = RunConfig { student: "wrn-16-1".into(), ..chunked.clone() };
    let err = format!("{:#}", train(&with_bn, &runs.path().join("bn"), &quiet()).unwrap_err());
    assert!(err.contains("has batch norm") && err.contains("gradient_chunks = 1"), "{err}");

    let symmetry = RunConfig {
        loss: LossSection {
            gradient: GradientKind::Symmetry,
            gradient_beta: 0.1,
            ..config.loss.clone()
        },
        ..config.clone()
    };
    let dir = runs.path().join("symmetry");
    train(&symmetry, &dir, &RunOptions { stop_after_batches: Some(1), ..quiet() }).unwrap();
    assert!(dir.join("checkpoints/latest").exists());

    let transfer_kd = RunConfig {
        teacher: Some(TeacherConfig {
            model: "nin-thin-nobn".into(),
            checkpoint: straight.join("model.safetensors"),
        }),
        loss: LossSection { gradient: GradientKind::Transfer, alpha: 0.5, ..config.loss.clone() },
        ..config.clone()
    };
    let dir = runs.path().join("transfer-kd");
    train(&transfer_kd, &dir, &quiet()).unwrap();
    let m = read_metrics(&dir).unwrap();
    assert!(m[0].train_kd.is_some_and(|kd| kd.is_finite() && kd > 0.0), "{:?}", m[0].train_kd);
    assert!(m[0].train_gradient.is_some_and(|g| g.is_finite() && g > 0.0));
}

/// Without the second-order thread a run with `loss.gradient` is refused before any work, with
/// an error that names what to pass.
fn a_gradient_run_without_the_second_order_thread_is_refused(_: &SecondOrder) {
    let data = tempfile::tempdir().unwrap();
    write_dataset(data.path(), "train", 8, 3);
    write_dataset(data.path(), "t10k", 8, 4);
    let config = RunConfig {
        student: "nin-thin-nobn".into(),
        loss: LossSection {
            gradient: GradientKind::Jacobian,
            gradient_beta: 1.0,
            ..LossSection::default()
        },
        ..config(data.path())
    };
    let runs = tempfile::tempdir().unwrap();
    let err =
        format!("{:#}", train(&config, &runs.path().join("r"), &common::quiet()).unwrap_err());
    assert!(
        err.contains("needs second-order gradients") && err.contains("RunOptions::second_order"),
        "{err}"
    );
}

/// What a GPU runs for Table 3 (the device convolution, candle's ops, second order on its
/// thread), run on the CPU: the jacobian norm, the symmetry norm and gradient transfer give the
/// kernels' loss, gradients and evaluation logits within the documented tolerance.
fn the_device_op_mix_matches_the_cpu_kernels_on_the_three_gradient_losses(so: &SecondOrder) {
    use at_losses::gradient::GradientPenalty;
    use at_trainer::check::{Check, CheckedStep, Tolerance, check_step};
    let mix = (candle_core::Device::Cpu, at_models::Backend::Device);
    for penalty in [GradientPenalty::Jacobian, GradientPenalty::Symmetry, GradientPenalty::Transfer]
    {
        let teacher = (penalty == GradientPenalty::Transfer).then_some("nin-wide-nobn");
        let check = Check {
            student: "nin-thin-nobn",
            teacher,
            step: CheckedStep::Gradient(penalty),
            frozen: false,
        };
        let result = check_step(check, 4, &mix, Some(so)).unwrap();
        assert!(result.agrees(Tolerance::default()), "{penalty:?}: {result:?}");
        assert!(result.loss_difference() < 1e-4, "{penalty:?}: {result:?}");
        assert_eq!(result.parameters, 20, "every NIN-thin parameter compared");
    }
}

fn main() -> std::process::ExitCode {
    at_losses::second_order::run_tests(&[
        (
            "the_device_op_mix_matches_the_cpu_kernels_on_the_three_gradient_losses",
            the_device_op_mix_matches_the_cpu_kernels_on_the_three_gradient_losses,
        ),
        (
            "gradient_penalties_train_and_resume_identically",
            gradient_penalties_train_and_resume_identically,
        ),
        (
            "a_gradient_run_without_the_second_order_thread_is_refused",
            a_gradient_run_without_the_second_order_thread_is_refused,
        ),
    ])
}
