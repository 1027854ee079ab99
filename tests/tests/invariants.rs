//! The invariants ARCHITECTURE.md promises, checked from the manifests and the resolved
//! dependency graph (`cargo metadata --offline`: no network; the graph of this platform, which the
//! build has already fetched).

use std::collections::{BTreeMap, BTreeSet};
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
    "at-dist",
    "at-losses",
    "at-trainer",
    "at-hub",
    "at-repro",
    "at-train",
];
const DEVICE_FEATURES: &[&str] = &["cuda", "cudnn", "metal", "mkl"];
/// Crates that talk to the network.
const NETWORK_CRATES: &[&str] = &["hf-hub", "reqwest", "ureq", "hyper", "tokio"];
/// The only packages allowed to depend on them: the data crate (its `hub` module), xtask, and
/// the tests' fake Hub (a server on 127.0.0.1, a dev-dependency only: see below).
const NETWORK_ALLOWED: &[&str] = &["at-data", "xtask", "at-fake-hub"];

/// The crates only the `at-train` binary (and the test and automation packages) may depend on,
/// directly or through anything else: the command line, the signal handler, progress bars.
const BINARY_ONLY: &[&str] = &["clap", "ctrlc", "indicatif"];
/// Packages that are not libraries: the binary, the workspace tests, xtask.
const NOT_LIBRARIES: &[&str] = &["at-train", "at-tests", "xtask"];

fn metadata(args: &[&str]) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(args)
        .current_dir(root)
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn packages() -> Vec<Value> {
    metadata(&["--no-deps"])["packages"].as_array().unwrap().clone()
}

/// The resolved graph of this platform: each package's name and its normal (not dev, not build)
/// dependencies' names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().expect("rustc runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let host = text.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc names its host");
    let meta = metadata(&["--filter-platform", host]);
    let names: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| {
            let deps = node["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null()))
                .map(|d| names[d["pkg"].as_str().unwrap()].to_owned())
                .collect();
            (names[node["id"].as_str().unwrap()].to_owned(), deps)
        })
        .collect()
}

/// Every package `name` reaches through normal dependencies, itself excluded (nothing for an
/// optional dependency the default features leave out, which the resolved graph lacks: at-dist's
/// `mpi`).
fn closure(graph: &BTreeMap<String, BTreeSet<String>>, name: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = vec![name];
    while let Some(next) = todo.pop() {
        for dep in graph.get(next).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                todo.push(dep);
            }
        }
    }
    seen
}

/// The arrows between the workspace's crates as ARCHITECTURE.md lists them, between its
/// `<!-- arrows -->` markers: `crate -> dep, dep`.
fn documented_arrows() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let block = text.split("<!-- arrows -->").nth(1).expect("ARCHITECTURE.md lists the arrows");
    block
        .lines()
        .filter_map(|l| l.split_once(" -> "))
        .map(|(from, to)| {
            let to = to.split(',').map(|d| d.trim().to_owned()).filter(|d| d != "nothing");
            (from.trim().to_owned(), to.collect())
        })
        .collect()
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
    // Nor does anything reach a crate of ours or candle-nn through candle-core.
    let members: BTreeSet<String> = packages.iter().map(|p| name(p).to_owned()).collect();
    let reached = closure(&graph(), "at-ops");
    let ours: Vec<&String> = reached.iter().filter(|d| members.contains(*d)).collect();
    assert!(ours.is_empty(), "at-ops reaches {ours:?}");
    assert!(!reached.contains("candle-nn"));
}

/// The workspace's crates depend on each other exactly as ARCHITECTURE.md's arrows say, which
/// makes the graph the one drawn there: one direction, no circle.
#[test]
fn the_crates_depend_on_each_other_as_architecture_md_draws_them() {
    let packages = packages();
    let members: BTreeSet<String> = packages.iter().map(|p| name(p).to_owned()).collect();
    let actual: BTreeMap<String, BTreeSet<String>> = packages
        .iter()
        .filter(|p| !["at-tests", "xtask"].contains(&name(p)))
        .map(|p| {
            let ours = normal_deps(p).into_iter().filter(|d| members.contains(d)).collect();
            (name(p).to_owned(), ours)
        })
        .collect();
    assert_eq!(actual, documented_arrows(), "the manifests (left) against ARCHITECTURE.md");
}

/// Only the binary parses arguments, handles signals and draws progress bars: no library reaches
/// those crates, directly or through another dependency.
#[test]
fn only_the_binary_owns_the_command_line_signals_and_progress_bars() {
    let graph = graph();
    for package in packages() {
        if NOT_LIBRARIES.contains(&name(&package)) {
            continue;
        }
        let reached = closure(&graph, name(&package));
        let owned: Vec<&&str> = BINARY_ONLY.iter().filter(|c| reached.contains(**c)).collect();
        assert!(owned.is_empty(), "the library {} reaches {owned:?}", name(&package));
        let direct = normal_deps(&package);
        assert!(!direct.contains("tracing-subscriber"), "{} sets up logging", name(&package));
    }
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

/// A network crate reaches the workspace through at-data (or xtask) only: no other crate of
/// ours depends on one, or on a third-party crate that reaches one.
#[test]
fn only_the_data_crate_and_xtask_touch_the_network() {
    let graph = graph();
    let packages = packages();
    let members: BTreeSet<String> = packages.iter().map(|p| name(p).to_owned()).collect();
    let networked = |dep: &String| {
        NETWORK_CRATES.contains(&dep.as_str())
            || (!members.contains(dep)
                && closure(&graph, dep).iter().any(|d| NETWORK_CRATES.contains(&d.as_str())))
    };
    for package in &packages {
        if NETWORK_ALLOWED.contains(&name(package)) {
            continue;
        }
        let network: Vec<String> = normal_deps(package).into_iter().filter(networked).collect();
        assert!(network.is_empty(), "{} reaches the network through {network:?}", name(package));
    }
    // The fake Hub is for tests: no package depends on it but as a dev-dependency.
    for package in &packages {
        assert!(
            !normal_deps(package).contains("at-fake-hub"),
            "{} needs the fake Hub",
            name(package)
        );
    }
    // The check sees what it must: at-data reaches them.
    assert!(closure(&graph, "at-data").iter().any(|d| NETWORK_CRATES.contains(&d.as_str())));
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
/// (at-trainer's `train/mod.rs`), which the binary calls.
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
    assert_eq!(opening, ["crates/at-trainer/src/train/mod.rs"], "files that open a device");
}
