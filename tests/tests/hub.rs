//! Publishing to the Hugging Face Hub and loading back, against a fake Hub on 127.0.0.1 started
//! by each test: the weights come back byte-identical with the same test accuracy, the card's
//! YAML holds the measured accuracy, a second publish is a second commit, a bad token and a
//! failing Hub give clear errors, and a dry run sends nothing.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use at_data::hub::HubOptions;
use at_fake_hub::FakeHub;
use at_hub::publish::{PublishOptions, publish};
use at_trainer::train::{RunModel, RunResult, train};
use candle_core::{Device, Tensor};
use common::{config, quiet, write_dataset};

const TOKEN: &str = "hf_fake_write_token_0123456789";

/// A finished one-epoch run on generated data: (data dir, run dir), kept alive by the guard.
fn tiny_run(root: &Path) -> (PathBuf, PathBuf) {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_dataset(&data, "train", 64, 3);
    write_dataset(&data, "t10k", 32, 4);
    let run = root.join("run");
    let config = at_trainer::config::RunConfig { epochs: 1, ..config(&data) };
    train(&config, &run, &quiet()).unwrap();
    (data, run)
}

/// A finished tiny run, a fake Hub and an empty cache, for one test.
struct Setup {
    root: tempfile::TempDir,
    data: PathBuf,
    run: PathBuf,
    hub: FakeHub,
    cache: PathBuf,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let (data, run) = tiny_run(root.path());
    let cache = root.path().join("cache");
    Setup { data, run, hub: FakeHub::start(TOKEN), cache, root }
}

fn hub_options(hub: &FakeHub, cache: &Path, token: Option<&str>) -> HubOptions {
    HubOptions {
        endpoint: Some(hub.url.clone()),
        token: token.map(String::from),
        cache_dir: Some(cache.to_path_buf()),
        offline: false,
        attempts: 3,
        chunk_bytes: 0,
    }
}

fn options(hub: &FakeHub, cache: &Path, repo: &str) -> PublishOptions {
    PublishOptions {
        repo: repo.into(),
        private: false,
        revision: None,
        dry_run: false,
        hub: hub_options(hub, cache, Some(TOKEN)),
    }
}

fn result(run: &Path) -> RunResult {
    serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn a_published_run_loads_back_identical_with_the_same_accuracy_and_a_card() {
    let Setup { root, data, run, hub, cache } = setup();
    let repo = "someone/wrn-16-1-fmnist";
    let publication =
        publish(&run, &options(&hub, &cache, repo), &root.path().join("staged")).unwrap();
    let committed = publication.committed.unwrap();
    assert!(committed.oid.is_some());
    let requests = hub.log();
    let posts: Vec<_> = requests.iter().filter(|r| r.method == "POST").collect();
    assert!(posts.len() >= 4, "create, preupload, LFS batch, commit: {requests:?}");
    let bearer = format!("Bearer {TOKEN}");
    assert!(posts.iter().all(|r| r.authorization.as_deref() == Some(bearer.as_str())));
    let published = hub.repo(repo).expect("the repository was created");
    assert_eq!(published.commits.len(), 1, "one commit");

    // The weights and the figures went to LFS storage, through the pre-signed URLs (which
    // never see the token); only text went inline.
    let commit = &published.commits[0];
    assert!(commit.lfs.contains(&"model.safetensors".to_owned()), "{commit:?}");
    assert!(commit.lfs.iter().any(|f| f.ends_with(".png")), "{commit:?}");
    assert!(
        commit.inline.iter().all(|f| f.ends_with(".md")
            || f.ends_with(".json")
            || f.ends_with(".jsonl")
            || f.ends_with(".toml")),
        "{commit:?}"
    );
    assert_eq!(committed.uploaded, commit.lfs);
    assert_eq!(hub.count("POST", ".git/info/lfs/objects/batch"), 1, "{requests:?}");
    let puts: Vec<_> = requests.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), commit.lfs.len(), "{requests:?}");
    assert!(puts.iter().all(|r| r.authorization.is_none()), "{puts:?}");
    for file in [
        "model.safetensors",
        "config.json",
        "README.md",
        "training/config.toml",
        "training/metrics.jsonl",
        "training/result.json",
    ] {
        assert!(
            published.files.contains_key(file),
            "{file} published: {:?}",
            published.files.keys()
        );
    }
    assert!(published.files.keys().any(|f| f.starts_with("figures/")), "the attention maps");
    let sent: Vec<&String> = publication.files.iter().map(|f| &f.path).collect();
    assert_eq!(sent, published.files.keys().collect::<Vec<_>>(), "what was listed was sent");

    // The weights come back byte for byte, in a model built from config.json.
    let loaded =
        at_hub::from_hub_with(repo, &hub_options(&hub, &cache, None), &Device::Cpu).unwrap();
    assert_eq!(loaded.config.at_model, "wrn-16-1");
    assert_eq!((loaded.config.num_classes, loaded.config.in_chans), (10, 1));
    assert_eq!(loaded.config.attention_points, ["group0", "group1", "group2"]);
    let original = tensors(&run.join("model.safetensors"));
    let data_lock = loaded.varmap.data().lock().unwrap();
    assert_eq!(data_lock.len(), original.len());
    for (name, var) in data_lock.iter() {
        let (a, b) =
            (var.as_tensor().flatten_all().unwrap(), original[name].flatten_all().unwrap());
        let bits = |t: &Tensor| {
            t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(&a), bits(&b), "{name}");
    }
    drop(data_lock);

    // The published run evaluates to the accuracy its result.json records.
    let (config, dir) =
        at_hub::published_run(repo, &hub_options(&hub, &cache, None), Some(&data)).unwrap();
    let (_, top1, top5) = RunModel::open(config, &dir).unwrap().evaluate().unwrap();
    let measured = result(&run);
    assert_eq!((top1, top5), (measured.test_top1, measured.test_top5));

    // The card: YAML front matter that parses and holds that accuracy.
    let card = String::from_utf8(hub.file(repo, "README.md").unwrap()).unwrap();
    let yaml = card.strip_prefix("---\n").unwrap().split("\n---\n").next().unwrap();
    let front: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(front["library_name"].as_str(), Some("attention-transfer"));
    let tags: Vec<&str> =
        front["tags"].as_sequence().unwrap().iter().filter_map(|t| t.as_str()).collect();
    for tag in ["image-classification", "candle", "attention-transfer"] {
        assert!(tags.contains(&tag), "{tags:?}");
    }
    let metrics = &front["model-index"][0]["results"][0]["metrics"];
    let top1_card = metrics[0]["value"].as_f64().unwrap();
    assert!(
        (top1_card - measured.test_top1).abs() < 0.006,
        "{top1_card} vs {}",
        measured.test_top1
    );
    assert!(card.contains("at-train train --config training/config.toml"), "{card}");
    assert!(!card.contains(TOKEN));
    for file in published.files.keys() {
        let bytes = hub.file(repo, file).unwrap();
        assert!(!bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()), "{file}");
    }

    // The weights say they are PyTorch's, as timm's and transformers' writers mark theirs.
    let weights = hub.file(repo, "model.safetensors").unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt", "{header}");

    // Offline, the cached copy is enough.
    let offline = HubOptions { offline: true, ..hub_options(&hub, &cache, None) };
    let before = hub.request_count();
    at_hub::from_hub_with(repo, &offline, &Device::Cpu).unwrap();
    assert_eq!(hub.request_count(), before, "offline: no request");
}

