//! `POST /v1/completions`: one or more prompts (text or token ids), `n` choices
//! each, choice `p * n + i` for prompt `p`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::generate::{self, ChoiceEvent};
use super::protocol::CompletionRequest;
use super::responses::{response_id, unix_now, CompletionChoice, CompletionLogprobs, CompletionResponse, UsageTally};
use super::sse::{self, ChunkHeader, ChunkRenderer};
use super::{models, params, AppState};
use crate::tokenizer::Tokenizer;

/// One prompt as the client gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, strings, token ids, or lists of token ids.
pub fn parse_prompts(v: &Value) -> Result<Vec<PromptInput>, ApiError> {
    const SHAPE: &str = "prompt must be a string, an array of strings, an array of token ids \
                         or an array of token-id arrays";
    let ids = |v: &Value, at: &str| -> Result<Vec<u32>, ApiError> {
        let list = v.as_array().ok_or_else(|| ApiError::invalid_param(at, SHAPE))?;
        list.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| {
                    ApiError::invalid_param(format!("{at}[{i}]"), format!("{at}[{i}] must be a token id, got {x}"))
                })
            })
            .collect()
    };
    match v {
        Value::String(s) => Ok(vec![PromptInput::Text(s.clone())]),
        Value::Array(list) if list.is_empty() => Err(ApiError::invalid_param("prompt", "prompt must not be empty")),
        Value::Array(list) => match &list[0] {
            Value::String(_) => list
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::String(s) => Ok(PromptInput::Text(s.clone())),
                    _ => Err(ApiError::invalid_param(format!("prompt[{i}]"), format!("prompt[{i}] must be a string"))),
                })
                .collect(),
            Value::Number(_) => Ok(vec![PromptInput::Ids(ids(v, "prompt")?)]),
            Value::Array(_) => {
                list.iter().enumerate().map(|(i, x)| ids(x, &format!("prompt[{i}]")).map(PromptInput::Ids)).collect()
            }
            _ => Err(ApiError::invalid_param("prompt", SHAPE)),
        },
        _ => Err(ApiError::invalid_param("prompt", SHAPE)),
    }
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A completion, or an SSE stream of chunks when `stream` is true",
            content((CompletionResponse = "application/json"), (super::sse::SseEvent = "text/event-stream"))),
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
    super::endpoint::handle::<CompletionRequest>(st, caller, tally, headers, body, respond).await
}

/// The request once its model is resolved.
async fn respond(
    st: &AppState,
    ready: &super::Ready,
    req: CompletionRequest,
    model: models::Resolved,
    caller: Option<crate::auth::Caller>,
    tally: Option<super::access_log::Tally>,
) -> Result<Response, ApiError> {
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    let logprobs = params::completion_logprobs(req.logprobs)?;
    let echo = req.echo.unwrap_or(false);
    let mut params = params::validate(&req.shared(), req.max_tokens, logprobs, ready.engine.info())?;
    params.adapter = model.target.adapter();
    params.meter = caller;
    params.tally = tally;
    if echo {
        // The echoed prompt carries logprobs too (the first token's are null).
        params.prompt_logprobs = logprobs;
    }
    let tok = &ready.tokenizer;
    let inputs = parse_prompts(&req.prompt)?;
    let mut prompts = Vec::with_capacity(inputs.len());
    let mut prompt_texts = Vec::with_capacity(inputs.len());
    for input in inputs {
        let (ids, text) = match input {
            PromptInput::Text(t) => (tok.encode(&t, true).map_err(|e| ApiError::from_tokenizer(e, "prompt"))?, t),
            PromptInput::Ids(ids) => {
                let text = if echo { tok.decode(&ids, false).unwrap_or_default() } else { String::new() };
                (ids, text)
            }
        };
        prompts.push(ids);
        prompt_texts.push(text);
    }

    let mut choices = generate::start_choices(ready, &params, &prompts, "prompt")?;
    super::routes::start_shadow(st, &params, &prompts, &model, &mut choices).await;
    let id = response_id("cmpl");
    let created = unix_now();
    let echo_texts: Vec<String> = if echo { prompt_texts } else { vec![String::new(); prompts.len()] };
    if params.stream {
        let renderer = CompletionChunks {
            header: ChunkHeader {
                id,
                object: "text_completion",
                created,
                model: model.name,
                include_usage: params.include_usage,
            },
            n: params.n,
            echo: echo_texts.clone(),
            offsets: (0..prompts.len() * params.n).map(|i| echo_texts[i / params.n].chars().count()).collect(),
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
            let prompt_index = c.index / params.n;
            tally.add(prompt_index, &c.outcome);
            let echo = &echo_texts[prompt_index];
            let logprobs = params.logprobs.map(|_| {
                let mut lp = CompletionLogprobs::default();
                let mut offset = 0;
                match &c.prompt_logprobs {
                    Some(p) => offset = lp.push_prompt(tok, &prompts[prompt_index], p, offset),
                    None => offset += echo.chars().count(),
                }
                for t in &c.tokens {
                    offset = lp.push(tok, t, offset);
                }
                lp
            });
            CompletionChoice {
                index: c.index,
                text: format!("{echo}{}", c.text),
                logprobs,
                finish_reason: c.outcome.finish_reason,
                stop_reason: c.outcome.stop_reason,
            }
        })
        .collect();
    let resp =
        CompletionResponse { id, object: "text_completion", created, model: model.name, choices, usage: tally.usage() };
    Ok(Json(resp).into_response())
}

