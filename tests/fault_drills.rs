//! Fault drills over real HTTP on the tiny Qwen2 fixture: what breaks on disk
//! fails clearly where it is used and nothing else stops serving.
//!
//! - a truncated adapter, and one with a garbage config, fail to load with a
//!   400 naming the problem; the adapters already loaded and the base serve on;
//! - a model whose chat template does not compile starts, its chat endpoint
//!   answers a 400 that says so, and completions serve;
//! - the data directory fills up while serving: uploads answer 507 "full",
//!   leave nothing behind, and work again once space is freed; inference serves;
//! - the data directory is read-only at start: the server starts and serves,
//!   what needs the directory answers 507 "read-only", nothing stored is lost;
//! - kill -9 mid-stream: the restarted server has every file and route that
//!   was acknowledged before, and nothing half-written.
//!
//! The full and read-only directories are real: a small tmpfs (or a read-only
//! bind mount) in a private mount namespace the server runs in. Where mount
//! namespaces are not allowed those two drills skip, saying so.
//!
//! (The engine thread's death is in tests/backend_faults.rs; SIGTERM draining
//! in tests/http_tiny.rs; kill -9 mid-job and mid-upload in tests/http_finetune.rs.)

mod common;

use std::path::Path;
use std::process::Command;

use common::http::Server;
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "tiny/qwen2/hf-f32";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

async fn health(s: &Server) -> u16 {
    reqwest::get(s.url("/health")).await.unwrap().status().as_u16()
}

