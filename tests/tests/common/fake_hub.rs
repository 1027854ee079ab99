//! A fake Hugging Face Hub on 127.0.0.1 that keeps model repositories in memory and records
//! every request: the routes hf-hub 1.0 uses to create a repository, commit files (preupload,
//! then an NDJSON commit with the files inline) and download them (`HEAD`/`GET .../resolve`).
//! Write routes need the token it was started with (else 401); failures can be injected.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use base64::Engine;

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
}

/// One commit of a repository.
#[derive(Clone, Debug)]
pub struct Commit {
    pub message: String,
    pub oid: String,
    pub files: Vec<String>,
}

/// A model repository.
#[derive(Clone, Debug, Default)]
pub struct Repo {
    pub private: bool,
    pub files: BTreeMap<String, Vec<u8>>,
    pub commits: Vec<Commit>,
}

/// Everything the fake Hub holds and saw.
#[derive(Debug, Default)]
pub struct State {
    pub requests: Vec<Request>,
    pub repos: BTreeMap<String, Repo>,
    /// `(part of the path, status, times)`: answer the next `times` matching requests with
    /// `status`.
    pub failures: Vec<(String, u16, usize)>,
}

pub struct FakeHub {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

impl FakeHub {
    /// Starts the server; `token` is the one write token it accepts.
    pub fn start(token: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (shared, base, token) = (state.clone(), url.clone(), token.to_owned());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (shared, base, token) = (shared.clone(), base.clone(), token.clone());
                std::thread::spawn(move || serve(stream, &shared, &base, &token));
            }
        });
        Self { url, state }
    }

    /// Requests seen so far.
    pub fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// The repository `id`, if it exists.
    pub fn repo(&self, id: &str) -> Option<Repo> {
        self.state.lock().unwrap().repos.get(id).cloned()
    }

    /// Answers the next `times` requests whose path contains `part` with `status`.
    pub fn fail(&self, part: &str, status: u16, times: usize) {
        self.state.lock().unwrap().failures.push((part.into(), status, times));
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, base: &str, token: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let (mut length, mut authorization, mut chunked) = (0usize, None, false);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
        let lower = header.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        } else if lower.starts_with("authorization:") {
            authorization = Some(header["authorization:".len()..].trim().to_owned());
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let body = if chunked { read_chunked(&mut reader) } else { read_exact(&mut reader, length) };
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let full = parts.next().unwrap_or("").to_owned();
    let path = full.split('?').next().unwrap_or("").to_owned();
    let mut state = state.lock().unwrap();
    state.requests.push(Request {
        method: method.clone(),
        path: path.clone(),
        authorization: authorization.clone(),
    });
    let injected =
        state.failures.iter_mut().find(|(part, _, n)| *n > 0 && path.contains(part.as_str()));
    let response = if let Some((_, status, n)) = injected {
        *n -= 1;
        Response::json(*status, serde_json::json!({"error": "injected failure"}))
    } else {
        let authorized = authorization.as_deref() == Some(&format!("Bearer {token}"));
        route(&mut state, &method, &path, &body, authorized, base)
    };
    drop(state);
    let mut stream = stream;
    let _ = response.write(&mut stream, method == "HEAD");
}

fn read_exact(reader: &mut impl Read, n: usize) -> Vec<u8> {
    let mut body = vec![0; n];
    let _ = reader.read_exact(&mut body);
    body
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut body = vec![];
    loop {
        let mut size = String::new();
        if reader.read_line(&mut size).unwrap_or(0) == 0 {
            return body;
        }
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            let mut end = String::new();
            let _ = reader.read_line(&mut end);
            return body;
        }
        body.extend(read_exact(reader, n));
        let mut crlf = [0u8; 2];
        let _ = reader.read_exact(&mut crlf);
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }

    fn error(status: u16, code: &str) -> Self {
        let mut r = Self::json(status, serde_json::json!({"error": code}));
        r.headers.push(("X-Error-Code".into(), code.into()));
        r
    }

    fn write(&self, stream: &mut TcpStream, head_only: bool) -> std::io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            401 => "Unauthorized",
            404 => "Not Found",
            409 => "Conflict",
            _ => "Error",
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", self.body.len()));
        stream.write_all(head.as_bytes())?;
        if !head_only {
            stream.write_all(&self.body)?;
        }
        stream.flush()
    }
}

