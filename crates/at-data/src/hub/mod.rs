//! Downloads from the Hugging Face Hub into its standard cache (`~/.cache/huggingface/hub`, or
//! `HF_HUB_CACHE`), and uploads to it ([`upload`]; see `upload.rs` for how binary files reach
//! its LFS storage): the only module of this workspace's libraries that touches the network.
//!
//! - CIFAR-10: `uoft-cs/cifar10`, the two parquet files of `plain_text/`; load the result with
//!   [`crate::cifar::load_parquet`].
//! - Fashion-MNIST: `zalando-datasets/fashion_mnist`, the two parquet files of `fashion_mnist/`;
//!   [`crate::mnist::load`] reads them as it reads the IDX files.
//! - The ImageNet-pretrained ResNet-18/34 of torchvision, as timm keeps them
//!   (`timm/resnet18.tv_in1k`, `timm/resnet34.tv_in1k`): `model.safetensors` under torchvision's
//!   names, which are at-models' names too, so they load as they are.
//! - CUB-200-2011 and MIT Indoor 67 have no official copy on the Hub: [`Source::cub`] and
//!   [`Source::scenes`] take the dataset repository of a mirror that holds the original archive
//!   (`CUB_200_2011.tgz`; `indoorCVPR_09.tar` with `TrainImages.txt` and `TestImages.txt`), which
//!   [`fetch`] downloads and unpacks beside the cache.
//! - ImageNet (`ILSVRC/imagenet-1k`) is gated: it needs a token of an account that accepted its
//!   terms, and says so before sending a request.
//!
//! [`HubOptions::from_env`] honours `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE`; offline, files
//! come from the cache or not at all. Every downloaded file is checked against the size the Hub
//! announces, and against its SHA-256 where the Hub's ETag is one (files in LFS or Xet storage).
//! A download is resumable to the byte: a file is fetched in byte ranges of
//! [`HubOptions::chunk_bytes`] into `blobs/<etag>.part` beside hf-hub's blobs, each range
//! written and synced before the next is asked for, so a download cut short (a killed command,
//! a dropped connection) goes on from the bytes it has when the command is run again. The
//! finished file becomes the cache's blob, which hf-hub then links into the snapshot as if it
//! had fetched it itself.

use std::fs::File;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use hf_hub::progress::{DownloadEvent, FileStatus, ProgressEvent, ProgressHandler};
use hf_hub::{HFClientBuilder, HFError, HFRepositorySync, RepoType};

use crate::error::{Error, Result};

mod upload;
pub use upload::{Committed, Transfer, Upload, upload};

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
    /// Attempts per request, the first included (a transient failure, 5xx, 429 or a cut
    /// connection, is retried until they are spent).
    pub attempts: usize,
    /// Bytes per range request of a download, the most a cut-short download loses; 0 is
    /// [`CHUNK_BYTES`].
    pub chunk_bytes: u64,
}

/// The default [`HubOptions::chunk_bytes`]: 16 MiB, so that a file of a few hundred megabytes
/// takes tens of requests and a kill loses seconds of transfer.
pub const CHUNK_BYTES: u64 = 16 << 20;

impl HubOptions {
    /// Options from `HF_ENDPOINT`, `HF_HUB_OFFLINE` (`1` or `true`) and the token: `HF_TOKEN`,
    /// else the file `HF_TOKEN_PATH` names, else `$HF_HOME/token` (where `hf auth login` writes
    /// it).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"));
        Self {
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN").or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_hub::hf_home().join("token"));
                let token = std::fs::read_to_string(path).ok()?;
                Some(token.trim().to_owned()).filter(|t| !t.is_empty())
            }),
            cache_dir: None,
            offline,
            attempts: 3,
            chunk_bytes: CHUNK_BYTES,
        }
    }
}

/// What kind of repository a [`Source`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    /// A dataset repository (`/datasets/owner/name`).
    Dataset,
    /// A model repository (`/owner/name`).
    Model,
}

