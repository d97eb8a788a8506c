//! The OpenAI-compatible HTTP layer (axum on tokio).
//!
//! `router` builds every route over an `AppState`; `serve` binds nothing itself
//! (the caller passes a listener, so tests can use port 0), answers at once,
//! loads the engine in a blocking task (`/health` is 503 until then) and shuts
//! down gracefully on SIGTERM/SIGINT: stop accepting, let in-flight requests and
//! streams finish, then stop the engine.
//!
//! Text work (templates, tokenizing, detokenizing, stop strings) happens here,
//! on the request's task; the engine sees token ids only. Adapter selection
//! happens in `models::resolve`, routes' aliases included (`routes.rs` holds
//! the admin API over `crate::routing`); `auth.rs` is the API-key layer in
//! front of every route (scopes, limits), and the key's allow-list applies in
//! `models::resolve` and the model list.

pub mod access_log;
pub mod adapters;
pub mod auth;
pub mod chat;
pub mod completions;
pub mod endpoint;
pub mod error;
pub mod files;
pub mod fine_tuning;
pub mod generate;
pub mod health;
pub mod json;
pub mod models;
pub mod openapi;
pub mod params;
pub mod protocol;
pub mod responses;
pub mod routes;
pub mod sse;
pub mod text;
pub mod upload_check;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::config::ServerSection;
use crate::engine::EngineHandle;
use crate::tokenizer::Tokenizer;
pub use error::ApiError;
pub use models::ModelNames;

/// What exists once the model is loaded.
pub struct Ready {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// Where the model came from (`root` in `/v1/models`).
    pub source: String,
    /// How its weights are stored (`quantization` in `/v1/models`, `tandem_model_info`).
    pub weights: crate::model::WeightsInfo,
    /// The LoRA adapters `model` can name.
    pub loras: Arc<crate::lora::LoraRegistry>,
    /// Fine-tuning jobs (`None` without a data directory).
    pub jobs: Option<Arc<crate::train::jobs::JobManager>>,
}

/// The data directory as the server found it at start.
enum DataDir {
    Open {
        store: Arc<crate::store::Store>,
        max_upload_bytes: usize,
    },
    /// It could not be opened (read-only, full, unreadable): what needs it
    /// answers this error; everything else serves.
    Unusable(ApiError),
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub names: ModelNames,
    pub server: ServerSection,
    pub created: u64,
    ready: OnceLock<Ready>,
    /// Uploaded files, job records and stored routes (unset: no data
    /// directory, so the files and fine-tuning APIs are off).
    store: OnceLock<DataDir>,
    /// Aliases clients may name in `model`, split between targets.
    pub routes: crate::routing::Routes,
    /// Responses by route, method and status (the access-log layer counts).
    pub responses: access_log::ResponseCounts,
    /// API keys (unset: an open server).
    keys: OnceLock<crate::auth::Keys>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(names: ModelNames, server: ServerSection) -> Self {
        Self(Arc::new(Inner {
            names,
            server,
            created: responses::unix_now(),
            ready: OnceLock::new(),
            store: OnceLock::new(),
            routes: crate::routing::Routes::default(),
            responses: Default::default(),
            keys: OnceLock::new(),
        }))
    }

    /// Turns on the files API over `store`, with uploads up to `max_upload_bytes`.
    pub fn with_store(self, store: Arc<crate::store::Store>, max_upload_bytes: usize) -> Self {
        let _ = self.store.set(DataDir::Open { store, max_upload_bytes });
        self
    }

    /// A data directory that failed to open at start: the files, fine-tuning
    /// and route-changing APIs answer why (507 when it is full or read-only,
    /// else 503) until it is fixed and the server restarted.
    pub fn with_unusable_store(self, dir: &std::path::Path, e: &crate::store::StoreError) -> Self {
        let detail = format!("opening {} at start: {e}; restart the server once it is fixed", dir.display());
        let err = match e.fault() {
            Some(fault) => ApiError::storage(fault, detail),
            None => ApiError::data_dir_unusable(detail),
        };
        let _ = self.store.set(DataDir::Unusable(err));
        self
    }

    /// The data store; 404 when the server has none, the start-up error when
    /// it could not be opened.
    pub fn store(&self) -> Result<&Arc<crate::store::Store>, ApiError> {
        match self.store.get() {
            Some(DataDir::Open { store, .. }) => Ok(store),
            Some(DataDir::Unusable(e)) => Err(e.clone()),
            None => Err(ApiError::not_found("the files API is off on this server: start it with --data-dir")),
        }
    }