#[test]
fn publishing_again_is_a_second_commit_and_a_dry_run_sends_nothing() {
    let Setup { root, run, hub, cache, .. } = setup();
    let repo = "someone/again";

    let dry = PublishOptions { dry_run: true, ..options(&hub, &cache, repo) };
    let staged = root.path().join("dry");
    let publication = publish(&run, &dry, &staged).unwrap();
    assert_eq!(publication.committed, None);
    assert_eq!(hub.request_count(), 0, "a dry run sends nothing");
    for f in &publication.files {
        let bytes = std::fs::read(staged.join(&f.path)).unwrap();
        assert_eq!(bytes.len() as u64, f.size, "{}", f.path);
        assert_eq!(f.sha256.len(), 64);
    }
    // No token is needed for a dry run.
    let no_token = PublishOptions { hub: hub_options(&hub, &cache, None), ..dry.clone() };
    publish(&run, &no_token, &staged).unwrap();
    assert_eq!(hub.request_count(), 0);

    let first = publish(&run, &options(&hub, &cache, repo), &root.path().join("s1")).unwrap();
    let uploads = hub.count("PUT", "/lfs-storage/");
    let again = publish(&run, &options(&hub, &cache, repo), &root.path().join("s2")).unwrap();
    let (first, again) = (first.committed.unwrap(), again.committed.unwrap());
    assert!(!first.uploaded.is_empty());
    assert!(again.uploaded.is_empty(), "the same bytes are not sent again: {again:?}");
    assert_eq!(again.already_stored, first.uploaded);
    assert_eq!(hub.count("PUT", "/lfs-storage/"), uploads, "no upload the second time");
    let state = hub.state();
    assert_eq!(state.repos.len(), 1, "one repository");
    assert_eq!(state.repos[repo].commits.len(), 2, "two commits");
}

#[test]
fn a_missing_or_wrong_token_is_named_and_never_printed() {
    let Setup { root, run, hub, cache, .. } = setup();

    let none =
        PublishOptions { hub: hub_options(&hub, &cache, None), ..options(&hub, &cache, "a/b") };
    let err = format!("{:#}", publish(&run, &none, &root.path().join("s")).unwrap_err());
    assert!(err.contains("no Hugging Face token") && err.contains("HF_TOKEN"), "{err}");
    assert_eq!(hub.request_count(), 0, "refused before any request");

    let wrong_token = "hf_wrong_token_abcdef";
    let wrong = PublishOptions {
        hub: hub_options(&hub, &cache, Some(wrong_token)),
        ..options(&hub, &cache, "a/b")
    };
    let err = format!("{:#}", publish(&run, &wrong, &root.path().join("s")).unwrap_err());
    assert!(err.contains("401") && err.contains("missing or wrong"), "{err}");
    assert!(!err.contains(wrong_token), "the token is not printed: {err}");
}

