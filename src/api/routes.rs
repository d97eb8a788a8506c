//! `/admin/routes`: the route table over HTTP. `PUT` validates a route
//! against what this server serves (every target and the shadow must be the
//! base model or a registered adapter, and the alias must not already name
//! one), persists it in the data store when there is one, and swaps the live
//! table; `DELETE` removes it the same way.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::files::store_error;
use super::models::{self, Resolved};
use super::params::GenParams;
use super::{generate, json, AppState};
use crate::routing::{Route, RouteSpec, TableError};

/// A route: its alias and its spec's fields (spelled out, not flattened:
/// the spec refuses unknown fields, which a flattened schema would inherit).
#[derive(Serialize, utoipa::ToSchema)]
pub struct RouteView {
    pub alias: String,
    pub targets: Vec<crate::routing::RouteTarget>,
    pub sticky_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::routing::Shadow>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RouteList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<RouteView>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RouteDeleted {
    /// Always `route`.
    pub object: &'static str,
    pub alias: String,
    pub deleted: bool,
}

fn view(r: &Route) -> RouteView {
    let RouteSpec { targets, sticky_by, shadow } = r.spec();
    RouteView { alias: r.alias.clone(), targets, sticky_by, shadow }
}

/// Every route.
#[utoipa::path(get, path = "/admin/routes", tag = "admin",
    responses((status = 200, body = RouteList), (status = 401, body = super::error::ErrorResponse),
        (status = 403, body = super::error::ErrorResponse)))]
pub async fn list(State(st): State<AppState>) -> Json<RouteList> {
    let table = st.routes.snapshot();
    Json(RouteList { object: "list", data: table.iter().map(|r| view(r)).collect() })
}

#[utoipa::path(get, path = "/admin/routes/{alias}", tag = "admin",
    params(("alias" = String, Path, description = "The name clients put in `model`")),
    responses((status = 200, body = RouteView), (status = 401, body = super::error::ErrorResponse),
        (status = 403, body = super::error::ErrorResponse), (status = 404, body = super::error::ErrorResponse)))]
pub async fn retrieve(State(st): State<AppState>, Path(alias): Path<String>) -> Result<Json<RouteView>, ApiError> {
    let table = st.routes.snapshot();
    table.get(&alias).map(|r| Json(view(r))).ok_or_else(|| no_route(&alias))
}

fn no_route(alias: &str) -> ApiError {
    ApiError::not_found(format!("no route has the alias `{alias}`")).with_param("alias")
}

/// Creates or replaces a route: 200 with the route as stored.
#[utoipa::path(put, path = "/admin/routes/{alias}", tag = "admin",
    params(("alias" = String, Path, description = "The name clients put in `model`")),
    request_body = RouteSpec,
    responses((status = 200, description = "The route as stored", body = RouteView),
        (status = 400, description = "Invalid spec, unknown target or shadow, alias loop", body = super::error::ErrorResponse),
        (status = 401, body = super::error::ErrorResponse), (status = 403, body = super::error::ErrorResponse),
        (status = 404, body = super::error::ErrorResponse),
        (status = 413, body = super::error::ErrorResponse), (status = 503, body = super::error::ErrorResponse),
        (status = 507, description = "The data directory is full or read-only", body = super::error::ErrorResponse)))]
