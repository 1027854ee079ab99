//! What the end-to-end tests share: generated data in Fashion-MNIST's IDX format, a small
//! run config, and the run's metrics without wall-clock fields.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use at_trainer::config::{
    Augmentation, DataConfig, DatasetName, OptimConfig, RunConfig, ScheduleKind,
};
use at_trainer::train::{RunOptions, read_metrics};

/// 28x28 images of four classes: one bright quadrant each, on noise.
pub fn write_dataset(dir: &Path, prefix: &str, n: usize, seed: u64) {
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

pub fn config(data: &Path) -> RunConfig {
    RunConfig {
        student: "wrn-16-1".into(),
        data: DataConfig {
            dataset: DatasetName::FashionMnist,
            root: data.to_path_buf(),
            augment: Augmentation::None,
            ..DataConfig::default()
        },
        optim: OptimConfig { lr: 0.05, schedule: ScheduleKind::Constant, ..OptimConfig::default() },
        epochs: 2,
        batch_size: 32,
        seed: 11,
        threads: 2,
        ..RunConfig::default()
    }
}

pub fn quiet() -> RunOptions {
    RunOptions::default()
}

/// The run's metrics without the wall-clock fields, which differ from run to run.
pub fn metrics(dir: &Path) -> Vec<serde_json::Value> {
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
