//! `tandem serve` over real HTTP on the tiny Qwen2 fixture (vocab 256, random
//! weights: the text is gibberish but deterministic). Checks the OpenAI shapes,
//! streaming, stop strings, logprobs, errors, concurrency and disconnects.

mod common;

use std::time::{Duration, Instant};

use common::http::{metric, parse_sse, Server};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use tandem::backend::cpu::CpuBackend;
use tandem::model::load_hf_dir;
use tandem::tokenizer::Tokenizer;

const MODEL: &str = "tiny/qwen2/hf-f32";
const SERVED: &str = "hf-f32";
const PROMPT: &str = "The quick brown fox jumps over the lazy dog";

async fn server() -> Server {
    Server::start(&fixture(MODEL), "").await
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_hf_dir(&fixture(MODEL)).unwrap()
}

/// What the engine core produces greedily when driven directly (no HTTP, no
/// engine thread, no detokenizer).
fn reference_greedy(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let be = CpuBackend::new(2).unwrap();
    let loaded = load_hf_dir(&be, &fixture(MODEL)).unwrap();
    let mut core = engine(loaded.model, &engine_config(16, 256, 64));
    let out = core.generate(vec![greedy(prompt, max_tokens)]);
    token_ids(&out[0].0)
}

fn assert_error(status: u16, v: &Value, want_status: u16, want_param: Option<&str>) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert_eq!(e["code"], want_status, "{v}");
    assert_eq!(e["param"].as_str(), want_param, "{v}");
}

