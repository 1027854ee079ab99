//! The fused pre-activation residual block against the same block built from separate ops
//! (`batch_norm_train`, `conv2d`, an addition, each tested against candle's own ops elsewhere):
//! output, batch statistics, and the gradients of the input and of every weight (f32); and the
//! evaluation-mode block (running statistics, forward only) against `batch_norm_eval`.

use at_kernels::{
    BatchStats, PreactBlock, batch_norm_eval, batch_norm_train, conv2d, preact_block_eval,
    preact_block_train, preact_blocks_train,
};
mod common;

use candle_core::{Result, Tensor};
use common::{max_rel, values};

fn composite(x: &Tensor, b: &PreactBlock) -> Result<(Tensor, [BatchStats; 2])> {
    let (o1, s0) = batch_norm_train(x, b.bn0.0, b.bn0.1, b.eps, true)?.expect("kernel");
    let y0 = conv2d(&o1, b.conv0, b.stride, 1)?;
    let (o2, s1) = batch_norm_train(&y0, b.bn1.0, b.bn1.1, b.eps, true)?.expect("kernel");
    let y1 = conv2d(&o2, b.conv1, 1, 1)?;
    let out = match b.convdim {
        Some(w) => (y1 + conv2d(&o1, w, b.stride, 0)?)?,
        None => (y1 + x)?,
    };
    Ok((out, [s0, s1]))
}

fn check(c_in: usize, c_out: usize, stride: usize) {
    check_size(c_in, c_out, stride, (8, 8));
}

