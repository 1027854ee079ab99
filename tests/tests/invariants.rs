//! The invariants ARCHITECTURE.md promises, checked from the manifests (`cargo metadata
//! --no-deps`: no network, no resolution).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Crates through which a device feature must be forwarded.
const DEVICE_CRATES: &[&str] = &[
    "candle-core",
    "candle-nn",
    "at-ops",
    "at-kernels",
    "at-models",
    "at-data",
    "at-losses",
    "at-train",
];
const DEVICE_FEATURES: &[&str] = &["cuda", "cudnn", "metal", "mkl"];
/// Crates that talk to the network.
const NETWORK_CRATES: &[&str] = &["hf-hub", "reqwest", "ureq", "hyper", "tokio"];
/// The only packages allowed to depend on them: the data crate (its `hub` module) and xtask.
const NETWORK_ALLOWED: &[&str] = &["at-data", "xtask"];

fn packages() -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(root)
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"].as_array().unwrap().clone()
}

fn name(package: &Value) -> &str {
    package["name"].as_str().unwrap()
}

/// The names of a package's normal (not dev, not build) dependencies.
fn normal_deps(package: &Value) -> BTreeSet<String> {
    package["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"].is_null())
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn at_ops_depends_on_candle_core_alone() {
    let packages = packages();
    let at_ops = packages.iter().find(|p| name(p) == "at-ops").expect("at-ops is a member");
    assert_eq!(normal_deps(at_ops), BTreeSet::from(["candle-core".to_owned()]));
}

#[test]
fn device_features_are_forwarded_through_every_crate_that_touches_candle() {
    for package in packages() {
        let deps: Vec<String> = normal_deps(&package)
            .into_iter()
            .filter(|d| DEVICE_CRATES.contains(&d.as_str()))
            .collect();
        if deps.is_empty() {
            continue;
        }
        for feature in DEVICE_FEATURES {
            let enables = package["features"][*feature].as_array().unwrap_or_else(|| {
                panic!("{} depends on {deps:?} but has no `{feature}` feature", name(&package))
            });
            for dep in &deps {
                let wanted = format!("{dep}/{feature}");
                assert!(
                    enables.iter().any(|e| e.as_str() == Some(wanted.as_str())),
                    "{}: feature `{feature}` must enable `{wanted}`",
                    name(&package)
                );
            }
        }
    }
}

#[test]
fn only_the_data_crate_and_xtask_touch_the_network() {
    for package in packages() {
        if NETWORK_ALLOWED.contains(&name(&package)) {
            continue;
        }
        let network: Vec<String> = normal_deps(&package)
            .into_iter()
            .filter(|d| NETWORK_CRATES.contains(&d.as_str()))
            .collect();
        assert!(network.is_empty(), "{} depends on network crates {network:?}", name(&package));
    }
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Libraries take a `&Device`; a device is opened in one place only, the trainer's `device`
/// (at-train's `train/mod.rs`), which the binary calls.
#[test]
fn a_device_is_opened_in_one_place_only() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = vec![];
    for krate in std::fs::read_dir(root.join("crates")).unwrap() {
        sources(&krate.unwrap().path().join("src"), &mut files);
    }
    let opening: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            ["Device::new_cuda", "Device::new_metal", "Device::cuda_if_available"]
                .iter()
                .any(|call| text.contains(call))
        })
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert_eq!(opening, ["crates/at-train/src/train/mod.rs"], "files that open a device");
}
