//! Loading and unloading LoRA adapters at run time, with vLLM's endpoints,
//! bodies and answers (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`).
//! File reads and parsing run on a blocking thread: the engine loop and other
//! requests never wait for them.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::models::adapter_error;
use super::{json, AppState};

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoadLoraAdapterRequest {
    #[serde(default)]
    pub lora_name: Option<String>,
    /// A PEFT adapter directory under one of the server's allowed roots.
    #[serde(default)]
    pub lora_path: Option<String>,
    /// Replace an adapter already loaded under `lora_name`: requests running
    /// on the old version finish on it; later ones get the new one.
    #[serde(default)]
    pub load_inplace: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UnloadLoraAdapterRequest {
    #[serde(default)]
    pub lora_name: Option<String>,
    /// Accepted for vLLM compatibility; unused.
    #[serde(default)]
    pub lora_int_id: Option<i64>,
}

fn text(s: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], s).into_response()
}

#[utoipa::path(
    post,
    path = "/v1/load_lora_adapter",
    request_body = LoadLoraAdapterRequest,
    responses(
        (status = 200, description = "Loaded", content_type = "text/plain", body = String),
        (status = 400, body = super::error::ErrorResponse),
        (status = 404, description = "No adapter at lora_path", body = super::error::ErrorResponse),
        (status = 503, body = super::error::ErrorResponse),
    )
)]
pub async fn load(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let ready = st.ready()?;
    let req: LoadLoraAdapterRequest = json::parse(&body)?;
    let (Some(name), Some(path)) = (req.lora_name.filter(|s| !s.is_empty()), req.lora_path.filter(|s| !s.is_empty()))
    else {
        return Err(ApiError::invalid("Both 'lora_name' and 'lora_path' must be provided."));
    };
    let inplace = req.load_inplace.unwrap_or(false);
    let reg = ready.loras.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || reg.load(&n, std::path::Path::new(&path), inplace, false))
        .await
        .map_err(|e| ApiError::internal(format!("loading the adapter failed: {e}")))?
        .map_err(|e| adapter_error(e, "lora_path"))?;
    Ok(text(format!("Success: LoRA adapter '{name}' added successfully.")))
}

#[utoipa::path(
    post,
    path = "/v1/unload_lora_adapter",
    request_body = UnloadLoraAdapterRequest,
    responses(
        (status = 200, description = "Unloaded", content_type = "text/plain", body = String),
        (status = 400, body = super::error::ErrorResponse),
        (status = 404, description = "Unknown adapter", body = super::error::ErrorResponse),
        (status = 503, body = super::error::ErrorResponse),
    )
)]
pub async fn unload(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let ready = st.ready()?;
    let req: UnloadLoraAdapterRequest = json::parse(&body)?;
    let Some(name) = req.lora_name.filter(|s| !s.is_empty()) else {
        return Err(ApiError::invalid_param("lora_name", "'lora_name' must be provided."));
    };
    ready.loras.unload(&name).map_err(|e| adapter_error(e, "lora_name"))?;
    Ok(text(format!("Success: LoRA adapter '{name}' removed successfully.")))
}
