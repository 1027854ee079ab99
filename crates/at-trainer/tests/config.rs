//! Run configs: every preset is valid, the TOML round-trips with every key, and unknown keys or
//! values are errors that say what is known.

use at_trainer::config::GradientKind;
use at_trainer::config::{LossSection, PRESETS, RunConfig, resolve};

#[test]
fn every_preset_is_a_valid_config_and_round_trips_through_toml() {
    for preset in PRESETS {
        let name = preset.name;
        let config = RunConfig::preset(name).unwrap();
        config.validate().unwrap_or_else(|e| panic!("preset {name}: {e:#}"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, config.to_toml()).unwrap();
        assert_eq!(RunConfig::load(&path).unwrap(), config, "preset {name}");
    }
    let imagenet_at = RunConfig::preset("imagenet-at").unwrap();
    assert_eq!(imagenet_at.loss.pairs, vec![[2, 2], [3, 3]]);
    assert_eq!((imagenet_at.optim.weight_decay, imagenet_at.batch_size), (1e-4, 256));
}

#[test]
fn the_default_is_the_authors_cifar_recipe_with_every_key_written() {
    let text = RunConfig::default().to_toml();
    for key in [
        "student",
        "epochs = 200",
        "batch_size = 128",
        "lr = 0.1",
        "momentum = 0.9",
        "weight_decay = 0.0005",
        "milestones = [",
        "gamma = 0.2",
        "temperature = 4.0",
        "# [teacher]",
    ] {
        assert!(text.contains(key), "{key} missing from\n{text}");
    }
}

#[test]
fn unknown_keys_and_values_are_errors_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "student = \"wrn-16-1\"\nepochz = 3\n").unwrap();
    let err = format!("{:#}", RunConfig::load(&path).unwrap_err());
    assert!(err.contains("typo.toml") && err.contains("epochz"), "{err}");

    let err = format!("{:#}", resolve(None, None, &["optim.lr_decay=0.1".into()]).unwrap_err());
    assert!(err.contains("unknown config key `optim.lr_decay`"), "{err}");
    let err = format!("{:#}", resolve(None, None, &["data.dataset=mnist".into()]).unwrap_err());
    assert!(err.contains("unknown variant `mnist`") && err.contains("`cifar10`"), "{err}");
    let err = format!(
        "{:#}",
        resolve(None, Some("cifar-at-kd"), &["teacher.model=wrn-28-10".into()]).unwrap_err()
    );
    assert!(err.contains("unknown model `wrn-28-10`") && err.contains("wrn-40-2"), "{err}");
    let err = format!("{:#}", resolve(None, Some("nope"), &[]).unwrap_err());
    assert!(err.contains("unknown preset `nope`") && err.contains("cifar-at"), "{err}");
    let err = format!("{:#}", resolve(None, None, &["loss.beta=1000".into()]).unwrap_err());
    assert!(err.contains("no [teacher]"), "{err}");
    // A teacher key by key on a config without one: both keys, in any order.
    let sets = ["teacher.checkpoint=t.safetensors", "teacher.model=wrn-16-2", "loss.beta=1000"];
    let with = resolve(None, Some("quick"), &sets.map(String::from)).unwrap();
    let teacher = with.teacher.unwrap();
    assert_eq!(
        (teacher.model.as_str(), teacher.checkpoint.to_str()),
        ("wrn-16-2", Some("t.safetensors"))
    );
    let err = format!(
        "{:#}",
        resolve(None, Some("quick"), &["teacher.model=wrn-16-2".into()]).unwrap_err()
    );
    assert!(err.contains("--set teacher.checkpoint=... is needed too"), "{err}");

    let config = resolve(
        None,
        Some("quick"),
        &["epochs=3".into(), "loss.distance=\"paper\"".into(), "optim.milestones=[1, 2]".into()],
    )
    .unwrap();
    assert_eq!(
        (config.epochs, config.loss.distance.as_str(), config.optim.milestones.clone()),
        (3, "paper", vec![1, 2])
    );
}

