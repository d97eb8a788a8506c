//! Logs as an operator reads them: JSON lines (`log_format = "json"`), a
//! request id returned as `x-request-id` (the client's own when it sends one)
//! and carried by one access line per request with status, model, route
//! target, key name, tokens and latency, never the prompt, output or key.

mod common;

use common::http::Server;
use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_access_lines_carry_the_request_id_and_never_the_prompt() {
    let cfg = format!(
        "[server]\nlog_format = \"json\"\n[lora.adapters]\na = {:?}\n[routes.chat]\ntargets = [{{model = \"a\", weight = 1}}]\n\
         [[auth.keys]]\nkey = \"sekrit-key-123\"\nscope = \"inference\"\nname = \"app\"\n",
        fixture("tiny/lora/a-r4-qv").display().to_string()
    );
    let s = Server::start(&fixture("tiny/qwen2/hf-f32"), &cfg).await;
    let client = reqwest::Client::new();
    let secret_prompt = "the secret prompt text";
    let body = json!({"model": "chat", "prompt": secret_prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": true});
    let r = client
        .post(s.url("/v1/completions"))
        .bearer_auth("sekrit-key-123")
        .header("x-request-id", "client-req-42")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["x-request-id"], "client-req-42", "the client's id comes back");
    let output = r.json::<Value>().await.unwrap()["choices"][0]["text"].as_str().unwrap().to_string();
    // A streamed one, and a refused one, get ids of their own.
    let r = client
        .post(s.url("/v1/completions"))
        .bearer_auth("sekrit-key-123")
        // ignore_eos: a sampled end-of-sequence would end it with fewer tokens.
        .json(&json!({"model": "chat", "prompt": secret_prompt, "max_tokens": 3, "stream": true, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    let streamed_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(streamed_id.starts_with("req-"), "{streamed_id}");
    let _ = r.text().await.unwrap();
    let r = client.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let refused_id = r.headers()["x-request-id"].to_str().unwrap().to_string();

    // The access lines are written when each body ends: give them a moment.
    // Wait for these three ids, not a count: the start-up readiness probe
    // writes an access line of its own.
    let ids = ["client-req-42", streamed_id.as_str(), refused_id.as_str()];
    let mut lines: Vec<Value> = Vec::new();
    for _ in 0..100 {
        lines = s.stderr().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
        let logged = |id: &str| lines.iter().any(|l| l["target"] == "tandem::access" && l["request_id"] == id);
        if ids.iter().all(|id| logged(id)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let log = s.stderr();
    assert!(log.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "every line is JSON:\n{log}");
    assert!(
        lines.iter().any(|l| l["message"].as_str().unwrap_or("").contains("is ready")),
        "start-up goes through the logger"
    );
    let access = |id: &str| lines.iter().find(|l| l["target"] == "tandem::access" && l["request_id"] == id).cloned();
    let first = access("client-req-42").expect("an access line for the request");
    assert_eq!(first["status"], 200);
    assert_eq!(first["path"], "/v1/completions");
    assert_eq!(first["model"], "a");
    assert_eq!(first["route_target"], "a");
    assert_eq!(first["key"], "app");
    assert_eq!(first["completion_tokens"], 5);
    assert!(first["prompt_tokens"].as_u64().unwrap() > 0, "{first}");
    assert!(first["latency_ms"].as_str().unwrap().parse::<f64>().unwrap() > 0.0, "{first}");
    assert_eq!(access(&streamed_id).expect("the streamed request")["completion_tokens"], 3);
    assert_eq!(access(&refused_id).expect("the refused request")["status"], 401);
    for secret in [secret_prompt, output.as_str(), "sekrit-key-123"] {
        assert!(secret.trim().is_empty() || !log.contains(secret), "{secret:?} appears in the log");
    }
}
