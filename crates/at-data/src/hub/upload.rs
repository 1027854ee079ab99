//! Commits files to a model repository the way the Hub asks for each of them.
//!
//! **Why this layer exists.** hf-hub 1.0 sends the files the Hub keeps in LFS only through Xet:
//! when the LFS batch answer chooses another transfer (`basic`), it falls back to sending them
//! inline, base64, in the commit, and the Hub refuses binary files sent so. This module speaks
//! the part of the protocol that hf-hub lacks and leaves the rest to it:
//!
//! 1. `POST /api/models/{repo}/preupload/{rev}` with each file's size and first 512 bytes: the
//!    Hub answers `lfs` or `regular` for each.
//! 2. For the `lfs` files, `POST /{repo}.git/info/lfs/objects/batch` (Git LFS's batch API),
//!    offering `basic` and `xet`:
//!    - `basic`: each object the Hub lacks is sent to the `href` of its `upload` action (a
//!      pre-signed storage URL: the action's `header` fields go with it, the Hub's token never),
//!      then confirmed at its `verify` action. An object without actions is stored already and
//!      is not sent again.
//!    - `xet`: hf-hub's own Xet path does the whole commit, as it would without this layer.
//! 3. `POST /api/models/{repo}/commit/{rev}` (NDJSON): a `header` line, an `lfsFile` line
//!    (SHA-256 and size) per LFS file, a `file` line (inline, base64) per regular file.
//!
//! Every request is retried on a transient failure (a cut connection, 5xx, 429) up to
//! [`HubOptions::attempts`] times; no message carries the token.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use hf_hub::HFError;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::{Value, json};

use super::{HubOptions, OnProgress, client, owner_name};
use crate::error::{Error, Result};

/// The media type of the Hub's API.
const JSON: &str = "application/json";
/// Git LFS's media type (its batch and verify calls).
const LFS_JSON: &str = "application/vnd.git-lfs+json";

/// A commit to a model repository: what [`upload`] sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    /// The model repository, `owner/name`; created (private or not) if it does not exist.
    pub repo: String,
    /// Create the repository private.
    pub private: bool,
    /// The branch to commit to (created if missing); `None` is `main`.
    pub revision: Option<String>,
    /// The commit message.
    pub message: String,
    /// `(path in the repository, local file)`, all in one commit.
    pub files: Vec<(String, PathBuf)>,
}

/// How the files the Hub keeps in LFS reached it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// No file needed LFS: every file went inline in the commit.
    Inline,
    /// Git LFS's `basic` transfer: one request per object to a pre-signed storage URL.
    Basic,
    /// Xet, through hf-hub.
    Xet,
}

/// What the Hub answered to an [`upload`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The commit's page, when the Hub gives it.
    pub url: Option<String>,
    /// The commit's id, when the Hub gives it.
    pub oid: Option<String>,
    /// How the LFS files were sent.
    pub transfer: Transfer,
    /// The LFS files whose bytes were sent (repository paths).
    pub uploaded: Vec<String>,
    /// The LFS files the Hub already held (same SHA-256): committed, not sent again.
    pub already_stored: Vec<String>,
}

