//! Model names: which `model` values this server answers to, resolved in one
//! place so LoRA adapters (and routes) can join as more targets later.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Base,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The `model` to echo in the response: the request's own, or the served name.
    pub name: String,
    pub target: Target,
}

/// The one place that maps a request's `model` to what serves it. Empty or
/// absent means the base model (LoRAX's convention).
pub fn resolve(names: &ModelNames, requested: Option<&str>) -> Result<Resolved, ApiError> {
    match requested {
        None | Some("") => Ok(Resolved { name: names.served.clone(), target: Target::Base }),
        Some(m) if m == names.served || names.aliases.iter().any(|a| a == m) => {
            Ok(Resolved { name: m.to_string(), target: Target::Base })
        }
        Some(m) => Err(ApiError::model_not_found(m)),
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
    }
}

/// The served models (today: the base model).
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList), (status = 503, body = super::error::ErrorResponse)))]
pub async fn list(State(st): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let ready = st.ready()?;
    Ok(Json(ModelList { object: "list", data: vec![base_card(&st, ready)] }))
}

/// One model by any name it answers to (ids may contain `/`, as hub ids do).
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    params(("model" = String, Path, description = "A served model name")),
    responses((status = 200, body = ModelCard), (status = 404, body = super::error::ErrorResponse), (status = 503, body = super::error::ErrorResponse))
)]
pub async fn retrieve(State(st): State<AppState>, Path(model): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    let ready = st.ready()?;
    match resolve(&st.names, Some(&model))?.target {
        Target::Base => Ok(Json(ModelCard { id: model, ..base_card(&st, ready) })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_resolution() {
        let n = ModelNames::from_spec("org/not-a-local-model", "");
        assert_eq!(n.served, "org/not-a-local-model");
        let dir = env!("CARGO_MANIFEST_DIR").to_string() + "/tests/fixtures/tiny/qwen2/hf-f32";
        let n = ModelNames::from_spec(&dir, "");
        assert_eq!(n.served, "hf-f32");
        assert_eq!(n.aliases, vec![dir.clone()]);
        let n = ModelNames::from_spec(&dir, "coder");
        assert_eq!(n.served, "coder");
        assert_eq!(resolve(&n, None).unwrap().name, "coder");
        assert_eq!(resolve(&n, Some("")).unwrap().name, "coder");
        assert_eq!(resolve(&n, Some("hf-f32")).unwrap().name, "hf-f32");
        assert_eq!(resolve(&n, Some(&dir)).unwrap().target, Target::Base);
        let e = resolve(&n, Some("gpt-4")).unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
        assert_eq!(e.message, "The model `gpt-4` does not exist.");
    }
}