#[test]
fn gradient_penalty_keys_are_checked() {
    let jacobian = RunConfig::preset("nin-jacobian").unwrap();
    assert_eq!(jacobian.student, "nin-thin-nobn");
    assert_eq!((jacobian.optim.weight_decay, jacobian.data.augment.as_str()), (0.0, "flip"));
    assert_eq!(jacobian.loss.gradient_chunks, 2);
    let at = RunConfig::preset("nin-gradient-at").unwrap();
    assert_eq!(at.teacher.as_ref().unwrap().model, "nin-wide-nobn");

    let with = |loss: LossSection, teacher: bool| {
        let config = RunConfig {
            loss,
            teacher: teacher.then(|| at.teacher.clone().unwrap()),
            ..RunConfig::default()
        };
        config.validate().map_err(|e| format!("{e:#}"))
    };
    let err =
        with(LossSection { gradient: GradientKind::Transfer, ..LossSection::default() }, false)
            .unwrap_err();
    assert!(err.contains("no [teacher]"), "{err}");
    let both =
        LossSection { gradient: GradientKind::Jacobian, beta: 1e3, ..LossSection::default() };
    let err = with(both, true).unwrap_err();
    assert!(err.contains("set loss.beta = 0"), "{err}");
    let err = with(
        LossSection {
            gradient: GradientKind::Jacobian,
            gradient_beta: -1.0,
            ..LossSection::default()
        },
        false,
    )
    .unwrap_err();
    assert!(err.contains("loss.gradient_beta must be a finite number >= 0, not -1"), "{err}");
    let err = with(
        LossSection {
            gradient: GradientKind::Jacobian,
            gradient_chunks: 0,
            ..LossSection::default()
        },
        false,
    )
    .unwrap_err();
    assert!(err.contains("gradient_chunks must be at least 1"), "{err}");
}

/// Every enumerated value is parsed once, when the config is read: a wrong one is an error that
/// names the key and every valid value, before any work.
#[test]
fn bad_enumerated_values_are_refused_with_the_valid_values_named() {
    let cases: [(&str, &[&str]); 9] = [
        ("device=gpu", &["`cpu`", "`cuda:N`", "`metal`"]),
        ("loss.map_reduce=median", &["`sum`", "`mean`", "`max`"]),
        ("loss.norm=l3", &["`l2`", "`l1`", "`none`"]),
        ("loss.distance=euclid", &["`code`", "`paper`"]),
        ("loss.resize=nearest", &["`area`", "`bilinear`"]),
        ("loss.gradient=hessian", &["`none`", "`jacobian`", "`symmetry`", "`transfer`"]),
        ("optim.schedule=step", &["`multistep`", "`cosine`", "`constant`"]),
        ("data.augment=mixup", &["`standard`", "`flip`", "`none`"]),
        ("data.dataset=mnist", &["`fashion-mnist-subset`", "`cifar10`", "`imagenet-parquet`"]),
    ];
    for (set, valid) in cases {
        let err = format!("{:#}", resolve(None, None, &[set.into()]).unwrap_err());
        let (key, value) = set.split_once('=').unwrap();
        let field = key.rsplit('.').next().unwrap();
        let unknown = [format!("unknown variant `{value}`"), format!("unknown device `{value}`")];
        assert!(unknown.iter().any(|u| err.contains(u)), "{set}: {err}");
        assert!(err.starts_with(&format!("--set {set}: ")), "{set}: names the override: {err}");
        assert!(!err.contains("error at line"), "{set}: no line of a generated document: {err}");
        assert!(err.contains(field), "{set}: the error names the key: {err}");
        for v in valid {
            assert!(err.contains(v), "{set}: the error names {v}: {err}");
        }
    }
}

