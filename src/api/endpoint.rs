//! The opening and the tail both generation endpoints share: the body parsed,
//! `model` resolved (routes, allow-lists, adapters), then the endpoint's own
//! work, then the response marked with what served it (route headers, the
//! access log) whether it succeeded or not.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::access_log::Tally;
use super::error::ApiError;
use super::models::{self, Resolved, RouteKey};
use super::{json, AppState, Ready};
use crate::auth::Caller;

/// What in a request picks its model.
pub struct ModelFields<'a> {
    pub model: Option<&'a str>,
    pub adapter_id: Option<&'a str>,
    pub adapter_source: Option<&'a str>,
    /// The OpenAI `user`: what routes stick to.
    pub user: Option<&'a str>,
}

/// A request that names a model (completions, chat).
pub trait ModelRequest: serde::de::DeserializeOwned {
    fn model_fields(&self) -> ModelFields<'_>;
}

/// Middleware of the generation endpoints: a 429 at once, before the body is
/// read, parsed or tokenised, when the engine's waiting queue is full.
pub async fn shed_when_full(
    axum::extract::State(st): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Ok(ready) = st.ready() {
        if let Err(e) = ready.engine.check_capacity() {
            return ApiError::from_submit(e, "prompt", false).into_response();
        }
    }
    next.run(req).await
}

/// Parses `body` as `R`, resolves its model and runs `respond` with it.
pub async fn handle<R: ModelRequest>(
    st: AppState,
    caller: Option<Extension<Caller>>,
    tally: Option<Extension<Tally>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    respond: impl AsyncFnOnce(&AppState, &Ready, R, Resolved, Option<Caller>, Option<Tally>) -> Result<Response, ApiError>,
) -> Result<Response, ApiError> {
    let caller = caller.map(|c| c.0);
    let body = body?;
    let ready = st.ready()?;
    let req: R = json::parse(&body)?;
    let f = req.model_fields();
    let key = RouteKey { user: f.user, headers: &headers, caller: caller.as_ref() };
    let model = models::resolve(&st, f.model, f.adapter_id, f.adapter_source, key).await?;
    let (route, served) = (model.route.clone(), model.name.clone());
    // A failure after a route chose the target counts against that target.
    let response =
        respond(&st, ready, req, model, caller, tally.map(|t| t.0)).await.unwrap_or_else(IntoResponse::into_response);
    Ok(models::tag_response(&served, route.as_ref(), response))
}
