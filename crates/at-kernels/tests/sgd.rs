//! The in-place SGD step against the same formula as candle tensor ops (what `at-trainer`'s
//! optimiser runs off the CPU): equal to the bit over several steps, in f32 and f64, with and
//! without momentum, Nesterov and weight decay; and where it does not apply it touches nothing.

use at_kernels::{SgdStep, sgd_step_in_place};
use candle_core::{DType, Device, Result, Tensor};

fn values(len: usize, seed: usize, dtype: DType) -> Tensor {
    let v: Vec<f64> =
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f64 / 500.0 - 1.0).collect();
    Tensor::from_vec(v, len, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// One step as tensor ops: `d = g + wd p`, `buf = m buf + d`, `d = buf` or `d + m buf`,
/// `p - lr d`.
fn reference(
    p: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    s: SgdStep,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut d = g.clone();
    if s.weight_decay != 0.0 {
        d = (d + (p * s.weight_decay)?)?;
    }
    let buf = match buf {
        Some(buf) => {
            let buf = ((buf * s.momentum)? + &d)?;
            d = if s.nesterov { (d + (&buf * s.momentum)?)? } else { buf.clone() };
            Some(buf)
        }
        None => None,
    };
    Ok(((p - (d * s.lr)?)?, buf))
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn in_place_step_equals_the_tensor_ops_to_the_bit() {
    let steps = [
        SgdStep { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 5e-4 },
        SgdStep { lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 1e-4 },
        SgdStep { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 5e-4 },
        SgdStep { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 0.0 },
    ];
    // Longer than one rayon task (2^15 elements), so that the chunks are covered too.
    let len = 70_001;
    for dtype in [DType::F32, DType::F64] {
        for (k, s) in steps.into_iter().enumerate() {
            let p = values(len, k, dtype).copy().unwrap();
            let buf = (s.momentum != 0.0).then(|| p.zeros_like().unwrap());
            let (mut p_ref, mut buf_ref) =
                (p.copy().unwrap(), buf.as_ref().map(|b| b.copy().unwrap()));
            for step in 0..3 {
                let g = values(len, 10 + 3 * k + step, dtype);
                assert!(sgd_step_in_place(&p, &g, buf.as_ref(), s).unwrap(), "{dtype:?} {s:?}");
                (p_ref, buf_ref) = reference(&p_ref, &g, buf_ref.as_ref(), s).unwrap();
                assert_eq!(bits(&p), bits(&p_ref), "{dtype:?} {s:?} step {step}: parameter");
                if let (Some(a), Some(b)) = (&buf, &buf_ref) {
                    assert_eq!(bits(a), bits(b), "{dtype:?} {s:?} step {step}: momentum");
                }
            }
        }
    }
}

#[test]
fn a_step_the_kernel_cannot_take_is_declined_untouched() {
    let s = SgdStep { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 5e-4 };
    let p = values(12, 1, DType::F32).reshape((3, 4)).unwrap().copy().unwrap();
    let before = bits(&p.flatten_all().unwrap());
    let buf = p.zeros_like().unwrap();
    // A transposed (not contiguous) gradient, another dtype, a half-precision parameter, a
    // momentum buffer for a step without momentum.
    let g = values(12, 2, DType::F32).reshape((4, 3)).unwrap().t().unwrap();
    assert!(!sgd_step_in_place(&p, &g, Some(&buf), s).unwrap());
    let g64 = values(12, 2, DType::F64).reshape((3, 4)).unwrap();
    assert!(!sgd_step_in_place(&p, &g64, Some(&buf), s).unwrap());
    let h = p.to_dtype(DType::F16).unwrap();
    assert!(
        !sgd_step_in_place(&h, &h.zeros_like().unwrap(), Some(&h.zeros_like().unwrap()), s)
            .unwrap()
    );
    let plain = SgdStep { momentum: 0.0, ..s };
    let g = values(12, 2, DType::F32).reshape((3, 4)).unwrap();
    assert!(!sgd_step_in_place(&p, &g, Some(&buf), plain).unwrap());
    assert_eq!(bits(&p.flatten_all().unwrap()), before);
    assert_eq!(buf.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.0; 12]);
}