/// `owner/name` and the rest of a path after `prefix`.
fn split_repo<'a>(path: &'a str, prefix: &str) -> Option<(String, &'a str)> {
    let rest = path.strip_prefix(prefix)?;
    let mut it = rest.splitn(3, '/');
    let (owner, name, tail) = (it.next()?, it.next()?, it.next().unwrap_or(""));
    Some((format!("{owner}/{name}"), tail))
}

fn route(
    state: &mut State,
    method: &str,
    path: &str,
    body: &[u8],
    authorized: bool,
    base: &str,
) -> Response {
    if method == "POST" && !authorized {
        return Response::error(401, "Unauthorized");
    }
    if method == "POST" && path == "/api/repos/create" {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let name = v["name"].as_str().unwrap_or_default();
        let id = match v["organization"].as_str() {
            Some(org) => format!("{org}/{name}"),
            None => name.to_owned(),
        };
        if state.repos.contains_key(&id) {
            return Response::json(409, serde_json::json!({"error": "already exists"}));
        }
        let private = v["private"].as_bool().unwrap_or(false);
        state.repos.insert(id.clone(), Repo { private, ..Repo::default() });
        return Response::json(200, serde_json::json!({"url": format!("{base}/{id}")}));
    }
    if method == "POST"
        && let Some((id, tail)) = split_repo(path, "/api/models/")
    {
        let Some(repo) = state.repos.get_mut(&id) else {
            return Response::error(404, "RepoNotFound");
        };
        if tail.starts_with("preupload/") {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let files: Vec<serde_json::Value> = v["files"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|f| {
                    serde_json::json!({"path": f["path"], "uploadMode": "regular", "shouldIgnore": false})
                })
                .collect();
            return Response::json(200, serde_json::json!({ "files": files }));
        }
        if tail.starts_with("branch/") {
            return Response::json(200, serde_json::json!({}));
        }
        if tail.starts_with("commit/") {
            let mut commit = Commit {
                message: String::new(),
                oid: format!("{:040x}", repo.commits.len() + 1),
                files: vec![],
            };
            for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(line).unwrap();
                match v["key"].as_str() {
                    Some("header") => {
                        commit.message = v["value"]["summary"].as_str().unwrap_or("").into()
                    }
                    Some("file") => {
                        let p = v["value"]["path"].as_str().unwrap().to_owned();
                        let content = base64::engine::general_purpose::STANDARD
                            .decode(v["value"]["content"].as_str().unwrap())
                            .unwrap();
                        repo.files.insert(p.clone(), content);
                        commit.files.push(p);
                    }
                    other => panic!("the fake Hub takes inline files only, got {other:?}"),
                }
            }
            let oid = commit.oid.clone();
            repo.commits.push(commit);
            return Response::json(
                200,
                serde_json::json!({"commitUrl": format!("{base}/{id}/commit/{oid}"), "commitOid": oid}),
            );
        }
        return Response::error(404, "NotFound");
    }
    if (method == "GET" || method == "HEAD")
        && let Some((id, tail)) = split_repo(path, "/")
        && let Some(file) =
            tail.strip_prefix("resolve/").and_then(|t| t.split_once('/')).map(|(_, f)| f)
    {
        let Some(repo) = state.repos.get(&id).filter(|r| !r.private || authorized) else {
            return Response::error(404, "RepoNotFound");
        };
        let Some(bytes) = repo.files.get(file) else {
            return Response::error(404, "EntryNotFound");
        };
        let commit = repo.commits.last().map_or("0".repeat(40), |c| c.oid.clone());
        let etag: u64 = bytes.iter().enumerate().map(|(i, &b)| (i as u64 + 1) * b as u64).sum();
        return Response {
            status: 200,
            headers: vec![
                ("ETag".into(), format!("\"{:016x}{:08x}\"", etag, bytes.len())),
                ("X-Repo-Commit".into(), commit),
            ],
            body: bytes.clone(),
        };
    }
    Response::error(404, "NotFound")
}
