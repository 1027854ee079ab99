//! Downloads from the Hugging Face Hub into its standard cache (`~/.cache/huggingface/hub`, or
//! `HF_HUB_CACHE`): the only module of this workspace's libraries that touches the network.
//!
//! - CIFAR-10: `uoft-cs/cifar10`, the two parquet files of `plain_text/`; load the result with
//!   [`crate::cifar::load_parquet`].
//! - CUB-200-2011 and MIT Indoor 67 have no official copy on the Hub: [`Source::cub`] and
//!   [`Source::scenes`] take the dataset repository of a mirror that holds the original archive
//!   (`CUB_200_2011.tgz`; `indoorCVPR_09.tar` with `TrainImages.txt` and `TestImages.txt`), which
//!   [`fetch`] downloads and unpacks beside the cache.
//! - ImageNet (`ILSVRC/imagenet-1k`) is gated: it needs a token of an account that accepted its
//!   terms, and says so before sending a request.
//!
//! [`HubOptions::from_env`] honours `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE`; offline, files
//! come from the cache or not at all. Every downloaded file is checked against the size the Hub
//! announces.

use std::fs::File;
use std::path::{Path, PathBuf};

use hf_hub::{HFClientBuilder, HFError};

use crate::error::{Error, Result};

/// Where and how to reach the Hub.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// The Hub's base URL; `None` is `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// An access token (needed for gated datasets).
    pub token: Option<String>,
    /// The cache directory; `None` is hf-hub's (`HF_HUB_CACHE`, else `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network: take files from the cache or fail.
    pub offline: bool,
    /// Attempts per request (transient failures are retried).
    pub attempts: usize,
}

impl HubOptions {
    /// Options from `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` (`1` or `true`).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"));
        Self {
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
            cache_dir: None,
            offline,
            attempts: 3,
        }
    }
}

/// A dataset on the Hub: a repository, the files to fetch, and what to do with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// A short name for messages and for the unpack directory, e.g. `cifar10`.
    pub name: String,
    /// The dataset repository, `owner/name`.
    pub repo: String,
    /// Files to download, relative to the repository root.
    pub files: Vec<String>,
    /// Whether the repository is gated (a token is required).
    pub gated: bool,
    /// Whether the `.tar`/`.tgz` files are unpacked after download.
    pub unpack: bool,
}

impl Source {
    /// CIFAR-10 in parquet (`uoft-cs/cifar10`).
    pub fn cifar10() -> Self {
        Self {
            name: "cifar10".into(),
            repo: "uoft-cs/cifar10".into(),
            files: ["train", "test"]
                .map(|s| format!("plain_text/{s}-00000-of-00001.parquet"))
                .to_vec(),
            gated: false,
            unpack: false,
        }
    }

    /// CUB-200-2011 from a mirror repository holding `CUB_200_2011.tgz`.
    pub fn cub(repo: &str) -> Self {
        Self {
            name: "cub".into(),
            repo: repo.into(),
            files: vec!["CUB_200_2011.tgz".into()],
            gated: false,
            unpack: true,
        }
    }

    /// MIT Indoor 67 from a mirror repository holding `indoorCVPR_09.tar`, `TrainImages.txt`
    /// and `TestImages.txt`.
    pub fn scenes(repo: &str) -> Self {
        let files =
            ["indoorCVPR_09.tar", "TrainImages.txt", "TestImages.txt"].map(String::from).to_vec();
        Self { name: "scenes".into(), repo: repo.into(), files, gated: false, unpack: true }
    }

    /// ImageNet-1k (`ILSVRC/imagenet-1k`, gated): the given files, e.g. `data/val_images.tar.gz`.
    pub fn imagenet(files: &[&str]) -> Self {
        Self {
            name: "imagenet".into(),
            repo: "ILSVRC/imagenet-1k".into(),
            files: files.iter().map(|f| f.to_string()).collect(),
            gated: true,
            unpack: false,
        }
    }
}

/// What [`fetch`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The snapshot directory: the repository's files under their repository paths.
    pub snapshot: PathBuf,
    /// Every downloaded file.
    pub files: Vec<PathBuf>,
    /// Where the archives were unpacked, for sources that unpack.
    pub unpacked: Option<PathBuf>,
}

