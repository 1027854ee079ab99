//! The fake Hub is as strict as the real one where a client meets it: these are the answers the
//! upload tests of at-data and the workspace rely on, checked with plain HTTP requests.

use at_fake_hub::{FakeHub, INLINE_BINARY_REFUSED, sha256_hex};
use base64::Engine;
use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};

const TOKEN: &str = "hf_strict_token";

fn post(hub: &FakeHub, path: &str, body: &Value) -> Response {
    Client::new()
        .post(format!("{}{path}", hub.url))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .body(body.to_string())
        .send()
        .unwrap()
}

fn json_of(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, serde_json::from_str(&response.text().unwrap()).unwrap_or_default())
}

fn hub_with_repo() -> FakeHub {
    let hub = FakeHub::start(TOKEN);
    let (status, _) =
        json_of(post(&hub, "/api/repos/create", &json!({"name": "x", "organization": "me"})));
    assert_eq!(status, 200);
    hub
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn creating_an_existing_repository_is_409_with_its_url() {
    let hub = hub_with_repo();
    let (status, body) =
        json_of(post(&hub, "/api/repos/create", &json!({"name": "x", "organization": "me"})));
    assert_eq!(status, 409);
    assert_eq!(body["url"], format!("{}/me/x", hub.url));
}

#[test]
fn writes_without_the_token_are_401() {
    let hub = hub_with_repo();
    let response = Client::new()
        .post(format!("{}/api/models/me/x/preupload/main", hub.url))
        .header("Authorization", "Bearer hf_other")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
}

#[test]
fn preupload_sends_binaries_large_files_and_lfs_patterns_to_lfs() {
    let hub = hub_with_repo();
    let files = json!({"files": [
        {"path": "README.md", "size": 20, "sample": b64(b"# A model\nIt works.\n")},
        {"path": "figures/a.png", "size": 300, "sample": b64(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")},
        {"path": "training/metrics.jsonl", "size": 11 << 20, "sample": b64(b"{\"epoch\": 1}\n")},
        {"path": "model.safetensors", "size": 12, "sample": b64(b"looks textual")},
        {"path": "notes.txt", "size": 3, "sample": b64(b"\xff\xfe\x00")},
    ]});
    let (status, body) = json_of(post(&hub, "/api/models/me/x/preupload/main", &files));
    assert_eq!(status, 200);
    let modes: Vec<(&str, &str)> = body["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["uploadMode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        modes,
        [
            ("README.md", "regular"),
            ("figures/a.png", "lfs"),
            ("training/metrics.jsonl", "lfs"),
            ("model.safetensors", "lfs"),
            ("notes.txt", "lfs"),
        ]
    );
}

fn commit(hub: &FakeHub, lines: &[Value]) -> (u16, Value) {
    let mut body = json!({"key": "header", "value": {"summary": "test"}}).to_string();
    for line in lines {
        body.push('\n');
        body.push_str(&line.to_string());
    }
    let response = Client::new()
        .post(format!("{}/api/models/me/x/commit/main", hub.url))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .header("Content-Type", "application/x-ndjson")
        .body(body)
        .send()
        .unwrap();
    json_of(response)
}

#[test]
fn an_inline_binary_is_refused_with_the_hubs_message_and_text_is_taken() {
    let hub = hub_with_repo();
    let binary = json!({"key": "file", "value": {"path": "model.safetensors", "content": b64(&[8, 0, 0, 0, 1, 2]), "encoding": "base64"}});
    let (status, body) = commit(&hub, &[binary]);
    assert_eq!((status, body["error"].as_str()), (400, Some(INLINE_BINARY_REFUSED)));
    assert!(hub.repo("me/x").unwrap().commits.is_empty());

    let text = json!({"key": "file", "value": {"path": "README.md", "content": b64(b"# hi\n"), "encoding": "base64"}});
    let (status, _) = commit(&hub, &[text]);
    assert_eq!(status, 200);
    assert_eq!(hub.file("me/x", "README.md").unwrap(), b"# hi\n");
}

/// The batch gives a pre-signed URL that takes the object only without the token and with the
/// action's header, a verify action, and nothing for an object it holds; a pointer to an object
/// never stored is refused.
#[test]
fn the_lfs_batch_and_its_presigned_url_work_as_the_hubs() {
    let hub = hub_with_repo();
    let bytes = vec![0u8, 1, 2, 3, 250];
    let oid = sha256_hex(&bytes);
    let pointer = json!({"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": 5}});
    assert_eq!(commit(&hub, std::slice::from_ref(&pointer)).0, 400, "no such object yet");

    let batch = json!({"operation": "upload", "transfers": ["basic", "multipart"], "objects": [{"oid": oid, "size": 5}]});
    let (status, answer) = json_of(post(&hub, "/me/x.git/info/lfs/objects/batch", &batch));
    assert_eq!((status, answer["transfer"].as_str()), (200, Some("basic")));
    let actions = &answer["objects"][0]["actions"];
    let href = actions["upload"]["href"].as_str().unwrap();
    let headers = actions["upload"]["header"].as_object().unwrap();
    let put = |auth: bool, header: bool| {
        let mut request = Client::new().put(href).body(bytes.clone());
        if auth {
            request = request.header("Authorization", format!("Bearer {TOKEN}"));
        }
        if header {
            for (k, v) in headers {
                request = request.header(k, v.as_str().unwrap());
            }
        }
        request.send().unwrap().status().as_u16()
    };
    assert_eq!(put(true, true), 400, "a signed URL takes no second credential");
    assert_eq!(put(false, false), 403, "the action's header is part of the signature");
    assert_eq!(put(false, true), 200);

    let verify = &actions["verify"];
    let mut request = Client::new()
        .post(verify["href"].as_str().unwrap())
        .header("Authorization", format!("Bearer {TOKEN}"))
        .body(json!({"oid": oid, "size": 5}).to_string());
    for (k, v) in verify["header"].as_object().unwrap() {
        request = request.header(k, v.as_str().unwrap());
    }
    assert_eq!(request.send().unwrap().status().as_u16(), 200);

    let (_, again) = json_of(post(&hub, "/me/x.git/info/lfs/objects/batch", &batch));
    assert!(again["objects"][0].get("actions").is_none(), "stored: {again}");
    assert_eq!(commit(&hub, &[pointer]).0, 200);
    assert_eq!(hub.file("me/x", "w.bin").unwrap(), bytes);
}
