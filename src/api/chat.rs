//! `POST /v1/chat/completions`: messages -> chat template -> token ids -> choices.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::generate::{self, ChoiceEvent};
use super::protocol::ChatCompletionRequest;
use super::responses::{
    chat_logprobs, response_id, unix_now, ChatChoice, ChatCompletionResponse, ChatMessageOut, UsageTally,
};
use super::sse::{self, ChunkHeader, ChunkRenderer};
use super::{models, params, AppState};
use crate::tokenizer::{messages, Tokenizer};

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A completion, or an SSE stream of chunks when `stream` is true",
            content((ChatCompletionResponse = "application/json"), (super::sse::SseEvent = "text/event-stream"))),
        (status = 400, body = super::error::ErrorResponse),
        (status = 404, description = "Unknown model", body = super::error::ErrorResponse),
        (status = 413, body = super::error::ErrorResponse),
        (status = 429, body = super::error::ErrorResponse),
        (status = 503, body = super::error::ErrorResponse),
    )
)]
pub async fn create(
    State(st): State<AppState>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    tally: Option<axum::Extension<super::access_log::Tally>>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    super::endpoint::handle::<ChatCompletionRequest>(st, caller, tally, headers, body, respond).await
}

/// The request once its model is resolved.
async fn respond(
    st: &AppState,
    ready: &super::Ready,
    req: ChatCompletionRequest,
    model: models::Resolved,
    caller: Option<crate::auth::Caller>,
    tally: Option<super::access_log::Tally>,
) -> Result<Response, ApiError> {
    let logprobs = params::chat_logprobs(req.logprobs, req.top_logprobs)?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let mut params = params::validate(&req.shared(), max_tokens, logprobs, ready.engine.info())?;
    params.adapter = model.target.adapter();
    params.meter = caller;
    params.tally = tally;
    let messages = prepare_messages(&req.messages)?;

    let tok = &ready.tokenizer;
    let template = tok.chat_template().ok_or_else(|| {
        let why = tok.chat_template_error().map(|e| format!(" (it failed to compile: {e})")).unwrap_or_default();
        ApiError::invalid(format!(
            "this model has no usable chat template{why}; use /v1/completions with a formatted prompt"
        ))
    })?;
    let tools = req.tools.clone().map(Value::Array);
    let extra = req.chat_template_kwargs.clone().map(Value::Object);
    let text = template
        .render(&messages, tools.as_ref(), req.add_generation_prompt.unwrap_or(true), extra.as_ref())
        .map_err(|e| ApiError::from_tokenizer(e, "messages"))?;
    // The template writes any BOS itself; adding special tokens would double it.
    let prompt = tok.encode(&text, false).map_err(|e| ApiError::from_tokenizer(e, "messages"))?;

    let prompts = [prompt];
    let mut choices = generate::start_choices(ready, &params, &prompts, "messages")?;
    super::routes::start_shadow(st, &params, &prompts, &model, &mut choices).await;
    let id = response_id("chatcmpl");
    let created = unix_now();
    if params.stream {
        let renderer = ChatChunks {
            header: ChunkHeader {
                id,
                object: "chat.completion.chunk",
                created,
                model: model.name,
                include_usage: params.include_usage,
            },
            n: params.n,
            logprobs: params.logprobs.is_some(),
            tokenizer: ready.tokenizer.clone(),
            tally: UsageTally::default(),
        };
        let deadline = sse::deadline(st.request_timeout());
        return Ok(sse::respond(generate::merge(choices), renderer, deadline, st.server.request_timeout_s));
    }
    let done = generate::collect_within(choices, st.request_timeout()).await?;
    let mut tally = UsageTally::default();
    let choices = done
        .into_iter()
        .map(|c| {
            tally.add(0, &c.outcome);
            ChatChoice {
                index: c.index,
                message: ChatMessageOut { role: "assistant", content: c.text, refusal: None },
                logprobs: params.logprobs.map(|_| chat_logprobs(tok, &c.tokens)),
                finish_reason: c.outcome.finish_reason,
                stop_reason: c.outcome.stop_reason,
            }
        })
        .collect();
    let resp = ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model: model.name,
        choices,
        usage: tally.usage(),
    };
    Ok(Json(resp).into_response())
}

/// The request's messages checked and normalised for the chat template
/// ([`messages::prepare_messages`], shared with training); a bad message is a
/// 400 naming the offending field.
pub fn prepare_messages(messages: &[Value]) -> Result<Value, ApiError> {
    messages::prepare_messages(messages).map_err(|e| ApiError::invalid_param(e.param, e.message))
}

