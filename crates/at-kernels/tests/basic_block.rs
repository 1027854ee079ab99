//! The fused layer of ResNet basic blocks against the same blocks built from separate ops
//! (`conv2d`, `batch_norm_train`, candle's addition and ReLU, each tested against candle's own
//! ops elsewhere): output, batch statistics, and the gradients of the input and of every weight
//! (f32), on the layer shapes of a ResNet (a strided first block with a projection, then
//! identity blocks) and on small and oblong images; and its refusals. (It declines on a
//! second-order thread: tests/second_order.rs.)

use at_kernels::{
    BasicBlock, BasicBlockStats, ParamGrads, basic_blocks_train, batch_norm_train, conv2d,
};
mod common;

use candle_core::{Result, Tensor, Var};
use common::{max_rel, values};

/// One block from separate ops: `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)`.
fn composite(x: &Tensor, b: &BasicBlock) -> Result<(Tensor, BasicBlockStats)> {
    let z1 = conv2d(x, b.conv1, b.stride, 1)?;
    let (y1, bn1) = batch_norm_train(&z1, b.bn1.0, b.bn1.1, b.eps, true)?.expect("kernel");
    let z2 = conv2d(&y1, b.conv2, 1, 1)?;
    let (y2, bn2) = batch_norm_train(&z2, b.bn2.0, b.bn2.1, b.eps, false)?.expect("kernel");
    let (shortcut, downsample) = match b.downsample {
        Some((w, (gamma, beta))) => {
            let zd = conv2d(x, w, b.stride, 0)?;
            let (s, stats) = batch_norm_train(&zd, gamma, beta, b.eps, false)?.expect("kernel");
            (s, Some(stats))
        }
        None => (x.clone(), None),
    };
    Ok(((y2 + shortcut)?.relu()?, BasicBlockStats { bn1, bn2, downsample }))
}

/// A layer of `count` blocks from `c_in` to `c_out` channels, the first with `stride` (and a
/// projection where the shape changes), on a batch of `n` images of `h x w`: fused against
/// separate ops.
fn check_layer(
    n: usize,
    (c_in, c_out): (usize, usize),
    stride: usize,
    count: usize,
    (h, w): (usize, usize),
) {
    let tag = format!("{count} blocks {c_in}->{c_out}, stride {stride}, {n}x{h}x{w}");
    let x = values(&[n, c_in, h, w], 1.0, 1.0);
    let mut vars = vec![];
    for i in 0..count {
        let c = if i == 0 { c_in } else { c_out };
        let s = 10.0 * (i + 1) as f64;
        vars.push([
            values(&[c_out, c, 3, 3], s + 1.0, 0.3),
            values(&[c_out], s + 2.0, 0.5),
            values(&[c_out], s + 3.0, 0.2),
            values(&[c_out, c_out, 3, 3], s + 4.0, 0.3),
            values(&[c_out], s + 5.0, 0.5),
            values(&[c_out], s + 6.0, 0.2),
            values(&[c_out, c, 1, 1], s + 7.0, 0.3),
            values(&[c_out], s + 8.0, 0.5),
            values(&[c_out], s + 9.0, 0.2),
        ]);
    }
    let projection = |i: usize| i == 0 && (stride != 1 || c_in != c_out);
    let blocks: Vec<BasicBlock> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| BasicBlock {
            conv1: v[0].as_tensor(),
            bn1: (v[1].as_tensor(), v[2].as_tensor()),
            conv2: v[3].as_tensor(),
            bn2: (v[4].as_tensor(), v[5].as_tensor()),
            downsample: projection(i)
                .then(|| (v[6].as_tensor(), (v[7].as_tensor(), v[8].as_tensor()))),
            stride: if i == 0 { stride } else { 1 },
            eps: 1e-5,
            frozen: None,
        })
        .collect();
    let deferred = ParamGrads::new();
    let (ours, ours_stats) =
        basic_blocks_train(x.as_tensor(), &blocks, &deferred).unwrap().expect("fused");
    let mut theirs = x.as_tensor().clone();
    let mut their_stats = vec![];
    for block in &blocks {
        let (y, stats) = composite(&theirs, block).unwrap();
        theirs = y;
        their_stats.push(stats);
    }
    assert!(max_rel(&format!("{tag}: output"), &ours, &theirs) < 1e-5, "{tag}: output");
    assert_eq!(ours_stats, their_stats, "{tag}: batch statistics of every block");
    // Gradients of sum(out * r) for a fixed r.
    let r = values(theirs.dims(), 99.0, 1.0);
    let mut grads_ours = (ours * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    // The input's gradient came through the graph, the parameters' through `deferred`.
    for var in vars.iter().flatten() {
        assert!(grads_ours.get(var).is_none(), "{tag}: a parameter's gradient in the graph");
    }
    deferred.merge_into(&mut grads_ours).unwrap();
    let grads_theirs = (theirs * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let mut checked = 0;
    for (k, var) in std::iter::once(&x).chain(vars.iter().flatten()).enumerate() {
        match (grads_ours.get(var), grads_theirs.get(var)) {
            (Some(a), Some(b)) => {
                let err = max_rel(&tag, a, b);
                assert!(err < 1e-4, "{tag}: gradient {k} differs by {err}");
                checked += 1;
            }
            (None, None) => {}
            _ => panic!("{tag}: gradient {k} exists on one side only"),
        }
    }
    let projections = (0..count).filter(|&i| projection(i)).count();
    assert_eq!(checked, 1 + 6 * count + 3 * projections, "{tag}: the input and every used weight");
}

#[test]
fn fused_layer_with_identity_blocks_matches_separate_ops() {
    check_layer(3, (8, 8), 1, 2, (8, 8));
}

#[test]
fn fused_layer_opening_with_a_strided_projection_matches_separate_ops() {
    // As ResNet's layers 2 to 4: 14x14 -> 7x7 (the weight gradient by bands over the batch).
    check_layer(2, (16, 32), 2, 2, (14, 14));
    check_layer(3, (6, 13), 2, 3, (9, 7));
    // A projection without a stride (a width change only).
    check_layer(2, (4, 6), 1, 1, (6, 6));
}

#[test]
fn fused_layer_matches_separate_ops_on_tiny_and_oblong_images() {
    check_layer(2, (3, 3), 1, 1, (1, 1));
    check_layer(2, (2, 4), 2, 2, (2, 2));
    check_layer(3, (3, 3), 1, 2, (5, 2));
}

/// An identity block whose two convolutions share `w` and whose batch norms share `(g, b)`.
fn shared_block<'a>(w: &'a Var, (g, b): (&'a Var, &'a Var), stride: usize) -> BasicBlock<'a> {
    BasicBlock {
        conv1: w.as_tensor(),
        bn1: (g.as_tensor(), b.as_tensor()),
        conv2: w.as_tensor(),
        bn2: (g.as_tensor(), b.as_tensor()),
        downsample: None,
        stride,
        eps: 1e-5,
        frozen: None,
    }
}

