//! Measures the loader's CIFAR-augmentation throughput (reflect-pad 4, random crop 32, flip,
//! normalise, batch of 128 into a tensor) with 1 and 2 worker threads, and, for comparison, how
//! many images per second a WRN-16-1 training step (forward and backward, batch 128) consumes.
//!
//! `cargo run --release -p at-data --example loader_throughput`
//!
//! The images are random bytes in CIFAR's shape: the augmentation's cost does not depend on what
//! the pixels show, and CIFAR itself cannot be downloaded everywhere.

use std::sync::Arc;
use std::time::Instant;

use at_data::{InMemory, Loader, LoaderConfig, Pipeline};
use at_models::{ModelOptions, build};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

fn main() -> at_data::Result<()> {
    let n = 50_000;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let pixels: Vec<u8> = (0..n * 32 * 32 * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    let dataset = Arc::new(InMemory::new("cifar-shaped", (32, 32, 3), 10, pixels, labels));
    let consumed = training_step_rate()?;
    println!(
        "| worker threads | images/s (median of 3 epochs of {n}) | ratio to the training step |"
    );
    println!("|---:|---:|---:|");
    for threads in [1, 2] {
        let config = LoaderConfig { batch_size: 128, threads, seed: 1, ..LoaderConfig::default() };
        let loader = Loader::new(dataset.clone(), Pipeline::cifar_train(), config)?;
        let mut rates = vec![];
        for epoch in 0..3 {
            let start = Instant::now();
            let mut seen = 0;
            for batch in loader.epoch(epoch, &Device::Cpu) {
                seen += batch?.indices.len();
            }
            rates.push(seen as f64 / start.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        println!("| {threads} | {:.0} | {:.0}x |", rates[1], rates[1] / consumed);
    }
    Ok(())
}

/// Images per second a WRN-16-1 forward and backward pass at batch 128 takes in (median of 3
/// steps after a warm-up), on the same CPU, with this build.
fn training_step_rate() -> at_data::Result<f64> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = build("wrn-16-1", &ModelOptions::default(), vb)?;
    let x = candle_core::Tensor::randn(0f32, 1.0, (128, 3, 32, 32), &Device::Cpu)?;
    let mut times = vec![];
    for step in 0..4 {
        let start = Instant::now();
        let out = model.forward_t(&x, true)?;
        out.logits.sqr()?.mean_all()?.backward()?;
        if step > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let rate = 128.0 / times[1];
    println!(
        "WRN-16-1 training step (forward + backward, batch 128): {:.2} s, {rate:.0} images/s\n",
        times[1]
    );
    Ok(rate)
}