/// Numbers outside their range are refused before any work, naming key, value and range.
#[test]
fn numbers_out_of_range_are_refused_with_key_value_and_range() {
    let cases = [
        ("optim.lr=-1", "optim.lr must be a finite number > 0, not -1"),
        ("optim.lr=0", "optim.lr must be a finite number > 0, not 0"),
        ("optim.momentum=1.5", "optim.momentum must be a number in [0, 1), not 1.5"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number >= 0"),
        ("loss.beta=nan", "loss.beta must be a finite number >= 0, not NaN"),
        ("loss.alpha=2", "loss.alpha must be a number in [0, 1], not 2"),
        ("loss.temperature=0", "loss.temperature must be a finite number > 0"),
        ("loss.map_p=inf", "loss.map_p must be a finite number > 0, not inf"),
        ("loss.distance_p=0.5", "loss.distance_p must be a finite number >= 1"),
    ];
    for (set, want) in cases {
        let err = format!("{:#}", resolve(None, None, &[set.into()]).unwrap_err());
        assert!(err.contains(want), "{set}: {err}");
    }
}

/// `data.side` is Fashion-MNIST's: a side that would crop its images, or any side on another
/// dataset, is refused naming the key; 28 and 32 are taken.
#[test]
fn an_input_side_is_for_fashion_mnist_and_never_crops_it() {
    let cases = [
        (vec!["data.side=20"], Some("data.side = 20 would crop Fashion-MNIST's 28x28 images")),
        (
            vec!["data.side=32", "data.dataset=\"cifar10\""],
            Some("data.side = 32 is for Fashion-MNIST"),
        ),
        (vec!["data.side=28"], None),
        (vec!["data.side=32", "data.dataset=\"fashion-mnist\""], None),
    ];
    for (sets, want) in cases {
        let sets: Vec<String> = sets.into_iter().map(String::from).collect();
        let config = resolve(None, None, &sets).and_then(|c| c.validate().map(|()| c));
        match want {
            Some(want) => {
                let err = format!("{:#}", config.unwrap_err());
                assert!(err.contains(want), "{sets:?}: {err}");
            }
            None => assert!(config.is_ok(), "{sets:?}: {:#}", config.unwrap_err()),
        }
    }
}

#[test]
fn devices_parse_and_print_as_written() {
    use at_trainer::config::DeviceSpec;
    for (text, device) in
        [("cpu", DeviceSpec::Cpu), ("cuda:1", DeviceSpec::Cuda(1)), ("metal", DeviceSpec::Metal)]
    {
        assert_eq!(text.parse::<DeviceSpec>().unwrap(), device);
        assert_eq!(device.to_string(), text);
    }
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    let config = resolve(None, None, &["device=\"cuda:2\"".into()]).unwrap();
    assert_eq!(config.device, DeviceSpec::Cuda(2));
    assert!(config.to_toml().contains("device = \"cuda:2\""));
}

/// Values that parse and are in range but cannot mean anything are refused before any work,
/// each with its reason.
#[test]
fn settings_that_cannot_take_effect_are_refused_with_the_reason() {
    let at = RunConfig::preset("cifar-at").unwrap();
    for (sets, want) in [
        (
            vec!["epochs=1", "loss.at_start_epoch=99"],
            "loss.at_start_epoch = 99 (from 0) is not before the run's end (epochs = 1): \
             attention transfer would never start",
        ),
        (vec!["epochs=5", "loss.at_start_epoch=5"], "would never start; use a value below 5"),
        (
            vec!["loss.beta=0", "loss.at_start_epoch=3"],
            "loss.at_start_epoch = 3 starts attention transfer, but loss.beta = 0",
        ),
        (vec!["optim.milestones=[60, 60, 160]"], "optim.milestones must increase"),
    ] {
        let sets: Vec<String> = sets.into_iter().map(String::from).collect();
        let err = format!("{:#}", resolve(None, Some("cifar-at"), &sets).unwrap_err());
        assert!(err.contains(want), "{sets:?}: `{want}` in `{err}`");
    }
    let fine = RunConfig {
        epochs: 100,
        loss: LossSection { at_start_epoch: 60, ..at.loss.clone() },
        ..at
    };
    fine.validate().unwrap();
    let chunks = vec!["batch_size=2".to_owned(), "loss.gradient_chunks=4".to_owned()];
    let err = format!("{:#}", resolve(None, Some("nin-jacobian"), &chunks).unwrap_err());
    assert!(err.contains("loss.gradient_chunks = 4 splits a batch of 2 images"), "{err}");
}