pub async fn put(
    State(st): State<AppState>,
    Path(alias): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RouteView>, ApiError> {
    let body = body?;
    let spec: RouteSpec = json::parse(&body)?;
    let route = Route::new(&alias, spec).map_err(|e| ApiError::invalid(format!("route `{alias}`: {e}")))?;
    check_models(&st, &route)?;
    let store = st.route_store()?;
    let stored = view(&route);
    let st2 = st.clone();
    tokio::task::spawn_blocking(move || {
        st2.routes.put(route, |r| match &store {
            Some(s) => s.put_route(&r.alias, &serde_json::to_value(r.spec()).expect("a spec serialises")),
            None => Ok(()),
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("route update failed: {e}")))?
    .map_err(|e| match e {
        TableError::Conflict(m) => ApiError::invalid(format!("route `{alias}`: {m}")),
        TableError::Persist(e) => store_error(e),
    })?;
    Ok(Json(stored))
}

#[utoipa::path(delete, path = "/admin/routes/{alias}", tag = "admin",
    params(("alias" = String, Path, description = "The name clients put in `model`")),
    responses((status = 200, body = RouteDeleted), (status = 401, body = super::error::ErrorResponse),
        (status = 403, body = super::error::ErrorResponse), (status = 404, body = super::error::ErrorResponse),
        (status = 503, body = super::error::ErrorResponse),
        (status = 507, description = "The data directory is full or read-only", body = super::error::ErrorResponse)))]
pub async fn delete(State(st): State<AppState>, Path(alias): Path<String>) -> Result<Json<RouteDeleted>, ApiError> {
    let store = st.route_store()?;
    let (st2, alias2) = (st.clone(), alias.clone());
    let existed = tokio::task::spawn_blocking(move || {
        st2.routes.delete(&alias2, || match &store {
            Some(s) => s.delete_route(&alias2).map(|_| ()),
            None => Ok(()),
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("route delete failed: {e}")))?
    .map_err(store_error)?;
    if !existed {
        return Err(no_route(&alias));
    }
    Ok(Json(RouteDeleted { object: "route", alias, deleted: true }))
}

/// Targets and shadow must be models this server serves; the alias must not
/// be one (it would hide it).
fn check_models(st: &AppState, route: &Route) -> Result<(), ApiError> {
    let ready = st.ready()?;
    let serves = |m: &str| match st.names.adapter_name(m) {
        None => true,
        Some(name) => ready.loras.contains(&name),
    };
    if serves(&route.alias) {
        return Err(ApiError::invalid(format!(
            "route `{}`: the alias is already a model this server serves; choose another name",
            route.alias
        )));
    }
    let names = route.targets.iter().map(|t| &t.model).chain(route.shadow.as_ref().map(|s| &s.model));
    let table = st.routes.snapshot();
    for m in names {
        if table.get(m).is_some() {
            return Err(ApiError::invalid(format!(
                "route `{}`: `{m}` is an alias; a route targets models, not other aliases",
                route.alias
            )));
        }
        if !serves(m) {
            return Err(ApiError::invalid(format!(
                "route `{}`: target `{m}` is neither the base model nor a loaded adapter",
                route.alias
            )));
        }
    }
    Ok(())
}

/// Sends a copy of a routed request to the route's shadow target in the
/// background, its output discarded, unless the engine already has requests
/// waiting: shadow traffic is dropped first under load and never delays the
/// primary (whose `choices` were submitted before this). For a greedy or
/// seeded request, the shadow's first tokens are compared with those of the
/// primary's first choice once both have them.
pub async fn start_shadow(
    st: &AppState,
    params: &GenParams,
    prompts: &[Vec<u32>],
    model: &Resolved,
    primary: &mut [generate::Choice],
) {
    let Some(choice) = &model.route else { return };
    let Some(shadow) = &choice.shadow else { return };
    let name = &shadow.model;
    let Ok(ready) = st.ready() else { return };
    if ready.engine.metrics().requests_waiting.get() > 0.0 {
        st.routes.count_shadow(&choice.alias, name, true);
        return;
    }
    let Ok(target) = models::resolve_name(st, name).await else {
        st.routes.count_shadow(&choice.alias, name, true);
        return;
    };
    let mut p = params.clone();
    p.adapter = target.target.adapter();
    // The server's own traffic: not charged to the caller's key.
    p.meter = None;
    p.tally = None;
    p.stream = false;
    p.logprobs = None;
    p.prompt_logprobs = None;
    let choices = match generate::start_choices(ready, &p, prompts, "prompt") {
        Ok(c) => c,
        Err(_) => return st.routes.count_shadow(&choice.alias, name, true),
    };
    st.routes.count_shadow(&choice.alias, name, false);
    let deterministic = params.sampling.temperature == 0.0 || params.sampling.seed.is_some();
    let compare = shadow.compare_tokens as usize;
    let primary_first =
        (deterministic && compare > 0).then(|| primary.first_mut().map(|c| c.tap_first_tokens(compare))).flatten();
    let timeout = st.request_timeout();
    let (st, alias, name) = (st.clone(), choice.alias.clone(), name.clone());
    let start = std::time::Instant::now();
    tokio::spawn(async move {
        // Its latency and length, beside the primary's per-target figures.
        let done = generate::collect_within(choices, timeout).await;
        let tokens = done.as_ref().map_or(0, |d| d.iter().map(|c| c.outcome.completion_tokens as u64).sum());
        st.routes.observe_shadow(&alias, &name, start.elapsed().as_secs_f64(), tokens, done.is_err());
        // The primary's first tokens arrive once it has them; an aborted
        // primary (its client went away) sends none, and nothing is compared.
        if let (Ok(done), Some(rx)) = (done, primary_first) {
            if let (Some(first), Ok(primary_ids)) = (done.first(), rx.await) {
                let shadow_ids: Vec<u32> = first.tokens.iter().map(|t| t.id).collect();
                st.routes.compare_shadow(&alias, &name, &primary_ids, &shadow_ids, compare);
            }
        }
    });
}
