//! `GET /openapi.json`: generated from the handlers' own annotations and the
//! request types they parse, so the document cannot drift from what is accepted.

use axum::Json;
use utoipa::OpenApi;

use super::{adapters, chat, completions, error, files, fine_tuning, health, models, protocol, responses, routes, sse};

#[derive(OpenApi)]
#[openapi(
    info(title = "tandem", description = "OpenAI-compatible LLM server"),
    paths(
        chat::create,
        completions::create,
        models::list,
        models::retrieve,
        adapters::load,
        adapters::unload,
        files::upload,
        files::list,
        files::retrieve,
        files::content,
        files::delete,
        fine_tuning::create,
        fine_tuning::list,
        fine_tuning::retrieve,
        fine_tuning::cancel,
        fine_tuning::pause,
        fine_tuning::resume,
        fine_tuning::events,
        fine_tuning::checkpoints,
        health::health,
        health::version,
        health::metrics,
        routes::list,
        routes::retrieve,
        routes::put,
        routes::delete
    ),
    components(schemas(
        protocol::ChatCompletionRequest,
        protocol::CompletionRequest,
        protocol::ChatMessage,
        protocol::StreamOptions,
        protocol::StopStrings,
        responses::ChatCompletionResponse,
        responses::CompletionResponse,
        responses::Usage,
        models::ModelList,
        models::ModelCard,
        adapters::LoadLoraAdapterRequest,
        adapters::UnloadLoraAdapterRequest,
        error::ErrorResponse,
        sse::SseEvent,
        files::FileObject,
        files::FileList,
        files::FileDeleted,
        files::FileUpload,
        fine_tuning::JobList,
        fine_tuning::JobEvent,
        fine_tuning::JobEventList,
        fine_tuning::JobCheckpoint,
        fine_tuning::JobCheckpointList,
        crate::train::jobs::Job,
        crate::train::jobs::JobError,
        crate::train::jobs::JobProgress,
        crate::train::jobs::JobRequest,
        crate::train::jobs::spec::Method,
        crate::train::jobs::spec::Supervised,
        crate::train::jobs::spec::Hyperparameters,
        crate::train::jobs::spec::Extras,
        routes::RouteView,
        routes::RouteList,
        routes::RouteDeleted,
        crate::routing::RouteSpec,
        crate::routing::RouteTarget,
        crate::routing::Shadow,
    ))
)]
pub struct ApiDoc;

pub async fn spec() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_lists_the_endpoints_and_request_fields() {
        let v = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for p in
            ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/admin/routes/{alias}"]
        {
            assert!(v["paths"][p].is_object(), "{p}");
        }
        let chat = &v["components"]["schemas"]["ChatCompletionRequest"]["properties"];
        for f in ["messages", "max_completion_tokens", "top_logprobs", "stop", "top_k", "logit_bias"] {
            assert!(chat[f].is_object(), "{f}: {chat}");
        }
        let req = &v["components"]["schemas"]["ChatCompletionRequest"]["required"];
        assert_eq!(req, &serde_json::json!(["messages"]));
        let put = &v["paths"]["/admin/routes/{alias}"]["put"];
        assert_eq!(
            put["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/RouteSpec"
        );
        let shadow = &v["components"]["schemas"]["Shadow"]["properties"];
        assert!(shadow["compare_tokens"].is_object(), "{shadow}");
    }
}
