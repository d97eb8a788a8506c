//! LoRA over real HTTP on the tiny Qwen2 fixture: every way clients name an
//! adapter (vLLM, SGLang, LoRAX), vLLM's load/unload endpoints and their
//! errors, `/v1/models`, metrics, and reloads and unloads under concurrent
//! traffic: no request fails, none sees a mix of versions, none reuses the
//! old version's prefix-cache KV.

mod common;

use common::http::{metric, Server};
use common::*;
use serde_json::{json, Value};
use tandem::tokenizer::Tokenizer;

const MODEL: &str = "tiny/qwen2/hf-f32";

fn dir(name: &str) -> String {
    fixture("tiny/lora").join(name).display().to_string()
}

async fn server(extra_root: &str) -> Server {
    let cfg = format!(
        "[lora]\nmax_loras = 2\nallowed_roots = [{:?}, {:?}]\n[lora.adapters]\na = {:?}\nv2 = {:?}\n",
        fixture("tiny/lora").display().to_string(),
        extra_root,
        dir("a-r4-qv"),
        dir("a-r4-qv-v2"),
    );
    Server::start(&fixture(MODEL), &cfg).await
}

fn golden() -> Value {
    read_json(&fixture("tiny/lora/golden.json"))
}

/// A greedy completion of `prompt` (token ids), 12 tokens, with `extra` fields.
async fn complete(s: &Server, prompt: &[u32], extra: Value) -> (u16, Value) {
    let mut body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    s.post("/v1/completions", &body).await
}

