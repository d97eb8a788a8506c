//! API keys over real HTTP on the tiny Qwen2 fixture: 401 without a known
//! key, 403 for an inference key on every admin route and on the route
//! override, a tenant key that cannot see or use another tenant's adapter,
//! tokens-per-minute answering 429 with Retry-After, the open endpoints, and
//! keys never echoed or logged.

mod common;

use common::http::Server;
use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-secret-key-1";
const INFER: &str = "inference-secret-1";
const TENANT: &str = "tenant-a-secret-1";

async fn server() -> Server {
    let cfg = format!(
        "[lora.adapters]\na = {:?}\nv2 = {:?}\n\
         [[auth.keys]]\nkey = {ADMIN:?}\nscope = \"admin\"\nname = \"ops\"\n\
         [[auth.keys]]\nkey = {INFER:?}\nscope = \"inference\"\nname = \"app\"\n\
         [[auth.keys]]\nkey = {TENANT:?}\nscope = \"inference\"\nname = \"tenant-a\"\nmodels = [\"hf-f32\", \"a\"]\ntokens_per_minute = 40\n",
        fixture("tiny/lora/a-r4-qv").display().to_string(),
        fixture("tiny/lora/a-r4-qv-v2").display().to_string(),
    );
    Server::start(&fixture("tiny/qwen2/hf-f32"), &cfg).await
}

async fn call(
    s: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let c = reqwest::Client::new();
    let mut req = match method {
        "GET" => c.get(s.url(path)),
        "POST" => c.post(s.url(path)),
        "PUT" => c.put(s.url(path)),
        "DELETE" => c.delete(s.url(path)),
        m => panic!("{m}"),
    };
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), retry)
}