/// Creates the model repository of `upload` if it is missing and commits its files in one
/// commit, binary files through the Hub's LFS storage (see the module's documentation).
/// `progress` is told `(path, bytes sent, size)` as each LFS file goes. It needs a token with
/// write access (`options.token`), and says so before sending anything.
pub fn upload(upload: &Upload, options: &HubOptions, progress: OnProgress) -> Result<Committed> {
    use hf_hub::repository::RepoTypeModel;
    let token = options.token.as_deref().filter(|t| !t.trim().is_empty());
    let Some(token) = token else {
        return Err(Error::Hub(format!(
            "no Hugging Face token to publish {} with: set HF_TOKEN (or log in with `hf auth login`) \
             to a token with write access, from https://huggingface.co/settings/tokens",
            upload.repo
        )));
    };
    if options.offline {
        return Err(Error::Hub(format!(
            "HF_HUB_OFFLINE is set: unset it to publish {}",
            upload.repo
        )));
    }
    let (owner, name) = owner_name(&upload.repo)?;
    let hub = Hub::new(options, token, &upload.repo)?;
    let (client, _) = client(options)?;
    client
        .create_repository()
        .repo_id(&upload.repo)
        .repo_type(RepoTypeModel)
        .private(upload.private)
        .exist_ok(true)
        .send()
        .map_err(|e| hub.hf_error(e))?;
    let repo = client.model(owner, name);
    if let Some(branch) = upload.revision.as_deref().filter(|b| *b != "main") {
        match repo.create_branch().branch(branch).send() {
            Ok(()) | Err(HFError::Conflict { .. }) => {}
            Err(e) => return Err(hub.hf_error(e)),
        }
    }
    let revision = upload.revision.as_deref().unwrap_or("main");
    let files = upload
        .files
        .iter()
        .map(|(path, file)| Prepared::read(path, file))
        .collect::<Result<Vec<_>>>()?;
    let lfs = hub.preupload(revision, &files)?;
    let (transfer, objects) = if lfs.is_empty() {
        (Transfer::Inline, BTreeMap::new())
    } else {
        hub.batch(revision, &files, &lfs)?
    };
    if transfer == Transfer::Xet {
        let info = commit_through_hf_hub(&repo, upload).map_err(|e| hub.hf_error(e))?;
        return Ok(Committed {
            url: info.commit_url,
            oid: info.commit_oid,
            transfer,
            uploaded: lfs.to_vec(),
            already_stored: vec![],
        });
    }
    let (mut uploaded, mut already_stored) = (vec![], vec![]);
    for file in files.iter().filter(|f| lfs.contains(&f.path)) {
        match objects.get(&file.sha256) {
            Some(actions) => {
                hub.send_object(file, actions, &progress)?;
                uploaded.push(file.path.clone());
            }
            None => {
                progress(&file.path, file.size, file.size);
                already_stored.push(file.path.clone());
            }
        }
    }
    let (url, oid) = hub.commit(revision, &upload.message, &files, &lfs)?;
    Ok(Committed { url, oid, transfer, uploaded, already_stored })
}

/// The commit of `upload` by hf-hub, which sends the LFS files through Xet.
fn commit_through_hf_hub(
    repo: &hf_hub::HFRepositorySync<hf_hub::repository::RepoTypeModel>,
    upload: &Upload,
) -> std::result::Result<hf_hub::repository::CommitInfo, HFError> {
    use hf_hub::repository::{AddSource, CommitOperation};
    let operations = upload
        .files
        .iter()
        .map(|(path, file)| CommitOperation::Add {
            path_in_repo: path.clone(),
            source: AddSource::File(file.clone()),
        })
        .collect();
    repo.create_commit()
        .operations(operations)
        .commit_message(upload.message.clone())
        .maybe_revision(upload.revision.clone())
        .send()
}

/// One file to commit, read once: its size, SHA-256 and first 512 bytes.
struct Prepared {
    path: String,
    local: PathBuf,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
}

impl Prepared {
    fn read(path: &str, local: &Path) -> Result<Self> {
        use sha2::Digest;
        let mut file = std::fs::File::open(local).map_err(|e| Error::io(local, e))?;
        let (mut hasher, mut sample, mut size) = (sha2::Sha256::new(), Vec::new(), 0u64);
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buffer).map_err(|e| Error::io(local, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            let take = (512 - sample.len()).min(n);
            sample.extend_from_slice(&buffer[..take]);
            size += n as u64;
        }
        let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { path: path.to_owned(), local: local.to_owned(), size, sha256, sample })
    }
}

/// The actions of one object the Hub asked to be sent.
#[derive(Clone, Debug)]
struct Actions {
    upload: Action,
    verify: Option<Action>,
}

