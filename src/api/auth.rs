//! The API-key layer in front of every route: 401 without a known key, 403
//! for an inference key on an admin route (or forcing a route's target), 429
//! with `Retry-After` past a key's limits, and the key's `Caller` handed to
//! the handlers (allow-lists, token charging). Liveness, version, metrics and
//! the OpenAPI document stay open, as load balancers and Prometheus need.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::error::ApiError;
use super::models::ROUTE_OVERRIDE_HEADER;
use super::AppState;
use crate::auth::Caller;

const OPEN: &[&str] = &["/health", "/version", "/metrics", "/openapi.json"];

/// Routes that change what the server serves or holds.
fn needs_admin(path: &str) -> bool {
    path.starts_with("/admin/")
        || path == "/admin"
        || path.starts_with("/v1/files")
        || path.starts_with("/v1/fine_tuning")
        || path == "/v1/load_lora_adapter"
        || path == "/v1/unload_lora_adapter"
}

/// Routes that run the model (what the per-key limits count).
fn generates(path: &str) -> bool {
    path == "/v1/completions" || path == "/v1/chat/completions"
}

/// `Authorization: Bearer KEY` (OpenAI's clients), or `x-api-key: KEY`.
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return Some(v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or("").trim());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

pub async fn layer(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if st.keys().is_open() || OPEN.contains(&path.as_str()) {
        return next.run(req).await;
    }
    let caller = match st.keys().check(presented(req.headers())) {
        Ok(c) => c,
        Err(e) => return ApiError::unauthorized(e.to_string()).into_response(),
    };
    if needs_admin(&path) && !caller.is_admin() {
        return ApiError::forbidden(format!(
            "API key '{}' has the inference scope; {path} needs an admin key",
            caller.name
        ))
        .into_response();
    }
    if req.headers().contains_key(ROUTE_OVERRIDE_HEADER) && !caller.is_admin() {
        return ApiError::forbidden(format!("{ROUTE_OVERRIDE_HEADER} needs an admin key")).into_response();
    }
    let permit = if generates(&path) {
        match caller.admit() {
            Ok(p) => Some(p),
            Err(wait) => {
                return ApiError::rate_limited(
                    format!("API key '{}' is over its limit of concurrent requests or tokens per minute", caller.name),
                    wait,
                )
                .into_response()
            }
        }
    } else {
        None
    };
    let name = caller.name.clone();
    req.extensions_mut().insert(Caller(caller));
    let mut response = next.run(req).await;
    response.extensions_mut().insert(super::access_log::KeyName(name));
    match permit {
        // The slot is held until the body (a stream, maybe) is done or dropped.
        Some(permit) => {
            let (parts, body) = response.into_parts();
            let stream = body.into_data_stream().map(move |chunk| {
                let _held = &permit;
                chunk
            });
            Response::from_parts(parts, Body::from_stream(stream))
        }
        None => response,
    }
}
