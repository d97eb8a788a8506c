//! Every failure the HTTP layer can report, mapped once to a status and OpenAI's
//! error envelope `{"error": {"message", "type", "param", "code"}}`.
//!
//! `code` carries the HTTP status as a number, as vLLM does (the 404 for an
//! unknown model must match vLLM byte for byte: gateways and SDKs match on it).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::SubmitError;
use crate::tokenizer::TokenizerError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Seconds a client should wait before retrying (429 / 503).
    pub retry_after: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: u16,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), param: None, retry_after: None }
    }

    /// A request the client must change: bad JSON, wrong types, values out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// `invalid` naming the offending field.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Exactly vLLM's answer for a model (or adapter) name it does not serve.
    pub fn model_not_found(name: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFoundError", format!("The model `{name}` does not exist."))
            .with_param("model")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFoundError", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    pub fn queue_full(message: impl Into<String>, retry_after_s: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        e.retry_after = Some(retry_after_s.max(1));
        e
    }

    /// No API key, or one the server does not know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
    }

    /// A known key without the scope the route needs.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    /// A key over one of its limits.
    pub fn rate_limited(message: impl Into<String>, retry_after_s: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        e.retry_after = Some(retry_after_s.max(1));
        e
    }

    /// The engine is still loading (or has stopped).
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message);
        e.retry_after = Some(1);
        e
    }

    pub fn timeout(seconds: u64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout_error",
            format!("the request did not finish within the server's limit of {seconds} s"),
        )
    }

    /// The data directory could not take a write (full, read-only): 507, with
    /// the operator's remedy first and the failing path and OS error after.
    pub fn storage(fault: crate::store::StorageFault, detail: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INSUFFICIENT_STORAGE, "storage_error", format!("{} ({detail})", fault.describe()))
    }

    /// The data directory could not be opened for another reason (permissions,
    /// a corrupt database): 503 without `Retry-After`, as retrying will not help.
    pub fn data_dir_unusable(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!("the data directory is unusable: {detail}"),
        )
    }

    /// The engine failed this request (the server goes on serving others).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.status.as_u16(),
            },
        }
    }

    /// The envelope as JSON, for SSE error events.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.body()).unwrap_or(serde_json::Value::Null)
    }

    /// A `SubmitError` for a request whose prompt field is called `prompt_param`
    /// (`prompt` or `messages`): the context-length error names whichever of the
    /// prompt and `max_tokens` the client has to shorten.
    pub fn from_submit(e: SubmitError, prompt_param: &str, max_tokens_explicit: bool) -> Self {
        match &e {
            SubmitError::QueueFull { retry_after_s, .. } => Self::queue_full(e.to_string(), *retry_after_s),
            SubmitError::ContextLength { prompt, limit, .. } => {
                let param = if *prompt >= *limit || !max_tokens_explicit { prompt_param } else { "max_tokens" };
                Self::invalid_param(param, e.to_string())
            }
            SubmitError::EmptyPrompt => Self::invalid_param(prompt_param, e.to_string()),
            SubmitError::InvalidParam { param, message } => {
                let param = if *param == "prompt" { prompt_param } else { param };
                Self::invalid_param(param, message.clone())
            }
            SubmitError::EngineStopped => Self::unavailable(e.to_string()),
        }
    }

    /// A tokenizer or chat-template failure while preparing `param`. A template that
    /// raised, or input the template rejects, is the client's; the rest is ours.
    pub fn from_tokenizer(e: TokenizerError, param: &str) -> Self {
        match e {
            TokenizerError::TemplateRaised(m) | TokenizerError::InvalidInput(m) => Self::invalid_param(param, m),
            TokenizerError::TemplateRender(m) => {
                Self::invalid_param(param, format!("the chat template could not render these messages: {m}"))
            }
            other => Self::internal(other.to_string()),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status.as_u16(), self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// axum's own rejections (unknown route methods aside) become the envelope too.
impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "the request body is too large")
        } else {
            Self::invalid(format!("could not read the request body: {}", r.body_text()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_matches_vllm_exactly() {
        let v = ApiError::model_not_found("x").to_json();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
        );
    }

    #[test]
    fn context_length_names_the_field_to_shorten() {
        let e = |prompt, explicit| {
            ApiError::from_submit(
                SubmitError::ContextLength { prompt, max_tokens: 10, limit: 100 },
                "messages",
                explicit,
            )
        };
        assert_eq!(e(95, true).param.as_deref(), Some("max_tokens"));
        assert_eq!(e(100, true).param.as_deref(), Some("messages"));
        assert_eq!(e(95, false).param.as_deref(), Some("messages"));
        assert_eq!(e(95, true).status, StatusCode::BAD_REQUEST);
        assert!(e(95, true).message.contains("100"), "the limit is named");
    }

    #[test]
    fn queue_full_is_429_with_retry_after() {
        let r = ApiError::from_submit(SubmitError::QueueFull { waiting: 3, retry_after_s: 2 }, "prompt", false)
            .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "2");
    }
}