async fn text_of(s: &Server, prompt: &[u32], extra: Value) -> String {
    let (st, v) = complete(s, prompt, extra.clone()).await;
    assert_eq!(st, 200, "{extra}: {v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapters_by_every_name_form_with_peft_tokens() {
    let s = server("/nonexistent-root").await;
    let g = golden();
    let prompt = ids(&g["greedy_prompt"]);
    let tok = Tokenizer::from_hf_dir(&fixture(MODEL)).unwrap();
    let want_a = tok.decode(&ids(&g["adapters"]["a-r4-qv"]["greedy"]), true).unwrap();
    let want_base = tok.decode(&ids(&g["base"]["greedy"]), true).unwrap();
    assert_ne!(want_a, want_base);

    let (st, v) = complete(&s, &prompt, json!({"model": "a"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "a", "the response echoes the adapter's name");
    assert_eq!(v["choices"][0]["text"], want_a.as_str(), "vLLM form: model = adapter");
    assert_eq!(text_of(&s, &prompt, json!({"model": "hf-f32:a"})).await, want_a, "SGLang form: base:adapter");
    assert_eq!(text_of(&s, &prompt, json!({})).await, want_base);
    assert_eq!(text_of(&s, &prompt, json!({"model": "hf-f32"})).await, want_base);
    // LoRAX form: adapter_id loaded on demand from an allowed root.
    let (st, v) =
        complete(&s, &prompt, json!({"model": "", "adapter_id": dir("a-r4-qv"), "adapter_source": "local"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want_a.as_str());
    // Chat and streaming take the adapter too.
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "v2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        )
        .await;
    assert_eq!((st, v["model"].as_str()), (200, Some("v2")), "{v}");
    let (events, done) = s
        .post_stream("/v1/completions", &json!({"model": "a", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "stream": true}))
        .await;
    assert!(done);
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, want_a);

    // Unknown adapters: vLLM's 404 envelope.
    for m in ["nope", "hf-f32:nope"] {
        let (st, v) = complete(&s, &prompt, json!({"model": m})).await;
        assert_eq!(st, 404, "{v}");
        assert_eq!(v["error"]["message"], format!("The model `{m}` does not exist."));
        assert_eq!(v["error"]["param"], "model");
    }
    let (st, v) = complete(&s, &prompt, json!({"adapter_id": "/etc", "adapter_source": "local"})).await;
    assert_eq!(st, 400, "a path outside the allowed roots: {v}");
    assert_eq!(v["error"]["param"], "adapter_id");
    let (st, v) = complete(&s, &prompt, json!({"adapter_id": "org/some-adapter", "adapter_source": "hub"})).await;
    assert_eq!(st, 400, "hub adapters are off by default: {v}");

    // /v1/models lists the adapters with their parent.
    let models = reqwest::get(s.url("/v1/models")).await.unwrap().json::<Value>().await.unwrap();
    let data = models["data"].as_array().unwrap();
    let card = |id: &str| data.iter().find(|m| m["id"] == id).cloned();
    assert_eq!(card("hf-f32").unwrap()["parent"], Value::Null);
    let a = card("a").expect("adapter a is listed");
    assert_eq!(a["parent"], "hf-f32");
    assert!(a["root"].as_str().unwrap().ends_with("a-r4-qv"), "{a}");
    assert!(card(&dir("a-r4-qv")).is_some(), "the on-demand adapter is listed under its id");
    let one = reqwest::get(s.url("/v1/models/a")).await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(one["parent"], "hf-f32");

    // The engine refreshes its gauges after the step that ended the last
    // request, which can be a moment after its client had the answer.
    let idle = "vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut m = s.metrics().await;
    while !m.contains(idle) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        m = s.metrics().await;
    }
    assert!(m.contains(idle), "{m}");
    assert_eq!(metric(&m, "tandem_lora_requests_total{adapter=\"a\"}"), Some(3.0), "{m}");
    assert_eq!(metric(&m, "tandem_lora_generation_tokens_total{adapter=\"a\"}"), Some(36.0), "{m}");
    assert_eq!(metric(&m, "tandem_lora_slots_total"), Some(2.0));
    assert_eq!(metric(&m, "tandem_lora_slots_pinned"), Some(0.0));
    assert!(metric(&m, "tandem_lora_slot_loads_total").unwrap() >= 2.0);
    assert_eq!(metric(&m, "tandem_lora_adapters_registered"), Some(3.0));
    assert_eq!(metric(&m, "tandem_kv_blocks_used"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_and_unload_answer_like_vllm() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().display().to_string();
    let s = server(&root).await;
    let load = |body: Value| {
        let s = &s;
        async move { s.post_text("/v1/load_lora_adapter", &body).await }
    };
    let (st, t) = load(json!({"lora_name": "x", "lora_path": dir("b-r8-all")})).await;
    assert_eq!((st, t.as_str()), (200, "Success: LoRA adapter 'x' added successfully."));
    let (st, t) = load(json!({"lora_name": "x", "lora_path": dir("c-r16-mlp")})).await;
    assert_eq!(st, 400, "{t}");
    assert!(t.contains("has already been loaded"), "{t}");
    let (st, t) = load(json!({"lora_name": "x", "lora_path": dir("c-r16-mlp"), "load_inplace": true})).await;
    assert_eq!(st, 200, "{t}");
    let (st, t) = load(json!({"lora_name": "y"})).await;
    assert_eq!(st, 400, "{t}");
    assert!(t.contains("Both 'lora_name' and 'lora_path' must be provided."), "{t}");
    let (st, t) = load(json!({"lora_name": "y", "lora_path": format!("{root}/nothing-here")})).await;
    assert_eq!(st, 404, "{t}");
    std::fs::create_dir_all(format!("{root}/empty")).unwrap();
    let (st, t) = load(json!({"lora_name": "y", "lora_path": format!("{root}/empty")})).await;
    assert_eq!(st, 404, "{t}");
    std::fs::create_dir_all(format!("{root}/pickle")).unwrap();
    std::fs::copy(format!("{}/adapter_config.json", dir("a-r4-qv")), format!("{root}/pickle/adapter_config.json"))
        .unwrap();
    std::fs::write(format!("{root}/pickle/adapter_model.bin"), b"not loaded").unwrap();
    let (st, t) = load(json!({"lora_name": "y", "lora_path": format!("{root}/pickle")})).await;
    assert_eq!(st, 400, "{t}");
    assert!(t.contains("pickle"), "{t}");
    let (st, t) = load(json!({"lora_name": "y", "lora_path": "/tmp/../etc"})).await;
    assert_eq!(st, 400, "{t}");
    assert!(t.contains("outside the allowed adapter roots"), "{t}");
    let (st, t) = load(json!({"lora_name": "hf-f32", "lora_path": dir("a-r4-qv")})).await;
    assert_eq!(st, 400, "{t}");
    let (st, t) = s.post_text("/v1/load_lora_adapter", &json!([1])).await;
    assert_eq!(st, 400, "{t}");

    let unload = |name: &str| {
        let s = &s;
        let body = json!({"lora_name": name});
        async move { s.post_text("/v1/unload_lora_adapter", &body).await }
    };
    let (st, t) = unload("x").await;
    assert_eq!((st, t.as_str()), (200, "Success: LoRA adapter 'x' removed successfully."));
    let (st, t) = unload("x").await;
    assert_eq!(st, 404, "{t}");
    let (st, _) = complete(&s, &[5, 6, 7], json!({"model": "x"})).await;
    assert_eq!(st, 404);
    let models = reqwest::get(s.url("/v1/models")).await.unwrap().json::<Value>().await.unwrap();
    assert!(!models["data"].as_array().unwrap().iter().any(|m| m["id"] == "x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_and_unloads_under_traffic_never_fail_or_mix_versions() {
    let s = server("/nonexistent-root").await;
    // A prompt of more than two blocks (so the prefix cache holds some) on
    // which the two versions disagree (random tiny weights often repeat one token).
    let g = golden();
    let (seq16, seq7) = (ids(&g["inputs"][0]), ids(&g["inputs"][1]));
    let mut found = None;
    for k in 0..8 {
        let prompt: Vec<u32> = seq16.iter().chain(&seq7).chain(&seq16).copied().skip(k).collect();
        let text_a = text_of(&s, &prompt, json!({"model": "a"})).await;
        let text_v2 = text_of(&s, &prompt, json!({"model": "v2"})).await;
        if text_a != text_v2 {
            found = Some((prompt, text_a, text_v2));
            break;
        }
    }
    let (prompt, text_a, text_v2) = found.expect("a prompt on which a and v2 differ");

    let load = |path: String, inplace: bool| {
        let s = &s;
        async move {
            let (st, t) = s
                .post_text(
                    "/v1/load_lora_adapter",
                    &json!({"lora_name": "x", "lora_path": path, "load_inplace": inplace}),
                )
                .await;
            assert_eq!(st, 200, "{t}");
        }
    };
    load(dir("a-r4-qv"), false).await;
    // The cached prefix of x (= a's weights) is warm.
    assert_eq!(text_of(&s, &prompt, json!({"model": "x"})).await, text_a);
    // Reload in place with other weights: the same prompt must give v2's text,
    // never a's (a stale prefix-cache hit would).
    load(dir("a-r4-qv-v2"), true).await;
    assert_eq!(text_of(&s, &prompt, json!({"model": "x"})).await, text_v2);

    // Requests for x in flight while x is reloaded back and forth.
    let base = s.base.clone();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (base, prompt) = (base.clone(), prompt.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "x", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "stream": i % 2 == 0});
            let r = reqwest::Client::new().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            let text = if i % 2 == 0 {
                let (events, done) = common::http::parse_sse(&body);
                assert!(done, "{body}");
                events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect::<String>()
            } else {
                serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string()
            };
            (status, text)
        }));
        if i % 3 == 2 {
            load(if i % 2 == 0 { dir("a-r4-qv") } else { dir("a-r4-qv-v2") }, true).await;
        }
    }
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(text == text_a || text == text_v2, "a request saw a mix of versions: {text:?}");
    }
    // Unload while requests run: they finish; later ones get 404.
    let (base2, prompt2) = (base.clone(), prompt.clone());
    let running = tokio::spawn(async move {
        let body = json!({"model": "x", "prompt": prompt2, "max_tokens": 40, "temperature": 0, "ignore_eos": true});
        let r = reqwest::Client::new().post(format!("{base2}/v1/completions")).json(&body).send().await.unwrap();
        r.status().as_u16()
    });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let (st, _) = s.post_text("/v1/unload_lora_adapter", &json!({"lora_name": "x"})).await;
    assert_eq!(st, 200);
    assert_eq!(running.await.unwrap(), 200);
    let (st, _) = complete(&s, &prompt, json!({"model": "x"})).await;
    assert_eq!(st, 404);
    // The engine updates its gauges at the end of the step that finished the
    // last request, which may be just after its client has the answer.
    let mut m = s.metrics().await;
    for _ in 0..40 {
        if metric(&m, "tandem_kv_blocks_used") == Some(0.0) && metric(&m, "tandem_lora_slots_pinned") == Some(0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = s.metrics().await;
    }
    assert_eq!(metric(&m, "tandem_kv_blocks_used"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "tandem_lora_slots_pinned"), Some(0.0), "{m}");
}
