//! Times the three convolution kernels (forward, input gradient, weight gradient) on the 3x3
//! layers of WRN-16-2 at batch 128, median of 5 after one warm-up; `xtask/bench/torch_conv.py`
//! times the same in PyTorch. One JSON line per measurement (what `cargo xtask bench` reads).
//!
//! `cargo run --release -p at-kernels --example conv_bench`
//!
//! With `resnet [BATCH] [LAYER]` (batch 8 unless given; LAYER: the layers whose name starts so,
//! e.g. `512-512`) it times ResNet-18's convolutions at 224x224
//! instead, each distinct layer once: the 7x7/2 stem, the "same" 3x3 layers, the 3x3/2 and 1x1/2
//! layers that open groups 2 to 4 (`xtask/bench/torch_conv.py resnet` likewise).

use std::time::Instant;

use at_kernels::{conv2d, conv2d_input_grad, conv2d_weight_grad};
use candle_core::{Device, Result, Tensor};

fn median(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = vec![];
    for _ in 0..5 {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[2])
}

/// ResNet-18's distinct convolutions at 224x224: input channels, output channels, input side,
/// kernel, stride, padding, and how many of each the network has.
const RESNET18: [(usize, usize, usize, usize, usize, usize, usize); 11] = [
    (3, 64, 224, 7, 2, 3, 1),
    (64, 64, 56, 3, 1, 1, 4),
    (64, 128, 56, 3, 2, 1, 1),
    (64, 128, 56, 1, 2, 0, 1),
    (128, 128, 28, 3, 1, 1, 3),
    (128, 256, 28, 3, 2, 1, 1),
    (128, 256, 28, 1, 2, 0, 1),
    (256, 256, 14, 3, 1, 1, 3),
    (256, 512, 14, 3, 2, 1, 1),
    (256, 512, 14, 1, 2, 0, 1),
    (512, 512, 7, 3, 1, 1, 3),
];

fn resnet(batch: usize, only: Option<&str>) -> Result<()> {
    let dev = Device::Cpu;
    for (c, o, hw, k, s, pad, count) in RESNET18 {
        let layer = format!("{c}-{o}x{hw} k{k}/{s}");
        if only.is_some_and(|only| !layer.starts_with(only)) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (batch, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (o, c, k, k), &dev)?;
        let y = conv2d(&x, &w, s, pad)?;
        let dy = Tensor::randn_like(&y, 0.0, 1.0)?;
        let fwd = median(|| conv2d(&x, &w, s, pad).map(|_| ()))?;
        let dx = median(|| conv2d_input_grad(&dy, &w, s, pad, (hw, hw)).map(|_| ()))?;
        let dw = median(|| conv2d_weight_grad(&x, &dy, s, pad, (k, k)).map(|_| ()))?;
        for (op, ms) in [("forward", fwd), ("input-grad", dx), ("weight-grad", dw)] {
            println!(
                "{{\"layer\": \"{layer}\", \"count\": {count}, \"op\": \"{op}\", \"ms\": [{ms:.2}]}}"
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    at_kernels::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "resnet") {
        let batch = args.get(1).map_or(Ok(8), |b| b.parse()).expect("BATCH is a number");
        return resnet(batch, args.get(2).map(String::as_str));
    }
    let dev = Device::Cpu;
    for (c, hw) in [(32usize, 32usize), (64, 16), (128, 8)] {
        let x = Tensor::randn(0f32, 1.0, (128, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (c, c, 3, 3), &dev)?;
        let dy = Tensor::randn(0f32, 1.0, (128, c, hw, hw), &dev)?;
        let fwd = median(|| conv2d(&x, &w, 1, 1).map(|_| ()))?;
        let dx = median(|| conv2d_input_grad(&dy, &w, 1, 1, (hw, hw)).map(|_| ()))?;
        let dw = median(|| conv2d_weight_grad(&x, &dy, 1, 1, (3, 3)).map(|_| ()))?;
        for (op, ms) in [("forward", fwd), ("input-grad", dx), ("weight-grad", dw)] {
            println!("{{\"layer\": \"{c}x{hw}x{hw}\", \"op\": \"{op}\", \"ms\": [{ms:.2}]}}");
        }
    }
    Ok(())
}
