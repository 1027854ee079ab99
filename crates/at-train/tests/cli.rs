//! The `at-train` binary as a user runs it: a device this build lacks is refused before anything
//! is written, with the feature to build with, and the same command on the CPU then trains; a
//! trained run is published to a Hub as strict as the real one.

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

/// `at-train publish RUN_DIR --repo me/x` against a Hub that keeps the weights and figures in
/// LFS storage: they go there (the Hub refuses them inline), the output says so, and publishing
/// again sends none of them.
#[test]
fn publish_sends_binaries_to_lfs_storage_and_says_so() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r");
    let dir_arg = dir.to_str().unwrap();
    let out = at_train(&[
        "train",
        "--preset",
        "quick",
        "--run-dir",
        dir_arg,
        "--set",
        "epochs=1",
        "--set",
        "data.train_limit=64",
        "--set",
        "data.test_limit=32",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let token = "hf_fake_cli_token_0123456789";
    let hub = at_fake_hub::FakeHub::start(token);
    let publish = || {
        Command::new(env!("CARGO_BIN_EXE_at-train"))
            .args(["publish", dir_arg, "--repo", "me/x"])
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_TOKEN", token)
            .env("HF_HOME", root.path().join("hf-home"))
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .expect("at-train starts")
    };
    let out = publish();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let published = format!("to {}/me/x (", hub.url);
    assert!(stdout.contains("published") && stdout.contains(&published), "{stdout}");
    let line = stdout.lines().find(|l| l.contains("LFS storage through Git LFS's basic transfer"));
    assert!(line.is_some_and(|l| l.contains("model.safetensors sent")), "{stdout}");
    assert!(stderr.contains("sending model.safetensors to the LFS storage of me/x"), "{stderr}");
    assert!(!stdout.contains(token) && !stderr.contains(token));
    let commit = hub.repo("me/x").unwrap().commits[0].clone();
    assert!(commit.lfs.contains(&"model.safetensors".to_owned()), "{commit:?}");

    let out = publish();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(": none sent, figures/test-0.png"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("model.safetensors is in the LFS storage of me/x already"), "{stderr}");
    assert_eq!(hub.repo("me/x").unwrap().commits.len(), 2);
}
