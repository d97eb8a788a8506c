//! Response bodies in OpenAI's exact shapes (plus vLLM's `stop_reason`), and the
//! two logprobs formats: chat's list of token entries and the legacy
//! completions' parallel arrays.

use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::text::token_bytes;

/// `stop_reason`: the matched stop string, the stop token id, or null.
fn stop_reason_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{Object, OneOfBuilder, Schema, Type};
    let b = OneOfBuilder::new()
        .item(Object::with_type(Type::String))
        .item(Object::with_type(Type::Integer))
        .item(Object::with_type(Type::Null));
    utoipa::openapi::RefOr::T(Schema::OneOf(b.build()))
}
use crate::engine::{TokenLogprob, TokenOut};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Default, Serialize, ToSchema, PartialEq)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// How one choice ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// "stop" or "length".
    pub finish_reason: &'static str,
    /// vLLM's `stop_reason`: the stop string or stop token id that matched
    /// (null for end-of-sequence and length).
    pub stop_reason: Value,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// Adds up usage over choices: each prompt counts once however many choices it
/// has (as OpenAI and vLLM count), generated tokens count per choice.
#[derive(Debug, Default)]
pub struct UsageTally {
    /// Per prompt: (prompt tokens, cached tokens) as the best-informed choice saw them.
    prompts: Vec<(usize, usize)>,
    completion: usize,
}

impl UsageTally {
    pub fn add(&mut self, prompt_index: usize, o: &Outcome) {
        if self.prompts.len() <= prompt_index {
            self.prompts.resize(prompt_index + 1, (0, 0));
        }
        let p = &mut self.prompts[prompt_index];
        *p = (p.0.max(o.prompt_tokens), p.1.max(o.cached_tokens));
        self.completion += o.completion_tokens;
    }

    pub fn usage(&self) -> Usage {
        let prompt: usize = self.prompts.iter().map(|p| p.0).sum();
        Usage {
            prompt_tokens: prompt,
            completion_tokens: self.completion,
            total_tokens: prompt + self.completion,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: self.prompts.iter().map(|p| p.1).sum() },
        }
    }
}

/// JSON has no -inf; vLLM reports such logprobs as -9999.
fn finite(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        -9999.0
    }
}

