//! The files an HF model directory keeps beside tokenizer.json, read the way
//! transformers 5 reads them: tokenizer.json decides what `encode` adds (its
//! post-processor; `add_bos_token` in tokenizer_config.json is ignored when a
//! tokenizer.json exists), tokenizer_config.json names bos/eos and may hold the chat
//! template, a chat_template.jinja file overrides that, and generation_config.json
//! lists the ids that end generation.

use std::path::Path;

use serde_json::Value as Json;

use super::TokenizerError;

#[derive(Debug, Default)]
pub(crate) struct HfMeta {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TokenizerError::Io { path: path.to_owned(), source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::InvalidFile { path: path.to_owned(), message: e.to_string() })
}

/// A special token in tokenizer_config.json: `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `eos_token_id` in generation_config.json / config.json: an int or a list of ints.
fn ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).into_iter().collect(),
        Some(Json::Array(a)) => a.iter().filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok())).collect(),
        _ => Vec::new(),
    }
}

/// tokenizer_config.json's `chat_template`: a string, or (older files) a list of
/// `{name, template}` of which "default" is the one `apply_chat_template` uses.
fn template_from_config(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let named = |name: &str| list.iter().find(|t| t.get("name").and_then(Json::as_str) == Some(name));
            named("default")
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_owned)
        }
        _ => None,
    }
}

impl HfMeta {
    pub(crate) fn read(dir: &Path, tok: &tokenizers::Tokenizer) -> Result<Self, TokenizerError> {
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let generation = read_json(&dir.join("generation_config.json"))?;
        let model_config = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);

        let mut chat_template = template_from_config(config.get("chat_template"));
        let jinja = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja) {
            Ok(t) => chat_template = Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Processor-style repos keep it in chat_template.json instead.
                if chat_template.is_none() {
                    if let Some(j) = read_json(&dir.join("chat_template.json"))? {
                        chat_template = template_from_config(j.get("chat_template"));
                    }
                }
            }
            Err(source) => return Err(TokenizerError::Io { path: jinja, source }),
        }

        let bos_token = token_text(config.get("bos_token"));
        let eos_token = token_text(config.get("eos_token"));
        let bos_id = bos_token
            .as_deref()
            .and_then(|t| tok.token_to_id(t))
            .or_else(|| ids(generation.as_ref().and_then(|g| g.get("bos_token_id"))).first().copied())
            .or_else(|| ids(model_config.get("bos_token_id")).first().copied());

        let mut eos_ids: Vec<u32> = eos_token.as_deref().and_then(|t| tok.token_to_id(t)).into_iter().collect();
        // generation_config is what generate() stops on; config.json is the older place.
        match &generation {
            Some(g) => eos_ids.extend(ids(g.get("eos_token_id"))),
            None => eos_ids.extend(ids(model_config.get("eos_token_id"))),
        }
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));

        Ok(Self { bos_token, eos_token, bos_id, eos_ids, chat_template })
    }
}
