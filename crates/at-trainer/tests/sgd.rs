//! The optimiser and the schedules against `torch.optim` (`golden/make_golden.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use at_trainer::optim::{Schedule, Sgd, SgdConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};

fn fixtures() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/sgd.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// A VarMap with `fc.weight`, `fc.bias` and a batch-norm buffer, set from the fixture.
fn model(f: &HashMap<String, Tensor>) -> VarMap {
    let varmap = VarMap::new();
    for (name, shape) in
        [("fc.weight", (4, 3).into()), ("fc.bias", 4.into()), ("bn.running_mean", 4.into())]
    {
        varmap
            .get::<candle_core::Shape>(shape, name, Init::Const(0.0), DType::F32, &Device::Cpu)
            .unwrap();
    }
    let data = varmap.data().lock().unwrap();
    data["fc.weight"].set(&f["w0"]).unwrap();
    data["fc.bias"].set(&f["b0"]).unwrap();
    drop(data);
    varmap
}

#[test]
fn sgd_matches_torch_with_momentum_nesterov_weight_decay_and_an_lr_change() {
    let f = fixtures();
    let configs = [
        ("momentum", SgdConfig { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 5e-4 }),
        ("nesterov", SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5e-4 }),
        ("plain", SgdConfig { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 0.0 }),
    ];
    for (tag, config) in configs {
        let varmap = model(&f);
        let mut sgd = Sgd::new(&varmap, config);
        let (w, b, rm) = {
            let data = varmap.data().lock().unwrap();
            (data["fc.weight"].clone(), data["fc.bias"].clone(), data["bn.running_mean"].clone())
        };
        for step in 0..4 {
            if step == 3 {
                sgd.set_lr(0.02);
            }
            // A loss whose gradient is the fixture's: sum(p * g). The buffer gets one too and
            // must still not move.
            let loss = ((w.as_tensor() * &f[&format!("grad{step}.w")]).unwrap().sum_all().unwrap()
                + (b.as_tensor() * &f[&format!("grad{step}.b")]).unwrap().sum_all().unwrap()
                + rm.as_tensor().sum_all().unwrap())
            .unwrap();
            sgd.step(&loss.backward().unwrap()).unwrap();
            let dw = max_diff(w.as_tensor(), &f[&format!("{tag}.step{step}.w")]);
            let db = max_diff(b.as_tensor(), &f[&format!("{tag}.step{step}.b")]);
            assert!(dw < 1e-6 && db < 1e-6, "{tag} step {step}: {dw:e} {db:e}");
        }
        assert_eq!(
            rm.as_tensor().to_vec1::<f32>().unwrap(),
            vec![0.0; 4],
            "{tag}: running stats untouched"
        );
        assert_eq!(sgd.state().len(), if config.momentum > 0.0 { 2 } else { 0 });
    }
}

#[test]
fn restoring_the_momentum_continues_identically() {
    let f = fixtures();
    let config = SgdConfig::default();
    let run = |split: bool| -> Vec<f32> {
        let varmap = model(&f);
        let mut sgd = Sgd::new(&varmap, config);
        let w = varmap.data().lock().unwrap()["fc.weight"].clone();
        for step in 0..4 {
            if split && step == 2 {
                let state = sgd.state().clone();
                sgd = Sgd::new(&varmap, config);
                sgd.load_state(state).unwrap();
            }
            let loss = (w.as_tensor() * &f[&format!("grad{step}.w")]).unwrap().sum_all().unwrap();
            sgd.step(&loss.backward().unwrap()).unwrap();
        }
        w.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_eq!(run(false), run(true));
    let mut sgd = Sgd::new(&model(&f), config);
    let bad = HashMap::from([(
        "fc.weight".to_owned(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    )]);
    assert!(sgd.load_state(bad).unwrap_err().to_string().contains("`fc.weight`"));
}

#[test]
fn schedules_match_torch() {
    let f = fixtures();
    let multistep = Schedule::MultiStep { milestones: vec![60, 120, 160], gamma: 0.2 };
    let cosine = Schedule::Cosine { epochs: 30 };
    for (schedule, key) in [(multistep, "multistep.lr"), (cosine, "cosine.lr")] {
        let reference: Vec<f64> = f[key].to_vec1().unwrap();
        for (epoch, r) in reference.iter().enumerate() {
            let ours = schedule.lr(0.1, epoch);
            assert!((ours - r).abs() < 1e-12, "{key} epoch {epoch}: {ours} vs {r}");
        }
    }
}
