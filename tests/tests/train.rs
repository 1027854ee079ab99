//! End to end: a WRN-16-1 trained for two epochs on generated data in Fashion-MNIST's IDX format.
//! The loss falls, accuracy beats chance, metrics.jsonl has its fields, and a run interrupted
//! after an epoch or mid-epoch and resumed ends with the same weights and metrics.

use std::io::Write;
use std::path::Path;

use at_train::config::{DataConfig, LossSection, OptimConfig, RunConfig, TeacherConfig};
use at_train::train::{RunOptions, read_metrics, resume, train};

/// 28x28 images of four classes: one bright quadrant each, on noise.
fn write_dataset(dir: &Path, prefix: &str, n: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 60) as u8
    };
    let (mut images, mut labels) = (vec![], vec![]);
    for i in 0..n {
        let class = (i % 4) as u8;
        for row in 0..28 {
            for col in 0..28 {
                let quadrant = (row >= 14) as u8 * 2 + (col >= 14) as u8;
                images.push(noise() + if quadrant == class { 180 } else { 0 });
            }
        }
        labels.push(class);
    }
    let idx = |dims: &[u32], payload: &[u8]| -> Vec<u8> {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        dims.iter().for_each(|d| out.extend_from_slice(&d.to_be_bytes()));
        out.extend_from_slice(payload);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&out).unwrap();
        gz.finish().unwrap()
    };
    std::fs::write(
        dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
        idx(&[n as u32, 28, 28], &images),
    )
    .unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), idx(&[n as u32], &labels))
        .unwrap();
}

fn config(data: &Path) -> RunConfig {
    RunConfig {
        student: "wrn-16-1".into(),
        data: DataConfig {
            dataset: "fashion-mnist".into(),
            root: data.to_path_buf(),
            augment: "none".into(),
            ..DataConfig::default()
        },
        optim: OptimConfig { lr: 0.05, schedule: "constant".into(), ..OptimConfig::default() },
        epochs: 2,
        batch_size: 32,
        seed: 11,
        threads: 2,
        ..RunConfig::default()
    }
}

fn quiet() -> RunOptions {
    RunOptions { quiet: true, ..RunOptions::default() }
}

/// The run's metrics without the wall-clock fields, which differ from run to run.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    read_metrics(dir)
        .unwrap()
        .into_iter()
        .map(|m| {
            let mut v = serde_json::to_value(m).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v.as_object_mut().unwrap().remove("images_per_second");
            v
        })
        .collect()
}

#[test]
fn training_learns_and_resuming_gives_identical_results() {
    let data = tempfile::tempdir().unwrap();
    write_dataset(data.path(), "train", 128, 1);
    write_dataset(data.path(), "t10k", 64, 2);
    let runs = tempfile::tempdir().unwrap();
    let config = config(data.path());

    let straight = runs.path().join("straight");
    let result = train(&config, &straight, &quiet()).unwrap();
    assert!(!result.interrupted);
    let m = read_metrics(&straight).unwrap();
    assert_eq!(m.len(), 2);
    assert!(
        m[1].train_loss < m[0].train_loss,
        "the loss falls: {} then {}",
        m[0].train_loss,
        m[1].train_loss
    );
    assert!(m[1].test_top1 > 25.0, "better than chance (4 classes): {}%", m[1].test_top1);
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
    let weights = std::fs::read(straight.join("model.safetensors")).unwrap();

    // Stopped after epoch 1, then resumed.
    let by_epoch = runs.path().join("by-epoch");
    let stopped =
        train(&config, &by_epoch, &RunOptions { stop_after_epochs: Some(1), ..quiet() }).unwrap();
    assert!(stopped.interrupted && !by_epoch.join("model.safetensors").exists());
    resume(&by_epoch, &quiet()).unwrap();
    assert_eq!(metrics(&by_epoch), metrics(&straight));
    assert_eq!(
        std::fs::read(by_epoch.join("model.safetensors")).unwrap(),
        weights,
        "weights after resuming at an epoch"
    );

    // Stopped mid-epoch (after 5 of 4 + 4 batches), then resumed.
    let mid = runs.path().join("mid-epoch");
    train(&config, &mid, &RunOptions { stop_after_batches: Some(5), ..quiet() }).unwrap();
    resume(&mid, &quiet()).unwrap();
    assert_eq!(metrics(&mid), metrics(&straight));
    assert_eq!(
        std::fs::read(mid.join("model.safetensors")).unwrap(),
        weights,
        "weights after resuming mid-epoch"
    );

    let err = train(&config, &straight, &quiet()).unwrap_err().to_string();
    assert!(err.contains("already exists") && err.contains("--resume"), "{err}");

    // The trained model as the teacher of a student with attention transfer and distillation.
    let teacher =
        TeacherConfig { model: "wrn-16-1".into(), checkpoint: straight.join("model.safetensors") };
    let at_kd = RunConfig {
        teacher: Some(teacher.clone()),
        loss: LossSection { alpha: 0.9, beta: 1e3, ..LossSection::default() },
        epochs: 1,
        ..config.clone()
    };
    train(&at_kd, &runs.path().join("at-kd"), &quiet()).unwrap();
    let m = read_metrics(&runs.path().join("at-kd")).unwrap();
    assert_eq!(m[0].train_at.len(), 3, "one AT term per WRN group");
    assert!(m[0].train_kd.is_some() && m[0].train_at.iter().all(|a| a.is_finite() && *a > 0.0));

    // Attention-map figures: the image and one panel per group.
    let maps = at_train::maps::write_maps(
        &straight,
        at_train::maps::Source::TestItems(vec![0, 5]),
        &runs.path().join("maps"),
    )
    .unwrap();
    assert_eq!(maps.len(), 2);
    let figure = image::open(&maps[1]).unwrap();
    assert_eq!((figure.width(), figure.height()), (4 * 128, 128));

    // A checkpoint that does not fit the teacher's architecture names the tensor.
    let wrong =
        RunConfig { teacher: Some(TeacherConfig { model: "wrn-16-2".into(), ..teacher }), ..at_kd };
    let err = format!("{:#}", train(&wrong, &runs.path().join("wrong"), &quiet()).unwrap_err());
    assert!(
        err.contains("does not fit a wrn-16-2")
            && err.contains("`bn.bias` has shape [64] in the file but [128]"),
        "{err}"
    );
}

/// Table 3's losses in the trainer: the double-backpropagation step trains, reports its penalty,
/// and resumes mid-epoch to the same weights; gradient transfer combines with distillation.
#[test]
fn gradient_penalties_train_and_resume_identically() {
    let data = tempfile::tempdir().unwrap();
    write_dataset(data.path(), "train", 96, 3);
    write_dataset(data.path(), "t10k", 32, 4);
    let runs = tempfile::tempdir().unwrap();
    let config = RunConfig {
        student: "nin-thin-nobn".into(),
        loss: LossSection {
            gradient: "jacobian".into(),
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
            gradient: "symmetry".into(),
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
        loss: LossSection { gradient: "transfer".into(), alpha: 0.5, ..config.loss.clone() },
        ..config.clone()
    };
    let dir = runs.path().join("transfer-kd");
    train(&transfer_kd, &dir, &quiet()).unwrap();
    let m = read_metrics(&dir).unwrap();
    assert!(m[0].train_kd.is_some_and(|kd| kd.is_finite() && kd > 0.0), "{:?}", m[0].train_kd);
    assert!(m[0].train_gradient.is_some_and(|g| g.is_finite() && g > 0.0));
}
