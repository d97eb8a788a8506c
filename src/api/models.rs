//! Model names: which `model` values this server answers to (the base model
//! and the LoRA adapters in the registry), resolved in one place so routes can
//! join as more targets later.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;
use crate::lora::registry::RegistryError;
use crate::lora::{LoraAdapter, LoraError};
use crate::routing::StickyBy;

/// The names the base model answers to.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelNames {
    /// The name listed in `/v1/models` and echoed for empty `model`.
    pub served: String,
    /// Other accepted spellings (the model spec as given on the command line).
    pub aliases: Vec<String>,
}

impl ModelNames {
    /// `served_model_name` if set; else a local file's stem or a directory's
    /// name; else (a hub id) the spec itself, as vLLM names it.
    pub fn from_spec(spec: &str, served_model_name: &str) -> Self {
        let path = std::path::Path::new(spec);
        let derived = if path.exists() {
            let stem = if path.is_file() { path.file_stem() } else { path.file_name() };
            stem.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| spec.to_string())
        } else {
            spec.to_string()
        };
        let served = if served_model_name.is_empty() { derived.clone() } else { served_model_name.to_string() };
        let aliases = [derived, spec.to_string()].into_iter().filter(|a| *a != served && !a.is_empty()).collect();
        Self { served, aliases }
    }
}

/// What a request's `model` selects.
#[derive(Debug, Clone)]
pub enum Target {
    Base,
    Adapter(Arc<LoraAdapter>),
}