/// Chat chunks: a `role` delta per choice first, then `content` deltas, then an
/// empty delta with `finish_reason`; `usage` last when asked for.
struct ChatChunks {
    header: ChunkHeader,
    n: usize,
    logprobs: bool,
    tokenizer: Arc<Tokenizer>,
    tally: UsageTally,
}

impl ChunkRenderer for ChatChunks {
    fn start(&mut self) -> Vec<Value> {
        (0..self.n)
            .map(|i| {
                self.header.chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
            })
            .collect()
    }

    fn event(&mut self, ev: ChoiceEvent) -> Vec<Value> {
        match ev {
            ChoiceEvent::Delta { index, text, tokens } => {
                // Text held back (possible stop string) with nothing else to say: no chunk.
                if text.is_empty() && (!self.logprobs || tokens.is_empty()) {
                    return vec![];
                }
                let lp = if self.logprobs { chat_logprobs(&self.tokenizer, &tokens) } else { Value::Null };
                vec![self
                    .header
                    .chunk(json!({"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}))]
            }
            // Chat has no prompt logprobs.
            ChoiceEvent::Prompt { .. } => vec![],
            ChoiceEvent::Done { index, outcome } => {
                self.tally.add(0, &outcome);
                vec![self.header.chunk(json!({
                    "index": index,
                    "delta": {},
                    "logprobs": null,
                    "finish_reason": outcome.finish_reason,
                    "stop_reason": outcome.stop_reason,
                }))]
            }
        }
    }

    fn usage(&mut self) -> Option<Value> {
        self.header.usage_chunk(self.tally.usage())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::responses::Outcome;

    #[test]
    fn message_errors_become_400s_naming_the_field() {
        let e = prepare_messages(&[json!({"role": "wizard", "content": "x"})]).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        assert_eq!(
            e.message,
            "messages[0].role 'wizard' is not one of system, developer, user, assistant, tool, function"
        );
        let e = prepare_messages(&[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert_eq!(e.message, "messages must contain at least one message");
        let m = prepare_messages(&[json!({"role": "user", "content": [{"type": "text", "text": "a"}]})]).unwrap();
        assert_eq!(m[0]["content"], "a");
    }

    fn renderer(logprobs: bool, include_usage: bool) -> ChatChunks {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/qwen2/hf-f32/tokenizer.json");
        ChatChunks {
            header: ChunkHeader {
                id: "chatcmpl-1".into(),
                object: "chat.completion.chunk",
                created: 7,
                model: "m".into(),
                include_usage,
            },
            n: 2,
            logprobs,
            tokenizer: Arc::new(Tokenizer::from_file(&p).unwrap()),
            tally: UsageTally::default(),
        }
    }

    #[test]
    fn chunk_shapes() {
        let mut r = renderer(false, true);
        let start = r.start();
        assert_eq!(start.len(), 2);
        assert_eq!(
            start[1],
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "usage": null,
                "choices": [{"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]})
        );
        assert!(r.event(ChoiceEvent::Delta { index: 0, text: String::new(), tokens: vec![] }).is_empty());
        let c = r.event(ChoiceEvent::Delta { index: 0, text: "hi".into(), tokens: vec![] });
        assert_eq!(c[0]["choices"][0]["delta"], json!({"content": "hi"}));
        let outcome = Outcome {
            finish_reason: "length",
            stop_reason: Value::Null,
            prompt_tokens: 5,
            cached_tokens: 0,
            completion_tokens: 3,
        };
        let c = r.event(ChoiceEvent::Done { index: 0, outcome });
        assert_eq!(c[0]["choices"][0]["delta"], json!({}));
        assert_eq!(c[0]["choices"][0]["finish_reason"], "length");
        let u = r.usage().unwrap();
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"]["total_tokens"], 8);
        assert_eq!(renderer(false, false).usage(), None);
        assert!(renderer(false, false).start()[0].get("usage").is_none());
    }

    #[test]
    fn logprob_chunks_carry_tokens_even_without_text() {
        let mut r = renderer(true, false);
        let t = crate::engine::TokenOut { id: 97, logprob: Some(-0.25), top_logprobs: vec![] };
        let c = r.event(ChoiceEvent::Delta { index: 1, text: String::new(), tokens: vec![t] });
        assert_eq!(c.len(), 1);
        assert_eq!(c[0]["choices"][0]["logprobs"]["content"][0]["logprob"], -0.25);
    }
}