fn token_entry(tok: &Tokenizer, id: u32, logprob: f32) -> Map<String, Value> {
    let bytes = token_bytes(tok, id);
    let mut m = Map::new();
    m.insert("token".into(), Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    m.insert("logprob".into(), json!(finite(logprob)));
    m.insert("bytes".into(), json!(bytes));
    m
}

/// Chat: `{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}`.
pub fn chat_logprob_entry(tok: &Tokenizer, t: &TokenOut) -> Value {
    let mut m = token_entry(tok, t.id, t.logprob.unwrap_or(f32::NEG_INFINITY));
    let top: Vec<Value> = t.top_logprobs.iter().map(|&(id, lp)| Value::Object(token_entry(tok, id, lp))).collect();
    m.insert("top_logprobs".into(), Value::Array(top));
    Value::Object(m)
}

/// Chat's `logprobs` object for a run of tokens.
pub fn chat_logprobs(tok: &Tokenizer, tokens: &[TokenOut]) -> Value {
    json!({"content": tokens.iter().map(|t| chat_logprob_entry(tok, t)).collect::<Vec<_>>()})
}

/// Completions' legacy logprobs: parallel arrays, `text_offset` counted in
/// characters of the choice's text from `start_offset` on.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` for the first prompt token under `echo` (nothing precedes it).
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub fn push(&mut self, tok: &Tokenizer, t: &TokenOut, offset: usize) -> usize {
        self.push_entry(tok, t.id, Some((t.logprob.unwrap_or(f32::NEG_INFINITY), &t.top_logprobs)), offset)
    }

    /// The prompt's tokens (for `echo`): the first has no logprob; token i's
    /// is `logprobs[i - 1]`.
    pub fn push_prompt(&mut self, tok: &Tokenizer, prompt: &[u32], logprobs: &[TokenLogprob], offset: usize) -> usize {
        let mut offset = offset;
        for (i, &id) in prompt.iter().enumerate() {
            let lp = i.checked_sub(1).and_then(|j| logprobs.get(j)).map(|l| (l.logprob, &l.top_logprobs));
            offset = self.push_entry(tok, id, lp, offset);
        }
        offset
    }

    fn push_entry(&mut self, tok: &Tokenizer, id: u32, lp: Option<(f32, &Vec<(u32, f32)>)>, offset: usize) -> usize {
        let text = String::from_utf8_lossy(&token_bytes(tok, id)).into_owned();
        let entry = lp.map(|(lp, alternatives)| {
            let lp = finite(lp);
            // The alternatives, plus the chosen token (OpenAI: up to logprobs + 1 entries).
            let mut top = Map::new();
            for &(alt, l) in alternatives {
                let s = String::from_utf8_lossy(&token_bytes(tok, alt)).into_owned();
                top.entry(s).or_insert(json!(finite(l)));
            }
            top.entry(text.clone()).or_insert(json!(lp));
            (lp, top)
        });
        let next = offset + text.chars().count();
        self.tokens.push(text);
        self.token_logprobs.push(entry.as_ref().map(|e| e.0));
        self.top_logprobs.push(entry.map(|e| e.1));
        self.text_offset.push(offset);
        next
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    pub finish_reason: &'static str,
    #[schema(schema_with = stop_reason_schema)]
    pub stop_reason: Value,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: &'static str,
    #[schema(schema_with = stop_reason_schema)]
    pub stop_reason: Value,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

/// A random response id with OpenAI's prefix (`chatcmpl-`, `cmpl-`).
pub fn response_id(prefix: &str) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    format!("{prefix}-{:016x}{:016x}", rng.gen::<u64>(), rng.gen::<u64>())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/qwen2/hf-f32/tokenizer.json");
        Tokenizer::from_file(&p).unwrap()
    }

    #[test]
    fn usage_counts_each_prompt_once() {
        let o = |p, c, k| Outcome {
            finish_reason: "length",
            stop_reason: Value::Null,
            prompt_tokens: p,
            cached_tokens: c,
            completion_tokens: k,
        };
        let mut t = UsageTally::default();
        t.add(0, &o(10, 0, 5));
        t.add(0, &o(10, 8, 7));
        t.add(1, &o(4, 0, 1));
        let u = t.usage();
        assert_eq!((u.prompt_tokens, u.completion_tokens, u.total_tokens), (14, 13, 27));
        assert_eq!(u.prompt_tokens_details.cached_tokens, 8);
        assert_eq!(
            serde_json::to_value(&u).unwrap(),
            json!({"prompt_tokens": 14, "completion_tokens": 13, "total_tokens": 27, "prompt_tokens_details": {"cached_tokens": 8}})
        );
    }

    #[test]
    fn chat_logprobs_shape() {
        let tok = tok();
        let a = tok.encode("a", false).unwrap()[0];
        let b = tok.encode("b", false).unwrap()[0];
        let t = TokenOut { id: a, logprob: Some(-0.5), top_logprobs: vec![(a, -0.5), (b, f32::NEG_INFINITY)] };
        let v = chat_logprobs(&tok, &[t]);
        assert_eq!(
            v,
            json!({"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
                {"token": "a", "logprob": -0.5, "bytes": [97]},
                {"token": "b", "logprob": -9999.0, "bytes": [98]}]}]})
        );
    }

    #[test]
    fn completion_logprobs_shape_and_offsets() {
        let tok = tok();
        let ids = tok.encode("ab", false).unwrap();
        let mut lp = CompletionLogprobs::default();
        let mut off = 3;
        for &id in &ids {
            off = lp.push(&tok, &TokenOut { id, logprob: Some(-1.0), top_logprobs: vec![] }, off);
        }
        let v = serde_json::to_value(&lp).unwrap();
        assert_eq!(v["tokens"].as_array().unwrap().len(), ids.len());
        assert_eq!(v["text_offset"][0], 3);
        assert_eq!(off, 5);
        assert_eq!(v["top_logprobs"][0], json!({"a": -1.0}), "the sampled token is always listed");
        assert_eq!(v["token_logprobs"][0], -1.0);
    }
}
