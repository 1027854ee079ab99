//! A fake Hugging Face Hub on 127.0.0.1 for the workspace's tests, as strict as the real Hub where
//! a client meets it: one server for the downloads of at-data and the publishing of at-hub.
//!
//! What it does as the Hub does (the routes hf-hub 1.0 and at-data call):
//!
//! - `POST /api/repos/create` makes a model repository; an existing one is `409` with the
//!   repository's `url`.
//! - `POST /api/models/{repo}/preupload/{rev}` answers `uploadMode: "lfs"` for a file the Hub keeps
//!   in LFS: one a default `.gitattributes` pattern names (`*.safetensors`, `*.parquet`, `*.tar`,
//!   ...), one over 10 MiB, or one whose sample is binary (a NUL byte, or not UTF-8); `"regular"`
//!   for the rest.
//! - `POST /{repo}.git/info/lfs/objects/batch` answers the `basic` transfer (or `xet`, when the
//!   test asks for it with [`FakeHub::choose_xet`]): for each object the store lacks, an `upload`
//!   action to a pre-signed URL (`PUT /lfs-storage/{repo}/{oid}?X-Amz-Signature=...`) with a header the
//!   upload must carry, and a `verify` action; an object it holds gets no actions.
//! - The pre-signed URL refuses a request that carries an `Authorization` header (as S3 does: a
//!   signed URL is the one credential), one without the action's header, and bytes whose SHA-256
//!   or size is not the object's.
//! - `POST /api/models/{repo}/commit/{rev}` (NDJSON) refuses an inline (`file`) entry whose bytes
//!   are binary or over 10 MiB with the real Hub's message, and an `lfsFile` entry whose object
//!   was never stored.
//! - `GET /api/models/{repo}/xet-write-token/{rev}` hands out a `local://` CAS directory, so that
//!   hf-xet's own local backend stores what the Xet path uploads.
//! - `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (`datasets/owner/name` for datasets) serve files
//!   with `ETag` (the SHA-256 for LFS files, as the Hub's), `X-Repo-Commit` and byte ranges.
//!
//! Write routes need the token the hub was started with (else `401`); a private repository is
//! `404` without it. Every request is logged ([`FakeHub::log`]); failures can be injected by path
//! ([`FakeHub::fail`]) and downloads can be cut short or corrupted ([`FakeHub::fault`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use sha2::Digest;

/// The size past which the Hub keeps every file in LFS and refuses it inline.
pub const LFS_THRESHOLD: u64 = 10 << 20;

/// The Hub's answer to an inline binary (or too large) file in a commit.
pub const INLINE_BINARY_REFUSED: &str = "Your push was rejected because it contains files that \
     must use LFS (larger than 10 MiB or binary)";

/// The patterns of the `.gitattributes` the Hub writes into a new repository: files that match
/// go to LFS whatever their content.
const GITATTRIBUTES_LFS: &[&str] = &[
    ".7z",
    ".arrow",
    ".bin",
    ".bz2",
    ".ckpt",
    ".ftz",
    ".gz",
    ".h5",
    ".joblib",
    ".mlmodel",
    ".model",
    ".msgpack",
    ".npy",
    ".npz",
    ".onnx",
    ".ot",
    ".parquet",
    ".pb",
    ".pickle",
    ".pkl",
    ".pt",
    ".pth",
    ".rar",
    ".safetensors",
    ".tar",
    ".tflite",
    ".tgz",
    ".wasm",
    ".xz",
    ".zip",
    ".zst",
];

/// Whether the Hub keeps `path` with these `bytes` (or this `size` and leading `sample`) in LFS.
pub fn must_use_lfs(path: &str, size: u64, sample: &[u8]) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    GITATTRIBUTES_LFS.iter().any(|ext| name.ends_with(ext))
        || name.contains("tfevents")
        || size > LFS_THRESHOLD
        || is_binary(sample)
}

