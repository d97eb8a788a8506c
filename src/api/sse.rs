//! Server-sent events for streamed completions: `data: {json}\n\n` per chunk,
//! `data: [DONE]\n\n` at the end, as OpenAI sends them. An error after the
//! response has started (engine failure, timeout) goes out as one
//! `data: {"error": ...}` event, then `[DONE]`.
//!
//! The body stream owns the choices' engine streams: when the client goes away,
//! hyper drops the body and with it every engine request (an abort each).

use std::collections::VecDeque;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures::stream::{SelectAll, StreamExt};
use serde_json::Value;
use tokio::time::Instant;

use super::error::ApiError;
use super::generate::{ChoiceEvent, ChoiceStream};
use super::responses::Usage;

/// One server-sent event, as the OpenAPI document describes a streamed response:
/// `data` is a JSON chunk (the response's `.chunk` object) or `[DONE]`.
#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
pub struct SseEvent {
    pub data: String,
    pub event: Option<String>,
}

pub fn event(v: &Value) -> Bytes {
    let mut s = String::with_capacity(64);
    s.push_str("data: ");
    s.push_str(&v.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}

pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// What every chunk of one streamed response carries besides its choice.
pub struct ChunkHeader {
    pub id: String,
    /// "chat.completion.chunk" or "text_completion".
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// Every chunk carries `usage: null`, and a usage chunk comes last.
    pub include_usage: bool,
}

impl ChunkHeader {
    /// A chunk holding one choice.
    pub fn chunk(&self, choice: Value) -> Value {
        let mut v = serde_json::json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The final chunk with `usage` and `choices: []`, when the client asked for it.
    pub fn usage_chunk(&self, usage: Usage) -> Option<Value> {
        self.include_usage.then(|| {
            serde_json::json!({
                "id": self.id,
                "object": self.object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            })
        })
    }
}

/// When a stream started now must end: after the server's request timeout,
/// or (no timeout) never in practice.
pub fn deadline(timeout: Option<std::time::Duration>) -> Instant {
    Instant::now() + timeout.unwrap_or(std::time::Duration::from_secs(100 * 365 * 86400))
}

/// Turns choice events into chunk JSON for one endpoint.
pub trait ChunkRenderer: Send + 'static {
    /// Chunks before any token (chat: the `role` delta of each choice).
    fn start(&mut self) -> Vec<Value>;
    fn event(&mut self, ev: ChoiceEvent) -> Vec<Value>;
    /// The usage chunk (`choices: []`) when the client asked for it.
    fn usage(&mut self) -> Option<Value>;
}

struct State<R> {
    choices: Option<SelectAll<ChoiceStream>>,
    renderer: R,
    out: VecDeque<Bytes>,
    deadline: Instant,
    timeout_s: u64,
}

/// The streaming response for `choices`, ending at `deadline` at the latest.
pub fn respond<R: ChunkRenderer>(
    choices: SelectAll<ChoiceStream>,
    mut renderer: R,
    deadline: Instant,
    timeout_s: u64,
) -> Response {
    let out: VecDeque<Bytes> = renderer.start().iter().map(event).collect();
    let state = State { choices: Some(choices), renderer, out, deadline, timeout_s };
    let body = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(b) = st.out.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(b), st));
            }
            let choices = st.choices.as_mut()?;
            match tokio::time::timeout_at(st.deadline, choices.next()).await {
                Ok(Some(Ok(ev))) => {
                    let chunks = st.renderer.event(ev);
                    st.out.extend(chunks.iter().map(event));
                }
                Ok(None) => {
                    if let Some(u) = st.renderer.usage() {
                        st.out.push_back(event(&u));
                    }
                    st.out.push_back(Bytes::from_static(DONE));
                    st.choices = None;
                }
                Ok(Some(Err(e))) => st.fail(e),
                Err(_) => {
                    let e = ApiError::timeout(st.timeout_s);
                    st.fail(e)
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies such as nginx must not buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

impl<R> State<R> {
    /// Ends the stream with an error event; dropping the choices aborts them.
    fn fail(&mut self, e: ApiError) {
        self.choices = None;
        self.out.push_back(event(&e.to_json()));
        self.out.push_back(Bytes::from_static(DONE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    struct Echo;
    impl ChunkRenderer for Echo {
        fn start(&mut self) -> Vec<Value> {
            vec![json!({"start": true})]
        }
        fn event(&mut self, ev: ChoiceEvent) -> Vec<Value> {
            match ev {
                ChoiceEvent::Delta { text, .. } => vec![json!({"text": text})],
                ChoiceEvent::Done { .. } | ChoiceEvent::Prompt { .. } => vec![],
            }
        }
        fn usage(&mut self) -> Option<Value> {
            Some(json!({"usage": 1}))
        }
    }

    async fn body_of(choices: Vec<ChoiceStream>, wait: Duration) -> String {
        let resp = respond(futures::stream::select_all(choices), Echo, Instant::now() + wait, 9);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn events_then_usage_then_done() {
        let delta = ChoiceEvent::Delta { index: 0, text: "hi".into(), tokens: vec![] };
        let s: ChoiceStream = Box::pin(futures::stream::iter(vec![Ok(delta)]));
        let body = body_of(vec![s], Duration::from_secs(5)).await;
        assert_eq!(
            body,
            "data: {\"start\":true}\n\ndata: {\"text\":\"hi\"}\n\ndata: {\"usage\":1}\n\ndata: [DONE]\n\n"
        );
    }

    #[tokio::test]
    async fn a_timeout_ends_the_stream_with_an_error_event_then_done() {
        let never: ChoiceStream = Box::pin(futures::stream::pending());
        let body = body_of(vec![never], Duration::from_millis(20)).await;
        let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{body}");
        let err: Value = serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(err["error"]["code"], 408);
        assert!(err["error"]["message"].as_str().unwrap().contains("9 s"));
        assert_eq!(events[2], "data: [DONE]");
    }

    #[tokio::test]
    async fn an_engine_failure_mid_stream_is_an_error_event() {
        let s: ChoiceStream = Box::pin(futures::stream::iter(vec![Err(ApiError::internal("boom"))]));
        let body = body_of(vec![s], Duration::from_secs(5)).await;
        assert!(body.contains("\"message\":\"boom\"") && body.ends_with("data: [DONE]\n\n"), "{body}");
        assert!(!body.contains("usage"), "no usage chunk after an error");
    }
}
