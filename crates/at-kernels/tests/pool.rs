//! at-kernels' max pool against a plain loop over every window: the maxima, and the gradient
//! of `sum(y * g)` at each window's first maximum (ties on purpose, padding, odd sides, kernel
//! and stride that differ, NaN inputs).

use at_kernels::max_pool2d;
use candle_core::{Device, Tensor, Var};

/// (y, dx) of a max pool, one window at a time: the first maximum in row-major order, a NaN
/// beating every value (PyTorch's rule).
fn reference(
    x: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    (k, s, p): (usize, usize, usize),
    g: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let (mut y, mut dx) = (vec![], vec![0f32; x.len()]);
    for plane in 0..b * c {
        for i in 0..oh {
            for j in 0..ow {
                let mut best: Option<(usize, f32)> = None;
                for di in 0..k {
                    for dj in 0..k {
                        let (r, q) = (
                            (i * s + di) as isize - p as isize,
                            (j * s + dj) as isize - p as isize,
                        );
                        if r < 0 || q < 0 || r as usize >= h || q as usize >= w {
                            continue;
                        }
                        let at = plane * h * w + r as usize * w + q as usize;
                        if best.is_none_or(|(_, v)| x[at] > v || x[at].is_nan()) {
                            best = Some((at, x[at]));
                        }
                    }
                }
                let (at, v) = best.expect("every window holds a cell");
                y.push(v);
                dx[at] += g[plane * oh * ow + i * ow + j];
            }
        }
    }
    (y, dx)
}

#[test]
fn the_maxima_and_their_gradients_are_those_of_a_loop_over_every_window() {
    let dev = Device::Cpu;
    for &(h, w) in &[(11, 13), (8, 8), (23, 17)] {
        for &(k, s, p) in &[(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0)] {
            let dims = (2, 3, h, w);
            let n = 2 * 3 * h * w;
            // A coarse grid of values: windows hold ties, as after a ReLU.
            let xs: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0).max(0.0)).collect();
            let x = Var::from_vec(xs.clone(), dims, &dev).unwrap();
            let y = max_pool2d(x.as_tensor(), (k, s, p)).unwrap();
            let (_, _, oh, ow) = y.dims4().unwrap();
            let gs: Vec<f32> = (0..2 * 3 * oh * ow).map(|i| (i % 7) as f32 - 3.0).collect();
            let g = Tensor::from_vec(gs.clone(), (2, 3, oh, ow), &dev).unwrap();
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (y_ref, dx_ref) = reference(&xs, dims, (k, s, p), &gs);
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v(&y), y_ref, "values, {h}x{w}, kernel {k} stride {s} padding {p}");
            let dx = v(grads.get(&x).unwrap());
            assert_eq!(dx, dx_ref, "gradients, {h}x{w}, kernel {k} stride {s} padding {p}");
        }
    }
}

#[test]
fn a_nan_in_a_window_is_its_maximum_and_takes_its_gradient() {
    let dev = Device::Cpu;
    let (h, w) = (9, 10);
    let dims = (1, 2, h, w);
    // NaN at a window's first cell, in the middle of a row, at a row's start, at the border.
    let mut xs: Vec<f32> = (0..2 * h * w).map(|i| (i * 29 % 13) as f32).collect();
    for at in [0, 13, 20, 2 * w + 1, 45, h * w + 3, 2 * h * w - 1] {
        xs[at] = f32::NAN;
    }
    for &(k, s, p) in &[(3, 2, 1), (2, 2, 0), (3, 1, 1), (4, 3, 1)] {
        let x = Var::from_vec(xs.clone(), dims, &dev).unwrap();
        let y = max_pool2d(x.as_tensor(), (k, s, p)).unwrap();
        let (_, _, oh, ow) = y.dims4().unwrap();
        let gs: Vec<f32> = (0..2 * oh * ow).map(|i| (i % 5) as f32 + 1.0).collect();
        let g = Tensor::from_vec(gs.clone(), (1, 2, oh, ow), &dev).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (y_ref, dx_ref) = reference(&xs, dims, (k, s, p), &gs);
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(y_ref.iter().any(|v| v.is_nan()), "the case holds NaN maxima");
        assert_eq!(bits(v(&y)), bits(y_ref), "values, kernel {k} stride {s} padding {p}");
        // Each output's gradient goes to its NaN, as PyTorch's indices say.
        let dx = v(grads.get(&x).unwrap());
        assert_eq!(bits(dx), bits(dx_ref), "gradients, kernel {k} stride {s} padding {p}");
    }
}

#[test]
fn a_pool_that_does_not_fit_or_a_strided_input_is_handled() {
    let x = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = max_pool2d(&x, (5, 1, 0)).unwrap_err().to_string();
    assert!(err.contains("do not fit an input of 2x2"), "{err}");
    // A transposed (non-contiguous) input is made contiguous first.
    let x = Tensor::arange(0f32, 32., &Device::Cpu).unwrap().reshape((1, 2, 4, 4)).unwrap();
    let t = x.transpose(2, 3).unwrap();
    let y = max_pool2d(&t, (2, 2, 0)).unwrap();
    let expected = max_pool2d(&t.contiguous().unwrap(), (2, 2, 0)).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}
