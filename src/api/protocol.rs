//! The request bodies of the generation endpoints, as clients send them (OpenAI's
//! fields plus vLLM's extras). Unknown fields are ignored, as OpenAI and vLLM do.
//! Integers that have a range are read as `i64` so an out-of-range value gets a
//! range message (with `param`) rather than a type error. Validation lives in
//! `params.rs`; these types only describe the wire format.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use utoipa::openapi::schema::{ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopStrings(pub Vec<String>);

impl utoipa::PartialSchema for StopStrings {
    fn schema() -> RefOr<Schema> {
        one_of([string(), array(string())])
    }
}
impl ToSchema for StopStrings {}

fn string() -> RefOr<Schema> {
    Object::with_type(Type::String).into()
}
fn integer() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)).build().into()
}
fn array(items: RefOr<Schema>) -> RefOr<Schema> {
    ArrayBuilder::new().items(items).build().into()
}
fn one_of<const N: usize>(items: [RefOr<Schema>; N]) -> RefOr<Schema> {
    let mut b = OneOfBuilder::new();
    for i in items {
        b = b.item(i);
    }
    RefOr::T(Schema::OneOf(b.build()))
}

/// `prompt`: a string, strings, token ids, or lists of token ids.
fn prompt_schema() -> RefOr<Schema> {
    one_of([string(), array(string()), array(integer()), array(array(integer()))])
}

/// A message's `content`: a string, `{type: "text", text}` parts, or null.
fn content_schema() -> RefOr<Schema> {
    let part = ObjectBuilder::new()
        .property("type", ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["text"])))
        .property("text", Object::with_type(Type::String))
        .required("type")
        .required("text")
        .build();
    let mut b = OneOfBuilder::new().item(string()).item(array(part.into()));
    b = b.item(Object::with_type(Type::Null));
    RefOr::T(Schema::OneOf(b.build()))
}