fn content_of(events: &[Value]) -> String {
    events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_endpoints() {
    let s = server().await;
    let r = reqwest::get(s.url("/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = reqwest::get(s.url("/version")).await.unwrap().json().await.unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

    let v: Value = reqwest::get(s.url("/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "list");
    let m = &v["data"][0];
    assert_eq!((m["id"].as_str(), m["object"].as_str()), (Some(SERVED), Some("model")));
    assert_eq!(m["parent"], Value::Null);
    assert_eq!(m["max_model_len"], 256);
    assert!(m["root"].as_str().unwrap().contains("hf-f32"), "{m}");
    assert_eq!(m["quantization"], "none", "{m}");

    let r = reqwest::get(s.url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"] {
        assert!(metric(&text, name).is_some(), "{name} missing:\n{text}");
    }
    assert!(text.contains("tandem_model_info{quantization=\"none\"} 1"), "{text}");
    assert!(metric(&text, "tandem_model_weight_bytes").is_some_and(|b| b > 100_000.0), "{text}");

    let v: Value = reqwest::get(s.url("/openapi.json")).await.unwrap().json().await.unwrap();
    assert!(v["openapi"].as_str().unwrap().starts_with("3."));
    assert!(v["paths"]["/v1/chat/completions"]["post"].is_object());
    assert!(v["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"].is_object());

    let r = reqwest::get(s.url("/v2/nothing")).await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_shape_and_greedy_equals_the_reference_loop() {
    let s = server().await;
    let tok = tokenizer();
    let ids = tok.encode(PROMPT, true).unwrap();
    let want = tok.decode(&reference_greedy(&ids, 12), true).unwrap();
    assert!(!want.is_empty());

    let body = json!({"model": SERVED, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (st, v) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], SERVED);
    let c = &v["choices"][0];
    assert_eq!((c["index"].as_u64(), c["finish_reason"].as_str()), (Some(0), Some("length")));
    assert_eq!(c["logprobs"], Value::Null);
    assert_eq!(c["text"], want.as_str());
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], ids.len());
    assert_eq!(u["completion_tokens"], 12);
    assert_eq!(u["total_tokens"], ids.len() + 12);
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());

    // The same prompt as token ids, and echo.
    let body = json!({"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "echo": true});
    let (st, v) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], SERVED, "an omitted model is the base model");
    assert_eq!(v["choices"][0]["text"], format!("{}{want}", tok.decode(&ids, false).unwrap()));

    // A list of prompts: n choices each, indexed prompt-major.
    let body = json!({"model": "", "prompt": [PROMPT, "hello"], "n": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": true});
    let (st, v) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let idx: Vec<u64> = v["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    assert_eq!(v["choices"][0]["text"], v["choices"][1]["text"], "greedy choices agree");
    let hello = tok.encode("hello", true).unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], ids.len() + hello, "each prompt counts once");
    assert_eq!(v["usage"]["completion_tokens"], 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_shape_and_streaming_matches_non_streaming() {
    let s = server().await;
    let msgs = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi there"}]}]);
    let body =
        json!({"model": SERVED, "messages": msgs, "max_completion_tokens": 10, "temperature": 0, "ignore_eos": true});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    assert_eq!(c["finish_reason"], "length");
    let text = c["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(v["usage"]["completion_tokens"], 10);
    // The prompt is the template's rendering, tokenized without extra specials.
    let tok = tokenizer();
    let rendered = tok
        .chat_template()
        .unwrap()
        .render(
            &json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]),
            None,
            true,
            None,
        )
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], tok.encode(&rendered, false).unwrap().len());

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let (events, done) = s.post_stream("/v1/chat/completions", &sbody).await;
    assert!(done, "ends with [DONE]");
    let first = &events[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    assert!(events.iter().all(|e| e.get("usage").is_some()), "include_usage: every chunk has a usage field");
    assert_eq!(content_of(&events), text);
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][k], v["usage"][k], "{k}");
    }
    // The same prompt again: its full KV blocks come from the prefix cache.
    assert!(last["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "{last}");
    let fin = &events[events.len() - 2];
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    assert_eq!(fin["choices"][0]["delta"], json!({}));
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "one id per stream");

    // Without include_usage: no usage chunk and no usage fields.
    sbody["stream_options"] = Value::Null;
    let (events, done) = s.post_stream("/v1/chat/completions", &sbody).await;
    assert!(done);
    assert!(events.iter().all(|e| e.get("usage").is_none()));
    assert_eq!(content_of(&events), text);

    // Completions streaming.
    let body = json!({"prompt": PROMPT, "max_tokens": 9, "temperature": 0, "ignore_eos": true, "stream": true});
    let (events, done) = s.post_stream("/v1/completions", &body).await;
    assert!(done);
    assert!(events.iter().all(|e| e["object"] == "text_completion"));
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    let (_, v) = s
        .post("/v1/completions", &json!({"prompt": PROMPT, "max_tokens": 9, "temperature": 0, "ignore_eos": true}))
        .await;
    assert_eq!(streamed, v["choices"][0]["text"].as_str().unwrap());
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_sampled_with_seeds() {
    let s = server().await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 16, "temperature": 1.0, "seed": 11, "ignore_eos": true});
    let (st, a) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{a}");
    let ch = a["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 2);
    assert_eq!((ch[0]["index"].as_u64(), ch[1]["index"].as_u64()), (Some(0), Some(1)));
    assert_ne!(ch[0]["message"]["content"], ch[1]["message"]["content"], "choice i samples with seed + i");
    assert_eq!(a["usage"]["completion_tokens"], 32);
    let (_, b) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(a["choices"], b["choices"], "seeded sampling is reproducible");

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (events, done) = s.post_stream("/v1/chat/completions", &sbody).await;
    assert!(done);
    for (i, choice) in ch.iter().enumerate() {
        let of_i: Vec<&Value> = events.iter().filter(|e| e["choices"][0]["index"] == i).collect();
        assert_eq!(of_i[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = of_i.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, choice["message"]["content"].as_str().unwrap(), "choice {i}");
        assert_eq!(of_i.last().unwrap()["choices"][0]["finish_reason"], "length");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_end_the_request() {
    let s = server().await;
    let base = json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": true});
    let (_, v) = s.post("/v1/completions", &base).await;
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 20, "{full:?}");
    // A stop string from the middle of the greedy text (spanning tokens, most likely).
    let stop: String = chars[12..15].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];

    let mut body = base.clone();
    body["stop"] = json!(["\u{1}never", stop]);
    let (st, v) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["text"], cut);
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["stop_reason"], stop.as_str());
    let used = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used < 40, "generation ended early: {used}");
    // completion_tokens counts every generated token up to the one completing
    // the stop string (its text is cut, the token still counts, as in vLLM).
    let tok = tokenizer();
    let ids = reference_greedy(&tok.encode(PROMPT, true).unwrap(), 40);
    let k = (1..=ids.len()).find(|&k| tok.decode(&ids[..k], true).unwrap().contains(&stop)).unwrap();
    assert_eq!(used as usize, k);

    body["stream"] = json!(true);
    let (events, done) = s.post_stream("/v1/completions", &body).await;
    assert!(done);
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, cut, "held-back text never leaks a stop string's start");
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // include_stop_str_in_output keeps it; chat takes a single string.
    body["stream"] = json!(false);
    body["include_stop_str_in_output"] = json!(true);
    let (_, v) = s.post("/v1/completions", &body).await;
    assert_eq!(v["choices"][0]["text"], format!("{cut}{stop}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_shapes() {
    let s = server().await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
        "ignore_eos": true, "logprobs": true, "top_logprobs": 3});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 6);
    let mut joined = String::new();
    for e in content {
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the sampled token is the most likely one.
        assert_eq!(top[0]["token"], e["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        let bytes: Vec<u8> = e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), e["token"].as_str().unwrap());
        joined.push_str(e["token"].as_str().unwrap());
    }
    assert_eq!(joined, v["choices"][0]["message"]["content"].as_str().unwrap());

    let body = json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": true, "logprobs": 2});
    let (st, v) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    for (t, top) in tokens.iter().zip(lp["top_logprobs"].as_array().unwrap()) {
        let top = top.as_object().unwrap();
        assert!(top.len() >= 2 && top.len() <= 3, "{top:?}");
        assert!(top.contains_key(t.as_str().unwrap()));
    }
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());

    // Streamed chat logprobs: one entry per generated token over all chunks.
    let mut sbody = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
        "ignore_eos": true, "logprobs": true, "stream": true});
    let (events, _) = s.post_stream("/v1/chat/completions", &sbody).await;
    let n: usize =
        events.iter().filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array()).map(|a| a.len()).sum();
    assert_eq!(n, 6);
    sbody["top_logprobs"] = json!(21);
    let (st, v) = s.post("/v1/chat/completions", &sbody).await;
    assert_error(st, &v, 400, Some("top_logprobs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_error_envelope() {
    let s = Server::start(&fixture(MODEL), "[server]\nmax_body_bytes = 100000\n").await;
    let client = reqwest::Client::new();
    let raw = |path: &'static str, body: Vec<u8>| {
        let c = client.clone();
        let url = s.url(path);
        async move {
            let r = c.post(url).header("content-type", "application/json").body(body).send().await.unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap())
        }
    };
    let chat = "/v1/chat/completions";
    let (st, v) = raw(chat, b"{\"messages\": [".to_vec()).await;
    assert_error(st, &v, 400, None);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (st, v) = raw(chat, b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec()).await;
    assert_error(st, &v, 400, None);
    assert!(v["error"]["message"].as_str().unwrap().contains("UTF-8"));
    let (st, v) = raw(chat, vec![b' '; 200_000]).await;
    assert_error(st, &v, 413, None);

    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (chat, json!({"messages": msgs, "max_tokens": "ten"}), 400, Some("max_tokens")),
        (chat, json!({"messages": "hi"}), 400, Some("messages")),
        (chat, json!({"messages": []}), 400, Some("messages")),
        (chat, json!({}), 400, Some("messages")),
        (chat, json!({"messages": [{"role": "user", "content": 3}]}), 400, Some("messages[0].content")),
        (chat, json!({"messages": msgs, "max_tokens": -1}), 400, Some("max_tokens")),
        (chat, json!({"messages": msgs, "max_tokens": 0}), 400, Some("max_tokens")),
        (chat, json!({"messages": msgs, "max_tokens": 1_000_000_000_000u64}), 400, Some("max_tokens")),
        (chat, json!({"messages": msgs, "max_completion_tokens": 300}), 400, Some("max_tokens")),
        (chat, json!({"messages": msgs, "temperature": -1}), 400, Some("temperature")),
        (chat, json!({"messages": msgs, "top_p": 1.5}), 400, Some("top_p")),
        (chat, json!({"messages": msgs, "n": 0}), 400, Some("n")),
        (chat, json!({"messages": msgs, "logit_bias": {"999": 1}}), 400, Some("logit_bias")),
        (chat, json!({"messages": msgs, "stop": 5}), 400, Some("stop")),
        (chat, json!({"messages": msgs, "stop_token_ids": [-3]}), 400, Some("stop_token_ids[0]")),
        (chat, json!({"messages": [{"role": "user", "content": "x".repeat(400)}]}), 400, Some("messages")),
        ("/v1/completions", json!({"prompt": [1, 2, 999]}), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": vec![5; 300]}), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": []}), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": PROMPT, "logprobs": 21}), 400, Some("logprobs")),
        ("/v1/completions", json!({"prompt": {"a": 1}}), 400, Some("prompt")),
    ];
    for (path, body, status, param) in cases {
        let (st, v) = s.post(path, &body).await;
        assert_error(st, &v, status, param);
    }
    let (st, v) = s.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 1000})).await;
    assert_error(st, &v, 400, Some("max_tokens"));
    assert!(v["error"]["message"].as_str().unwrap().contains("256"), "names the limit: {v}");

    let (st, v) = s.post(chat, &json!({"model": "gpt-4", "messages": msgs})).await;
    assert_eq!(st, 404);
    assert_eq!(
        v,
        json!({"error": {"message": "The model `gpt-4` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    );
    // Unknown fields are ignored.
    let (st, v) = s.post(chat, &json!({"messages": msgs, "max_tokens": 2, "frobnicate": [1, {}]})).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_equal_solo_runs() {
    let s = server().await;
    let body = |i: usize| {
        json!({"prompt": format!("{PROMPT} number {i}"), "max_tokens": 24, "temperature": 0,
            "ignore_eos": true, "stream": true})
    };
    let stream_text =
        |events: Vec<Value>| -> String { events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect() };
    let mut solo = Vec::new();
    for i in 0..32 {
        let (events, done) = s.post_stream("/v1/completions", &body(i)).await;
        assert!(done);
        solo.push(stream_text(events));
    }
    let runs = (0..32).map(|i| {
        let s = &s;
        async move { s.post_stream("/v1/completions", &body(i)).await }
    });
    let together = futures::future::join_all(runs).await;
    for (i, (events, done)) in together.into_iter().enumerate() {
        assert!(done);
        assert_eq!(stream_text(events), solo[i], "request {i}");
    }
    assert!(solo.iter().any(|t| t != &solo[0]), "prompts differ, so outputs should");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_aborts_and_frees_kv_blocks() {
    // One sequence at a time, so the 16 long choices below take far longer than
    // the abort needs to arrive: whichever is running then is cut off mid-way.
    let s = Server::start(&fixture(MODEL), "[scheduler]\nmax_num_seqs = 1\n").await;
    let aborted = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("vllm:request_success_total{finished_reason=\"abort\"} "))
            .and_then(|x| x.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = aborted(&s.metrics().await);
    // Long generations (the whole context): they cannot end on their own soon.
    let body =
        json!({"prompt": [5, 6, 7], "max_tokens": 250, "temperature": 0, "ignore_eos": true, "n": 16, "stream": true});
    let r = reqwest::Client::new().post(s.url("/v1/completions")).json(&body).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut got = String::new();
    while !got.contains("\"text\"") {
        got.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = s.metrics().await;
        let running = metric(&m, "vllm:num_requests_running").unwrap();
        // Between one choice finishing and the next being admitted, nothing
        // runs and no block is held while the rest still wait: wait for those too.
        let waiting = metric(&m, "vllm:num_requests_waiting").unwrap();
        let used = metric(&m, "tandem_kv_blocks_used").unwrap();
        if running == 0.0 && waiting == 0.0 && used == 0.0 {
            assert!(aborted(&m) > before, "the requests were aborted, not finished:\n{m}");
            break;
        }
        assert!(Instant::now() < deadline, "KV blocks still held after disconnect:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server still serves.
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2})).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_then_exits_0() {
    let mut s = server().await;
    let body = json!({"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": true, "stream": true});
    let r = reqwest::Client::new().post(s.url("/v1/completions")).json(&body).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut text = String::new();
    text.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    let pid = s.pid().to_string();
    let killed = tokio::task::spawn_blocking(move || std::process::Command::new("kill").args(["-TERM", &pid]).status());
    assert!(killed.await.unwrap().unwrap().success());
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let (events, done) = parse_sse(&text);
    assert!(done, "the in-flight stream finished: {text}");
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], "length");
    let exit = s.wait_exit();
    assert!(exit.success(), "{exit:?}; stderr:\n{}", s.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_a_template_is_a_clear_400() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture(MODEL);
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg = read_json(&src.join("tokenizer_config.json"));
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let s = Server::start(dir.path(), "").await;
    let (st, v) = s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_error(st, &v, 400, None);
    assert!(v["error"]["message"].as_str().unwrap().contains("chat template"), "{v}");
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(st, 200, "completions still work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_requests_before_reading_them() {
    let s = Server::start(&fixture(MODEL), "[scheduler]\nmax_num_seqs = 1\nmax_waiting = 2\n").await;
    let bad = |path: &'static str| {
        let url = s.url(path);
        async move { reqwest::Client::new().post(url).body("{not json").send().await.unwrap() }
    };
    // A body that is not even JSON, sent while the queue is full, is refused
    // for the queue without being parsed: the 429 comes before any work on
    // it. (The tiny model finishes a whole context in milliseconds, so the
    // queue may drain between filling it and asking: then it is a 400, and
    // the queue is filled again.)
    let mut shed = std::collections::BTreeSet::new();
    for _ in 0..50 {
        // One long choice running, then two waiting: the queue is full.
        let mut held = Vec::new();
        for n in [1, 2] {
            let body = json!({"prompt": [5, 6, 7], "n": n, "max_tokens": 250, "ignore_eos": true, "stream": true});
            let r = reqwest::Client::new().post(s.url("/v1/completions")).json(&body).send().await.unwrap();
            let mut stream = r.bytes_stream();
            if n == 1 {
                let _ = stream.next().await;
            }
            held.push(stream);
        }
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let r = bad(path).await;
            match r.status().as_u16() {
                429 => {
                    assert!(r.headers().contains_key("retry-after"), "{path}");
                    let v: Value = r.json().await.unwrap();
                    assert_error(429, &v, 429, None);
                    shed.insert(path);
                }
                400 => {}
                other => panic!("{path}: {other}"),
            }
        }
        if shed.len() == 2 {
            break;
        }
    }
    assert_eq!(shed.len(), 2, "a full queue never refused an unparsed body: {shed:?}");
    // With room again, the same body gets the 400 it deserves.
    let deadline = Instant::now() + Duration::from_secs(20);
    while bad("/v1/completions").await.status() != 400 {
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_429_with_retry_after() {
    // One running and two waiting at most: eight choices cannot all be queued.
    let s = Server::start(&fixture(MODEL), "[scheduler]\nmax_num_seqs = 1\nmax_waiting = 2\n").await;
    let body = json!({"prompt": PROMPT, "n": 8, "max_tokens": 50, "ignore_eos": true});
    let r = reqwest::Client::new().post(s.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let v: Value = r.json().await.unwrap();
    assert_error(429, &v, 429, None);
    // The choices queued before the refusal are aborted, not left running: the
    // queue drains and a small request gets through (after 429s while it drains,
    // which is what Retry-After tells a client to expect).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, v) = s.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2})).await;
        if st == 200 {
            break;
        }
        assert_error(st, &v, 429, None);
        assert!(Instant::now() < deadline, "the queue never drained:\n{}", s.metrics().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = s.metrics().await;
    let aborted = m
        .lines()
        .find_map(|l| l.strip_prefix("vllm:request_success_total{finished_reason=\"abort\"} "))
        .and_then(|x| x.trim().parse::<f64>().ok());
    assert!(aborted.unwrap() >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_counted_by_route_template_and_status() {
    let s = Server::start(&fixture(MODEL), "").await;
    let (st, _) = s.post("/v1/completions", &json!({"prompt": [5, 6], "max_tokens": 2})).await;
    assert_eq!(st, 200);
    let (st, _) = s.post("/v1/completions", &json!({"prompt": 5})).await;
    assert_eq!(st, 400);
    let (st, _) = s.get("/v1/models/no/such/model").await;
    assert_eq!(st, 404);
    let (st, _) = s.get("/no/such/path").await;
    assert_eq!(st, 404);
    let m = s.metrics().await;
    let count = |labels: &str| metric(&m, &format!("tandem_http_responses_total{{{labels}}}"));
    assert_eq!(count(r#"path="/v1/completions",method="POST",status="200""#), Some(1.0), "{m}");
    assert_eq!(count(r#"path="/v1/completions",method="POST",status="400""#), Some(1.0), "{m}");
    // Templates, not raw paths: a model name or a stray path adds no series.
    assert_eq!(count(r#"path="/v1/models/{*model}",method="GET",status="404""#), Some(1.0), "{m}");
    assert_eq!(count(r#"path="unmatched",method="GET",status="404""#), Some(1.0), "{m}");
    assert!(!m.contains("/no/such/path") && !m.contains("no/such/model"), "{m}");
    assert_eq!(metric(&m, "tandem_engine_alive"), Some(1.0), "{m}");
}