struct CompletionChunks {
    header: ChunkHeader,
    n: usize,
    /// Per prompt: the text `echo` sends first.
    echo: Vec<String>,
    /// Per choice: `text_offset` of its next token.
    offsets: Vec<usize>,
    logprobs: bool,
    tokenizer: Arc<Tokenizer>,
    tally: UsageTally,
}

impl ChunkRenderer for CompletionChunks {
    fn start(&mut self) -> Vec<Value> {
        if self.logprobs {
            // The echo goes out with the prompt's logprobs, once the engine has them.
            return vec![];
        }
        (0..self.offsets.len())
            .filter(|&i| !self.echo[i / self.n].is_empty())
            .map(|i| {
                self.header
                    .chunk(json!({"index": i, "text": self.echo[i / self.n], "logprobs": null, "finish_reason": null}))
            })
            .collect()
    }

    fn event(&mut self, ev: ChoiceEvent) -> Vec<Value> {
        match ev {
            ChoiceEvent::Prompt { index, prompt, logprobs } => {
                let mut lp = CompletionLogprobs::default();
                let offset = lp.push_prompt(&self.tokenizer, &prompt, &logprobs, 0);
                if let Some(o) = self.offsets.get_mut(index) {
                    *o = offset;
                }
                let text = self.echo.get(index / self.n).cloned().unwrap_or_default();
                vec![self.header.chunk(json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null}))]
            }
            ChoiceEvent::Delta { index, text, tokens } => {
                if text.is_empty() && (!self.logprobs || tokens.is_empty()) {
                    return vec![];
                }
                let lp = if self.logprobs {
                    let mut lp = CompletionLogprobs::default();
                    let mut offset = self.offsets.get(index).copied().unwrap_or(0);
                    for t in &tokens {
                        offset = lp.push(&self.tokenizer, t, offset);
                    }
                    if let Some(o) = self.offsets.get_mut(index) {
                        *o = offset;
                    }
                    serde_json::to_value(lp).unwrap_or(Value::Null)
                } else {
                    Value::Null
                };
                vec![self.header.chunk(json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null}))]
            }
            ChoiceEvent::Done { index, outcome } => {
                self.tally.add(index / self.n, &outcome);
                vec![self.header.chunk(json!({
                    "index": index,
                    "text": "",
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

    #[test]
    fn prompt_shapes() {
        assert_eq!(parse_prompts(&json!("hi")).unwrap(), vec![PromptInput::Text("hi".into())]);
        assert_eq!(parse_prompts(&json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(parse_prompts(&json!([1, 2, 3])).unwrap(), vec![PromptInput::Ids(vec![1, 2, 3])]);
        assert_eq!(
            parse_prompts(&json!([[1], [2, 3]])).unwrap(),
            vec![PromptInput::Ids(vec![1]), PromptInput::Ids(vec![2, 3])]
        );
        for (bad, param) in [
            (json!([]), "prompt"),
            (json!(5), "prompt"),
            (json!(["a", 1]), "prompt[1]"),
            (json!([1, -2]), "prompt[1]"),
            (json!([1, 5000000000u64]), "prompt[1]"),
            (json!([[1], "a"]), "prompt[1]"),
            (json!([{"a": 1}]), "prompt"),
        ] {
            assert_eq!(parse_prompts(&bad).unwrap_err().param.as_deref(), Some(param), "{bad}");
        }
    }
}
