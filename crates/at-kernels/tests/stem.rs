//! The fused stem (convolution, batch norm with the batch's statistics, ReLU, max pool) against
//! the same stem built from separate ops (`conv2d`, `batch_norm_train`, `max_pool2d`, each
//! tested against candle's own ops elsewhere): output, batch statistics and the gradients of
//! every parameter (f32), on ResNet's stem shape (7x7 stride 2, padding 3, pool 3/2/1) at a
//! small and an odd image size; and its refusals. (It declines on a second-order thread too:
//! `stem_train` checks `is_second_order_thread` as the fused layer does.)

use at_kernels::{ParamGrads, Stem, batch_norm_train, conv2d, max_pool2d, stem_train};
mod common;

use candle_core::{DType, Tensor, Var};
use common::{max_rel, values};

/// The stem's parameters: the convolution's weight, the batch norm's weight and bias.
fn params(c_in: usize, c_out: usize) -> [Var; 3] {
    [values(&[c_out, c_in, 7, 7], 1.0, 0.2), values(&[c_out], 2.0, 0.5), values(&[c_out], 3.0, 0.2)]
}

fn stem<'a>(p: &'a [Var; 3]) -> Stem<'a> {
    Stem {
        conv: p[0].as_tensor(),
        stride: 2,
        padding: 3,
        bn: (p[1].as_tensor(), p[2].as_tensor()),
        eps: 1e-5,
        pool: (3, 2, 1),
    }
}

fn check(n: usize, (c_in, c_out): (usize, usize), (h, w): (usize, usize)) {
    let tag = format!("stem {c_in}->{c_out}, {n}x{h}x{w}");
    // The images: a tensor that tracks no gradient, as a batch from the loader.
    let x = values(&[n, c_in, h, w], 7.0, 1.0).as_tensor().detach();
    let p = params(c_in, c_out);
    let s = stem(&p);
    let deferred = ParamGrads::new();
    let (ours, ours_stats) = stem_train(&x, &s, &deferred).unwrap().expect("fused");
    let z = conv2d(&x, s.conv, s.stride, s.padding).unwrap();
    let (a, their_stats) = batch_norm_train(&z, s.bn.0, s.bn.1, s.eps, true).unwrap().unwrap();
    let theirs = max_pool2d(&a, s.pool).unwrap();
    assert_eq!(ours.dims(), theirs.dims(), "{tag}: shape");
    assert!(max_rel(&format!("{tag}: output"), &ours, &theirs) < 1e-6, "{tag}: output");
    assert_eq!(ours_stats, their_stats, "{tag}: batch statistics");
    // Gradients of sum(out * r) for a fixed r.
    let r = values(theirs.dims(), 99.0, 1.0);
    let mut grads_ours = (ours * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    for var in &p {
        assert!(grads_ours.get(var).is_none(), "{tag}: a parameter's gradient in the graph");
    }
    deferred.merge_into(&mut grads_ours).unwrap();
    let grads_theirs = (theirs * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    for (k, var) in p.iter().enumerate() {
        let (a, b) = (grads_ours.get(var).expect("ours"), grads_theirs.get(var).expect("theirs"));
        let err = max_rel(&tag, a, b);
        assert!(err < 1e-4, "{tag}: gradient of parameter {k} differs by {err}");
    }
}

#[test]
fn fused_stem_matches_separate_ops_on_resnet_stem_shapes() {
    check(2, (3, 16), (32, 32));
}

#[test]
fn fused_stem_matches_separate_ops_on_odd_and_oblong_images() {
    // 37 x 23: odd sides, so the convolution's and the pool's last windows are partial.
    check(3, (3, 8), (37, 23));
}

#[test]
fn fused_stem_declines_tracked_images_and_f64() {
    let p = params(3, 8);
    let deferred = ParamGrads::new();
    // Images that take a gradient (an input-gradient penalty) need the separate ops.
    let tracked = values(&[1, 3, 16, 16], 5.0, 1.0);
    assert!(stem_train(tracked.as_tensor(), &stem(&p), &deferred).unwrap().is_none());
    let x64 = values(&[1, 3, 16, 16], 5.0, 1.0).as_tensor().to_dtype(DType::F64).unwrap();
    assert!(stem_train(&x64, &stem(&p), &deferred).unwrap().is_none());
}

#[test]
fn fused_stem_names_a_batch_norm_of_the_wrong_width() {
    let p = params(3, 8);
    let narrow = Tensor::ones(4, DType::F32, &candle_core::Device::Cpu).unwrap();
    let s = Stem { bn: (&narrow, &narrow), ..stem(&p) };
    let x = values(&[1, 3, 16, 16], 5.0, 1.0).as_tensor().detach();
    let err = stem_train(&x, &s, &ParamGrads::new()).unwrap_err().to_string();
    assert!(err.contains("must have 8 channels"), "{err}");
}