fn completion(model: &str) -> Value {
    json!({"model": model, "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_scopes_tenants_and_limits() {
    let s = server().await;

    // No key, a wrong key: 401 in OpenAI's envelope, the key never echoed.
    for key in [None, Some("wrong-key-123456"), Some("")] {
        let (st, v, _) = call(&s, "POST", "/v1/completions", key, Some(completion("hf-f32"))).await;
        assert_eq!(st, 401, "{key:?}: {v}");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert!(!v.to_string().contains("wrong-key"), "{v}");
    }
    let (st, _, _) = call(&s, "GET", "/v1/models", None, None).await;
    assert_eq!(st, 401);
    // What load balancers and Prometheus poll stays open.
    for path in ["/health", "/version", "/metrics"] {
        let r = reqwest::get(s.url(path)).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    // `x-api-key` works as well as the bearer header.
    let r = reqwest::Client::new().get(s.url("/v1/models")).header("x-api-key", INFER).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Every admin route refuses an inference key (403) and a missing one (401).
    let admin_routes: [(&str, &str, Option<Value>); 11] = [
        ("GET", "/admin/routes", None),
        ("GET", "/admin/routes/chat", None),
        ("PUT", "/admin/routes/chat", Some(json!({"targets": [{"model": "a", "weight": 1}]}))),
        ("DELETE", "/admin/routes/chat", None),
        ("POST", "/v1/load_lora_adapter", Some(json!({"lora_name": "x", "lora_path": "/tmp"}))),
        ("POST", "/v1/unload_lora_adapter", Some(json!({"lora_name": "a"}))),
        ("GET", "/v1/files", None),
        ("GET", "/v1/files/file-abc", None),
        ("GET", "/v1/fine_tuning/jobs", None),
        ("POST", "/v1/fine_tuning/jobs", Some(json!({"model": "hf-f32", "training_file": "file-x"}))),
        ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", None),
    ];
    for (method, path, body) in admin_routes.iter().cloned() {
        let (st, v, _) = call(&s, method, path, Some(INFER), body.clone()).await;
        assert_eq!(st, 403, "{method} {path}: {v}");
        assert_eq!(v["error"]["type"], "permission_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("'app'"), "named by its name, not its key: {v}");
        let (st, _, _) = call(&s, method, path, None, body).await;
        assert_eq!(st, 401, "{method} {path}");
    }
    // The admin key gets through (to the handler's own answer).
    let (st, v, _) =
        call(&s, "PUT", "/admin/routes/chat", Some(ADMIN), Some(json!({"targets": [{"model": "a", "weight": 1}]})))
            .await;
    assert_eq!(st, 200, "{v}");
    let (st, v, _) = call(&s, "GET", "/v1/fine_tuning/jobs", Some(ADMIN), None).await;
    assert_eq!(st, 404, "no data directory: the files API is off ({v})");
    // Forcing a route's target is for admins.
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .bearer_auth(INFER)
        .header("x-tandem-route-override", "a")
        .json(&completion("chat"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // A tenant key sees and uses only its models: others do not exist for it.
    let (_, models, _) = call(&s, "GET", "/v1/models", Some(TENANT), None).await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["hf-f32", "a"], "{models}");
    let (_, all, _) = call(&s, "GET", "/v1/models", Some(INFER), None).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 4, "base, a, v2, chat: {all}");
    for (method, path, body) in [
        ("POST", "/v1/completions", Some(completion("v2"))),
        ("POST", "/v1/completions", Some(completion("hf-f32:v2"))),
        ("POST", "/v1/completions", Some(completion("chat"))),
        ("GET", "/v1/models/v2", None),
    ] {
        let (st, v, _) = call(&s, method, path, Some(TENANT), body).await;
        assert_eq!(st, 404, "{path}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("does not exist"), "{v}");
    }
    let (st, v, _) = call(&s, "POST", "/v1/completions", Some(TENANT), Some(completion("a"))).await;
    assert_eq!(st, 200, "{v}");

    // 40 tokens a minute: that request spent 11 (3 + 8); two more fit, then 429.
    for _ in 0..2 {
        let (st, v, _) = call(&s, "POST", "/v1/completions", Some(TENANT), Some(completion("hf-f32"))).await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, v, _) = call(&s, "POST", "/v1/completions", Some(TENANT), Some(completion("hf-f32"))).await;
    assert_eq!(st, 200, "33 spent, under 40: {v}");
    let (st, v, retry) = call(&s, "POST", "/v1/completions", Some(TENANT), Some(completion("hf-f32"))).await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let wait: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // Other keys are not limited by it.
    let (st, _, _) = call(&s, "POST", "/v1/completions", Some(INFER), Some(completion("hf-f32"))).await;
    assert_eq!(st, 200);

    let log = s.stderr();
    assert!(log.contains("3 API key(s) configured"), "{log}");
    for k in [ADMIN, INFER, TENANT, "wrong-key"] {
        assert!(!log.contains(k), "a key appears in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapter_paths_stay_inside_the_allowed_roots() {
    let root = tempfile::tempdir().unwrap();
    let inside = root.path().join("ok");
    std::fs::create_dir(&inside).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("tiny/lora/a-r4-qv").join(f), inside.join(f)).unwrap();
    }
    // A link inside the root to an adapter outside it.
    std::os::unix::fs::symlink(fixture("tiny/lora/a-r4-qv-v2"), root.path().join("escape")).unwrap();
    let r = root.path().display().to_string();
    let cfg = format!("[lora]\nallowed_roots = [{r:?}]\n[[auth.keys]]\nkey = {ADMIN:?}\nscope = \"admin\"\n");
    let s = Server::start(&fixture("tiny/qwen2/hf-f32"), &cfg).await;
    let lora = fixture("tiny/lora").display().to_string();
    let attempts = [
        format!("{r}/../../etc"),
        format!("{r}/ok/../../.."),
        format!("{r}/./../{}", root.path().file_name().unwrap().to_string_lossy()),
        format!("{r}/escape"),
        format!("{r}/escape/."),
        "/etc".to_string(),
        "/".to_string(),
        "../../../../etc".to_string(),
        "~/".to_string(),
        format!("{lora}/a-r4-qv"),
        format!("{r}/ok/../../{}/a-r4-qv", lora),
        format!("{r}/%2e%2e/%2e%2e/etc"),
        format!("{r}/ok\u{0}/../../etc"),
    ];
    for (i, path) in attempts.iter().enumerate() {
        let body = json!({"lora_name": format!("x{i}"), "lora_path": path});
        let (st, v, _) = call(&s, "POST", "/v1/load_lora_adapter", Some(ADMIN), Some(body)).await;
        assert!(st == 400 || st == 404, "{path}: {st} {v}");
        let (st, v, _) = call(
            &s,
            "POST",
            "/v1/completions",
            Some(ADMIN),
            Some(json!({"prompt": [5], "max_tokens": 1, "adapter_id": path, "adapter_source": "local"})),
        )
        .await;
        assert!(st == 400 || st == 404, "adapter_id {path}: {st} {v}");
    }
    // The one inside loads.
    let body = json!({"lora_name": "ok", "lora_path": format!("{r}/ok")});
    let (st, v, _) = call(&s, "POST", "/v1/load_lora_adapter", Some(ADMIN), Some(body)).await;
    assert_eq!(st, 200, "{v}");
}
