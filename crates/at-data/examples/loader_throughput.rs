//! Measures the loader's CIFAR-augmentation throughput (reflect-pad 4, random crop 32, flip,
//! normalise, batch of 128 into a tensor) with 1 and 2 worker threads.
//!
//! `cargo run --release -p at-data --example loader_throughput`
//!
//! The images are random bytes in CIFAR's shape: the augmentation's cost does not depend on what
//! the pixels show, and CIFAR itself cannot be downloaded everywhere.

use std::sync::Arc;
use std::time::Instant;

use at_data::{InMemory, Loader, LoaderConfig, Pipeline};
use candle_core::Device;

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
    println!("| worker threads | images/s (median of 3 epochs of {n}) |");
    println!("|---:|---:|");
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
        println!("| {threads} | {:.0} |", rates[1]);
    }
    Ok(())
}