/// A NUL byte, or bytes that are not UTF-8 (a character cut at the sample's end excepted).
fn is_binary(bytes: &[u8]) -> bool {
    if bytes.contains(&0) {
        return true;
    }
    match std::str::from_utf8(bytes) {
        Ok(_) => false,
        Err(e) => e.error_len().is_some(),
    }
}

/// The SHA-256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// One request as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The byte range asked for, `start..end`.
    pub range: Option<(u64, u64)>,
    /// The status answered.
    pub status: u16,
}

/// How a repository holds one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// In git, sent inline in the commit.
    Inline(Vec<u8>),
    /// An LFS pointer to an object of the store, uploaded through the `basic` transfer.
    Lfs {
        /// The SHA-256 of the bytes.
        oid: String,
        /// Their length.
        size: u64,
    },
    /// An LFS pointer whose bytes went to the Xet CAS (the local one the write token names).
    Xet {
        /// The SHA-256 of the bytes.
        oid: String,
        /// Their length.
        size: u64,
    },
}

/// One commit of a repository.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commit {
    /// Its summary.
    pub message: String,
    /// Its id (40 hex digits).
    pub oid: String,
    /// The files sent inline.
    pub inline: Vec<String>,
    /// The files committed as LFS pointers.
    pub lfs: Vec<String>,
}

/// A repository.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Repo {
    /// Private: downloads need the token.
    pub private: bool,
    /// Its files at the last commit.
    pub files: BTreeMap<String, Stored>,
    /// Its commits, oldest first.
    pub commits: Vec<Commit>,
}

/// What goes wrong with the download of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every response announces the whole length but sends half of it, then hangs up.
    Truncated,
    /// The first request for a range that starts at or after this byte is cut as `Truncated`
    /// cuts; the later ones are whole.
    CutOnceAt(u64),
    /// The `ETag` is the SHA-256 of other bytes.
    WrongSha,
}

/// Everything the fake Hub holds and saw.
#[derive(Debug, Default)]
pub struct State {
    /// Every request, in order.
    pub log: Vec<Logged>,
    /// Repositories by route: `owner/name` for models, `datasets/owner/name` for datasets.
    pub repos: BTreeMap<String, Repo>,
    /// The LFS store of each repository: bytes by `(route, SHA-256)`.
    pub objects: BTreeMap<(String, String), Vec<u8>>,
    /// Objects an LFS batch sent to Xet, `(route, SHA-256) -> size`: a commit may point to them.
    pub xet_objects: BTreeMap<(String, String), u64>,
    /// `(part of the path, status, times)`: answer the next `times` matching requests so.
    failures: Vec<(String, u16, usize)>,
    /// Download faults by `(repository route, file)`.
    faults: BTreeMap<(String, String), Fault>,
    /// Where the Xet path stores, when the batch is to choose `xet`.
    xet_cas: Option<PathBuf>,
    /// The requests answered with a cut body so far, by `(route, file)`.
    cut: BTreeMap<(String, String), usize>,
}

impl State {
    /// The bytes of `file` in the repository `route`, resolving LFS pointers (`None` for a file
    /// that is not there, or whose bytes are in the Xet CAS).
    pub fn bytes(&self, route: &str, file: &str) -> Option<Vec<u8>> {
        match self.repos.get(route)?.files.get(file)? {
            Stored::Inline(bytes) => Some(bytes.clone()),
            Stored::Lfs { oid, .. } => self.objects.get(&(route.to_owned(), oid.clone())).cloned(),
            Stored::Xet { .. } => None,
        }
    }
}

