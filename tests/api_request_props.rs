//! Request bodies are outside bytes: any bytes, and any JSON with the right
//! field names but arbitrary values, either parse and validate into engine
//! requests within the engine's limits or give a 4xx error naming a reason —
//! never a panic, never a 5xx.

use proptest::prelude::*;
use serde_json::{json, Value};
use tandem::api::chat::prepare_messages;
use tandem::api::completions::parse_prompts;
use tandem::api::json::parse;
use tandem::api::params::{completion_logprobs, validate};
use tandem::api::protocol::{ChatCompletionRequest, CompletionRequest};
use tandem::engine::EngineInfo;

fn info() -> EngineInfo {
    tandem::fuzz_harness::small_engine_info()
}

/// Arbitrary JSON, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        (-3i64..300).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z0-9_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "echo",
    "stream",
    "stream_options",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "user",
    "skip_special_tokens",
    "tools",
];

/// A body with known field names and arbitrary values.
fn body() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(FIELDS), any_json()), 0..8)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

fn check_completion(bytes: &[u8]) {
    let Ok(req) = parse::<CompletionRequest>(bytes) else { return };
    let Ok(logprobs) = completion_logprobs(req.logprobs) else { return };
    if let Ok(p) = validate(&req.shared(), req.max_tokens, logprobs, &info()) {
        assert!(p.n >= 1);
        if let Ok(prompts) = parse_prompts(&req.prompt) {
            for prompt in prompts {
                let tandem::api::completions::PromptInput::Ids(ids) = prompt else { continue };
                if let Ok(reqs) = p.engine_requests(&ids, &info(), "prompt") {
                    for r in reqs {
                        assert!(r.prompt.len() + r.stopping.max_tokens <= 256);
                        assert!(r.stopping.max_tokens >= 1);
                    }
                }
            }
        }
    }
}

fn check_chat(bytes: &[u8]) {
    let Ok(req) = parse::<ChatCompletionRequest>(bytes) else { return };
    let _ = prepare_messages(&req.messages);
    let _ = validate(&req.shared(), req.max_completion_tokens.or(req.max_tokens), None, &info());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_bytes_are_an_error_or_a_request(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        check_completion(&bytes);
        check_chat(&bytes);
    }

    #[test]
    fn known_fields_with_any_values_never_panic(b in body()) {
        let bytes = serde_json::to_vec(&b).unwrap();
        check_completion(&bytes);
        check_chat(&bytes);
    }
}

#[test]
fn errors_are_client_errors_that_name_the_field() {
    for (body, param) in [
        (json!({"prompt": "x", "max_tokens": "many"}), "max_tokens"),
        (json!({"prompt": "x", "n": -1}), "n"),
        (json!({"prompt": "x", "temperature": -0.5}), "temperature"),
        (json!({"prompt": "x", "logit_bias": {"abc": 1}}), "logit_bias"),
    ] {
        let bytes = serde_json::to_vec(&body).unwrap();
        let e = parse::<CompletionRequest>(&bytes)
            .and_then(|r| validate(&r.shared(), r.max_tokens, None, &info()).map(|_| ()))
            .expect_err(&body.to_string());
        assert!(e.status.is_client_error(), "{body}: {}", e.status);
        assert!(e.param.as_deref().is_some_and(|p| p.starts_with(param)), "{body}: {:?}", e.param);
    }
}