/// Files on the Hub: a repository, the files to fetch, and what to do with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// A short name for messages and for the unpack directory, e.g. `cifar10`: the name
    /// `cargo xtask download` takes.
    pub name: String,
    /// The repository, `owner/name`.
    pub repo: String,
    /// A dataset or a model repository.
    pub kind: RepoKind,
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
            kind: RepoKind::Dataset,
            files: ["train", "test"]
                .map(|s| format!("plain_text/{s}-00000-of-00001.parquet"))
                .to_vec(),
            gated: false,
            unpack: false,
        }
    }

    /// Fashion-MNIST in parquet (`zalando-datasets/fashion_mnist`, 60,000 + 10,000 PNGs).
    pub fn fashion_mnist() -> Self {
        Self {
            name: "fashion-mnist".into(),
            repo: "zalando-datasets/fashion_mnist".into(),
            kind: RepoKind::Dataset,
            files: ["train", "test"]
                .map(|s| format!("fashion_mnist/{s}-00000-of-00001.parquet"))
                .to_vec(),
            gated: false,
            unpack: false,
        }
    }

    /// torchvision's ImageNet-pretrained ResNet of `depth` (18 or 34) from timm's copy
    /// (`timm/resnet18.tv_in1k`): `model.safetensors` and timm's `config.json`.
    pub fn imagenet_resnet(depth: usize) -> Self {
        Self {
            name: format!("resnet{depth}-imagenet"),
            repo: format!("timm/resnet{depth}.tv_in1k"),
            kind: RepoKind::Model,
            files: vec!["model.safetensors".into(), "config.json".into()],
            gated: false,
            unpack: false,
        }
    }

    /// The `files` of the model repository `repo` (a published student, say).
    pub fn model(repo: &str, files: &[&str]) -> Self {
        Self {
            name: repo.into(),
            repo: repo.into(),
            kind: RepoKind::Model,
            files: files.iter().map(|f| f.to_string()).collect(),
            gated: false,
            unpack: false,
        }
    }

    /// The source `cargo xtask download NAME` fetches, for the names that need no other
    /// argument: `cifar10`, `fashion-mnist`, `resnet18-imagenet`, `resnet34-imagenet`.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "cifar10" => Some(Self::cifar10()),
            "fashion-mnist" => Some(Self::fashion_mnist()),
            "resnet18-imagenet" => Some(Self::imagenet_resnet(18)),
            "resnet34-imagenet" => Some(Self::imagenet_resnet(34)),
            _ => None,
        }
    }

    /// The repository's page on the Hub.
    pub fn page(&self) -> String {
        match self.kind {
            RepoKind::Dataset => format!("https://huggingface.co/datasets/{}", self.repo),
            RepoKind::Model => format!("https://huggingface.co/{}", self.repo),
        }
    }

    /// CUB-200-2011 from a mirror repository holding `CUB_200_2011.tgz`.
    pub fn cub(repo: &str) -> Self {
        Self {
            name: "cub".into(),
            repo: repo.into(),
            kind: RepoKind::Dataset,
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
        Self {
            name: "scenes".into(),
            repo: repo.into(),
            kind: RepoKind::Dataset,
            files,
            gated: false,
            unpack: true,
        }
    }

    /// ImageNet-1k (`ILSVRC/imagenet-1k`, gated): the given files, e.g. `data/val_images.tar.gz`.
    pub fn imagenet(files: &[&str]) -> Self {
        Self {
            name: "imagenet".into(),
            repo: "ILSVRC/imagenet-1k".into(),
            kind: RepoKind::Dataset,
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

/// Told how a transfer goes: `(repository path, bytes so far, bytes in all)`. It is called
/// with `(file, 0, 0)` as each file starts (found in the cache or not), then as bytes arrive.
pub type OnProgress = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// An [`OnProgress`] that tells no one.
pub fn silent() -> OnProgress {
    Arc::new(|_: &str, _, _| {})
}

/// Forwards hf-hub's download events to an [`OnProgress`]: of a whole file (`range: None`), or
/// of one byte range starting at `at` of a `total`-byte file, told as the file's bytes so far.
struct Forward {
    to: OnProgress,
    range: Option<(u64, u64)>,
}

impl ProgressHandler for Forward {
    fn on_progress(&self, event: &ProgressEvent) {
        if let ProgressEvent::Download(DownloadEvent::Progress { files }) = event {
            for file in files.iter().filter(|f| f.status != FileStatus::Started) {
                let (done, total) = match self.range {
                    None => (file.bytes_completed, file.total_bytes),
                    Some((at, total)) => ((at + file.bytes_completed).min(total), total),
                };
                (self.to)(&file.filename, done, total);
            }
        }
    }
}

/// `owner/name` split, or an error saying that is what a repository is.
pub(crate) fn owner_name(repo: &str) -> Result<(&str, &str)> {
    repo.split_once('/')
        .ok_or_else(|| Error::Hub(format!("a Hub repository is `owner/name`, got `{repo}`")))
}

/// A client for `options`, and the cache directory it uses.
pub(crate) fn client(options: &HubOptions) -> Result<(hf_hub::HFClientSync, PathBuf)> {
    let mut builder = HFClientBuilder::new().retry_max_attempts(options.attempts.saturating_sub(1));
    if let Some(endpoint) = &options.endpoint {
        builder = builder.endpoint(endpoint.trim_end_matches('/'));
    }
    if let Some(token) = &options.token {
        builder = builder.token(token);
    }
    if let Some(dir) = &options.cache_dir {
        builder = builder.cache_dir(dir);
    }
    let setup = |e: HFError| Error::Hub(format!("cannot set up the Hub client: {e}"));
    let client = builder.build().map_err(setup)?;
    let cache = client.cache_dir().to_path_buf();
    Ok((hf_hub::HFClientSync::from_inner(client).map_err(setup)?, cache))
}

/// Downloads (or finds in the cache) every file of `source`, checks its size (and SHA-256 where
/// the Hub gives one), and unpacks archives when the source asks for it. A file already in the
/// cache is not fetched again; a file cut short goes on from the bytes it has when the command
/// is run again (see the module's documentation).
pub fn fetch(source: &Source, options: &HubOptions, progress: OnProgress) -> Result<Fetched> {
    let page = source.page();
    if source.gated && options.token.is_none() && !options.offline {
        return Err(Error::Hub(format!(
            "{} is gated: accept its terms on {page} with your account, then set HF_TOKEN to a token of that account",
            source.repo
        )));
    }
    let (owner, name) = owner_name(&source.repo)?;
    let (client, cache) = client(options)?;
    // Typed handles: hf-hub's `RepoTypeAny` asks a dataset's file size at the model's address.
    let files = match source.kind {
        RepoKind::Dataset => {
            let blobs = cache.join(format!("datasets--{owner}--{name}")).join("blobs");
            fetch_files(&client.dataset(owner, name), source, options, &blobs, &progress)?
        }
        RepoKind::Model => {
            let blobs = cache.join(format!("models--{owner}--{name}")).join("blobs");
            fetch_files(&client.model(owner, name), source, options, &blobs, &progress)?
        }
    };
    let snapshot = snapshot_dir(&files[0], &source.files[0]);
    let unpacked =
        if source.unpack { Some(unpack_archives(source, &files, &snapshot)?) } else { None };
    Ok(Fetched { snapshot, files, unpacked })
}

/// The files of `source` from `repo`, whose cache keeps its blobs in `blobs`: see [`fetch`].
fn fetch_files<T: RepoType>(
    repo: &HFRepositorySync<T>,
    source: &Source,
    options: &HubOptions,
    blobs: &Path,
    progress: &OnProgress,
) -> Result<Vec<PathBuf>> {
    let page = source.page();
    let mut files = Vec::with_capacity(source.files.len());
    for file in &source.files {
        progress(file, 0, 0);
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
        let meta = repo.get_file_metadata().filepath(file).send().map_err(explain)?;
        let expected = meta.file_size;
        if expected > 0 {
            let chunk = if options.chunk_bytes == 0 { CHUNK_BYTES } else { options.chunk_bytes };
            Ranges { repo, file, meta: &meta, chunk }.write_blob(blobs, progress, &explain)?;
        }
        // The blob is there (or the size unknown): hf-hub links it into the snapshot, or
        // fetches it whole.
        let path = repo
            .download_file()
            .filename(file)
            .progress(Forward { to: progress.clone(), range: None })
            .send()
            .map_err(explain)?;
        let actual = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        if expected > 0 && actual != expected {
            return Err(Error::Size { path, expected, actual });
        }
        files.push(path);
    }
    Ok(files)
}

/// One file fetched in byte ranges, pinned to the commit its metadata came from.
struct Ranges<'a, T: RepoType> {
    repo: &'a HFRepositorySync<T>,
    file: &'a str,
    meta: &'a hf_hub::repository::FileMetadataInfo,
    chunk: u64,
}

impl<T: RepoType> Ranges<'_, T> {
    /// Makes `blobs/<etag>` (unless it is there): appends the missing ranges to
    /// `blobs/<etag>.part`, syncing each, then checks the SHA-256 where the ETag is one and
    /// renames the part into place. The Hub's errors go through `explain`.
    fn write_blob(
        &self,
        blobs: &Path,
        progress: &OnProgress,
        explain: &dyn Fn(HFError) -> Error,
    ) -> Result<()> {
        use std::io::Write;
        let (size, etag) = (self.meta.file_size, self.meta.etag.as_str());
        let blob = blobs.join(etag);
        if etag.is_empty() || etag.contains(['/', '\\']) || blob.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(blobs).map_err(|e| Error::io(blobs, e))?;
        let part = blobs.join(format!("{etag}.part"));
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(|e| Error::io(&part, e))?;
        let mut done = out.metadata().map_err(|e| Error::io(&part, e))?.len();
        if done > size {
            out.set_len(0).map_err(|e| Error::io(&part, e))?;
            done = 0;
        }
        progress(self.file, done, size);
        while done < size {
            let end = (done + self.chunk).min(size);
            let bytes = self
                .repo
                .download_file_to_bytes()
                .filename(self.file)
                .revision(self.meta.commit_hash.clone())
                .range(done..end)
                .progress(Forward { to: progress.clone(), range: Some((done, size)) })
                .send()
                .map_err(explain)?;
            // A server that ignores the range sends the whole file.
            let bytes = match bytes.len() as u64 {
                n if n == end - done => &bytes[..],
                n if n == size => &bytes[done as usize..end as usize],
                n => {
                    return Err(Error::Hub(format!(
                        "{}: asked for bytes {done}..{end}, the Hub sent {n}: the transfer was cut \
                         short; run the command again to go on from byte {done}",
                        self.file
                    )));
                }
            };
            out.write_all(bytes).and_then(|()| out.sync_data()).map_err(|e| Error::io(&part, e))?;
            done = end;
            progress(self.file, done, size);
        }
        drop(out);
        if etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            let actual = sha256_hex(&part)?;
            if !actual.eq_ignore_ascii_case(etag) {
                let _ = std::fs::remove_file(&part);
                return Err(Error::Hub(format!(
                    "{}: the downloaded bytes have SHA-256 {actual}, the Hub says {etag}; the \
                     partial file was removed, run the command again to fetch it anew",
                    self.file
                )));
            }
        }
        std::fs::rename(&part, &blob).map_err(|e| Error::io(&blob, e))?;
        Ok(())
    }
}

