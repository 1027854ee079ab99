//! End to end: a WRN-16-1 trained for two epochs on generated data in Fashion-MNIST's IDX format
//! (trained once, shared by the tests of this binary). Each test names one property: the loss
//! falls and accuracy beats chance, metrics.jsonl has its fields, a run interrupted after an epoch
//! or mid-epoch (or killed with SIGKILL after a periodic checkpoint) and resumed ends with the
//! same weights and metrics, a run directory is never
//! overwritten, the trained model teaches, its attention maps draw, a wrong teacher is named.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use at_trainer::config::{DeviceSpec, LossSection, RunConfig, TeacherConfig};
use at_trainer::train::{RunOptions, read_metrics, resume, train};
use common::{config, metrics, quiet, write_dataset};

/// The data, the config and the uninterrupted run every test compares with.
struct Base {
    root: PathBuf,
    config: RunConfig,
    straight: PathBuf,
    weights: Vec<u8>,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("train-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        write_dataset(&data, "train", 128, 1);
        write_dataset(&data, "t10k", 64, 2);
        let config = config(&data);
        let straight = root.join("straight");
        let result = train(&config, &straight, &quiet()).unwrap();
        assert!(!result.interrupted);
        let weights = std::fs::read(straight.join("model.safetensors")).unwrap();
        Base { root, config, straight, weights }
    })
}

/// A fresh run directory under the shared root.
fn run_dir(name: &str) -> PathBuf {
    base().root.join(name)
}

#[test]
fn training_lowers_the_loss_and_beats_chance() {
    let m = read_metrics(&base().straight).unwrap();
    assert_eq!(m.len(), 2);
    assert!(
        m[1].train_loss < m[0].train_loss,
        "the loss falls: {} then {}",
        m[0].train_loss,
        m[1].train_loss
    );
    assert!(m[1].test_top1 > 25.0, "better than chance (4 classes): {}%", m[1].test_top1);
}

#[test]
fn a_finished_run_writes_its_metrics_result_and_config() {
    let straight = &base().straight;
    let line = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    for field in [
        "epoch",
        "lr",
        "train_loss",
        "train_ce",
        "train_kd",
        "train_at",
        "train_top1",
        "test_loss",
        "test_top1",
        "test_top5",
        "seconds",
        "images_per_second",
    ] {
        assert!(line.contains(&format!("\"{field}\"")), "metrics.jsonl lacks {field}");
    }
    assert!(straight.join("result.json").exists() && straight.join("config.toml").exists());
}

#[test]
fn resuming_after_an_epoch_gives_identical_weights_and_metrics() {
    let b = base();
    let dir = run_dir("by-epoch");
    let stopped =
        train(&b.config, &dir, &RunOptions { stop_after_epochs: Some(1), ..quiet() }).unwrap();
    assert!(stopped.interrupted && !dir.join("model.safetensors").exists());
    resume(&dir, &quiet()).unwrap();
    assert_eq!(metrics(&dir), metrics(&b.straight));
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), b.weights);
}

#[test]
fn resuming_mid_epoch_gives_identical_weights_and_metrics() {
    let b = base();
    // Stopped after 5 of 4 + 4 batches, then resumed.
    let dir = run_dir("mid-epoch");
    train(&b.config, &dir, &RunOptions { stop_after_batches: Some(5), ..quiet() }).unwrap();
    resume(&dir, &quiet()).unwrap();
    assert_eq!(metrics(&dir), metrics(&b.straight));
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), b.weights);
}

/// The op mix a GPU runs (`Backend::Device`), on the CPU: a run trains, checkpoints mid-epoch
/// and resumes to the same weights and metrics as its uninterrupted twin, and lands near the
/// kernels' run (the same weights at the start, rounding apart).
#[test]
fn a_run_on_a_devices_op_mix_trains_and_resumes_identically() {
    let b = base();
    let mix = || RunOptions { backend: at_models::Backend::Device, ..quiet() };
    let straight = run_dir("mix-straight");
    let result = train(&b.config, &straight, &mix()).unwrap();
    let dir = run_dir("mix-resumed");
    train(&b.config, &dir, &RunOptions { stop_after_batches: Some(5), ..mix() }).unwrap();
    resume(&dir, &mix()).unwrap();
    assert_eq!(metrics(&dir), metrics(&straight));
    let weights = std::fs::read(straight.join("model.safetensors")).unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), weights);
    let kernels = &metrics(&b.straight)[0];
    let first = &metrics(&straight)[0];
    let loss = |m: &serde_json::Value| m["train_loss"].as_f64().unwrap();
    assert!((loss(first) - loss(kernels)).abs() < 1e-3 * loss(kernels), "{first} / {kernels}");
    assert!(result.test_top1 > 25.0, "above chance on four classes: {result:?}");
}

/// Set in the child process of the kill test: `DATA_DIR|RUN_DIR`.
const CHILD: &str = "AT_TEST_TRAIN_CHILD";

#[test]
fn a_run_killed_without_warning_resumes_from_its_last_checkpoint_identically() {
    if let Ok(dirs) = std::env::var(CHILD) {
        // The child: a checkpoint after every batch, until it is killed.
        let (data, dir) = dirs.split_once('|').unwrap();
        let every = RunOptions { checkpoint_every: Some(std::time::Duration::ZERO), ..quiet() };
        train(&config(std::path::Path::new(data)), std::path::Path::new(dir), &every).unwrap();
        return;
    }
    let b = base();
    let dir = run_dir("killed");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_run_killed_without_warning_resumes_from_its_last_checkpoint_identically",
        ])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{}|{}", b.root.join("data").display(), dir.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // SIGKILL, which no handler sees, once a checkpoint inside the first epoch exists.
    let latest = dir.join("checkpoints/latest");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let tag = std::fs::read_to_string(&latest).unwrap_or_default();
        if tag.starts_with("epoch-0000-batch-") && !tag.ends_with("batch-00000") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint inside the epoch");
        assert!(child.try_wait().unwrap().is_none(), "the child ended before it was killed");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dir.join("result.json").exists(), "killed before the end");
    resume(&dir, &quiet()).unwrap();
    assert_eq!(metrics(&dir), metrics(&b.straight));
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), b.weights);
}

