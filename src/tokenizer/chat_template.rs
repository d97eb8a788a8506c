//! Chat templates, rendered the way transformers' `apply_chat_template` renders them.
//!
//! transformers compiles templates in a jinja2 sandbox with `trim_blocks` and
//! `lstrip_blocks` on, `loopcontrols`, its own `tojson`, `raise_exception` and
//! `strftime_now`, and renders with `messages`, `tools`, `documents`,
//! `add_generation_prompt` and the special tokens. This module sets minijinja up
//! the same way; `jinja_py` holds the Python spellings.

use std::sync::Arc;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, Value};
use serde_json::{Map, Value as Json};

use super::jinja_py;
use super::TokenizerError;

const TEMPLATE_NAME: &str = "chat_template";

/// Instructions a render may execute. Generous for real templates (Qwen's tool
/// template on a long chat uses a few tens of thousands) while stopping a
/// user-supplied template from looping for minutes.
const FUEL: u64 = 50_000_000;

/// Fields HF copies into each other so templates find reasoning under any name
/// (transformers 5 `_alias_reasoning_fields`).
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// A compiled chat template plus the special tokens it is rendered with.
/// Cheap to clone; rendering takes `&self` and may run on many threads at once.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: Arc<str>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// The error `raise_exception` raises, kept as the minijinja error's source so the
/// template's own message can be told apart from engine errors after the render.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    /// Compiles `source`. Syntax errors are reported here, not at render time.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| out.write_str(&jinja_py::py_str(value)).map_err(Error::from));
        env.add_filter("tojson", |value: &Value, kwargs: Kwargs| jinja_py::tojson(value, kwargs));
        env.add_filter("trim", jinja_py::trim);
        env.add_filter("string", |value: &Value| jinja_py::py_str(value));
        env.add_filter("round", jinja_py::round);
        env.add_function("raise_exception", |message: Option<Value>| -> Result<Value, Error> {
            let message = message.map(|m| jinja_py::py_str(&m)).unwrap_or_default();
            Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
        });
        env.add_function("strftime_now", |format: String| jinja_py::strftime_now(&format));
        let source: Arc<str> = Arc::from(source);
        env.add_template_owned(TEMPLATE_NAME, jinja_py::rewrite_generation_tags(&source))
            .map_err(|e| TokenizerError::TemplateSyntax(describe(&e)))?;
        Ok(Self { env: Arc::new(env), source, bos_token, eos_token })
    }

    /// The template text as given (before any rewriting).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (a JSON array of message objects, passed through as they
    /// are: `content` may be a string or a list of parts, `tool_calls` etc. are
    /// whatever the template reads). `extra` (a JSON object) adds template variables,
    /// e.g. `enable_thinking`, and may override `bos_token`/`eos_token`, as HF's
    /// `**kwargs` do.
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        extra: Option<&Json>,
    ) -> Result<String, TokenizerError> {
        let messages = prepare_messages(messages)?;
        let mut ctx = Map::new();
        ctx.insert("bos_token".into(), self.bos_token.clone().map_or(Json::Null, Json::String));
        ctx.insert("eos_token".into(), self.eos_token.clone().map_or(Json::Null, Json::String));
        match extra {
            None | Some(Json::Null) => {}
            Some(Json::Object(extra)) => ctx.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone()))),
            Some(_) => {
                return Err(TokenizerError::InvalidInput("chat template extra variables must be a JSON object".into()))
            }
        }
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Json::Null));
        ctx.entry("documents").or_insert(Json::Null);
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));

        let template =
            self.env.get_template(TEMPLATE_NAME).map_err(|e| TokenizerError::TemplateRender(describe(&e)))?;
        template.render(Value::from_serialize(&ctx)).map_err(|e| match raised_message(&e) {
            Some(message) => TokenizerError::TemplateRaised(message),
            None => TokenizerError::TemplateRender(describe(&e)),
        })
    }
}

/// Checks the shape HF insists on (a list of objects) and applies its reasoning
/// aliases: `{"thinking": r, **message, "reasoning_content": r}` in Python's
/// dict-order semantics, which an insertion-ordered map reproduces.
fn prepare_messages(messages: &Json) -> Result<Json, TokenizerError> {
    let list =
        messages.as_array().ok_or_else(|| TokenizerError::InvalidInput("chat messages must be a JSON array".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for message in list {
        let object = message
            .as_object()
            .ok_or_else(|| TokenizerError::InvalidInput(format!("chat messages must be objects, got {message}")))?;
        let reasoning = REASONING_FIELDS.iter().find_map(|k| object.get(*k).filter(|v| !v.is_null())).cloned();
        match reasoning {
            None => out.push(message.clone()),
            Some(reasoning) => {
                let mut aliased = Map::new();
                aliased.insert("thinking".into(), reasoning.clone());
                for (k, v) in object {
                    aliased.insert(k.clone(), v.clone());
                }
                aliased.insert("reasoning_content".into(), reasoning);
                out.push(Json::Object(aliased));
            }
        }
    }
    Ok(Json::Array(out))
}

fn raised_message(err: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<Raised>() {
            return Some(raised.0.clone());
        }
        source = e.source();
    }
    None
}

/// minijinja's `Display` for an error includes the kind, detail and location;
/// that is what an operator needs to fix a template.
fn describe(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