impl Target {
    pub fn adapter(&self) -> Option<Arc<LoraAdapter>> {
        match self {
            Target::Base => None,
            Target::Adapter(a) => Some(a.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Resolved {
    /// The `model` to echo in the response: the request's own, the served
    /// name, or for a routed alias the target chosen.
    pub name: String,
    pub target: Target,
    /// Set when `model` was a route's alias.
    pub route: Option<RouteChoice>,
}

/// What a route decided for one request.
#[derive(Debug, Clone)]
pub struct RouteChoice {
    pub alias: String,
    pub target: String,
    /// A background copy of the request to this shadow, when drawn.
    pub shadow: Option<crate::routing::Shadow>,
}

/// Response headers naming the route and the target a request went to.
pub const ROUTE_ALIAS_HEADER: &str = "x-tandem-route-alias";
pub const ROUTE_TARGET_HEADER: &str = "x-tandem-route-target";
/// Request header forcing a route's target (testing a canary by hand).
pub const ROUTE_OVERRIDE_HEADER: &str = "x-tandem-route-override";

/// `response` marked with what served it (for the access log) and, when
/// routed, the headers naming the route and target.
pub fn tag_response(
    model: &str,
    route: Option<&RouteChoice>,
    mut response: axum::response::Response,
) -> axum::response::Response {
    response.extensions_mut().insert(super::access_log::Served {
        model: model.to_string(),
        route: route.map(|r| (r.alias.clone(), r.target.clone())),
    });
    if let Some(r) = route {
        let h = response.headers_mut();
        for (name, value) in [(ROUTE_ALIAS_HEADER, &r.alias), (ROUTE_TARGET_HEADER, &r.target)] {
            if let Ok(v) = axum::http::HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        }
    }
    response
}

/// What a route may key on besides `model`: the OpenAI `user` field and the
/// request's headers.
#[derive(Clone, Copy)]
pub struct RouteKey<'a> {
    pub user: Option<&'a str>,
    pub headers: &'a axum::http::HeaderMap,
    /// The API key, whose allow-list limits what `model` may name.
    pub caller: Option<&'a crate::auth::Caller>,
}

/// A model the caller's key may not use is answered as one that does not exist.
fn check_allowed(caller: Option<&crate::auth::Caller>, name: &str) -> Result<(), ApiError> {
    match caller {
        Some(c) if !c.0.allows(name) => Err(ApiError::model_not_found(name)),
        _ => Ok(()),
    }
}

/// How a request's `model` names what serves it, before any registry lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Base,
    /// A registered adapter by name (`model` = adapter, or `base:adapter`).
    Adapter(String),
    /// Not the base model and not `base:<something>`.
    Unknown,
}

impl ModelNames {
    /// Splits `model` the way vLLM, SGLang and LoRAX clients spell it: empty or
    /// absent = base; a base name = base; `base:adapter` (split at a known base
    /// name, since LoRAX ids may hold `:`) = that adapter; anything else may be
    /// an adapter's own name.
    pub fn classify(&self, requested: Option<&str>) -> ModelRef {
        let m = match requested {
            None | Some("") => return ModelRef::Base,
            Some(m) => m,
        };
        let bases = std::iter::once(&self.served).chain(&self.aliases);
        if bases.clone().any(|b| b == m) {
            return ModelRef::Base;
        }
        for b in bases {
            if let Some(rest) = m.strip_prefix(b.as_str()).and_then(|r| r.strip_prefix(':')) {
                if !rest.is_empty() {
                    return ModelRef::Adapter(rest.to_string());
                }
            }
        }
        ModelRef::Unknown
    }

    /// The adapter name `model` may mean, or `None` for the base model: the
    /// part after `base:`, or the whole name when it is not the base's.
    pub fn adapter_name(&self, requested: &str) -> Option<String> {
        match self.classify(Some(requested)) {
            ModelRef::Base => None,
            ModelRef::Adapter(name) => Some(name),
            ModelRef::Unknown => Some(requested.to_string()),
        }
    }

    /// Every name the base model answers to.
    pub fn all(&self) -> Vec<String> {
        std::iter::once(self.served.clone()).chain(self.aliases.iter().cloned()).collect()
    }
}

/// The one place that maps a request's `model` (and LoRAX's `adapter_id` /
/// `adapter_source`) to what serves it. Order: `adapter_id` loaded on demand,
/// a route's alias (its chosen target), exact name (base, then loaded
/// adapters), `base:adapter`.
pub async fn resolve(
    st: &AppState,
    requested: Option<&str>,
    adapter_id: Option<&str>,
    adapter_source: Option<&str>,
    key: RouteKey<'_>,
) -> Result<Resolved, ApiError> {
    let requested = requested.filter(|m| !m.is_empty());
    check_allowed(key.caller, requested.unwrap_or(&st.names.served))?;
    if let Some(id) = adapter_id.filter(|s| !s.is_empty()) {
        check_allowed(key.caller, id)?;
        let Some(reg) = st.ready.get().map(|r| r.loras.clone()) else {
            return Err(ApiError::unavailable("the model is still loading"));
        };
        let (id2, src) = (id.to_string(), adapter_source.map(str::to_string));
        let a = tokio::task::spawn_blocking(move || reg.on_demand(&id2, src.as_deref()))
            .await
            .map_err(|e| ApiError::internal(format!("adapter load failed: {e}")))?
            .map_err(|e| adapter_error(e, "adapter_id"))?;
        return Ok(Resolved { name: requested.unwrap_or(id).to_string(), target: Target::Adapter(a), route: None });
    }
    let Some(m) = requested else {
        return Ok(Resolved { name: st.names.served.clone(), target: Target::Base, route: None });
    };
    let table = st.routes.snapshot();
    let Some(route) = table.get(m) else { return resolve_name(st, m).await };
    let forced = key.headers.get(ROUTE_OVERRIDE_HEADER).map(|v| v.to_str().unwrap_or(""));
    let target = match forced {
        Some(f) => match route.targets.iter().find(|t| t.model == f) {
            Some(t) => t,
            None => {
                return Err(ApiError::invalid(format!("{ROUTE_OVERRIDE_HEADER}: `{f}` is not a target of route `{m}`")))
            }
        },
        None => {
            let sticky = match &route.sticky_by {
                StickyBy::User => key.user,
                StickyBy::Header(h) => key.headers.get(h.as_str()).and_then(|v| v.to_str().ok()),
            };
            route.choose(sticky, rand::random::<f64>())
        }
    };
    let mut resolved = resolve_name(st, &target.model).await.map_err(|e| {
        if e.status.as_u16() == 404 {
            ApiError::not_found(format!(
                "route `{m}` sent this request to `{}`, which this server no longer serves",
                target.model
            ))
            .with_param("model")
        } else {
            e
        }
    })?;
    st.routes.count(m, &target.model);
    resolved.name = target.model.clone();
    resolved.route = Some(RouteChoice {
        alias: m.to_string(),
        target: target.model.clone(),
        shadow: route.shadowed(rand::random::<f64>()).cloned(),
    });
    Ok(resolved)
}

/// A model name (not an alias) to what serves it.
pub(crate) async fn resolve_name(st: &AppState, m: &str) -> Result<Resolved, ApiError> {
    let registry = st.ready.get().map(|r| r.loras.clone());
    let Some(name) = st.names.adapter_name(m) else {
        return Ok(Resolved { name: m.to_string(), target: Target::Base, route: None });
    };
    let Some(reg) = registry.filter(|r| r.contains(&name)) else { return Err(ApiError::model_not_found(m)) };
    // A host-cache miss re-reads the adapter from disk: off the async threads.
    let found = tokio::task::spawn_blocking(move || reg.get(&name))
        .await
        .map_err(|e| ApiError::internal(format!("adapter lookup failed: {e}")))?
        .map_err(|e| adapter_error(e, "model"))?;
    match found {
        Some(a) => Ok(Resolved { name: m.to_string(), target: Target::Adapter(a), route: None }),
        None => Err(ApiError::model_not_found(m)),
    }
}

/// A registry failure as the API reports it.
pub fn adapter_error(e: RegistryError, param: &str) -> ApiError {
    match e {
        RegistryError::Unknown(_) | RegistryError::Lora(LoraError::NotFound { .. }) => {
            ApiError::not_found(e.to_string()).with_param(param)
        }
        _ => ApiError::invalid_param(param, e.to_string()),
    }
}

#[derive(Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
    /// How the base model's weights are stored: a checkpoint's quantisation
    /// ("gptq 4-bit, group 128, sym", "--quantize nf4"), the GGUF kinds
    /// ("gguf Q4_K+Q6_K"), or "none". A tandem extension.
    pub quantization: String,
    /// For a trained adapter (`GET /v1/models/{id}` only): its
    /// `training_metadata.json` (base and hashes, data files and hashes,
    /// hyperparameters, job, final metrics).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub lineage: Option<serde_json::Value>,
    /// For a route's alias: its targets, weights, sticky key and shadow.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub route: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

fn base_card(st: &AppState, ready: &super::Ready) -> ModelCard {
    ModelCard {
        id: st.names.served.clone(),
        object: "model",
        created: st.created,
        owned_by: "tandem",
        root: ready.source.clone(),
        parent: None,
        max_model_len: ready.engine.info().max_model_len,
        quantization: ready.weights.quantization.clone(),
        lineage: None,
        route: None,
    }
}

/// An adapter's card: its parent is the base, or for a training checkpoint
/// (`ft:...:ckpt-step-N`) the fine-tuned model it is a step of.
fn adapter_card(st: &AppState, ready: &super::Ready, name: String, root: String) -> ModelCard {
    let parent = match name.rsplit_once(":ckpt-step-") {
        Some((model, _)) if name.starts_with("ft:") => model.to_string(),
        _ => st.names.served.clone(),
    };
    ModelCard { id: name, root, parent: Some(parent), ..base_card(st, ready) }
}

/// A route's alias: `root` names it a route, `route` holds its targets.
fn alias_card(st: &AppState, ready: &super::Ready, route: &crate::routing::Route) -> ModelCard {
    ModelCard {
        id: route.alias.clone(),
        root: format!("route:{}", route.alias),
        route: Some(serde_json::to_value(route.spec()).expect("a spec serialises")),
        ..base_card(st, ready)
    }
}

/// The base model, then every registered adapter (with `parent` = the base),
/// then every route's alias.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList), (status = 503, body = super::error::ErrorResponse)))]
pub async fn list(
    State(st): State<AppState>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
) -> Result<Json<ModelList>, ApiError> {
    let ready = st.ready()?;
    let mut data = vec![base_card(&st, ready)];
    for (name, root) in ready.loras.list() {
        data.push(adapter_card(&st, ready, name, root));
    }
    for route in st.routes.snapshot().iter() {
        data.push(alias_card(&st, ready, route));
    }
    if let Some(axum::Extension(c)) = caller {
        data.retain(|card| c.0.allows(&card.id));
    }
    Ok(Json(ModelList { object: "list", data }))
}

/// One model by any name it answers to (ids may contain `/`, as hub ids do).
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    params(("model" = String, Path, description = "A served model name")),
    responses((status = 200, body = ModelCard), (status = 404, body = super::error::ErrorResponse), (status = 503, body = super::error::ErrorResponse))
)]
pub async fn retrieve(
    State(st): State<AppState>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let ready = st.ready()?;
    check_allowed(caller.as_ref().map(|c| &c.0), &model)?;
    if let Some(route) = st.routes.snapshot().get(&model) {
        return Ok(Json(alias_card(&st, ready, route)));
    }
    let Some(adapter) = st.names.adapter_name(&model) else {
        return Ok(Json(ModelCard { id: model, ..base_card(&st, ready) }));
    };
    match ready.loras.list().into_iter().find(|(n, _)| *n == adapter) {
        Some((_, root)) => {
            let meta = std::path::Path::new(&root).join(crate::train::output::METADATA);
            let lineage = tokio::task::spawn_blocking(move || {
                std::fs::read(meta).ok().and_then(|b| serde_json::from_slice(&b).ok())
            })
            .await
            .ok()
            .flatten();
            Ok(Json(ModelCard { lineage, ..adapter_card(&st, ready, model, root) }))
        }
        None => Err(ApiError::model_not_found(&model)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_classification() {
        let n = ModelNames::from_spec("org/not-a-local-model", "");
        assert_eq!(n.served, "org/not-a-local-model");
        let dir = env!("CARGO_MANIFEST_DIR").to_string() + "/tests/fixtures/tiny/qwen2/hf-f32";
        let n = ModelNames::from_spec(&dir, "");
        assert_eq!(n.served, "hf-f32");
        assert_eq!(n.aliases, vec![dir.clone()]);
        let n = ModelNames::from_spec(&dir, "coder");
        assert_eq!(n.served, "coder");
        assert_eq!(n.classify(None), ModelRef::Base);
        assert_eq!(n.classify(Some("")), ModelRef::Base);
        assert_eq!(n.classify(Some("hf-f32")), ModelRef::Base);
        assert_eq!(n.classify(Some(&dir)), ModelRef::Base);
        assert_eq!(n.classify(Some("gpt-4")), ModelRef::Unknown);
        // SGLang's base:adapter, split at the base name (the adapter may hold ':').
        assert_eq!(n.classify(Some("coder:sql")), ModelRef::Adapter("sql".into()));
        assert_eq!(n.classify(Some("hf-f32:org/a:b")), ModelRef::Adapter("org/a:b".into()));
        assert_eq!(n.classify(Some("coder:")), ModelRef::Unknown);
        assert_eq!(n.classify(Some("coderx:sql")), ModelRef::Unknown);
        let e = ApiError::model_not_found("gpt-4");
        assert_eq!(e.status.as_u16(), 404);
        assert_eq!(e.message, "The model `gpt-4` does not exist.");
    }
}