/// A Git LFS action: where to send, with which headers.
#[derive(Clone, Debug)]
struct Action {
    href: String,
    header: Vec<(String, String)>,
}

impl Action {
    fn parse(value: &Value) -> Option<Self> {
        let href = value["href"].as_str()?.to_owned();
        let header = value["header"]
            .as_object()
            .map(|h| {
                h.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect()
            })
            .unwrap_or_default();
        Some(Self { href, header })
    }
}

/// The requests of one upload: the endpoint, the token, the retries.
struct Hub<'a> {
    http: Client,
    endpoint: String,
    token: &'a str,
    attempts: usize,
    repo: &'a str,
}

/// What one request ended with: an answer, or the transport's error after the last attempt.
enum Outcome {
    Answered(Response),
    Failed(reqwest::Error),
}

impl<'a> Hub<'a> {
    fn new(options: &HubOptions, token: &'a str, repo: &'a str) -> Result<Self> {
        let endpoint = options
            .endpoint
            .as_deref()
            .unwrap_or("https://huggingface.co")
            .trim_end_matches('/')
            .to_owned();
        let http = Client::builder()
            // An upload of a few hundred megabytes must not be cut by a whole-request timeout;
            // connecting still is.
            .timeout(None)
            .connect_timeout(Duration::from_secs(30))
            .user_agent(concat!("attention-transfer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Hub(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self { http, endpoint, token, attempts: options.attempts.max(1), repo })
    }

    fn api(&self, action: &str, revision: &str) -> String {
        format!(
            "{}/api/models/{}/{action}/{}",
            self.endpoint,
            self.repo,
            revision.replace('/', "%2F")
        )
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// Sends what `build` makes, again on a transient failure (a cut connection, 5xx, 429) until
    /// the attempts are spent, waiting 0.2 s, 0.4 s, ... between them.
    fn send(&self, build: &dyn Fn() -> Result<RequestBuilder>) -> Result<Outcome> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= self.attempts;
            match build()?.send() {
                Ok(response) => {
                    let status = response.status();
                    if last || !(status.is_server_error() || status.as_u16() == 429) {
                        return Ok(Outcome::Answered(response));
                    }
                }
                Err(e) if last || e.is_builder() => return Ok(Outcome::Failed(e)),
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(200 << (attempt - 1).min(5)));
        }
    }

    /// The successful answer to `build`, or an error that says which step failed (`what`) and
    /// the Hub's reason, with the fix for 401 and 403.
    fn expect(&self, what: &str, build: &dyn Fn() -> Result<RequestBuilder>) -> Result<Response> {
        match self.send(build)? {
            Outcome::Answered(response) if response.status().is_success() => Ok(response),
            Outcome::Answered(response) => {
                let status = response.status();
                let body = response.text().unwrap_or_default();
                let reason = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["error"].as_str().or(v["message"].as_str()).map(str::to_owned))
                    .unwrap_or_else(|| body.chars().take(300).collect());
                Err(self.refused(what, status.as_u16(), &reason))
            }
            Outcome::Failed(e) => Err(Error::Hub(self.scrub(&format!(
                "cannot publish {}: {what} failed after {} attempts ({e}); check the network (or \
                 HF_ENDPOINT) and run the command again",
                self.repo, self.attempts
            )))),
        }
    }

    fn refused(&self, what: &str, status: u16, reason: &str) -> Error {
        let repo = self.repo;
        Error::Hub(self.scrub(&match status {
            401 => format!(
                "the Hub refused the token (401) for {repo}: HF_TOKEN (or the token file) is \
                 missing or wrong; use a token with write access"
            ),
            403 => format!(
                "the Hub forbids writing to {repo} with this token (403): it needs write access to \
                 {}",
                repo.split('/').next().unwrap_or(repo)
            ),
            _ => format!("cannot publish {repo}: {what} was refused ({status}): {reason}"),
        }))
    }

