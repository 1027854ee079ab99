//! The `at-train` binary as a user runs it: a device this build lacks is refused before anything
//! is written, with the feature to build with, and the same command on the CPU then trains.

use std::process::Command;

fn at_train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_at-train")).args(args).output().expect("at-train starts")
}

#[test]
fn a_device_this_build_lacks_is_refused_before_the_run_directory_exists() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r");
    let dir_arg = dir.to_str().unwrap();
    let tiny = ["--set", "epochs=1", "--set", "data.train_limit=64", "--set", "data.test_limit=32"];
    let mut args = vec!["train", "--preset", "quick", "--device", "cuda", "--run-dir", dir_arg];
    args.extend(tiny);
    let out = at_train(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot open cuda:0") && stderr.contains("--features cuda"),
        "{stderr}"
    );
    assert!(!dir.exists(), "nothing written: {stderr}");

    let mut args = vec!["train", "--preset", "quick", "--device", "cpu", "--run-dir", dir_arg];
    args.extend(tiny);
    let out = at_train(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(config.contains("device = \"cpu\""), "{config}");
    assert!(dir.join("result.json").is_file());
}