impl<'de> Deserialize<'de> for StopStrings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StopStrings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<StopStrings, E> {
                Ok(StopStrings(vec![s.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<StopStrings, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(StopStrings(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send one more chunk before `[DONE]` with `usage` and `choices: []`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Declares a request struct with the fields both generation endpoints share,
/// so the two cannot drift apart; `params::Shared` reads them.
macro_rules! generation_request {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize, ToSchema)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// The served model's name (or an adapter's); empty or absent = the base model.
            #[serde(default)]
            pub model: Option<String>,
            /// Choices to generate per prompt.
            #[serde(default)]
            #[schema(minimum = 1, maximum = 128)]
            pub n: Option<i64>,
            /// 0 = greedy. Default 1.
            #[serde(default)]
            #[schema(minimum = 0)]
            pub temperature: Option<f64>,
            #[serde(default)]
            #[schema(exclusive_minimum = 0, maximum = 1)]
            pub top_p: Option<f64>,
            /// vLLM: -1 or 0 = off.
            #[serde(default)]
            pub top_k: Option<i64>,
            /// vLLM: drop tokens below `min_p` x the most likely one's probability.
            #[serde(default)]
            #[schema(minimum = 0, maximum = 1)]
            pub min_p: Option<f64>,
            #[serde(default)]
            #[schema(minimum = -2, maximum = 2)]
            pub presence_penalty: Option<f64>,
            #[serde(default)]
            #[schema(minimum = -2, maximum = 2)]
            pub frequency_penalty: Option<f64>,
            /// vLLM: > 0, 1 = off.
            #[serde(default)]
            #[schema(exclusive_minimum = 0)]
            pub repetition_penalty: Option<f64>,
            /// Token id (as a string) -> bias in [-100, 100] added to its logit.
            #[serde(default)]
            pub logit_bias: Option<BTreeMap<String, f64>>,
            /// Choice i samples with seed + i.
            #[serde(default)]
            pub seed: Option<i64>,
            #[serde(default)]
            pub stop: Option<StopStrings>,
            /// Most tokens to generate; default: the rest of the context (capped).
            #[serde(default)]
            #[schema(minimum = 1)]
            pub max_tokens: Option<i64>,
            #[serde(default)]
            pub stream: Option<bool>,
            #[serde(default)]
            pub stream_options: Option<StreamOptions>,
            #[serde(default)]
            pub user: Option<String>,
            /// vLLM: keep generating past end-of-sequence tokens.
            #[serde(default)]
            pub ignore_eos: Option<bool>,
            /// vLLM: end-of-sequence and stop tokens are ignored before this many tokens.
            #[serde(default)]
            pub min_tokens: Option<i64>,
            /// vLLM: more token ids that end generation.
            #[serde(default)]
            pub stop_token_ids: Option<Vec<u32>>,
            /// vLLM: default true.
            #[serde(default)]
            pub skip_special_tokens: Option<bool>,
            /// vLLM: keep the matched stop string in the output.
            #[serde(default)]
            pub include_stop_str_in_output: Option<bool>,
            /// LoRAX: a LoRA adapter to run with, loaded on first use: a directory
            /// under the server's allowed roots, or a hub repo when allowed.
            #[serde(default)]
            pub adapter_id: Option<String>,
            /// LoRAX: where `adapter_id` lives: "local" or "hub" (default: a path
            /// if absolute, else hub).
            #[serde(default)]
            pub adapter_source: Option<String>,
        }

        impl crate::api::endpoint::ModelRequest for $name {
            fn model_fields(&self) -> crate::api::endpoint::ModelFields<'_> {
                crate::api::endpoint::ModelFields {
                    model: self.model.as_deref(),
                    adapter_id: self.adapter_id.as_deref(),
                    adapter_source: self.adapter_source.as_deref(),
                    user: self.user.as_deref(),
                }
            }
        }

        impl $name {
            /// The fields both endpoints share, for `params::validate`.
            pub fn shared(&self) -> crate::api::params::Shared<'_> {
                crate::api::params::Shared {
                    n: self.n,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    logit_bias: self.logit_bias.as_ref(),
                    seed: self.seed,
                    stop: self.stop.as_ref().map(|s| s.0.as_slice()).unwrap_or(&[]),
                    max_tokens: self.max_tokens,
                    stream: self.stream.unwrap_or(false),
                    include_usage: self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
                    ignore_eos: self.ignore_eos.unwrap_or(false),
                    min_tokens: self.min_tokens,
                    stop_token_ids: self.stop_token_ids.as_deref().unwrap_or(&[]),
                    skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
                    include_stop_str_in_output: self.include_stop_str_in_output.unwrap_or(false),
                }
            }
        }
    };
}

generation_request! {
    /// `POST /v1/chat/completions`.
    pub struct ChatCompletionRequest {
        /// At least one message: `{role, content}` where content is a string or an
        /// array of `{type: "text", text}` parts; assistant messages may carry `tool_calls`.
        #[schema(value_type = Vec<ChatMessage>, min_items = 1)]
        pub messages: Vec<Value>,
        /// Function definitions, passed to the chat template.
        #[serde(default)]
        #[schema(value_type = Option<Vec<Object>>)]
        pub tools: Option<Vec<Value>>,
        /// Return the sampled tokens' log probabilities.
        #[serde(default)]
        pub logprobs: Option<bool>,
        /// Alternatives per position (0..=20); needs `logprobs: true`.
        #[serde(default)]
        #[schema(minimum = 0, maximum = 20)]
        pub top_logprobs: Option<i64>,
        /// OpenAI's newer name for `max_tokens` (wins when both are given).
        #[serde(default)]
        #[schema(minimum = 1)]
        pub max_completion_tokens: Option<i64>,
        /// vLLM: default true.
        #[serde(default)]
        pub add_generation_prompt: Option<bool>,
        /// vLLM: extra variables for the chat template.
        #[serde(default)]
        #[schema(value_type = Option<Object>)]
        pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    }
}

generation_request! {
    /// `POST /v1/completions`.
    pub struct CompletionRequest {
        /// A string, an array of strings, an array of token ids, or an array of
        /// token-id arrays; each prompt gets `n` choices.
        #[schema(schema_with = prompt_schema)]
        pub prompt: Value,
        /// Return the sampled tokens' log probabilities and this many alternatives (0..=20).
        #[serde(default)]
        #[schema(minimum = 0, maximum = 20)]
        pub logprobs: Option<i64>,
        /// Prepend the prompt to the returned text.
        #[serde(default)]
        pub echo: Option<bool>,
        /// Not supported (400 when set).
        #[serde(default)]
        pub suffix: Option<String>,
    }
}

/// One chat message, for the OpenAPI document (the handler validates the JSON
/// itself so it can name the exact message and field that is wrong).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ChatMessage {
    #[schema(pattern = "^(system|developer|user|assistant|tool|function)$")]
    pub role: String,
    /// A string or an array of `{type: "text", text}` parts.
    #[schema(schema_with = content_schema)]
    pub content: Option<Value>,
    pub name: Option<String>,
    /// Assistant tool calls; `function.arguments` is a JSON string.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Vec<Value>>,
    pub tool_call_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::json::parse;

    #[test]
    fn stop_is_a_string_or_a_list() {
        let r: CompletionRequest = parse(br#"{"prompt": "a", "stop": "x"}"#).unwrap();
        assert_eq!(r.stop, Some(StopStrings(vec!["x".into()])));
        let r: CompletionRequest = parse(br#"{"prompt": "a", "stop": ["x", "yz"], "bogus": 1}"#).unwrap();
        assert_eq!(r.stop, Some(StopStrings(vec!["x".into(), "yz".into()])));
        let r: CompletionRequest = parse(br#"{"prompt": "a", "stop": null}"#).unwrap();
        assert_eq!(r.stop, None);
        let e = parse::<CompletionRequest>(br#"{"prompt": "a", "stop": 3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
        assert!(e.message.contains("a string or an array of strings"), "{}", e.message);
        let e = parse::<CompletionRequest>(br#"{"prompt": "a", "stop": ["x", 3]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop[1]"));
    }

    #[test]
    fn shared_fields_parse_on_both_endpoints() {
        let r: ChatCompletionRequest = parse(
            br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1,
                "top_k": -1, "logit_bias": {"5": -100}, "stream_options": {"include_usage": true}}"#,
        )
        .unwrap();
        assert_eq!(r.temperature, Some(1.0));
        assert_eq!(r.top_k, Some(-1));
        assert_eq!(r.logit_bias.unwrap()["5"], -100.0);
        assert_eq!(r.stream_options.unwrap().include_usage, Some(true));
        let e = parse::<ChatCompletionRequest>(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse::<ChatCompletionRequest>(br#"{"messages": [], "logit_bias": {"1": "x"}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logit_bias.1"));
    }
}