    /// Why a configured data directory is unusable (`None` when it is open or
    /// there is none).
    pub fn data_dir_error(&self) -> Option<ApiError> {
        match self.store.get() {
            Some(DataDir::Unusable(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// Where route changes are persisted: `None` without a data directory
    /// (they live in memory), an error if it is configured but unusable (a
    /// change that would silently not survive a restart is refused).
    pub fn route_store(&self) -> Result<Option<Arc<crate::store::Store>>, ApiError> {
        match self.data_dir_error() {
            Some(e) => Err(e),
            None => Ok(self.store().ok().cloned()),
        }
    }

    /// Requires API keys from now on (before serving).
    pub fn with_keys(self, keys: crate::auth::Keys) -> Self {
        let _ = self.keys.set(keys);
        self
    }

    pub fn keys(&self) -> &crate::auth::Keys {
        static OPEN: OnceLock<crate::auth::Keys> = OnceLock::new();
        self.keys.get().unwrap_or_else(|| OPEN.get_or_init(crate::auth::Keys::default))
    }

    pub fn max_upload_bytes(&self) -> usize {
        match self.store.get() {
            Some(DataDir::Open { max_upload_bytes, .. }) => *max_upload_bytes,
            _ => 0,
        }
    }

    /// Marks the engine up; false if it already was.
    pub fn set_ready(&self, ready: Ready) -> bool {
        self.ready.set(ready).is_ok()
    }

    /// The engine, or 503 while the model loads.
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly"))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get().is_some()
    }

    /// `server.request_timeout_s` (0 = no limit).
    pub fn request_timeout(&self) -> Option<Duration> {
        (self.server.request_timeout_s > 0).then(|| Duration::from_secs(self.server.request_timeout_s))
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.server.max_body_bytes;
    // Uploads have their own limit (they are streamed to disk, not buffered).
    let uploads = Router::new()
        .route("/v1/files", post(files::upload).get(files::list))
        .layer(DefaultBodyLimit::max(state.max_upload_bytes().max(1)))
        .with_state(state.clone());
    let shed = axum::middleware::from_fn_with_state(state.clone(), endpoint::shed_when_full);
    Router::new()
        .route("/v1/files/{file_id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{file_id}/content", get(files::content))
        .route("/v1/fine_tuning/jobs", post(fine_tuning::create).get(fine_tuning::list))
        .route("/v1/fine_tuning/jobs/{fine_tuning_job_id}", get(fine_tuning::retrieve))
        .route("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", post(fine_tuning::cancel))
        .route("/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause", post(fine_tuning::pause))
        .route("/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume", post(fine_tuning::resume))
        .route("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", get(fine_tuning::events))
        .route("/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", get(fine_tuning::checkpoints))
        .route("/health", get(health::health))
        .route("/version", get(health::version))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::spec))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*model}", get(models::retrieve))
        .route("/v1/completions", post(completions::create).layer(shed.clone()))
        .route("/v1/chat/completions", post(chat::create).layer(shed))
        .route("/admin/routes", get(routes::list))
        .route("/admin/routes/{alias}", get(routes::retrieve).put(routes::put).delete(routes::delete))
        .route("/v1/load_lora_adapter", post(adapters::load))
        .route("/v1/unload_lora_adapter", post(adapters::unload))
        .fallback(health::not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state.clone())
        .merge(uploads)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::layer))
        .layer(axum::middleware::from_fn_with_state(state, access_log::layer))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves `state` on `listener` until SIGTERM/SIGINT (or until `load` fails).
/// `load` runs on a blocking thread; its `Ready` switches the server on.
pub async fn serve<L>(listener: tokio::net::TcpListener, state: AppState, load: L) -> Result<(), ServeError>
where
    L: FnOnce() -> Result<Ready, String> + Send + 'static,
{
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::channel::<String>(1);
    let loading_state = state.clone();
    tokio::spawn(async move {
        let result = tokio::task::spawn_blocking(load).await.unwrap_or_else(|e| Err(format!("loader panicked: {e}")));
        match result {
            Ok(ready) => {
                loading_state.set_ready(ready);
                tracing::info!("model '{}' is ready", loading_state.names.served);
            }
            Err(e) => {
                let _ = fail_tx.send(e).await;
            }
        }
    });
    let load_error: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
    let load_error2 = load_error.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("shutting down (draining in-flight requests)"),
            Some(e) = fail_rx.recv() => { let _ = load_error2.set(e); }
        }
    };
    axum::serve(listener, router(state.clone())).with_graceful_shutdown(shutdown).await?;
    if let Ok(ready) = state.ready() {
        if !ready.engine.shutdown_and_wait(std::time::Duration::from_secs(30)).await {
            tracing::warn!("the engine did not stop within 30 s");
        }
    }
    match load_error.get().cloned() {
        Some(e) => Err(ServeError::Load(e)),
        None => Ok(()),
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
