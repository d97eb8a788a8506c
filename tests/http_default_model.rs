//! `tandem serve` on the default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M):
//! real answers over HTTP, and streaming that equals the non-streamed text.
//! Skipped, with a printed reason, when the model was not fetched.

mod common;

use common::http::Server;
use common::*;
use serde_json::{json, Value};

fn content_of(events: &[Value]) -> String {
    events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_and_streams_like_it_answers() {
    let Some(model) = default_model() else { return };
    let s = Server::start(&model, "").await;
    assert!(s.saw_loading, "the server answers (503) while the model loads");
    let body = json!({
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        "max_tokens": 12,
        "temperature": 0,
    });
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "a short answer ends with end-of-sequence");
    assert_eq!(v["model"], "qwen2.5-coder-0.5b-instruct-q4_k_m");

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let (events, done) = s.post_stream("/v1/chat/completions", &sbody).await;
    assert!(done);
    assert_eq!(content_of(&events), text, "streamed deltas concatenate to the greedy answer");
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], v["usage"]["completion_tokens"]);

    // A stop string on real text: the answer is cut right before it.
    let body = json!({
        "messages": [{"role": "user", "content": "Count from 1 to 10, separated by commas, nothing else."}],
        "max_tokens": 40,
        "temperature": 0,
        "stop": ["5"],
        "stream": true,
    });
    let (events, done) = s.post_stream("/v1/chat/completions", &body).await;
    assert!(done);
    let text = content_of(&events);
    assert!(text.contains('4') && !text.contains('5'), "{text:?}");
    let fin = events.iter().rev().find(|e| !e["choices"][0]["finish_reason"].is_null()).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "stop");
    assert_eq!(fin["choices"][0]["stop_reason"], "5");
}

/// LoRA on the quantised default model: an adapter whose B is zero answers
/// exactly like the base; a random adapter answers differently, streams what it
/// answers, and base and adapter requests batched together each equal their
/// solo answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lora_adapters_on_the_default_model() {
    use std::sync::Arc;
    use tandem::bench::lora::{random_adapter, write_peft_dir};
    use tandem::lora::{LoraAdapter, LoraDtype, LoraMatrix, LoraValues};
    let Some(model) = default_model() else { return };
    let gguf = tandem::loader::gguf::GgufFile::open(&model).unwrap();
    let cfg = tandem::model::ModelConfig::from_gguf(&gguf).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let rnd = random_adapter(&cfg, 8, 7, LoraDtype::F32);
    write_peft_dir(&rnd, &tmp.path().join("rnd")).unwrap();
    let zero_layers = rnd
        .layers
        .iter()
        .map(|l| {
            l.clone()
                .map(|m| m.map(|m| Arc::new(LoraMatrix { bt: LoraValues::F32(vec![0.0; m.bt.len()]), ..(*m).clone() })))
        })
        .collect();
    write_peft_dir(&LoraAdapter::new("zero".into(), String::new(), zero_layers, None), &tmp.path().join("zero"))
        .unwrap();
    let config = format!(
        "[lora.adapters]\nrnd = {:?}\nzero = {:?}\n",
        tmp.path().join("rnd").display().to_string(),
        tmp.path().join("zero").display().to_string()
    );
    let s = Server::start(&model, &config).await;
    let ask = |m: &str, stream: bool| {
        json!({
            "model": m,
            "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": stream,
        })
    };
    let answer = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let (st, base) = s.post("/v1/chat/completions", &ask("", false)).await;
    assert_eq!(st, 200, "{base}");
    let (st, zero) = s.post("/v1/chat/completions", &ask("zero", false)).await;
    assert_eq!(st, 200, "{zero}");
    assert_eq!(answer(&zero), answer(&base), "a zero adapter changes nothing");
    let (st, rnd) = s.post("/v1/chat/completions", &ask("rnd", false)).await;
    assert_eq!(st, 200, "{rnd}");
    assert_eq!(rnd["model"], "rnd");
    assert_ne!(answer(&rnd), answer(&base), "a random adapter changes the answer");
    let (events, done) = s.post_stream("/v1/chat/completions", &ask("rnd", true)).await;
    assert!(done);
    assert_eq!(content_of(&events), answer(&rnd));
    // Base, zero and rnd at once: one mixed batch; each equals its solo answer.
    let (qa, qb, qc) = (ask("", false), ask("rnd", false), ask("qwen2.5-coder-0.5b-instruct-q4_k_m:zero", false));
    let (a, b, c) = tokio::join!(
        s.post("/v1/chat/completions", &qa),
        s.post("/v1/chat/completions", &qb),
        s.post("/v1/chat/completions", &qc),
    );
    assert_eq!(answer(&a.1), answer(&base));
    assert_eq!(answer(&b.1), answer(&rnd));
    assert_eq!(answer(&c.1), answer(&base));
}
