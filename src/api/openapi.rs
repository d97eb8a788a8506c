//! `GET /openapi.json`: generated from the handlers' own annotations and the
//! request types they parse, so the document cannot drift from what is accepted.

use axum::Json;
use utoipa::OpenApi;

use super::{adapters, chat, completions, error, health, models, protocol, responses, sse};

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
        health::health,
        health::version,
        health::metrics
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
        for p in ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"] {
            assert!(v["paths"][p].is_object(), "{p}");
        }
        let chat = &v["components"]["schemas"]["ChatCompletionRequest"]["properties"];
        for f in ["messages", "max_completion_tokens", "top_logprobs", "stop", "top_k", "logit_bias"] {
            assert!(chat[f].is_object(), "{f}: {chat}");
        }
        let req = &v["components"]["schemas"]["ChatCompletionRequest"]["required"];
        assert_eq!(req, &serde_json::json!(["messages"]));
    }
}
