//! Downloads against a fake Hugging Face Hub on 127.0.0.1, started by the test: files land in the
//! cache, are reused with the network gone, and a 404 or a truncated body is a clear error.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use at_data::Error;
use at_data::hub::{HubOptions, OnProgress, Source, cached, fetch, silent};

/// How the fake Hub serves one file. Its ETag is the SHA-256 of the bytes, as the Hub's is for
/// files in LFS or Xet storage, and it answers byte ranges (`Range: bytes=a-b`) with 206.
#[derive(Clone)]
enum Serve {
    Whole(Vec<u8>),
    /// Announces the whole length (of the file or range) but sends only the first half, then
    /// hangs up.
    Truncated(Vec<u8>),
    /// As `Whole`, but the first request for a range starting at or after `at` is cut as
    /// `Truncated` cuts, once.
    CutOnce {
        bytes: Vec<u8>,
        at: u64,
        done: Arc<AtomicBool>,
    },
    /// Sends these bytes under the ETag of others.
    WrongSha(Vec<u8>),
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A tiny HTTP/1.1 server that answers hf-hub's `HEAD`/`GET /{route}/resolve/{rev}/{path}`, the
/// route being `datasets/owner/name` for a dataset and `owner/name` for a model.
struct FakeHub {
    url: String,
    requests: Arc<AtomicUsize>,
    /// The byte ranges asked for by GET requests, in order.
    ranges: Arc<Mutex<Vec<(u64, u64)>>>,
    tokens: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
}

impl FakeHub {
    fn start(route: &str, files: HashMap<String, Serve>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let prefix = format!("/{route}/resolve/");
        let (r, t, s, g) = (requests.clone(), tokens.clone(), stop.clone(), ranges.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return; // Dropping the listener: the network is gone.
                }
                let Ok(mut stream) = stream else { continue };
                r.fetch_add(1, Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let (mut token, mut range) = (None, None);
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                        break;
                    }
                    let lower = header.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("authorization: bearer ") {
                        token = Some(v.trim().to_owned());
                    }
                    if let Some(v) = lower.strip_prefix("range: bytes=") {
                        let (a, b) = v.trim().split_once('-').unwrap();
                        range = Some((a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap() + 1));
                    }
                }
                t.lock().unwrap().push(token);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                // Any revision: `main`, or the commit a ranged download pins.
                let file = path
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split_once('/'))
                    .and_then(|(_, f)| files.get(f));
                let Some(serve) = file else {
                    let body = b"{\"error\":\"Entry not found\"}";
                    let head = format!(
                        "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    if method != "HEAD" {
                        let _ = stream.write_all(body);
                    }
                    continue;
                };
                let (Serve::Whole(bytes)
                | Serve::Truncated(bytes)
                | Serve::CutOnce { bytes, .. }
                | Serve::WrongSha(bytes)) = serve;
                let etag = match serve {
                    Serve::WrongSha(b) => sha256_hex(&[&b[..], b"other"].concat()),
                    _ => sha256_hex(bytes),
                };
                let (start, end) = range.unwrap_or((0, bytes.len() as u64));
                let (status, span) = match range {
                    Some(_) => (
                        "206 Partial Content",
                        format!("Content-Range: bytes {start}-{}/{}\r\n", end - 1, bytes.len()),
                    ),
                    None => ("200 OK", String::new()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {}\r\n{span}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    "a".repeat(40),
                    end - start
                );
                let _ = stream.write_all(head.as_bytes());
                if method == "GET" {
                    g.lock().unwrap().push((start, end));
                    let body = &bytes[start as usize..end as usize];
                    let cut = match serve {
                        Serve::Truncated(_) => true,
                        Serve::CutOnce { at, done, .. } => {
                            start >= *at && !done.swap(true, Ordering::SeqCst)
                        }
                        _ => false,
                    };
                    let _ = stream.write_all(if cut { &body[..body.len() / 2] } else { body });
                }
            }
        });
        Self { url, requests, ranges, tokens, stop }
    }

    /// Stops answering: later connections are refused.
    fn shut_down(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

fn options(hub: &FakeHub, cache: &std::path::Path) -> HubOptions {
    HubOptions {
        endpoint: Some(hub.url.clone()),
        token: Some("hf_test_token".into()),
        cache_dir: Some(cache.to_path_buf()),
        offline: false,
        attempts: 1,
        chunk_bytes: 4096,
    }
}

#[test]
fn a_download_lands_in_the_cache_and_is_reused_with_the_network_gone() {
    let files: HashMap<String, Serve> = [
        ("plain_text/train-00000-of-00001.parquet".to_owned(), Serve::Whole(vec![1; 5000])),
        ("plain_text/test-00000-of-00001.parquet".to_owned(), Serve::Whole(vec![2; 3000])),
    ]
    .into();
    let hub = FakeHub::start("datasets/uoft-cs/cifar10", files);
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
        hub.tokens.lock().unwrap().iter().all(|t| t.as_deref() == Some("hf_test_token")),
        "HF token sent"
    );

    hub.shut_down();
    let before = hub.requests.load(Ordering::SeqCst);
    let offline = HubOptions { offline: true, ..options(&hub, cache.path()) };
    let again = fetch(&Source::cifar10(), &offline, silent()).unwrap();
    assert_eq!(again.files, fetched.files);
    assert_eq!(cached(&Source::cifar10(), &options(&hub, cache.path())), Some(again.snapshot));
    assert_eq!(hub.requests.load(Ordering::SeqCst), before, "offline means no request");

    let elsewhere = tempfile::tempdir().unwrap();
    let offline_empty = HubOptions { offline: true, ..options(&hub, elsewhere.path()) };
    let err = fetch(&Source::cifar10(), &offline_empty, silent()).unwrap_err();
    assert!(matches!(err, Error::Missing { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let hub = FakeHub::start("datasets/someone/cub-mirror", HashMap::new());
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&Source::cub("someone/cub-mirror"), &options(&hub, cache.path()), silent())
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUB_200_2011.tgz of someone/cub-mirror"), "{err}");
    assert!(err.contains("no such file") || err.contains("no dataset repository"), "{err}");
}

#[test]
fn a_truncated_body_is_a_clear_error() {
    let files: HashMap<String, Serve> = [(
        "plain_text/train-00000-of-00001.parquet".to_owned(),
        Serve::Truncated(vec![7; 100_000]),
    )]
    .into();
    let hub = FakeHub::start("datasets/uoft-cs/cifar10", files);
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
    let hub = FakeHub::start(
        "datasets/someone/cub-mirror",
        [("CUB_200_2011.tgz".to_owned(), Serve::Whole(tgz))].into(),
    );
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
    let files: HashMap<String, Serve> = [
        ("model.safetensors".to_owned(), Serve::Whole(vec![5; 4096])),
        ("config.json".to_owned(), Serve::Whole(b"{\"architecture\": \"resnet18\"}".to_vec())),
    ]
    .into();
    // A model repository: no `datasets/` in the route.
    let hub = FakeHub::start("timm/resnet18.tv_in1k", files);
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
    let files: HashMap<String, Serve> =
        source.files.iter().map(|f| (f.clone(), Serve::Whole(vec![3; 100]))).collect();
    let hub = FakeHub::start("datasets/zalando-datasets/fashion_mnist", files);
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
    let done = Arc::new(AtomicBool::new(false));
    let serve = Serve::CutOnce { bytes: bytes.clone(), at: 8192, done };
    let hub = FakeHub::start("datasets/someone/cub-mirror", [(file.to_owned(), serve)].into());
    let cache = tempfile::tempdir().unwrap();
    let source = Source { unpack: false, ..Source::cub("someone/cub-mirror") };
    let err = fetch(&source, &options(&hub, cache.path()), silent()).unwrap_err().to_string();
    assert!(err.contains("cut short"), "{err}");
    assert_eq!(*hub.ranges.lock().unwrap(), [(0, 4096), (4096, 8192), (8192, 10_000)]);
    let blobs = cache.path().join("datasets--someone--cub-mirror/blobs");
    let part = blobs.join(format!("{}.part", sha256_hex(&bytes)));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 8192, "the two whole ranges are kept");

    hub.ranges.lock().unwrap().clear();
    let fetched = fetch(&source, &options(&hub, cache.path()), silent()).unwrap();
    assert_eq!(
        *hub.ranges.lock().unwrap(),
        [(8192, 10_000)],
        "only the missing range is asked for"
    );
    assert_eq!(std::fs::read(fetched.snapshot.join(file)).unwrap(), bytes);
    assert!(!part.exists(), "the part became the blob");
    assert_eq!(cached(&source, &options(&hub, cache.path())), Some(fetched.snapshot));
}

/// Bytes whose SHA-256 is not the Hub's ETag are refused, and the partial file goes, so that
/// the next run fetches the file anew.
#[test]
fn bytes_that_do_not_hash_to_the_etag_are_refused_and_dropped() {
    let file = "CUB_200_2011.tgz";
    let serve = Serve::WrongSha(vec![9; 5000]);
    let hub = FakeHub::start("datasets/someone/cub-mirror", [(file.to_owned(), serve)].into());
    let cache = tempfile::tempdir().unwrap();
    let source = Source { unpack: false, ..Source::cub("someone/cub-mirror") };
    let err = fetch(&source, &options(&hub, cache.path()), silent()).unwrap_err().to_string();
    assert!(err.contains("SHA-256") && err.contains("run the command again"), "{err}");
    let blobs = cache.path().join("datasets--someone--cub-mirror/blobs");
    let left: Vec<_> = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing is left to be taken for the file: {left:?}");
}
