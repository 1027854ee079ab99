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