/// Downloads (or finds in the cache) every file of `source`, checks its size, and unpacks
/// archives when the source asks for it. `progress` is told each file as it starts.
pub fn fetch(
    source: &Source,
    options: &HubOptions,
    mut progress: impl FnMut(&str),
) -> Result<Fetched> {
    let page = format!("https://huggingface.co/datasets/{}", source.repo);
    if source.gated && options.token.is_none() && !options.offline {
        return Err(Error::Hub(format!(
            "{} is gated: accept its terms on {page} with your account, then set HF_TOKEN to a token of that account",
            source.repo
        )));
    }
    let (owner, name) = source.repo.split_once('/').ok_or_else(|| {
        Error::Hub(format!("a Hub repository is `owner/name`, got `{}`", source.repo))
    })?;
    let mut builder = HFClientBuilder::new().retry_max_attempts(options.attempts.max(1));
    if let Some(endpoint) = &options.endpoint {
        builder = builder.endpoint(endpoint.trim_end_matches('/'));
    }
    if let Some(token) = &options.token {
        builder = builder.token(token);
    }
    if let Some(dir) = &options.cache_dir {
        builder = builder.cache_dir(dir);
    }
    let client = builder
        .build_sync()
        .map_err(|e| Error::Hub(format!("cannot set up the Hub client: {e}")))?;
    let repo = client.dataset(owner, name);

    let mut files = Vec::with_capacity(source.files.len());
    for file in &source.files {
        progress(file);
        let explain = |e: HFError| explain(e, source, file, &page);
        if options.offline {
            let path = repo
                .download_file()
                .filename(file)
                .local_files_only(true)
                .send()
                .map_err(explain)?;
            files.push(path);
            continue;
        }
        let expected = repo.get_file_metadata().filepath(file).send().map_err(explain)?.file_size;
        let path = repo.download_file().filename(file).send().map_err(explain)?;
        let actual = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        if expected > 0 && actual != expected {
            return Err(Error::Size { path, expected, actual });
        }
        files.push(path);
    }
    let snapshot = snapshot_dir(&files[0], &source.files[0]);
    let unpacked =
        if source.unpack { Some(unpack_archives(source, &files, &snapshot)?) } else { None };
    Ok(Fetched { snapshot, files, unpacked })
}

/// The snapshot directory of a downloaded `file` whose repository path is `repo_path`.
fn snapshot_dir(file: &Path, repo_path: &str) -> PathBuf {
    let depth = Path::new(repo_path).components().count();
    file.ancestors().nth(depth).map(Path::to_path_buf).unwrap_or_else(|| file.to_path_buf())
}

/// Unpacks the `.tar`, `.tgz` and `.tar.gz` files into `<cache>/../at-data/<name>/` (once; a
/// `.complete` marker records it) and copies the other files beside them.
fn unpack_archives(source: &Source, files: &[PathBuf], snapshot: &Path) -> Result<PathBuf> {
    // snapshots/<commit> -> the repository folder -> the hub cache.
    let cache = snapshot.ancestors().nth(3).unwrap_or(snapshot);
    let commit = snapshot.file_name().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    let dest = cache.join("at-data").join(&source.name).join(commit);
    let marker = dest.join(".complete");
    if marker.exists() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    for (file, repo_path) in files.iter().zip(&source.files) {
        let open = || File::open(file).map_err(|e| Error::io(file, e));
        let broken = |e: std::io::Error| Error::format(file, format!("cannot unpack: {e}"));
        if repo_path.ends_with(".tgz") || repo_path.ends_with(".tar.gz") {
            tar::Archive::new(flate2::read::GzDecoder::new(open()?))
                .unpack(&dest)
                .map_err(broken)?;
        } else if repo_path.ends_with(".tar") {
            tar::Archive::new(open()?).unpack(&dest).map_err(broken)?;
        } else {
            let target = dest.join(Path::new(repo_path).file_name().unwrap_or_default());
            std::fs::copy(file, &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    File::create(&marker).map_err(|e| Error::io(&marker, e))?;
    Ok(dest)
}

/// Turns hf-hub's error into one that says what to do.
fn explain(e: HFError, source: &Source, file: &str, page: &str) -> Error {
    let what = format!("{file} of {}", source.repo);
    match e {
        HFError::LocalEntryNotFound { .. } => Error::Missing {
            what: what.clone(),
            path: PathBuf::from(file),
            hint: format!(
                "offline and not in the Hugging Face cache: unset HF_HUB_OFFLINE and run `cargo xtask download {}`",
                source.name
            ),
        },
        HFError::AuthRequired { .. } | HFError::Forbidden { .. } => Error::Hub(format!(
            "{what}: the Hub refused access; {}",
            if source.gated {
                format!(
                    "{} is gated: accept its terms on {page} and set HF_TOKEN to a token of that account",
                    source.repo
                )
            } else {
                "check HF_TOKEN".to_owned()
            }
        )),
        HFError::RepoNotFound { .. } => {
            Error::Hub(format!("{what}: no dataset repository {} on the Hub", source.repo))
        }
        HFError::EntryNotFound { .. } => {
            Error::Hub(format!("{what}: the repository has no such file (404)"))
        }
        other => Error::Hub(format!(
            "{what}: download failed, the transfer was refused or cut short ({other}); \
             check the network (or HF_ENDPOINT) and run the command again"
        )),
    }
}
