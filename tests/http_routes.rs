//! Routes over real HTTP on the tiny Qwen2 fixture: a configured 90/10 split
//! sticky per user (each user's target is the one the routing function
//! predicts, and the response says which in `model` and a header), the admin
//! API (validation, 90/10 -> 50/50 moving no user off the canary, override,
//! shadow, delete), `/v1/models` and metrics, and routes surviving a restart.

mod common;

use common::http::{metric, Server};
use common::*;
use serde_json::{json, Value};
use tandem::routing::{Route, RouteSpec};

const MODEL: &str = "tiny/qwen2/hf-f32";

fn config(data_dir: &std::path::Path) -> String {
    format!(
        "[store]\ndata_dir = {:?}\n[lora.adapters]\na = {:?}\nv2 = {:?}\n\
         [routes.chat]\ntargets = [{{model = \"hf-f32\", weight = 90}}, {{model = \"a\", weight = 10}}]\n",
        data_dir.display().to_string(),
        fixture("tiny/lora/a-r4-qv").display().to_string(),
        fixture("tiny/lora/a-r4-qv-v2").display().to_string(),
    )
}

/// One routed completion: (status, body, the route-target header).
async fn ask(s: &Server, model: &str, user: Option<&str>, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
    let mut body = json!({"model": model, "prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0});
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    let mut req = reqwest::Client::new().post(s.url("/v1/completions")).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let target = r.headers().get("x-tandem-route-target").map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap(), target)
}

async fn put_route(s: &Server, alias: &str, body: Value) -> (u16, Value) {
    s.put(&format!("/admin/routes/{alias}"), &body).await
}

fn predicted(spec: Value, user: &str) -> String {
    let route = Route::new("chat", serde_json::from_value::<RouteSpec>(spec).unwrap()).unwrap();
    route.choose(Some(user), 0.0).model.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_split_stick_change_and_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(&fixture(MODEL), &config(data.path())).await;
    let split_90_10 = json!({"targets": [{"model": "hf-f32", "weight": 90}, {"model": "a", "weight": 10}]});

    // The configured split: every user lands where the routing function says,
    // and the response names the target.
    let users: Vec<String> = (0..120).map(|u| format!("user-{u}")).collect();
    let mut on_canary = Vec::new();
    for u in &users {
        let (st, v, header) = ask(&s, "chat", Some(u), &[]).await;
        assert_eq!(st, 200, "{v}");
        let want = predicted(split_90_10.clone(), u);
        assert_eq!(v["model"], want.as_str(), "{u}");
        assert_eq!(header.as_deref(), Some(want.as_str()), "{u}: the header names the target");
        if want == "a" {
            on_canary.push(u.clone());
        }
    }
    assert!(!on_canary.is_empty() && on_canary.len() < 40, "{} of 120 on the canary", on_canary.len());
    let (_, again, _) = ask(&s, "chat", Some(&on_canary[0]), &[]).await;
    assert_eq!(again["model"], "a", "sticky: the same user gets the same target");
    // Without a user, a weighted draw; a direct model name is not routed.
    let (st, _, header) = ask(&s, "hf-f32", Some("user-0"), &[]).await;
    assert_eq!((st, header), (200, None));

    // Override (an open server: no keys configured), and a bad one.
    let (_, v, _) = ask(&s, "chat", Some("user-0"), &[("x-tandem-route-override", "a")]).await;
    assert_eq!(v["model"], "a");
    let (st, v, _) = ask(&s, "chat", None, &[("x-tandem-route-override", "v2")]).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("not a target of route"), "{v}");

    // Admin validation: each refusal says why.
    for (alias, body, want) in [
        ("chat", json!({"targets": [{"model": "nope", "weight": 1}]}), "neither the base model nor a loaded adapter"),
        ("a", json!({"targets": [{"model": "hf-f32", "weight": 1}]}), "already a model"),
        ("other", json!({"targets": [{"model": "chat", "weight": 1}]}), "is an alias"),
        ("chat", json!({"targets": [{"model": "a", "weight": 0}]}), "positive integer"),
        ("chat", json!({"targets": [{"model": "a", "weight": 1}], "sticky_by": "cookie"}), "sticky_by"),
        ("chat", json!({"targets": [{"model": "a", "weight": 1}], "extra": 1}), "extra"),
        ("chat", json!({"targets": "a"}), "targets"),
    ] {
        let (st, v) = put_route(&s, alias, body.clone()).await;
        assert_eq!(st, 400, "{alias} {body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{alias} {body}: {msg}");
    }

    // 90/10 -> 50/50: nobody on the canary moves back to the base.
    let split_50_50 = json!({"targets": [{"model": "hf-f32", "weight": 50}, {"model": "a", "weight": 50}]});
    let (st, v) = put_route(&s, "chat", split_50_50.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["alias"], "chat");
    for u in &users {
        let (_, v, _) = ask(&s, "chat", Some(u), &[]).await;
        assert_eq!(v["model"], predicted(split_50_50.clone(), u).as_str());
        if on_canary.contains(u) {
            assert_eq!(v["model"], "a", "{u} left the canary when its share grew");
        }
    }

    // A second route with a shadow, sticky by a header; listed everywhere.
    let (st, v) = put_route(
        &s,
        "tenant",
        json!({"targets": [{"model": "v2", "weight": 1}], "sticky_by": "header:X-Tenant", "shadow": {"model": "a", "fraction": 1.0}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v, _) = ask(&s, "tenant", None, &[("x-tenant", "t1")]).await;
    assert_eq!((st, v["model"].as_str()), (200, Some("v2")), "{v}");
    let (_, list) = s.get("/admin/routes").await;
    let aliases: Vec<&str> = list["data"].as_array().unwrap().iter().map(|r| r["alias"].as_str().unwrap()).collect();
    assert_eq!(aliases, vec!["chat", "tenant"]);
    let (_, one) = s.get("/admin/routes/tenant").await;
    assert_eq!(one["sticky_by"], "header:x-tenant");
    let (_, models) = s.get("/v1/models").await;
    let card = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "chat").cloned().expect("alias listed");
    assert_eq!(card["root"], "route:chat");
    assert_eq!(card["route"]["targets"][1]["weight"], 50);

    let m = s.metrics().await;
    let routed_to_a = metric(&m, "tandem_route_requests_total{alias=\"chat\",target=\"a\"}").unwrap();
    let expected_a =
        1 + 1 + on_canary.len() + users.iter().filter(|u| predicted(split_50_50.clone(), u) == "a").count();
    assert_eq!(routed_to_a as usize, expected_a, "{m}");
    let started = metric(&m, "tandem_route_shadow_requests_total{alias=\"tenant\",target=\"a\",outcome=\"started\"}");
    let dropped = metric(&m, "tandem_route_shadow_requests_total{alias=\"tenant\",target=\"a\",outcome=\"dropped\"}");
    assert_eq!(started.unwrap() + dropped.unwrap(), 1.0, "{m}");
    assert_eq!(metric(&m, "tandem_routes"), Some(2.0));
    // A shadow that ran is timed and its tokens counted, beside the primary's.
    if started == Some(1.0) {
        let timed = "tandem_route_shadow_e2e_seconds_count{alias=\"tenant\",target=\"a\"}";
        let mut m = s.metrics().await;
        for _ in 0..100 {
            if metric(&m, timed) == Some(1.0) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            m = s.metrics().await;
        }
        assert_eq!(metric(&m, timed), Some(1.0), "{m}");
        let tokens = metric(&m, "tandem_route_shadow_completion_tokens_total{alias=\"tenant\",target=\"a\"}");
        assert!(tokens.unwrap() >= 1.0, "{m}");
    }

    // Per-target latency and errors: a request refused after the route chose
    // its target (a bad temperature) counts against that target, and its
    // response still names the target.
    let u0_target = predicted(split_50_50.clone(), "user-0");
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "chat", "user": "user-0", "prompt": [5], "temperature": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.headers()["x-tandem-route-target"], u0_target.as_str());
    let errors = format!("tandem_route_errors_total{{alias=\"chat\",target=\"{u0_target}\"}}");
    let timed = "tandem_route_e2e_seconds_count{alias=\"chat\",target=\"a\"}";
    let first = "tandem_route_first_byte_seconds_count{alias=\"chat\",target=\"a\"}";
    // Recorded when each response body is dropped: poll briefly.
    // Every response routed to `a` (the refused one too) is timed.
    let routed = "tandem_route_requests_total{alias=\"chat\",target=\"a\"}";
    let mut m = s.metrics().await;
    for _ in 0..40 {
        if metric(&m, &errors) == Some(1.0) && metric(&m, timed) == metric(&m, routed) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = s.metrics().await;
    }
    assert_eq!(metric(&m, &errors), Some(1.0), "{m}");
    assert_eq!(metric(&m, timed), metric(&m, routed), "{m}");
    assert_eq!(metric(&m, first), metric(&m, routed), "{m}");
    let tokens = metric(&m, "tandem_route_completion_tokens_total{alias=\"chat\",target=\"a\"}").unwrap();
    assert!(tokens >= routed_to_a, "one token per successful request to a: {tokens}");

    // Delete, then the alias is unknown.
    let r = reqwest::Client::new().delete(s.url("/admin/routes/tenant")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = reqwest::Client::new().delete(s.url("/admin/routes/tenant")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let (st, _, _) = ask(&s, "tenant", None, &[]).await;
    assert_eq!(st, 404);
    drop(s);

    // After a restart the stored 50/50 wins over the config's 90/10.
    let s = Server::start(&fixture(MODEL), &config(data.path())).await;
    let (_, one) = s.get("/admin/routes/chat").await;
    assert_eq!(one["targets"][0]["weight"], 50, "{one}");
    let (st, _) = s.get("/admin/routes/tenant").await;
    assert_eq!(st, 404, "the deleted route stays deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn route_updates_under_64_streams_fail_no_request() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(&fixture(MODEL), &config(data.path())).await;
    let base = s.base.clone();
    let streams: Vec<_> = (0..64)
        .map(|i| {
            let url = format!("{base}/v1/completions");
            tokio::spawn(async move {
                let body = json!({"model": "chat", "user": format!("u{i}"), "prompt": [5, 6, 7], "max_tokens": 24,
                                  "temperature": 0, "ignore_eos": true, "stream": true});
                let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let text = r.text().await.unwrap();
                (status, common::http::parse_sse(&text))
            })
        })
        .collect();
    for i in 0..20 {
        let w = 1 + i * 5;
        let (st, v) = put_route(
            &s,
            "chat",
            json!({"targets": [{"model": "hf-f32", "weight": 100 - w}, {"model": "a", "weight": w}]}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    for t in streams {
        let (status, (events, done)) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(done, "every stream ends with [DONE]");
        let tokens = events.iter().filter(|e| e["choices"][0]["text"].is_string()).count();
        assert!(tokens >= 1, "{events:?}");
        assert!(events.iter().all(|e| e.get("error").is_none()), "{events:?}");
    }
}

/// Shadow agreement: a shadow that is the primary's own model agrees on its
/// first tokens for greedy requests; a sampled, unseeded request is not
/// compared (it would differ by chance).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_first_tokens_are_compared_with_the_primary() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(&fixture(MODEL), &config(data.path())).await;
    let mirror = json!({"targets": [{"model": "a", "weight": 1}], "shadow": {"model": "a", "fraction": 1.0, "compare_tokens": 4}});
    let (st, v) = put_route(&s, "mirror", mirror).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["shadow"]["compare_tokens"], 4);
    let complete = |body: Value| {
        let url = s.url("/v1/completions");
        async move {
            let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let started = "tandem_route_shadow_requests_total{alias=\"mirror\",target=\"a\",outcome=\"started\"}";
    let agreed = "tandem_route_shadow_comparisons_total{alias=\"mirror\",target=\"a\",outcome=\"agree\"}";
    let disagreed = "tandem_route_shadow_comparisons_total{alias=\"mirror\",target=\"a\",outcome=\"disagree\"}";
    let prefix = "tandem_route_shadow_common_prefix_tokens_total{alias=\"mirror\",target=\"a\"}";
    // A shadow is dropped while requests wait, so ask until one has started.
    let mut runs = 0.0;
    for _ in 0..20 {
        complete(
            json!({"model": "mirror", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        )
        .await;
        runs = metric(&s.metrics().await, started).unwrap_or(0.0);
        if runs >= 1.0 {
            break;
        }
    }
    assert!(runs >= 1.0, "no shadow copy started in 20 requests");
    let mut m = s.metrics().await;
    for _ in 0..100 {
        if metric(&m, agreed).unwrap_or(0.0) + metric(&m, disagreed).unwrap_or(0.0) >= runs {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = s.metrics().await;
    }
    assert_eq!(metric(&m, agreed), Some(runs), "{m}");
    assert_eq!(metric(&m, disagreed), Some(0.0), "{m}");
    assert_eq!(metric(&m, prefix), Some(4.0 * runs), "4 tokens compared per run: {m}");

    // Sampled without a seed: the shadow runs but nothing is compared.
    let before = metric(&m, started).unwrap();
    for _ in 0..20 {
        complete(json!({"model": "mirror", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0})).await;
        if metric(&s.metrics().await, started).unwrap() > before {
            break;
        }
    }
    let shadow_runs = "tandem_route_shadow_e2e_seconds_count{alias=\"mirror\",target=\"a\"}";
    let total = metric(&s.metrics().await, started).unwrap();
    let mut m = s.metrics().await;
    for _ in 0..100 {
        if metric(&m, shadow_runs) >= Some(total) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = s.metrics().await;
    }
    assert!(total > before, "no sampled shadow started");
    assert_eq!(metric(&m, shadow_runs), Some(total), "{m}");
    assert_eq!(
        metric(&m, agreed).unwrap() + metric(&m, disagreed).unwrap(),
        runs,
        "sampled runs are not compared: {m}"
    );
}
