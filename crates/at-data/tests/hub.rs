//! Downloads against a fake Hugging Face Hub on 127.0.0.1, started by the test: files land in the
//! cache, are reused with the network gone, and a 404 or a truncated body is a clear error.

use std::sync::{Arc, Mutex};

use at_data::Error;
use at_data::hub::{HubOptions, OnProgress, Source, cached, fetch, silent};
use at_fake_hub::{FakeHub, Fault, sha256_hex};

const TOKEN: &str = "hf_test_token";

/// A fake Hub holding `files` in the repository `route` (`datasets/owner/name` for a dataset).
/// Files the Hub keeps in LFS (`.parquet`, `.tgz`, `.safetensors`, ...) have their SHA-256 as
/// `ETag`, as on the real Hub, and every file is served in byte ranges.
fn hub_with(route: &str, files: &[(&str, Vec<u8>)]) -> FakeHub {
    let hub = FakeHub::start(TOKEN);
    for (file, bytes) in files {
        hub.put(route, file, bytes.clone());
    }
    hub
}

/// The byte ranges the GET requests asked for, in order.
fn ranges(hub: &FakeHub) -> Vec<(u64, u64)> {
    hub.log().iter().filter(|r| r.method == "GET").filter_map(|r| r.range).collect()
}

fn options(hub: &FakeHub, cache: &std::path::Path) -> HubOptions {
    HubOptions {
        endpoint: Some(hub.url.clone()),
        token: Some(TOKEN.into()),
        cache_dir: Some(cache.to_path_buf()),
        offline: false,
        attempts: 1,
        chunk_bytes: 4096,
    }
}

