//! Times the three convolution kernels (forward, input gradient, weight gradient) on the 3x3
//! layers of WRN-16-2 at batch 128, median of 5 after one warm-up; `xtask/bench/torch_conv.py`
//! times the same in PyTorch. One JSON line per measurement (what `cargo xtask bench` reads).
//!
//! `cargo run --release -p at-kernels --example conv_bench`

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

fn main() -> Result<()> {
    at_kernels::tune_allocator();
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