#[test]
fn fused_layer_refuses_blocks_that_do_not_chain_or_lack_a_projection() {
    let x = values(&[1, 4, 4, 4], 1.0, 1.0);
    let (g, b) = (values(&[4], 2.0, 1.0), values(&[4], 3.0, 1.0));
    let w = values(&[4, 4, 3, 3], 4.0, 1.0);
    let block = shared_block(&w, (&g, &b), 2);
    let err =
        basic_blocks_train(x.as_tensor(), &[block], &ParamGrads::new()).unwrap_err().to_string();
    assert!(err.contains("needs a projection"), "{err}");
    let w6 = values(&[6, 4, 3, 3], 5.0, 1.0);
    let wide = BasicBlock { conv1: w6.as_tensor(), stride: 1, ..block };
    let err =
        basic_blocks_train(x.as_tensor(), &[wide], &ParamGrads::new()).unwrap_err().to_string();
    assert!(err.contains("3x3 convolutions"), "{err}");
    let err = basic_blocks_train(x.as_tensor(), &[], &ParamGrads::new()).unwrap_err().to_string();
    assert!(err.contains("at least one block"), "{err}");
}

#[test]
fn fused_layer_leaves_f64_to_separate_ops() {
    let x = values(&[1, 4, 4, 4], 1.0, 1.0);
    let (g, b) = (values(&[4], 2.0, 1.0), values(&[4], 3.0, 1.0));
    let w = values(&[4, 4, 3, 3], 4.0, 1.0);
    let block = shared_block(&w, (&g, &b), 1);
    let x64 = x.as_tensor().to_dtype(candle_core::DType::F64).unwrap();
    assert!(
        basic_blocks_train(&x64, &[block], &ParamGrads::new()).unwrap().is_none(),
        "f64 is left to separate ops"
    );
}