#[test]
fn a_failing_hub_is_retried_a_bounded_number_of_times_then_reported() {
    let Setup { root, run, hub, cache, .. } = setup();
    let count = |part: &str| hub.count("POST", part);

    // One 503: retried, then it succeeds.
    hub.fail("/preupload/", 503, 1);
    publish(&run, &options(&hub, &cache, "a/flaky"), &root.path().join("s1")).unwrap();
    assert_eq!(count("/preupload/"), 2);

    // Always 503: three attempts (the options' bound), then an error that says what failed.
    hub.fail("/preupload/", 503, 1000);
    let err = format!(
        "{:#}",
        publish(&run, &options(&hub, &cache, "a/down"), &root.path().join("s2")).unwrap_err()
    );
    assert_eq!(count("/preupload/"), 2 + 3, "{err}");
    assert!(err.contains("a/down") && err.contains("503"), "{err}");
}

#[test]
fn an_unfinished_run_is_refused_with_the_reason() {
    let Setup { root, run, hub, cache, .. } = setup();
    std::fs::remove_file(run.join("result.json")).unwrap();
    let err = format!(
        "{:#}",
        publish(&run, &options(&hub, &cache, "a/b"), &root.path().join("s")).unwrap_err()
    );
    assert!(err.contains("has not finished") && err.contains("--resume"), "{err}");
    assert_eq!(hub.request_count(), 0);
}

/// Set in the child process of the `hf://` test: `DATA_DIR|OUT_DIR`.
const CHILD: &str = "AT_TEST_HUB_CHILD";

#[test]
fn configs_and_commands_take_published_models_as_hf_names() {
    if let Ok(dirs) = std::env::var(CHILD) {
        // The child: HF_ENDPOINT and HF_HUB_CACHE point at the fake Hub and a fresh cache, as a
        // user's environment would.
        let (data, out) = dirs.split_once('|').unwrap();
        let (data, out) = (Path::new(data), Path::new(out));
        let mut student = at_trainer::config::RunConfig { epochs: 1, ..config(data) };
        student.teacher = Some(at_trainer::config::TeacherConfig {
            model: "wrn-16-1".into(),
            checkpoint: "hf://someone/teacher".into(),
        });
        student.loss.beta = 1e3;
        student.pretrained = "hf://someone/teacher".into();
        // The binary hands the trainer at-hub's resolver; without it hf:// is refused.
        let err = format!("{:#}", train(&student, &out.join("refused"), &quiet()).unwrap_err());
        assert!(err.contains("pass RunOptions::resolve_weights"), "{err}");
        let resolve = Some(at_hub::resolver(|_| at_data::hub::silent()));
        let options = at_trainer::train::RunOptions { resolve_weights: resolve, ..quiet() };
        train(&student, &out.join("student"), &options).unwrap();
        let name = Path::new("hf://someone/teacher");
        let (config, dir) = at_hub::open_run(name, Some(data)).unwrap();
        let (_, top1, _) = RunModel::open(config.clone(), &dir).unwrap().evaluate().unwrap();
        println!("child: evaluated top-1 {top1}");
        let source = at_trainer::maps::Source::TestItems(vec![0]);
        let maps =
            at_trainer::maps::write_maps_of(config, &dir, source, &out.join("maps")).unwrap();
        assert_eq!(maps.len(), 1);
        return;
    }
    let Setup { root, data, run, hub, cache } = setup();
    let repo = "someone/teacher";
    publish(&run, &options(&hub, &cache, repo), &root.path().join("s")).unwrap();

    let out = root.path().join("child");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "configs_and_commands_take_published_models_as_hf_names"])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{}|{}", data.display(), out.display()))
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", root.path().join("child-cache"))
        .env("HF_HOME", root.path().join("hf-home"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(child.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&child.stderr));
    let top1 = result(&run).test_top1;
    assert!(stdout.contains(&format!("child: evaluated top-1 {top1}")), "{stdout}");
    assert!(out.join("student/result.json").is_file(), "the student trained from hf:// weights");
    let requests = hub.log();
    // At the commit the file's metadata named (downloads are ranged and pinned to it).
    let fetched = |file: &str| {
        requests.iter().any(|r| {
            let at = r.path.strip_prefix(&format!("/{repo}/resolve/"));
            r.method == "GET" && at.is_some_and(|at| at.split_once('/').unwrap().1 == file)
        })
    };
    assert!(fetched("model.safetensors") && fetched("training/config.toml"), "{requests:?}");
}