#[test]
fn an_existing_run_directory_is_never_overwritten() {
    let b = base();
    let err = train(&b.config, &b.straight, &quiet()).unwrap_err().to_string();
    assert!(err.contains("already exists") && err.contains("--resume"), "{err}");
}

/// A start that fails (a device this build lacks, data that is not there) writes nothing, so the
/// same command can simply be run again; a directory left by such a start before this rule (a
/// config and an empty `checkpoints/`) is started afresh, not refused.
#[test]
fn a_failed_start_leaves_nothing_and_is_no_obstacle_to_the_next() {
    let b = base();
    let dir = run_dir("failed-start");
    let on_cuda = RunConfig { device: DeviceSpec::Cuda(0), ..b.config.clone() };
    let err = format!("{:#}", train(&on_cuda, &dir, &quiet()).unwrap_err());
    assert!(err.contains("cannot open cuda:0") && err.contains("--features cuda"), "{err}");
    assert!(!dir.exists(), "nothing written for a device that cannot open");
    let mut no_data = b.config.clone();
    no_data.data.root = b.root.join("no-such-data");
    assert!(train(&no_data, &dir, &quiet()).is_err());
    assert!(!dir.exists(), "nothing written for data that is not there");
    // What an older failed start left: a config and an empty checkpoints folder.
    std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
    std::fs::write(dir.join("config.toml"), on_cuda.to_toml()).unwrap();
    let options = RunOptions { stop_after_batches: Some(1), ..quiet() };
    assert!(train(&b.config, &dir, &options).unwrap().interrupted);
    assert_eq!(RunConfig::load(&dir.join("config.toml")).unwrap(), b.config);
    let err = train(&b.config, &dir, &quiet()).unwrap_err().to_string();
    assert!(err.contains("already exists"), "a run with progress is refused: {err}");
}

/// The device of the invocation wins over the one a run was started on: a resumed run continues
/// where it is told to (here a CUDA device this build cannot open, which shows it was asked for).
#[test]
fn a_resumed_run_continues_on_the_invocations_device() {
    let b = base();
    let dir = run_dir("resume-device");
    let options = RunOptions { stop_after_batches: Some(1), ..quiet() };
    train(&b.config, &dir, &options).unwrap();
    let elsewhere = RunOptions { device: Some(DeviceSpec::Cuda(0)), ..quiet() };
    let err = format!("{:#}", resume(&dir, &elsewhere).unwrap_err());
    assert!(err.contains("cannot open cuda:0"), "{err}");
    let here = RunOptions { device: Some(DeviceSpec::Cpu), ..quiet() };
    assert!(!resume(&dir, &here).unwrap().interrupted);
}

fn teacher() -> TeacherConfig {
    TeacherConfig {
        model: "wrn-16-1".into(),
        checkpoint: base().straight.join("model.safetensors"),
    }
}

fn at_kd() -> RunConfig {
    RunConfig {
        teacher: Some(teacher()),
        loss: LossSection { alpha: 0.9, beta: 1e3, ..LossSection::default() },
        epochs: 1,
        ..base().config.clone()
    }
}

#[test]
fn a_trained_model_teaches_with_attention_transfer_and_distillation() {
    let dir = run_dir("at-kd");
    train(&at_kd(), &dir, &quiet()).unwrap();
    let m = read_metrics(&dir).unwrap();
    assert_eq!(m[0].train_at.len(), 3, "one AT term per WRN group");
    assert!(m[0].train_kd.is_some() && m[0].train_at.iter().all(|a| a.is_finite() && *a > 0.0));
}

#[test]
fn attention_map_figures_have_the_image_and_one_panel_per_group() {
    let maps = at_trainer::maps::write_maps(
        &base().straight,
        at_trainer::maps::Source::TestItems(vec![0, 5]),
        &run_dir("maps"),
    )
    .unwrap();
    assert_eq!(maps.len(), 2);
    let figure = image::open(&maps[1]).unwrap();
    assert_eq!((figure.width(), figure.height()), (4 * 128, 128));
}

#[test]
fn a_teacher_checkpoint_of_another_architecture_names_the_tensor() {
    let wrong = RunConfig {
        teacher: Some(TeacherConfig { model: "wrn-16-2".into(), ..teacher() }),
        ..at_kd()
    };
    let err = format!("{:#}", train(&wrong, &run_dir("wrong"), &quiet()).unwrap_err());
    assert!(
        err.contains("does not fit a wrn-16-2")
            && err.contains("`bn.bias` has shape [64] in the file but [128]"),
        "{err}"
    );
}

/// `loss.at_start_epoch` (Table 5 adds AT at epoch 60 of 100): no attention term before it,
/// every group's after.
#[test]
fn attention_transfer_starts_at_its_epoch() {
    let config = RunConfig {
        loss: LossSection { beta: 1e3, at_start_epoch: 1, ..LossSection::default() },
        epochs: 2,
        ..at_kd()
    };
    let dir = run_dir("at-late");
    train(&config, &dir, &quiet()).unwrap();
    let m = read_metrics(&dir).unwrap();
    assert!(m[0].train_at.is_empty(), "no AT in epoch 1: {:?}", m[0].train_at);
    assert_eq!(m[1].train_at.len(), 3, "AT on every group from epoch 2");
}