#[test]
fn deferred_gradients_add_to_what_the_graph_gave_the_same_parameter() {
    let (x, g, b) =
        (values(&[2, 4, 5, 5], 1.0, 1.0), values(&[4], 2.0, 0.5), values(&[4], 3.0, 0.2));
    let w = values(&[4, 4, 3, 3], 4.0, 0.3);
    let block = shared_block(&w, (&g, &b), 1);
    let deferred = ParamGrads::new();
    let (y, _) = basic_blocks_train(x.as_tensor(), &[block], &deferred).unwrap().unwrap();
    // The loss also uses `w` directly: its graph gradient is `1` everywhere.
    let loss = (y.sum_all().unwrap() + w.as_tensor().sum_all().unwrap()).unwrap();
    let mut grads = loss.backward().unwrap();
    deferred.merge_into(&mut grads).unwrap();
    let (theirs, _) = composite(x.as_tensor(), &block).unwrap();
    let loss = (theirs.sum_all().unwrap() + w.as_tensor().sum_all().unwrap()).unwrap();
    let reference = loss.backward().unwrap();
    // conv1 and conv2 share `w`, as bn1 and bn2 share their weights: three contributions each.
    for (name, var) in [("w", &w), ("gamma", &g), ("beta", &b)] {
        let err = max_rel(name, grads.get(var).unwrap(), reference.get(var).unwrap());
        assert!(err < 1e-4, "{name}: {err}");
    }
}

/// The evaluation-mode block on plain tensors (a teacher's) against the same block from
/// `conv2d`, `batch_norm_eval`, candle's addition and ReLU, with the identity shortcut and with
/// a strided projection (7x7 outputs, the pixel-major convolution); tracked operands and
/// running statistics of the wrong size are declined or refused.
#[test]
fn eval_block_matches_separate_ops_and_declines_tracked_operands() {
    use at_kernels::{basic_block_eval, batch_norm_eval};
    for (c_in, c_out, stride, hw) in [(8, 8, 1, 8), (16, 32, 2, 14), (5, 7, 1, 6)] {
        let t = |shape: &[usize], seed: f64, scale: f64| {
            values(shape, seed, scale).as_tensor().detach()
        };
        let x = t(&[3, c_in, hw, hw], 1.0, 1.0);
        let (w1, w2, wd) = (
            t(&[c_out, c_in, 3, 3], 2.0, 0.3),
            t(&[c_out, c_out, 3, 3], 3.0, 0.3),
            t(&[c_out, c_in, 1, 1], 4.0, 0.3),
        );
        let norm = |seed: f64| {
            let var = (t(&[c_out], seed + 3.0, 0.4).abs().unwrap() + 0.5).unwrap();
            (
                t(&[c_out], seed, 0.5),
                t(&[c_out], seed + 1.0, 0.2),
                t(&[c_out], seed + 2.0, 0.3),
                var,
            )
        };
        let (n1, n2, nd) = (norm(10.0), norm(20.0), norm(30.0));
        let projection = stride != 1 || c_in != c_out;
        let block = BasicBlock {
            conv1: &w1,
            bn1: (&n1.0, &n1.1),
            conv2: &w2,
            bn2: (&n2.0, &n2.1),
            downsample: projection.then_some((&wd, (&nd.0, &nd.1))),
            stride,
            eps: 1e-5,
            frozen: None,
        };
        let mut running = vec![(&n1.2, &n1.3), (&n2.2, &n2.3)];
        if projection {
            running.push((&nd.2, &nd.3));
        }
        let ours = basic_block_eval(&x, &block, &running).unwrap().expect("plain f32 tensors fuse");
        let eval = |x: &Tensor, n: &(Tensor, Tensor, Tensor, Tensor), relu: bool| {
            batch_norm_eval(x, &n.0, &n.1, &n.2, &n.3, 1e-5, relu).unwrap().unwrap()
        };
        let y1 = eval(&conv2d(&x, &w1, stride, 1).unwrap(), &n1, true);
        let y2 = eval(&conv2d(&y1, &w2, 1, 1).unwrap(), &n2, false);
        let shortcut = if projection {
            eval(&conv2d(&x, &wd, stride, 0).unwrap(), &nd, false)
        } else {
            x.clone()
        };
        let theirs = (y2 + shortcut).unwrap().relu().unwrap();
        let tag = format!("{c_in}->{c_out} stride {stride}, {hw}x{hw}");
        assert!(max_rel(&tag, &ours, &theirs) < 1e-5, "{tag}");
        // A tracked input (a student's) is left to separate ops.
        let tracked = Var::from_tensor(&x).unwrap();
        assert!(
            basic_block_eval(tracked.as_tensor(), &block, &running).unwrap().is_none(),
            "{tag}"
        );
        let err = basic_block_eval(&x, &block, &running[..1]).unwrap_err().to_string();
        assert!(err.contains("running statistics"), "{err}");
    }
}