async fn greedy(s: &Server, model: &str) -> (u16, Value) {
    s.post("/v1/completions", &json!({"model": model, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_or_truncated_adapter_fails_to_load_and_the_rest_keep_serving() {
    let root = tempfile::tempdir().unwrap();
    let good = fixture("tiny/lora/a-r4-qv");
    let truncated = root.path().join("truncated");
    copy_dir(&good, &truncated);
    let weights = truncated.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = root.path().join("garbage-config");
    copy_dir(&good, &garbage);
    std::fs::write(garbage.join("adapter_config.json"), b"{\"peft_type\": \"LORA\", \"r\": ").unwrap();

    let cfg = format!(
        "[lora]\nmax_loras = 2\nallowed_roots = [{:?}]\n[lora.adapters]\na = {:?}\n",
        root.path().display().to_string(),
        good.display().to_string(),
    );
    let s = Server::start(&fixture(MODEL), &cfg).await;
    let (_, before) = greedy(&s, "a").await;

    for (name, dir, want) in [("t", &truncated, "adapter_model.safetensors"), ("g", &garbage, "adapter_config.json")] {
        let body = json!({"lora_name": name, "lora_path": dir.display().to_string()});
        let r = reqwest::Client::new().post(s.url("/v1/load_lora_adapter")).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 400, "{name}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{name}: the message names the bad file: {msg}");
        assert_eq!(v["error"]["param"], "lora_path", "{v}");
        // Nothing half-loaded is listed or served.
        let (st, _) = greedy(&s, name).await;
        assert_eq!(st, 404, "{name} must not serve");
    }
    let (_, models) = s.get("/v1/models").await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"a") && !ids.contains(&"t") && !ids.contains(&"g"), "{ids:?}");
    // The adapter loaded before and the base serve on, unchanged.
    let (st, after) = greedy(&s, "a").await;
    assert_eq!(st, 200, "{after}");
    assert_eq!(after["choices"][0]["text"], before["choices"][0]["text"]);
    let (st, v) = greedy(&s, "hf-f32").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(health(&s).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chat_template_that_does_not_compile_fails_chat_clearly_and_completions_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("broken-template");
    copy_dir(&fixture(MODEL), &model);
    let cfg_path = model.join("tokenizer_config.json");
    let mut tok_cfg: Value = read_json(&cfg_path);
    tok_cfg["chat_template"] = json!("{% for m in messages %}{{ m.content }}{% endfor");
    std::fs::write(&cfg_path, tok_cfg.to_string()).unwrap();

    let s = Server::start(&model, "").await;
    assert_eq!(health(&s).await, 200, "a broken template does not stop the server");
    let (st, v) = s
        .post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .await;
    assert_eq!(st, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("failed to compile"), "the message says why: {msg}");
    assert!(msg.contains("/v1/completions"), "and what to use instead: {msg}");
    let (st, v) = s.post("/v1/completions", &json!({"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

fn store_config(data: &Path) -> String {
    format!("[store]\ndata_dir = {:?}\nmax_upload_mib = 1\n", data.display().to_string())
}

/// Runs `script` (sh, `$0` = `dir`, then exec "$@") in a private mount
/// namespace: the wrapper for `Server::start_wrapped`. `None`, with the reason
/// printed, where this machine does not allow mount namespaces.
fn in_mount_namespace(script: &str, dir: &Path) -> Option<Vec<String>> {
    let probe = tempfile::tempdir().unwrap();
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tandem-probe \"$0\""])
        .arg(probe.path())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!("skipping: no private mount namespace here: {}", String::from_utf8_lossy(&o.stderr).trim());
            return None;
        }
        Err(e) => {
            eprintln!("skipping: unshare(1) is not available: {e}");
            return None;
        }
    }
    let script = format!("{script} && exec \"$@\"");
    Some(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", &script, dir.to_str().unwrap()]
            .map(String::from)
            .to_vec(),
    )
}

/// Runs `sh -c script` inside `server`'s mount namespace.
fn in_server_namespace(server: &Server, script: &str) -> String {
    let out = Command::new("nsenter")
        .args(["-t", &server.pid().to_string(), "-m", "sh", "-c", script])
        .output()
        .expect("nsenter");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn content(s: &Server, id: &str) -> Vec<u8> {
    let r = reqwest::get(s.url(&format!("/v1/files/{id}/content"))).await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap().to_vec()
}

async fn put_route(s: &Server, alias: &str, target: &str) -> (u16, Value) {
    s.put(&format!("/admin/routes/{alias}"), &json!({"targets": [{"model": target, "weight": 1}]})).await
}

/// `n` lines of chat JSONL (about 80 bytes each).
fn jsonl(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            json!({"messages": [{"role": "user", "content": format!("q{i}")}, {"role": "assistant", "content": "a"}]})
                .to_string()
                + "\n"
        })
        .collect::<String>()
        .into_bytes()
}

fn assert_storage_error(status: u16, v: &Value, what: &str, word: &str) {
    assert_eq!(status, 507, "{what}: {v}");
    assert_eq!(v["error"]["type"], "storage_error", "{what}: {v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(word), "{what}: the message says the directory is {word}: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_data_directory_fails_uploads_clearly_and_serving_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let Some(wrapper) = in_mount_namespace("mount -t tmpfs -o size=4m tandem-drill \"$0\"", data.path()) else {
        return;
    };
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let s = Server::start_wrapped(&fixture(MODEL), &store_config(data.path()), &wrapper).await;
    let dir = data.path().display().to_string();

    let first = jsonl(20);
    let (st, v) = s.upload("first.jsonl", first.clone(), "fine-tune").await;
    assert_eq!(st, 200, "{v}");
    let first_id = v["id"].as_str().unwrap().to_string();
    // A job saving a checkpoint every step.
    let (st, job) = s
        .post(
            "/v1/fine_tuning/jobs",
            &json!({"model": "hf-f32", "training_file": first_id,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}},
                "tandem": {"rank": 4, "save_every": 1}}),
        )
        .await;
    assert_eq!(st, 200, "{job}");
    let job_id = job["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, v) = s.get(&format!("/v1/fine_tuning/jobs/{job_id}/checkpoints")).await;
        if !v["data"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Fill the filesystem to the last block.
    in_server_namespace(&s, &format!("dd if=/dev/zero of={dir}/fill bs=64k 2>/dev/null; true"));
    // Its next checkpoint cannot be written: the job fails saying why, even
    // though its failure cannot be written either (it is shown from memory).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let job = loop {
        let (_, j) = s.get(&format!("/v1/fine_tuning/jobs/{job_id}")).await;
        if j["status"] != "running" && j["status"] != "queued" {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "the job never stopped: {j}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(job["status"], "failed", "{job}");
    let why = job["error"]["message"].as_str().unwrap();
    assert!(why.contains("No space left"), "{job}");
    let (_, list) = s.get("/v1/fine_tuning/jobs").await;
    assert_eq!(list["data"][0]["status"], "failed", "the list agrees: {list}");
    let (st, v) = s.post("/v1/fine_tuning/jobs", &json!({"model": "hf-f32", "training_file": first_id})).await;
    assert_storage_error(st, &v, "a new job in a full directory", "full");

    let (st, v) = s.upload("second.jsonl", jsonl(2000), "fine-tune").await;
    assert_storage_error(st, &v, "an upload into a full directory", "full");
    let left = in_server_namespace(&s, &format!("ls -A {dir}/files"));
    assert_eq!(
        left.split_whitespace().collect::<Vec<_>>(),
        vec![first_id.as_str()],
        "no partial upload is left behind"
    );
    // Reads and inference are unaffected.
    let (st, v) = s.get("/v1/files").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(content(&s, &first_id).await, first);
    let (st, v) = greedy(&s, "hf-f32").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(health(&s).await, 200);

    // Space freed: the same upload works, without a restart.
    in_server_namespace(&s, &format!("rm {dir}/fill"));
    let second = jsonl(2000);
    let (st, v) = s.upload("second.jsonl", second.clone(), "fine-tune").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(content(&s, v["id"].as_str().unwrap()).await, second);
    // And the job's failure, kept in memory meanwhile, reaches the disk.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !s.stderr().contains(&format!("job {job_id} saved (failed)")) {
        assert!(std::time::Instant::now() < deadline, "the failure was never saved:\n{}", s.stderr());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_data_directory_at_start_serves_and_refuses_writes_clearly() {
    let data = tempfile::tempdir().unwrap();
    let Some(wrapper) =
        in_mount_namespace("mount --bind \"$0\" \"$0\" && mount -o remount,bind,ro \"$0\"", data.path())
    else {
        return;
    };
    // First a normal run stores a file and a route.
    let s = Server::start(&fixture(MODEL), &store_config(data.path())).await;
    let bytes = jsonl(20);
    let (st, v) = s.upload("kept.jsonl", bytes.clone(), "fine-tune").await;
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (st, v) = put_route(&s, "chat", "hf-f32").await;
    assert_eq!(st, 200, "{v}");
    let mut s = s;
    assert!(s.terminate().success());

    // Then the directory is read-only: the server starts, serves, and says why the rest fails.
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let s = Server::start_wrapped(&fixture(MODEL), &store_config(data.path()), &wrapper).await;
    assert!(s.stderr().contains("unusable"), "the log says so:\n{}", s.stderr());
    let (st, v) = greedy(&s, "hf-f32").await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s.get("/v1/files").await;
    assert_storage_error(st, &v, "listing files", "read-only");
    let (st, v) = s.upload("new.jsonl", jsonl(2), "fine-tune").await;
    assert_storage_error(st, &v, "an upload", "read-only");
    let (st, v) = put_route(&s, "other", "hf-f32").await;
    assert_storage_error(st, &v, "a route change that would not survive a restart", "read-only");
    let (st, v) = s.post("/v1/fine_tuning/jobs", &json!({"model": "hf-f32", "training_file": id})).await;
    assert_storage_error(st, &v, "a fine-tuning job", "read-only");
    assert_eq!(health(&s).await, 200);
    drop(s);

    // Writable again: everything stored before is there.
    let s = Server::start(&fixture(MODEL), &store_config(data.path())).await;
    assert_eq!(content(&s, &id).await, bytes);
    let (st, v) = s.get("/admin/routes/chat").await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_loses_nothing_acknowledged_and_leaves_nothing_half_written() {
    let data = tempfile::tempdir().unwrap();
    let cfg = store_config(data.path()) + "[scheduler]\nmax_num_seqs = 1\n";
    let mut s = Server::start(&fixture(MODEL), &cfg).await;
    let bytes = jsonl(50);
    let (st, v) = s.upload("train.jsonl", bytes.clone(), "fine-tune").await;
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (st, v) = put_route(&s, "chat", "hf-f32").await;
    assert_eq!(st, 200, "{v}");

    // A long stream through the route, and an upload still arriving, when the server dies.
    // (One sequence at a time: 16 whole-context choices cannot finish before the kill.)
    let body = json!({"model": "chat", "prompt": [5, 6, 7], "max_tokens": 250, "n": 16, "stream": true,
        "ignore_eos": true});
    let mut stream = reqwest::Client::new().post(s.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut got = 0;
    while got < 3 {
        got += stream.chunk().await.unwrap().map_or(0, |_| 1);
    }
    let url = s.url("/v1/files");
    let chunks = futures_stream(jsonl(5000));
    let slow = tokio::spawn(async move {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "fine-tune")
            .part("file", reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(chunks)).file_name("slow.jsonl"));
        let _ = reqwest::Client::new().post(url).multipart(form).send().await;
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    s.kill9();
    slow.abort();
    // The stream ends cut short, not with [DONE].
    let mut rest = Vec::new();
    while let Ok(Some(c)) = stream.chunk().await {
        rest.extend_from_slice(&c);
    }
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    };
    let files_dir = data.path().join("files");
    assert!(names(&files_dir).iter().any(|n| n.starts_with(".partial-")), "the kill came mid-upload");

    let s = Server::start(&fixture(MODEL), &store_config(data.path())).await;
    let (_, v) = s.get("/v1/files").await;
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![id.as_str()], "the acknowledged file, and only it");
    assert_eq!(content(&s, &id).await, bytes);
    assert_eq!(names(&files_dir), vec![id.clone()], "the half-received upload was removed at start");
    let (st, v) = s.post("/v1/completions", &json!({"model": "chat", "prompt": [5, 6], "max_tokens": 2})).await;
    assert_eq!(st, 200, "the route serves after the restart: {v}");
}

/// `bytes` as a slow body stream: 1 KiB every 20 ms, so the server is
/// mid-upload when it dies.
fn futures_stream(bytes: Vec<u8>) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    let chunks: Vec<Vec<u8>> = bytes.chunks(1024).map(<[u8]>::to_vec).collect();
    futures::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        Ok(c)
    })
}