    /// hf-hub's error, in the words of [`Hub::refused`].
    fn hf_error(&self, e: HFError) -> Error {
        match e {
            HFError::AuthRequired { .. } => self.refused("", 401, ""),
            HFError::Forbidden { .. } => self.refused("", 403, ""),
            other => Error::Hub(self.scrub(&format!("cannot publish {}: {other}", self.repo))),
        }
    }

    /// POSTs `body` (of `content_type`) to the Hub's `url` with the token, and reads the JSON it
    /// answers; errors as [`Hub::expect`] says them, `what` naming the step.
    fn post_for_json(
        &self,
        what: &str,
        url: &str,
        content_type: &str,
        body: String,
    ) -> Result<Value> {
        // Git LFS answers in its own media type; the Hub's API in plain JSON.
        let accept = if content_type == LFS_JSON { LFS_JSON } else { JSON };
        let text = self
            .expect(what, &|| {
                Ok(self
                    .http
                    .post(url)
                    .header("Authorization", self.bearer())
                    .header("Content-Type", content_type)
                    .header("Accept", accept)
                    .body(body.clone()))
            })?
            .text()
            .map_err(|e| Error::Hub(format!("the Hub's answer to {what} was cut short: {e}")))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Hub(format!("the Hub's answer to {what} is not JSON: {e}")))
    }

    /// `text` without the token (hf-hub's and reqwest's messages hold none; this makes sure).
    fn scrub(&self, text: &str) -> String {
        text.replace(self.token, "***")
    }

    /// The repository paths the Hub wants in LFS (empty files never are).
    fn preupload(&self, revision: &str, files: &[Prepared]) -> Result<Vec<String>> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = json!({
            "files": files.iter().map(|f| json!({
                "path": f.path, "size": f.size, "sample": b64.encode(&f.sample),
            })).collect::<Vec<_>>(),
        });
        let url = self.api("preupload", revision);
        let answer = self.post_for_json("the preupload check", &url, JSON, body.to_string())?;
        let lfs: Vec<String> = answer["files"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["uploadMode"] == "lfs")
            .filter_map(|f| f["path"].as_str().map(str::to_owned))
            .collect();
        Ok(files
            .iter()
            .filter(|f| f.size > 0 && lfs.contains(&f.path))
            .map(|f| f.path.clone())
            .collect())
    }

    /// Git LFS's batch call for the `lfs` files: the transfer the Hub chose and, for `basic`,
    /// the actions of each object it lacks (by SHA-256).
    fn batch(
        &self,
        revision: &str,
        files: &[Prepared],
        lfs: &[String],
    ) -> Result<(Transfer, BTreeMap<String, Actions>)> {
        let mut objects: BTreeMap<&str, u64> = BTreeMap::new();
        for file in files.iter().filter(|f| lfs.contains(&f.path)) {
            objects.insert(&file.sha256, file.size);
        }
        // `multipart` is not offered: one request per object is what `basic` does, fine for
        // the weights of these models (tens of megabytes); the Hub takes up to 5 GB so.
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "xet"],
            "objects": objects.iter().map(|(oid, size)| json!({"oid": oid, "size": size})).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": revision},
        });
        let url = format!("{}/{}.git/info/lfs/objects/batch", self.endpoint, self.repo);
        let answer = self.post_for_json("the LFS batch call", &url, LFS_JSON, body.to_string())?;
        // Git LFS: no `transfer` in the answer means `basic`.
        let transfer = match answer["transfer"].as_str().unwrap_or("basic") {
            "basic" => Transfer::Basic,
            "xet" => return Ok((Transfer::Xet, BTreeMap::new())),
            other => {
                return Err(Error::Hub(format!(
                    "cannot publish {}: the Hub chose the LFS transfer `{other}`, which was not \
                     offered (basic, xet)",
                    self.repo
                )));
            }
        };
        let mut actions = BTreeMap::new();
        for object in answer["objects"].as_array().into_iter().flatten() {
            let oid = object["oid"].as_str().unwrap_or_default().to_owned();
            if let Some(error) = object.get("error") {
                let path = files.iter().find(|f| f.sha256 == oid).map_or(oid.as_str(), |f| &f.path);
                return Err(Error::Hub(format!(
                    "cannot publish {}: the Hub refused to store {path} ({}: {})",
                    self.repo,
                    error["code"],
                    error["message"].as_str().unwrap_or("no reason given")
                )));
            }
            if let Some(upload) = Action::parse(&object["actions"]["upload"]) {
                let verify = Action::parse(&object["actions"]["verify"]);
                actions.insert(oid, Actions { upload, verify });
            }
        }
        Ok((transfer, actions))
    }

    /// Sends one object to its pre-signed URL, then asks the Hub to verify it.
    fn send_object(&self, file: &Prepared, actions: &Actions, progress: &OnProgress) -> Result<()> {
        let what = format!("the upload of {} to LFS storage", file.path);
        progress(&file.path, 0, file.size);
        self.expect(&what, &|| {
            let reader = std::fs::File::open(&file.local).map_err(|e| Error::io(&file.local, e))?;
            let counted = Counted {
                inner: reader,
                path: file.path.clone(),
                done: 0,
                size: file.size,
                progress: progress.clone(),
            };
            // The URL is signed: its own headers go with it, the Hub's token does not.
            let mut request = self
                .http
                .put(&actions.upload.href)
                .body(reqwest::blocking::Body::sized(counted, file.size));
            for (name, value) in &actions.upload.header {
                request = request.header(name, value);
            }
            Ok(request)
        })?;
        let Some(verify) = &actions.verify else { return Ok(()) };
        let body = json!({"oid": file.sha256, "size": file.size});
        // The token goes to the Hub's own verify URL only, and only if the action gives no
        // credential of its own.
        let own = verify.href.starts_with(&format!("{}/", self.endpoint));
        let has_auth = verify.header.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
        self.expect(&format!("the LFS verification of {}", file.path), &|| {
            let mut request = self
                .http
                .post(&verify.href)
                .header("Accept", LFS_JSON)
                .header("Content-Type", LFS_JSON)
                .body(body.to_string());
            if own && !has_auth {
                request = request.header("Authorization", self.bearer());
            }
            for (name, value) in &verify.header {
                request = request.header(name, value);
            }
            Ok(request)
        })?;
        Ok(())
    }

    /// The commit: `lfsFile` lines for the `lfs` files, inline `file` lines for the rest.
    fn commit(
        &self,
        revision: &str,
        message: &str,
        files: &[Prepared],
        lfs: &[String],
    ) -> Result<(Option<String>, Option<String>)> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut body =
            json!({"key": "header", "value": {"summary": message, "description": ""}}).to_string();
        body.push('\n');
        for file in files {
            let line = if lfs.contains(&file.path) {
                json!({"key": "lfsFile", "value": {
                    "path": file.path, "algo": "sha256", "oid": file.sha256, "size": file.size,
                }})
            } else {
                let bytes = std::fs::read(&file.local).map_err(|e| Error::io(&file.local, e))?;
                json!({"key": "file", "value": {
                    "path": file.path, "content": b64.encode(bytes), "encoding": "base64",
                }})
            };
            body.push_str(&line.to_string());
            body.push('\n');
        }
        let url = self.api("commit", revision);
        let answer = self.post_for_json("the commit", &url, "application/x-ndjson", body)?;
        let field = |name: &str| answer[name].as_str().map(str::to_owned);
        Ok((field("commitUrl"), field("commitOid")))
    }
}

/// A file being sent, telling `progress` the bytes read so far.
struct Counted {
    inner: std::fs::File,
    path: String,
    done: u64,
    size: u64,
    progress: OnProgress,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.progress)(&self.path, self.done, self.size);
        Ok(n)
    }
}