/// Frozen batch norms (fine-tuning: the running statistics, no gradient to gamma and beta)
/// against the same blocks from `conv2d`, `batch_norm_eval`, candle's addition and ReLU: output,
/// and the gradients of the input and of every convolution; the batch norms' weights and biases
/// get none; a strided block with a projection, then an identity block.
#[test]
fn fused_layer_with_frozen_batch_norms_matches_separate_ops() {
    use at_kernels::batch_norm_eval;
    let x = values(&[3, 6, 9, 9], 1.0, 1.0);
    let c = 8;
    let norm = |seed: f64| {
        let t = |s: f64, scale: f64| values(&[c], s, scale).as_tensor().detach();
        (
            t(seed, 0.5),
            t(seed + 1.0, 0.2),
            t(seed + 2.0, 0.3),
            (t(seed + 3.0, 0.4).abs().unwrap() + 0.5).unwrap(),
        )
    };
    let (w1, w2, wd) = (
        values(&[c, 6, 3, 3], 2.0, 0.3),
        values(&[c, c, 3, 3], 3.0, 0.3),
        values(&[c, 6, 1, 1], 4.0, 0.3),
    );
    let (w3, w4) = (values(&[c, c, 3, 3], 5.0, 0.3), values(&[c, c, 3, 3], 6.0, 0.3));
    let norms: Vec<_> = (0..5).map(|i| norm(10.0 * (i + 1) as f64)).collect();
    let gammas: Vec<Var> = norms.iter().map(|n| Var::from_tensor(&n.0).unwrap()).collect();
    let running: Vec<Vec<(&Tensor, &Tensor)>> = vec![
        norms[..3].iter().map(|n| (&n.2, &n.3)).collect(),
        norms[3..].iter().map(|n| (&n.2, &n.3)).collect(),
    ];
    let blocks = [
        BasicBlock {
            conv1: w1.as_tensor(),
            bn1: (gammas[0].as_tensor(), &norms[0].1),
            conv2: w2.as_tensor(),
            bn2: (gammas[1].as_tensor(), &norms[1].1),
            downsample: Some((wd.as_tensor(), (gammas[2].as_tensor(), &norms[2].1))),
            stride: 2,
            eps: 1e-5,
            frozen: Some(&running[0]),
        },
        BasicBlock {
            conv1: w3.as_tensor(),
            bn1: (gammas[3].as_tensor(), &norms[3].1),
            conv2: w4.as_tensor(),
            bn2: (gammas[4].as_tensor(), &norms[4].1),
            downsample: None,
            stride: 1,
            eps: 1e-5,
            frozen: Some(&running[1]),
        },
    ];
    let deferred = ParamGrads::new();
    let (ours, _) = basic_blocks_train(x.as_tensor(), &blocks, &deferred).unwrap().expect("fused");
    let eval = |z: &Tensor, n: &(Tensor, Tensor, Tensor, Tensor), relu: bool| {
        batch_norm_eval(z, &n.0, &n.1, &n.2, &n.3, 1e-5, relu).unwrap().unwrap()
    };
    let block = |x: &Tensor,
                 w1: &Tensor,
                 w2: &Tensor,
                 n: &[(Tensor, Tensor, Tensor, Tensor)],
                 wd: Option<&Tensor>,
                 s: usize| {
        let y1 = eval(&conv2d(x, w1, s, 1).unwrap(), &n[0], true);
        let y2 = eval(&conv2d(&y1, w2, 1, 1).unwrap(), &n[1], false);
        let shortcut = match wd {
            Some(wd) => eval(&conv2d(x, wd, s, 0).unwrap(), &n[2], false),
            None => x.clone(),
        };
        (y2 + shortcut).unwrap().relu().unwrap()
    };
    let y =
        block(x.as_tensor(), w1.as_tensor(), w2.as_tensor(), &norms[..3], Some(wd.as_tensor()), 2);
    let theirs = block(&y, w3.as_tensor(), w4.as_tensor(), &norms[3..], None, 1);
    assert!(max_rel("frozen output", &ours, &theirs) < 1e-5);
    let r = values(theirs.dims(), 99.0, 1.0);
    let mut grads_ours = (ours * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    deferred.merge_into(&mut grads_ours).unwrap();
    let grads_theirs = (theirs * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("x", &x), ("w1", &w1), ("w2", &w2), ("wd", &wd), ("w3", &w3), ("w4", &w4)]
    {
        let err = max_rel(name, grads_ours.get(var).expect(name), grads_theirs.get(var).unwrap());
        assert!(err < 1e-4, "frozen: gradient of {name} differs by {err}");
    }
    for gamma in &gammas {
        assert!(grads_ours.get(gamma).is_none(), "a frozen batch norm's weight took a gradient");
    }
}