/// A running fake Hub; it stops when dropped.
pub struct FakeHub {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<Mutex<State>>,
    stopped: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeHub {
    /// Starts a Hub on a free port of 127.0.0.1; `token` is the one write token it accepts.
    pub fn start(token: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_io()
            .build()
            .expect("a tokio runtime for the fake Hub");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a port on 127.0.0.1");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let stopped = Arc::new(AtomicBool::new(false));
        let hub =
            Arc::new(Server { base: url.clone(), token: token.to_owned(), state: state.clone() });
        let stop = stopped.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                if stop.load(Ordering::SeqCst) {
                    return; // The listener goes: later connections are refused.
                }
                let hub = hub.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let hub = hub.clone();
                        async move { Ok::<_, Infallible>(hub.answer(request).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    // A connection that ends badly (a body cut on purpose) is not an error here.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Self { url, state, stopped, runtime: Some(runtime) }
    }

    /// Everything the Hub holds and saw, locked.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Logged> {
        self.state().log.clone()
    }

    /// How many requests arrived so far.
    pub fn request_count(&self) -> usize {
        self.state().log.len()
    }

    /// How many requests so far had `method` and a path containing `part`.
    pub fn count(&self, method: &str, part: &str) -> usize {
        self.state().log.iter().filter(|r| r.method == method && r.path.contains(part)).count()
    }

    /// The repository `route` (`owner/name`, or `datasets/owner/name`), if it exists.
    pub fn repo(&self, route: &str) -> Option<Repo> {
        self.state().repos.get(route).cloned()
    }

    /// The bytes of `file` in the repository `route`, LFS pointers resolved.
    pub fn file(&self, route: &str, file: &str) -> Option<Vec<u8>> {
        self.state().bytes(route, file)
    }

    /// Puts `bytes` at `file` of the repository `route` (created, public, if missing) in one
    /// commit, kept where the Hub would keep it (LFS or git).
    pub fn put(&self, route: &str, file: &str, bytes: Vec<u8>) {
        let mut state = self.state();
        let stored = if must_use_lfs(file, bytes.len() as u64, &bytes[..bytes.len().min(512)]) {
            let oid = sha256_hex(&bytes);
            let size = bytes.len() as u64;
            state.objects.insert((route.to_owned(), oid.clone()), bytes);
            Stored::Lfs { oid, size }
        } else {
            Stored::Inline(bytes)
        };
        let repo = state.repos.entry(route.to_owned()).or_default();
        let oid = format!("{:040x}", repo.commits.len() + 1);
        repo.commits.push(Commit { message: format!("Add {file}"), oid, ..Commit::default() });
        repo.files.insert(file.to_owned(), stored);
    }

    /// Makes the downloads of `file` of `route` go wrong as `fault` says.
    pub fn fault(&self, route: &str, file: &str, fault: Fault) {
        self.state().faults.insert((route.to_owned(), file.to_owned()), fault);
    }

    /// Answers the next `times` requests whose path contains `part` with `status`.
    pub fn fail(&self, part: &str, status: u16, times: usize) {
        self.state().failures.push((part.to_owned(), status, times));
    }

    /// Makes the LFS batch choose the `xet` transfer, with its CAS in the directory `cas`
    /// (hf-xet's `local://` backend).
    pub fn choose_xet(&self, cas: PathBuf) {
        self.state().xet_cas = Some(cas);
    }

    /// Stops answering: later connections are refused, as with the network gone.
    pub fn shut_down(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag and drops the listener.
        let _ = std::net::TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What the connections share.
struct Server {
    base: String,
    token: String,
    state: Arc<Mutex<State>>,
}

/// One request, read whole.
struct Incoming {
    method: String,
    path: String,
    query: String,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Incoming {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn range(&self) -> Option<(u64, u64)> {
        let (a, b) = self.header("range")?.trim().strip_prefix("bytes=")?.split_once('-')?;
        Some((a.parse().ok()?, b.parse::<u64>().ok()? + 1))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// An answer; `cut_after` sends that many bytes of the body and then breaks the connection.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    cut_after: Option<usize>,
}

impl Reply {
    fn json(status: u16, value: serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
            cut_after: None,
        }
    }

    /// An error as the Hub writes one: `{"error": message}` and `X-Error-Code`.
    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut reply = Self::json(status, serde_json::json!({ "error": message }));
        reply.headers.push(("X-Error-Code".into(), code.into()));
        reply
    }

    fn not_found() -> Self {
        Self::error(404, "EntryNotFound", "Entry not found")
    }
}

type Body = Either<
    Full<Bytes>,
    StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >,
>;

impl Server {
    async fn answer(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Body> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
        let incoming = Incoming {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or("").to_owned(),
            headers: parts.headers,
            body,
        };
        let reply = {
            let mut state = self.state.lock().unwrap();
            let injected = state
                .failures
                .iter_mut()
                .find(|(part, _, n)| *n > 0 && incoming.path.contains(part.as_str()));
            let reply = match injected {
                Some((_, status, n)) => {
                    *n -= 1;
                    Reply::error(*status, "Injected", "injected failure")
                }
                None => self.route(&mut state, &incoming),
            };
            state.log.push(Logged {
                method: incoming.method.clone(),
                path: incoming.path.clone(),
                authorization: incoming.header("authorization").map(str::to_owned),
                range: incoming.range(),
                status: reply.status,
            });
            reply
        };
        let mut response = hyper::Response::builder().status(reply.status);
        for (name, value) in &reply.headers {
            response = response.header(name, value);
        }
        let body = match reply.cut_after {
            None => Either::Left(Full::new(Bytes::from(reply.body))),
            Some(n) => {
                // The whole length is announced, part of it sent, then the body fails: hyper
                // breaks the connection, as a dropped connection would.
                response = response.header("Content-Length", reply.body.len());
                let frames = vec![
                    Ok(Frame::data(Bytes::copy_from_slice(&reply.body[..n]))),
                    Err(std::io::Error::other("cut on purpose")),
                ];
                Either::Right(StreamBody::new(futures_util::stream::iter(frames)))
            }
        };
        response.body(body).unwrap()
    }

    fn authorized(&self, request: &Incoming) -> bool {
        request.header("authorization") == Some(&format!("Bearer {}", self.token))
    }

    fn route(&self, state: &mut State, request: &Incoming) -> Reply {
        let (method, path) = (request.method.as_str(), request.path.as_str());
        if method == "PUT" && path.starts_with("/lfs-storage/") {
            return self.store_object(state, request);
        }
        if method == "GET" || method == "HEAD" {
            if let Some(rest) = path.strip_prefix("/api/models/")
                && let Some((route, _)) = rest.split_once("/xet-write-token/")
            {
                return self.xet_token(state, request, route);
            }
            return self.resolve(state, request);
        }
        if method != "POST" {
            return Reply::error(405, "MethodNotAllowed", "method not allowed");
        }
        if !self.authorized(request) {
            return Reply::error(
                401,
                "Unauthorized",
                "Invalid credentials in Authorization header",
            );
        }
        if path == "/api/repos/create" {
            return self.create(state, request);
        }
        if let Some(route) = path.strip_suffix(".git/info/lfs/objects/batch") {
            return self.batch(state, request, route.trim_start_matches('/'));
        }
        if path.ends_with(".git/info/lfs/objects/verify") {
            let v = request.json();
            let (oid, size) = (v["oid"].as_str().unwrap_or(""), v["size"].as_u64());
            if request.header("x-verify-token") != Some(&verify_token(oid)) {
                return Reply::error(403, "Forbidden", "the verify action's header is missing");
            }
            let route =
                path.trim_start_matches('/').trim_end_matches(".git/info/lfs/objects/verify");
            return match state.objects.get(&(route.to_owned(), oid.to_owned())) {
                Some(bytes) if Some(bytes.len() as u64) == size => {
                    Reply::json(200, serde_json::json!({}))
                }
                _ => Reply::error(404, "EntryNotFound", &format!("object {oid} is not stored")),
            };
        }
        let Some(rest) = path.strip_prefix("/api/models/") else {
            return Reply::error(404, "NotFound", "no such route");
        };
        let mut it = rest.splitn(4, '/');
        let (owner, name, action) = (it.next().unwrap_or(""), it.next().unwrap_or(""), it.next());
        let route = format!("{owner}/{name}");
        if !state.repos.contains_key(&route) {
            return Reply::error(404, "RepoNotFound", "Repository not found");
        }
        match action {
            Some("preupload") => preupload(request),
            Some("branch") => Reply::json(200, serde_json::json!({})),
            Some("commit") => self.commit(state, request, &route),
            _ => Reply::error(404, "NotFound", "no such route"),
        }
    }

    fn create(&self, state: &mut State, request: &Incoming) -> Reply {
        let v = request.json();
        let name = v["name"].as_str().unwrap_or_default();
        let route = match v["organization"].as_str() {
            Some(org) => format!("{org}/{name}"),
            None => name.to_owned(),
        };
        let url = format!("{}/{route}", self.base);
        if state.repos.contains_key(&route) {
            return Reply::json(
                409,
                serde_json::json!({"error": "You already created this model repo", "url": url}),
            );
        }
        let private = v["private"].as_bool().unwrap_or(false);
        state.repos.insert(route, Repo { private, ..Repo::default() });
        Reply::json(200, serde_json::json!({ "url": url }))
    }

    fn batch(&self, state: &mut State, request: &Incoming, route: &str) -> Reply {
        if !state.repos.contains_key(route) {
            return Reply::error(404, "RepoNotFound", "Repository not found");
        }
        let v = request.json();
        if v["operation"] != "upload" {
            return Reply::error(422, "Unprocessable", "this fake Hub batches uploads only");
        }
        let offered: Vec<&str> =
            v["transfers"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
        let objects = v["objects"].as_array().cloned().unwrap_or_default();
        if state.xet_cas.is_some() && offered.contains(&"xet") {
            for object in &objects {
                let (oid, size) = (object["oid"].as_str().unwrap_or(""), object["size"].as_u64());
                state.xet_objects.insert((route.to_owned(), oid.to_owned()), size.unwrap_or(0));
            }
            return Reply::json(200, serde_json::json!({"transfer": "xet", "objects": objects}));
        }
        if !offered.is_empty() && !offered.contains(&"basic") {
            return Reply::error(422, "Unprocessable", "no transfer this Hub speaks was offered");
        }
        let answered: Vec<serde_json::Value> = objects
            .iter()
            .map(|object| {
                let oid = object["oid"].as_str().unwrap_or("").to_owned();
                let size = object["size"].as_u64().unwrap_or(0);
                match state.objects.get(&(route.to_owned(), oid.clone())) {
                    Some(bytes) if bytes.len() as u64 == size => {
                        serde_json::json!({"oid": oid, "size": size})
                    }
                    Some(_) => serde_json::json!({
                        "oid": oid, "size": size,
                        "error": {"code": 422, "message": "the size does not match the stored object"},
                    }),
                    None => serde_json::json!({
                        "oid": oid,
                        "size": size,
                        "authenticated": true,
                        "actions": {
                            "upload": {
                                "href": format!(
                                    "{}/lfs-storage/{route}/{oid}?X-Amz-Signature={}",
                                    self.base,
                                    signature(&oid)
                                ),
                                "header": {"x-amz-meta-oid": oid.clone()},
                                "expires_in": 900,
                            },
                            "verify": {
                                "href": format!("{}/{route}.git/info/lfs/objects/verify", self.base),
                                "header": {"X-Verify-Token": verify_token(&oid)},
                                "expires_in": 900,
                            },
                        },
                    }),
                }
            })
            .collect();
        Reply::json(200, serde_json::json!({"transfer": "basic", "objects": answered}))
    }

    /// The pre-signed upload URL: the signature in the query is the only credential.
    fn store_object(&self, state: &mut State, request: &Incoming) -> Reply {
        let Some((route, oid)) = request.path.trim_start_matches("/lfs-storage/").rsplit_once('/')
        else {
            return Reply::error(404, "NoSuchKey", "The specified key does not exist.");
        };
        if request.header("authorization").is_some() {
            return Reply::error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, \
                 Signature query string parameter or the Authorization header should be specified",
            );
        }
        if !request.query.contains(&format!("X-Amz-Signature={}", signature(oid)))
            || request.header("x-amz-meta-oid") != Some(oid)
        {
            return Reply::error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided",
            );
        }
        if sha256_hex(&request.body) != oid {
            return Reply::error(400, "BadDigest", "the bytes do not hash to the object's oid");
        }
        state.objects.insert((route.to_owned(), oid.to_owned()), request.body.clone());
        Reply {
            status: 200,
            headers: vec![("ETag".into(), format!("\"{oid}\""))],
            body: vec![],
            cut_after: None,
        }
    }

    fn xet_token(&self, state: &mut State, request: &Incoming, route: &str) -> Reply {
        if !self.authorized(request) {
            return Reply::error(
                401,
                "Unauthorized",
                "Invalid credentials in Authorization header",
            );
        }
        if !state.repos.contains_key(route) {
            return Reply::error(404, "RepoNotFound", "Repository not found");
        }
        let Some(cas) = &state.xet_cas else {
            return Reply::error(404, "NotFound", "this repository is not on Xet");
        };
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        Reply::json(
            200,
            serde_json::json!({
                "accessToken": "fake-xet-token",
                "exp": exp,
                "casUrl": format!("local://{}", cas.display()),
            }),
        )
    }

    fn commit(&self, state: &mut State, request: &Incoming, route: &str) -> Reply {
        let mut commit = Commit::default();
        let mut files = Vec::new();
        for line in request.body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                return Reply::error(400, "BadRequest", "a commit line is not JSON");
            };
            let value = &v["value"];
            let path = value["path"].as_str().unwrap_or("").to_owned();
            match v["key"].as_str() {
                Some("header") => commit.message = value["summary"].as_str().unwrap_or("").into(),
                Some("file") => {
                    let content = value["content"].as_str().unwrap_or("");
                    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(content)
                    else {
                        return Reply::error(400, "BadRequest", "inline content is not base64");
                    };
                    if bytes.len() as u64 > LFS_THRESHOLD || is_binary(&bytes) {
                        return Reply::error(400, "BadRequest", INLINE_BINARY_REFUSED);
                    }
                    commit.inline.push(path.clone());
                    files.push((path, Some(Stored::Inline(bytes))));
                }
                Some("lfsFile") => {
                    let oid = value["oid"].as_str().unwrap_or("").to_owned();
                    let size = value["size"].as_u64().unwrap_or(0);
                    let key = (route.to_owned(), oid.clone());
                    let stored = match (state.objects.get(&key), state.xet_objects.get(&key)) {
                        (Some(bytes), _) if bytes.len() as u64 == size => Stored::Lfs { oid, size },
                        (_, Some(&xet_size)) if xet_size == size => Stored::Xet { oid, size },
                        _ => {
                            return Reply::error(
                                400,
                                "BadRequest",
                                &format!(
                                    "Your push was rejected because an LFS pointer pointed to a file that does not exist ({path})"
                                ),
                            );
                        }
                    };
                    commit.lfs.push(path.clone());
                    files.push((path, Some(stored)));
                }
                Some("deletedFile") => files.push((path, None)),
                other => {
                    return Reply::error(
                        400,
                        "BadRequest",
                        &format!("unknown commit key {other:?}"),
                    );
                }
            }
        }
        let repo = state.repos.get_mut(route).expect("checked by the caller");
        commit.oid = format!("{:040x}", repo.commits.len() + 1);
        for (path, stored) in files {
            match stored {
                Some(stored) => repo.files.insert(path, stored),
                None => repo.files.remove(&path),
            };
        }
        let oid = commit.oid.clone();
        repo.commits.push(commit);
        Reply::json(
            200,
            serde_json::json!({
                "commitUrl": format!("{}/{route}/commit/{oid}", self.base),
                "commitOid": oid,
                "pullRequestUrl": null,
            }),
        )
    }

    fn resolve(&self, state: &mut State, request: &Incoming) -> Reply {
        let path = request.path.trim_start_matches('/');
        let (route, rest) = {
            let parts: Vec<&str> =
                path.splitn(if path.starts_with("datasets/") { 4 } else { 3 }, '/').collect();
            match parts.as_slice() {
                [d, o, n, rest] if *d == "datasets" => (format!("datasets/{o}/{n}"), *rest),
                [o, n, rest] if !path.starts_with("datasets/") => (format!("{o}/{n}"), *rest),
                _ => return Reply::error(404, "NotFound", "no such route"),
            }
        };
        let Some(file) =
            rest.strip_prefix("resolve/").and_then(|r| r.split_once('/')).map(|(_, f)| f)
        else {
            return Reply::error(404, "NotFound", "no such route");
        };
        let authorized = self.authorized(request);
        let Some(repo) = state.repos.get(&route).filter(|r| !r.private || authorized) else {
            return Reply::error(404, "RepoNotFound", "Repository not found");
        };
        let Some(stored) = repo.files.get(file) else {
            return Reply::not_found();
        };
        let commit = repo.commits.last().map_or("0".repeat(40), |c| c.oid.clone());
        let (bytes, etag) = match stored {
            Stored::Inline(bytes) => (bytes.clone(), git_blob_id(bytes)),
            Stored::Lfs { oid, .. } => {
                (state.objects[&(route.clone(), oid.clone())].clone(), oid.clone())
            }
            Stored::Xet { .. } => {
                return Reply::error(
                    501,
                    "NotImplemented",
                    "the fake Hub does not serve Xet files",
                );
            }
        };
        let key = (route.clone(), file.to_owned());
        let fault = state.faults.get(&key).copied();
        let etag = match fault {
            Some(Fault::WrongSha) => sha256_hex(&[&bytes[..], b"other"].concat()),
            _ => etag,
        };
        let size = bytes.len() as u64;
        let (start, end) = request.range().map_or((0, size), |(a, b)| (a.min(size), b.min(size)));
        let mut headers = vec![
            ("ETag".to_owned(), format!("\"{etag}\"")),
            ("X-Repo-Commit".to_owned(), commit),
            ("Accept-Ranges".to_owned(), "bytes".to_owned()),
        ];
        let status = if request.range().is_some() {
            headers
                .push(("Content-Range".into(), format!("bytes {start}-{}/{size}", end.max(1) - 1)));
            206
        } else {
            200
        };
        let body = bytes[start as usize..end as usize].to_vec();
        let cut = request.method == "GET"
            && match fault {
                Some(Fault::Truncated) => true,
                Some(Fault::CutOnceAt(at)) => {
                    start >= at && *state.cut.entry(key.clone()).or_default() == 0
                }
                _ => false,
            };
        if cut {
            *state.cut.entry(key).or_default() += 1;
        }
        if request.method == "HEAD" {
            headers.push(("Content-Length".into(), body.len().to_string()));
            return Reply { status, headers, body: vec![], cut_after: None };
        }
        let cut_after = cut.then_some(body.len() / 2);
        Reply { status, headers, body, cut_after }
    }
}

/// The preupload answer: where each file goes.
fn preupload(request: &Incoming) -> Reply {
    let files: Vec<serde_json::Value> = request.json()["files"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let path = f["path"].as_str().unwrap_or("");
            let size = f["size"].as_u64().unwrap_or(0);
            let sample = base64::engine::general_purpose::STANDARD
                .decode(f["sample"].as_str().unwrap_or(""))
                .unwrap_or_default();
            let mode = if must_use_lfs(path, size, &sample) { "lfs" } else { "regular" };
            serde_json::json!({"path": path, "uploadMode": mode, "shouldIgnore": false})
        })
        .collect();
    Reply::json(200, serde_json::json!({ "files": files }))
}

/// The pre-signed URL's signature for an object (fixed per object: a test can tell it).
fn signature(oid: &str) -> String {
    sha256_hex(format!("signed:{oid}").as_bytes())[..32].to_owned()
}

/// The header value the verify action carries.
fn verify_token(oid: &str) -> String {
    sha256_hex(format!("verify:{oid}").as_bytes())[..32].to_owned()
}

/// Git's blob id of `bytes` stands in for it with 40 hex digits that are not a SHA-256, which is
/// what a client needs to know of a regular file's `ETag`.
fn git_blob_id(bytes: &[u8]) -> String {
    sha256_hex(&[format!("blob {}\0", bytes.len()).as_bytes(), bytes].concat())[..40].to_owned()
}