/// The SHA-256 of the file at `path`, in lowercase hex (read in pieces, not whole).
pub fn sha256_hex(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The snapshot directory of `source` if every one of its files is in the cache already (no
/// request is made), else `None`.
pub fn cached(source: &Source, options: &HubOptions) -> Option<PathBuf> {
    let offline = HubOptions { offline: true, ..options.clone() };
    fetch(source, &offline, silent()).ok().map(|f| f.snapshot)
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
            hint: if source.name == source.repo {
                "offline and not in the Hugging Face cache: unset HF_HUB_OFFLINE so that it can be downloaded".to_owned()
            } else {
                format!(
                    "offline and not in the Hugging Face cache: unset HF_HUB_OFFLINE and run `cargo xtask download {}`",
                    source.name
                )
            },
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
        HFError::RepoNotFound { .. } => Error::Hub(format!(
            "{what}: no {} repository {} on the Hub (or it is private: set HF_TOKEN)",
            match source.kind {
                RepoKind::Dataset => "dataset",
                RepoKind::Model => "model",
            },
            source.repo
        )),
        HFError::EntryNotFound { .. } => {
            Error::Hub(format!("{what}: the repository has no such file (404)"))
        }
        other => Error::Hub(format!(
            "{what}: download failed, the transfer was refused or cut short ({other}); \
             check the network (or HF_ENDPOINT) and run the command again"
        )),
    }
}