fn check_size(c_in: usize, c_out: usize, stride: usize, (h, w): (usize, usize)) {
    let x = values(&[3, c_in, h, w], 1.0, 1.0);
    let g0 = values(&[c_in], 2.0, 0.5);
    let b0 = values(&[c_in], 3.0, 0.2);
    let w0 = values(&[c_out, c_in, 3, 3], 4.0, 0.3);
    let g1 = values(&[c_out], 5.0, 0.5);
    let b1 = values(&[c_out], 6.0, 0.2);
    let w1 = values(&[c_out, c_out, 3, 3], 7.0, 0.3);
    let wd = values(&[c_out, c_in, 1, 1], 8.0, 0.3);
    let projection = c_in != c_out || stride != 1;
    let block = PreactBlock {
        bn0: (g0.as_tensor(), b0.as_tensor()),
        conv0: w0.as_tensor(),
        bn1: (g1.as_tensor(), b1.as_tensor()),
        conv1: w1.as_tensor(),
        convdim: projection.then_some(wd.as_tensor()),
        stride,
        eps: 1e-5,
    };
    let (ours, ours_stats) =
        preact_block_train(x.as_tensor(), &block).unwrap().expect("f32 on the CPU is fused");
    let (theirs, their_stats) = composite(x.as_tensor(), &block).unwrap();
    let tag = format!("{c_in}->{c_out} stride {stride}, {h}x{w}");
    assert!(max_rel(&format!("{tag} output"), &ours, &theirs) < 1e-5);
    assert_eq!(ours_stats, their_stats, "{tag}: batch statistics");

    // Gradients of sum(out * r) for a fixed r.
    let r = values(theirs.dims(), 9.0, 1.0);
    let grads_ours = (ours * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let grads_theirs = (theirs * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let mut vars = vec![("x", &x), ("bn0.w", &g0), ("bn0.b", &b0), ("conv0", &w0)];
    vars.extend([("bn1.w", &g1), ("bn1.b", &b1), ("conv1", &w1)]);
    if projection {
        vars.push(("convdim", &wd));
    }
    for (name, var) in vars {
        let a = grads_ours.get(var).unwrap_or_else(|| panic!("{tag}: no gradient for {name}"));
        let b = grads_theirs.get(var).unwrap();
        let err = max_rel(&format!("{tag} d{name}"), a, b);
        assert!(err < 1e-4, "{tag}: gradient of {name} differs by {err}");
    }
    if !projection {
        assert!(grads_ours.get(&wd).is_none(), "{tag}: an unused projection took a gradient");
    }
}

#[test]
fn fused_block_with_identity_shortcut_matches_separate_ops() {
    check(4, 4, 1);
}

#[test]
fn fused_block_with_projection_and_stride_matches_separate_ops() {
    check(3, 5, 2);
    check(4, 6, 1);
}

#[test]
fn fused_block_matches_separate_ops_on_tiny_and_oblong_images() {
    check_size(3, 3, 1, (1, 1));
    check_size(2, 4, 2, (2, 2));
    check_size(3, 3, 1, (5, 2));
    check_size(2, 3, 2, (3, 7));
}

#[test]
fn fused_block_rejects_a_kernel_that_is_not_3x3() {
    let x = values(&[1, 2, 4, 4], 1.0, 1.0);
    let (g, b) = (values(&[2], 2.0, 1.0), values(&[2], 3.0, 1.0));
    let w5 = values(&[2, 2, 5, 5], 4.0, 1.0);
    let block = PreactBlock {
        bn0: (g.as_tensor(), b.as_tensor()),
        conv0: w5.as_tensor(),
        bn1: (g.as_tensor(), b.as_tensor()),
        conv1: w5.as_tensor(),
        convdim: None,
        stride: 1,
        eps: 1e-5,
    };
    let err = preact_block_train(x.as_tensor(), &block).unwrap_err().to_string();
    assert!(err.contains("3x3"), "{err}");
}

#[test]
fn fused_group_matches_its_blocks_one_after_another() {
    // A group as WRN builds it: a strided block with a projection, then two identity blocks.
    let x = values(&[2, 3, 6, 6], 1.0, 1.0);
    let mut vars = vec![];
    for (i, (c_in, c_out, projection)) in
        [(3, 4, true), (4, 4, false), (4, 4, false)].iter().enumerate()
    {
        let s = 10.0 * (i + 1) as f64;
        vars.push([
            values(&[*c_in], s + 1.0, 0.5),
            values(&[*c_in], s + 2.0, 0.2),
            values(&[*c_out, *c_in, 3, 3], s + 3.0, 0.3),
            values(&[*c_out], s + 4.0, 0.5),
            values(&[*c_out], s + 5.0, 0.2),
            values(&[*c_out, *c_out, 3, 3], s + 6.0, 0.3),
            values(&[*c_out, *c_in, 1, 1], s + 7.0, if *projection { 0.3 } else { 0.0 }),
        ]);
    }
    let blocks: Vec<PreactBlock> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| PreactBlock {
            bn0: (v[0].as_tensor(), v[1].as_tensor()),
            conv0: v[2].as_tensor(),
            bn1: (v[3].as_tensor(), v[4].as_tensor()),
            conv1: v[5].as_tensor(),
            convdim: (i == 0).then_some(v[6].as_tensor()),
            stride: if i == 0 { 2 } else { 1 },
            eps: 1e-5,
        })
        .collect();
    let (ours, ours_stats) = preact_blocks_train(x.as_tensor(), &blocks).unwrap().expect("fused");
    let mut theirs = x.as_tensor().clone();
    let mut their_stats = vec![];
    for block in &blocks {
        let (y, stats) = composite(&theirs, block).unwrap();
        theirs = y;
        their_stats.push(stats);
    }
    assert!(max_rel("group output", &ours, &theirs) < 1e-5);
    assert_eq!(ours_stats, their_stats, "batch statistics of every block");
    let r = values(theirs.dims(), 99.0, 1.0);
    let grads_ours = (ours * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let grads_theirs = (theirs * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let mut checked = 0;
    for var in std::iter::once(&x).chain(vars.iter().flatten()) {
        match (grads_ours.get(var), grads_theirs.get(var)) {
            (Some(a), Some(b)) => {
                let err = max_rel("group gradient", a, b);
                assert!(err < 1e-4, "a gradient differs by {err}");
                checked += 1;
            }
            (None, None) => {}
            _ => panic!("a gradient exists on one side only"),
        }
    }
    assert_eq!(checked, 1 + 7 + 6 + 6, "the input and every used weight");
}

/// The evaluation-mode block on plain tensors (what a teacher holds) against the same block
/// from `batch_norm_eval`, `conv2d` and an addition, with the identity shortcut and with a
/// strided projection; tracked operands fall back (`None`).
#[test]
fn eval_block_matches_separate_ops_and_declines_tracked_operands() {
    for (c_in, c_out, stride) in [(16, 16, 1), (8, 16, 2), (5, 7, 1)] {
        let t = |shape: &[usize], seed: f64, scale: f64| {
            values(shape, seed, scale).as_tensor().detach()
        };
        let x = t(&[3, c_in, 8, 8], 1.0, 1.0);
        let (g0, b0, w0) =
            (t(&[c_in], 2.0, 0.5), t(&[c_in], 3.0, 0.2), t(&[c_out, c_in, 3, 3], 4.0, 0.3));
        let (g1, b1, w1) =
            (t(&[c_out], 5.0, 0.5), t(&[c_out], 6.0, 0.2), t(&[c_out, c_out, 3, 3], 7.0, 0.3));
        let wd = t(&[c_out, c_in, 1, 1], 8.0, 0.3);
        let (m0, v0) =
            (t(&[c_in], 9.0, 0.3), (t(&[c_in], 10.0, 0.4).abs().unwrap() + 0.5).unwrap());
        let (m1, v1) =
            (t(&[c_out], 11.0, 0.3), (t(&[c_out], 12.0, 0.4).abs().unwrap() + 0.5).unwrap());
        let projection = c_in != c_out || stride != 1;
        let block = PreactBlock {
            bn0: (&g0, &b0),
            conv0: &w0,
            bn1: (&g1, &b1),
            conv1: &w1,
            convdim: projection.then_some(&wd),
            stride,
            eps: 1e-5,
        };
        let running = [(&m0, &v0), (&m1, &v1)];
        let ours = preact_block_eval(&x, &block, running).unwrap().expect("plain f32 tensors");
        let bn = |x: &Tensor, (g, b): (&Tensor, &Tensor), (m, v): (&Tensor, &Tensor)| {
            batch_norm_eval(x, g, b, m, v, 1e-5, true).unwrap().expect("kernel")
        };
        let o1 = bn(&x, block.bn0, running[0]);
        let y0 = conv2d(&o1, &w0, stride, 1).unwrap();
        let y1 = conv2d(&bn(&y0, block.bn1, running[1]), &w1, 1, 1).unwrap();
        let theirs = match projection {
            true => (y1 + conv2d(&o1, &wd, stride, 0).unwrap()).unwrap(),
            false => (y1 + &x).unwrap(),
        };
        let tag = format!("eval {c_in}->{c_out} stride {stride}");
        let err = max_rel(&tag, &ours, &theirs);
        assert!(err < 1e-5, "{tag}: output differs by {err}");

        // The output's attention map from the same pass: mean_c y^2, and the same output.
        let (y, map) = at_kernels::preact_block_eval_map(&x, &block, running).unwrap().unwrap();
        assert!(max_rel(&tag, &y, &ours) == 0.0, "{tag}: the same output with its map");
        let expected = theirs.sqr().unwrap().mean(1).unwrap();
        assert_eq!(map.dims(), expected.dims());
        let err = max_rel(&tag, &map, &expected);
        assert!(err < 1e-5, "{tag}: map differs by {err}");

        let tracked = values(&[3, c_in, 8, 8], 1.0, 1.0);
        let declined = preact_block_eval(tracked.as_tensor(), &block, running).unwrap();
        assert!(declined.is_none(), "{tag}: a tracked input must take the differentiable path");
    }
}