#[test]
fn a_download_lands_in_the_cache_and_is_reused_with_the_network_gone() {
    let hub = hub_with(
        "datasets/uoft-cs/cifar10",
        &[
            ("plain_text/train-00000-of-00001.parquet", vec![1; 5000]),
            ("plain_text/test-00000-of-00001.parquet", vec![2; 3000]),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let told = Arc::new(Mutex::new(Vec::<(String, u64, u64)>::new()));
    let record = told.clone();
    let progress: OnProgress =
        Arc::new(move |f: &str, done, total| record.lock().unwrap().push((f.into(), done, total)));
    assert_eq!(cached(&Source::cifar10(), &options(&hub, cache.path())), None);
    let fetched = fetch(&Source::cifar10(), &options(&hub, cache.path()), progress).unwrap();
    let told = told.lock().unwrap().clone();
    let train = "plain_text/train-00000-of-00001.parquet";
    assert_eq!(told[0], (train.to_owned(), 0, 0), "each file is announced as it starts");
    assert!(told.contains(&(train.to_owned(), 5000, 5000)), "bytes are told: {told:?}");
    assert!(told.iter().any(|(f, ..)| f.starts_with("plain_text/test")), "{told:?}");
    assert!(
        fetched.snapshot.starts_with(cache.path().join("datasets--uoft-cs--cifar10")),
        "{:?}",
        fetched.snapshot
    );
    let train = fetched.snapshot.join("plain_text/train-00000-of-00001.parquet");
    assert_eq!(std::fs::read(&train).unwrap(), vec![1; 5000]);
    assert!(
        hub.log().iter().all(|r| r.authorization == Some(format!("Bearer {TOKEN}"))),
        "HF token sent"
    );

    hub.shut_down();
    let before = hub.request_count();
    let offline = HubOptions { offline: true, ..options(&hub, cache.path()) };
    let again = fetch(&Source::cifar10(), &offline, silent()).unwrap();
    assert_eq!(again.files, fetched.files);
    assert_eq!(cached(&Source::cifar10(), &options(&hub, cache.path())), Some(again.snapshot));
    assert_eq!(hub.request_count(), before, "offline means no request");

    let elsewhere = tempfile::tempdir().unwrap();
    let offline_empty = HubOptions { offline: true, ..options(&hub, elsewhere.path()) };
    let err = fetch(&Source::cifar10(), &offline_empty, silent()).unwrap_err();
    assert!(matches!(err, Error::Missing { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let hub = FakeHub::start(TOKEN);
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&Source::cub("someone/cub-mirror"), &options(&hub, cache.path()), silent())
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUB_200_2011.tgz of someone/cub-mirror"), "{err}");
    assert!(err.contains("no such file") || err.contains("no dataset repository"), "{err}");
}

#[test]
fn a_truncated_body_is_a_clear_error() {
    let (route, file) = ("datasets/uoft-cs/cifar10", "plain_text/train-00000-of-00001.parquet");
    let hub = hub_with(route, &[(file, vec![7; 100_000])]);
    hub.fault(route, file, Fault::Truncated);
    let cache = tempfile::tempdir().unwrap();
    let source = Source {
        files: vec!["plain_text/train-00000-of-00001.parquet".into()],
        ..Source::cifar10()
    };
    let err = fetch(&source, &options(&hub, cache.path()), silent()).unwrap_err().to_string();
    assert!(err.contains("train-00000-of-00001.parquet"), "{err}");
    assert!(
        err.contains("expected 100000 bytes, found 50000") || err.contains("cut short"),
        "{err}"
    );
}

#[test]
fn archives_are_unpacked_beside_the_cache() {
    // A CUB mirror with a .tgz holding one file.
    let mut tgz = Vec::new();
    {
        let enc = flate2::write::GzEncoder::new(&mut tgz, flate2::Compression::fast());
        let mut builder = tar::Builder::new(enc);
        let body = b"1 001.Black_footed_Albatross/a.jpg\n";
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, "CUB_200_2011/images.txt", &body[..]).unwrap();
        builder.into_inner().unwrap().finish().unwrap();
    }
    let hub = hub_with("datasets/someone/cub-mirror", &[("CUB_200_2011.tgz", tgz)]);
    let cache = tempfile::tempdir().unwrap();
    let fetched =
        fetch(&Source::cub("someone/cub-mirror"), &options(&hub, cache.path()), silent()).unwrap();
    let unpacked = fetched.unpacked.unwrap();
    let text = std::fs::read_to_string(unpacked.join("CUB_200_2011/images.txt")).unwrap();
    assert!(text.contains("Albatross"));
}

#[test]
fn a_gated_dataset_without_a_token_says_how_to_get_access() {
    let options = HubOptions {
        endpoint: Some("http://127.0.0.1:9".into()),
        attempts: 1,
        ..HubOptions::default()
    };
    let err = fetch(&Source::imagenet(&["data/val_images.tar.gz"]), &options, silent())
        .unwrap_err()
        .to_string();
    assert!(err.contains("ILSVRC/imagenet-1k is gated") && err.contains("HF_TOKEN"), "{err}");
}

#[test]
fn pretrained_resnet_weights_come_from_timms_model_repository() {
    // A model repository: no `datasets/` in the route.
    let hub = hub_with(
        "timm/resnet18.tv_in1k",
        &[
            ("model.safetensors", vec![5; 4096]),
            ("config.json", b"{\"architecture\": \"resnet18\"}".to_vec()),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let source = Source::named("resnet18-imagenet").unwrap();
    let fetched = fetch(&source, &options(&hub, cache.path()), silent()).unwrap();
    assert!(
        fetched.snapshot.starts_with(cache.path().join("models--timm--resnet18.tv_in1k")),
        "{:?}",
        fetched.snapshot
    );
    assert_eq!(std::fs::read(fetched.snapshot.join("model.safetensors")).unwrap(), vec![5; 4096]);

    let err = fetch(&Source::imagenet_resnet(34), &options(&hub, cache.path()), silent())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors of timm/resnet34.tv_in1k"), "{err}");
}

#[test]
fn fashion_mnist_comes_from_zalandos_parquet_copy() {
    let source = Source::named("fashion-mnist").unwrap();
    assert_eq!(source.repo, "zalando-datasets/fashion_mnist");
    let files: Vec<(&str, Vec<u8>)> =
        source.files.iter().map(|f| (f.as_str(), vec![3; 100])).collect();
    let hub = hub_with("datasets/zalando-datasets/fashion_mnist", &files);
    let cache = tempfile::tempdir().unwrap();
    let fetched = fetch(&source, &options(&hub, cache.path()), silent()).unwrap();
    for split in [at_data::Split::Train, at_data::Split::Test] {
        assert!(at_data::mnist::parquet_path(&fetched.snapshot, split).is_file(), "{split:?}");
    }
}

/// A download cut in the middle keeps the ranges it wrote: run again, it asks only for the
/// rest, and the file is whole, checked against its SHA-256 and linked into the snapshot.
#[test]
fn a_download_cut_short_goes_on_from_the_bytes_it_has() {
    let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = "CUB_200_2011.tgz";
    let route = "datasets/someone/cub-mirror";
    let hub = hub_with(route, &[(file, bytes.clone())]);
    hub.fault(route, file, Fault::CutOnceAt(8192));
    let cache = tempfile::tempdir().unwrap();
    let source = Source { unpack: false, ..Source::cub("someone/cub-mirror") };
    let err = fetch(&source, &options(&hub, cache.path()), silent()).unwrap_err().to_string();
    assert!(err.contains("cut short"), "{err}");
    assert_eq!(ranges(&hub), [(0, 4096), (4096, 8192), (8192, 10_000)]);
    let blobs = cache.path().join("datasets--someone--cub-mirror/blobs");
    let part = blobs.join(format!("{}.part", sha256_hex(&bytes)));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 8192, "the two whole ranges are kept");

    let asked = ranges(&hub).len();
    let fetched = fetch(&source, &options(&hub, cache.path()), silent()).unwrap();
    assert_eq!(ranges(&hub)[asked..], [(8192, 10_000)], "only the missing range is asked for");
    assert_eq!(std::fs::read(fetched.snapshot.join(file)).unwrap(), bytes);
    assert!(!part.exists(), "the part became the blob");
    assert_eq!(cached(&source, &options(&hub, cache.path())), Some(fetched.snapshot));
}

/// Bytes whose SHA-256 is not the Hub's ETag are refused, and the partial file goes, so that
/// the next run fetches the file anew.
#[test]
fn bytes_that_do_not_hash_to_the_etag_are_refused_and_dropped() {
    let file = "CUB_200_2011.tgz";
    let route = "datasets/someone/cub-mirror";
    let hub = hub_with(route, &[(file, vec![9; 5000])]);
    hub.fault(route, file, Fault::WrongSha);
    let cache = tempfile::tempdir().unwrap();
    let source = Source { unpack: false, ..Source::cub("someone/cub-mirror") };
    let err = fetch(&source, &options(&hub, cache.path()), silent()).unwrap_err().to_string();
    assert!(err.contains("SHA-256") && err.contains("run the command again"), "{err}");
    let blobs = cache.path().join("datasets--someone--cub-mirror/blobs");
    let left: Vec<_> = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing is left to be taken for the file: {left:?}");
}

// Uploads, against the strict fake Hub: binary files go through LFS storage.

use at_data::hub::{Transfer, Upload, upload};

/// A folder with a binary file the Hub keeps in LFS, a PNG-like binary of no LFS extension, and
/// a text file that goes inline: `(dir, files)`.
fn upload_files(root: &std::path::Path) -> Vec<(String, std::path::PathBuf)> {
    let weights: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 256) as u8).collect();
    let figure = [&b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"[..], &[7; 300]].concat();
    let files = [
        ("model.safetensors", weights),
        ("figures/map.png", figure),
        ("README.md", b"---\nlibrary_name: attention-transfer\n---\n# A model\n".to_vec()),
    ];
    files
        .into_iter()
        .map(|(path, bytes)| {
            let local = root.join(path.replace('/', "_"));
            std::fs::write(&local, bytes).unwrap();
            (path.to_owned(), local)
        })
        .collect()
}

fn commit_of(files: &[(String, std::path::PathBuf)], repo: &str) -> Upload {
    Upload {
        repo: repo.into(),
        private: false,
        revision: None,
        message: "Publish".into(),
        files: files.to_vec(),
    }
}

fn write_options(hub: &FakeHub, token: &str) -> HubOptions {
    HubOptions {
        token: Some(token.into()),
        attempts: 3,
        ..options(hub, std::path::Path::new("/nonexistent"))
    }
}

/// The weights and the figure go to the pre-signed URLs the LFS batch gives (without the
/// token), are verified, and are committed as LFS pointers; only the text goes inline. The
/// files read back byte for byte.
#[test]
fn binary_files_go_through_lfs_storage_and_only_text_goes_inline() {
    let root = tempfile::tempdir().unwrap();
    let files = upload_files(root.path());
    let hub = FakeHub::start(TOKEN);
    let committed =
        upload(&commit_of(&files, "me/x"), &write_options(&hub, TOKEN), silent()).unwrap();
    assert_eq!(committed.transfer, Transfer::Basic);
    assert_eq!(committed.uploaded, ["model.safetensors", "figures/map.png"]);
    assert!(committed.already_stored.is_empty());
    assert!(committed.oid.is_some() && committed.url.is_some());

    let repo = hub.repo("me/x").unwrap();
    let commit = &repo.commits[0];
    assert_eq!(commit.lfs, ["model.safetensors", "figures/map.png"]);
    assert_eq!(commit.inline, ["README.md"], "no binary inline");
    for (path, local) in &files {
        assert_eq!(hub.file("me/x", path).unwrap(), std::fs::read(local).unwrap(), "{path}");
    }
    let log = hub.log();
    assert_eq!(hub.count("POST", ".git/info/lfs/objects/batch"), 1, "{log:?}");
    let puts: Vec<_> = log.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 2, "one upload per object: {log:?}");
    assert!(puts.iter().all(|r| r.authorization.is_none() && r.status == 200), "{puts:?}");
    assert_eq!(hub.count("POST", "/objects/verify"), 2);
    let bearer = format!("Bearer {TOKEN}");
    let posts = log.iter().filter(|r| r.method == "POST");
    assert!(posts.clone().all(|r| r.authorization.as_deref() == Some(bearer.as_str())));
}

/// Publishing the same bytes again sends no object: the batch answer has no actions for them.
#[test]
fn uploading_again_sends_no_stored_object() {
    let root = tempfile::tempdir().unwrap();
    let files = upload_files(root.path());
    let hub = FakeHub::start(TOKEN);
    upload(&commit_of(&files, "me/x"), &write_options(&hub, TOKEN), silent()).unwrap();
    let told = Arc::new(Mutex::new(Vec::<(String, u64, u64)>::new()));
    let record = told.clone();
    let progress: OnProgress =
        Arc::new(move |f: &str, done, total| record.lock().unwrap().push((f.into(), done, total)));
    let again = upload(&commit_of(&files, "me/x"), &write_options(&hub, TOKEN), progress).unwrap();
    assert!(again.uploaded.is_empty(), "{again:?}");
    assert_eq!(again.already_stored, ["model.safetensors", "figures/map.png"]);
    assert_eq!(hub.count("PUT", "/lfs-storage/"), 2, "only the first upload sent objects");
    assert_eq!(hub.repo("me/x").unwrap().commits.len(), 2, "a second commit all the same");
    let size = std::fs::metadata(&files[0].1).unwrap().len();
    assert!(told.lock().unwrap().contains(&("model.safetensors".into(), size, size)));
    // The repository existed: the Hub said so with a 409, which is no error.
    assert!(hub.log().iter().any(|r| r.path == "/api/repos/create" && r.status == 409));
}

/// A storage URL that fails once (a 500) is tried again and the upload goes through; one that
/// keeps failing is reported with the file's name, after the options' attempts.
#[test]
fn an_upload_url_that_fails_once_is_retried() {
    let root = tempfile::tempdir().unwrap();
    let files = upload_files(root.path());
    let hub = FakeHub::start(TOKEN);
    hub.fail("/lfs-storage/", 500, 1);
    upload(&commit_of(&files, "me/x"), &write_options(&hub, TOKEN), silent()).unwrap();
    assert_eq!(hub.count("PUT", "/lfs-storage/"), 3, "two objects, one of them twice");
    assert_eq!(hub.repo("me/x").unwrap().commits[0].lfs.len(), 2);

    hub.fail("/lfs-storage/", 503, 1000);
    let err = upload(&commit_of(&files[..1], "me/y"), &write_options(&hub, TOKEN), silent())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("503") && err.contains("me/y"),
        "{err}"
    );
    assert_eq!(hub.count("PUT", "/lfs-storage/"), 3 + 3, "the options' three attempts");
    assert!(hub.repo("me/y").unwrap().commits.is_empty(), "nothing committed");
}

/// A wrong token is the 401 message, which names the fix and not the token.
#[test]
fn a_wrong_token_is_named_and_never_printed() {
    let root = tempfile::tempdir().unwrap();
    let files = upload_files(root.path());
    let hub = FakeHub::start(TOKEN);
    let wrong = "hf_wrong_token_abcdef";
    let err = upload(&commit_of(&files, "me/x"), &write_options(&hub, wrong), silent())
        .unwrap_err()
        .to_string();
    assert!(err.contains("401") && err.contains("missing or wrong"), "{err}");
    assert!(!err.contains(wrong), "{err}");
}

/// hf-hub alone sends the weights inline when the batch does not choose Xet, and the Hub
/// refuses that: why `upload` has its own LFS transfer. (If a later hf-hub passes this, the
/// layer can go.)
#[test]
fn hf_hub_alone_sends_binaries_inline_which_the_hub_refuses() {
    use hf_hub::repository::{AddSource, CommitOperation};
    let root = tempfile::tempdir().unwrap();
    let files = upload_files(root.path());
    let hub = FakeHub::start(TOKEN);
    let client = hf_hub::HFClientBuilder::new()
        .endpoint(hub.url.clone())
        .token(TOKEN)
        .retry_max_attempts(0)
        .build_sync()
        .unwrap();
    client
        .create_repository()
        .repo_id("me/x")
        .repo_type(hf_hub::repository::RepoTypeModel)
        .send()
        .unwrap();
    let operations = files
        .iter()
        .map(|(path, local)| CommitOperation::Add {
            path_in_repo: path.clone(),
            source: AddSource::File(local.clone()),
        })
        .collect();
    let err = client
        .model("me", "x")
        .create_commit()
        .operations(operations)
        .commit_message("inline")
        .send()
        .unwrap_err()
        .to_string();
    assert!(err.contains(at_fake_hub::INLINE_BINARY_REFUSED), "{err}");
    assert!(hub.repo("me/x").unwrap().commits.is_empty());
}

/// When the batch chooses Xet, hf-hub's Xet path sends the files (here into hf-xet's local CAS,
/// which the fake Hub's write token names) and commits them as LFS pointers; nothing goes to
/// the basic storage, no binary inline.
#[test]
fn the_xet_transfer_goes_through_hf_hubs_xet_path() {
    let root = tempfile::tempdir().unwrap();
    let files = upload_files(root.path());
    let hub = FakeHub::start(TOKEN);
    let cas = root.path().join("cas");
    std::fs::create_dir_all(&cas).unwrap();
    hub.choose_xet(cas.clone());
    let committed =
        upload(&commit_of(&files, "me/x"), &write_options(&hub, TOKEN), silent()).unwrap();
    assert_eq!(committed.transfer, Transfer::Xet);
    let commit = &hub.repo("me/x").unwrap().commits[0];
    assert_eq!(commit.lfs, ["model.safetensors", "figures/map.png"]);
    assert_eq!(commit.inline, ["README.md"]);
    assert_eq!(hub.count("PUT", "/lfs-storage/"), 0);
    assert!(hub.count("GET", "/xet-write-token/") >= 1, "{:?}", hub.log());
    let stored = walk(&cas);
    assert!(!stored.is_empty(), "the CAS holds what was sent");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
