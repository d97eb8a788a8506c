//! Fault drills over real HTTP on the tiny Qwen2 fixture: what breaks on disk
//! fails clearly where it is used and nothing else stops serving.
//!
//! - a truncated adapter, and one with a garbage config, fail to load with a
//!   400 naming the problem; the adapters already loaded and the base serve on;
//! - a model whose chat template does not compile starts, its chat endpoint
//!   answers a 400 that says so, and completions serve.
//!
//! (The engine thread's death is in tests/backend_faults.rs; SIGTERM draining
//! in tests/http_tiny.rs; kill -9 mid-job and mid-upload in tests/http_finetune.rs.)

mod common;

use std::path::Path;

use common::http::Server;
use common::*;
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
