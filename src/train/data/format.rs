//! One line of a training file -> its format -> a conversation to render.
//! Errors are messages for the person who wrote the file; the caller adds the
//! line number.

use serde_json::{json, Map, Value};

use super::DataFormat;
use crate::tokenizer::messages::prepare_messages;

/// Messages ready for the chat template, and which of them are trained.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Conversation {
    /// Normalised by `tokenizer::messages::prepare_messages`, `weight` removed.
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    /// Indices of the assistant messages trained on, ascending.
    pub trained: Vec<usize>,
}

const CHAT_KEYS: [&str; 1] = ["messages"];
const PROMPT_COMPLETION_KEYS: [&str; 2] = ["prompt", "completion"];
const ALPACA_KEYS: [&str; 2] = ["instruction", "output"];

/// Parses a line and tells its format by its keys.
pub(super) fn detect(text: &str) -> Result<(DataFormat, Map<String, Value>), String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err(format!("expected a JSON object, got {}", kind(&value)));
    };
    let has = |keys: &[&str]| keys.iter().any(|k| object.contains_key(*k));
    let found: Vec<DataFormat> = [
        (DataFormat::Chat, has(&CHAT_KEYS)),
        (DataFormat::PromptCompletion, has(&PROMPT_COMPLETION_KEYS)),
        (DataFormat::Alpaca, has(&ALPACA_KEYS)),
    ]
    .into_iter()
    .filter_map(|(f, present)| present.then_some(f))
    .collect();
    match found.as_slice() {
        [one] => Ok((*one, object)),
        [] => {
            let mut keys: Vec<String> = object.keys().take(6).map(|k| format!("{k:?}")).collect();
            if object.len() > 6 {
                keys.push("...".into());
            }
            let keys = if keys.is_empty() { "none".to_owned() } else { keys.join(", ") };
            Err(format!(
                "unknown format (keys: {keys}); expected \"messages\" (chat), \"prompt\" and \"completion\", \
                 or \"instruction\" and \"output\" (alpaca)"
            ))
        }
        several => {
            let names: Vec<String> = several.iter().map(ToString::to_string).collect();
            Err(format!("the keys of several formats on one line ({}); use one", names.join(" and ")))
        }
    }
}

/// The line's conversation, checked.
pub(super) fn conversation(format: DataFormat, object: &Map<String, Value>) -> Result<Conversation, String> {
    match format {
        DataFormat::Chat => chat(object),
        DataFormat::PromptCompletion => {
            let prompt = text_field(object, "prompt")?;
            let completion = text_field(object, "completion")?;
            Ok(user_then_assistant(prompt.to_owned(), completion))
        }
        DataFormat::Alpaca => {
            let instruction = text_field(object, "instruction")?;
            let output = text_field(object, "output")?;
            let user = match object.get("input") {
                None | Some(Value::Null) => instruction.to_owned(),
                Some(Value::String(input)) if input.is_empty() => instruction.to_owned(),
                Some(Value::String(input)) => format!("{instruction}\n\n{input}"),
                Some(other) => return Err(format!("\"input\" must be a string, got {}", kind(other))),
            };
            Ok(user_then_assistant(user, output))
        }
    }
}

fn user_then_assistant(user: String, assistant: &str) -> Conversation {
    Conversation {
        messages: vec![json!({"role": "user", "content": user}), json!({"role": "assistant", "content": assistant})],
        tools: None,
        trained: vec![1],
    }
}

/// A required, non-empty string field.
fn text_field<'a>(object: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match object.get(key) {
        None => Err(format!("\"{key}\" is missing")),
        Some(Value::String(s)) if s.is_empty() => Err(format!("\"{key}\" is empty")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("\"{key}\" must be a string, got {}", kind(other))),
    }
}

fn chat(object: &Map<String, Value>) -> Result<Conversation, String> {
    let messages = match object.get("messages") {
        Some(Value::Array(list)) if list.is_empty() => {
            return Err("\"messages\" is empty; a conversation needs at least one assistant message".into())
        }
        Some(Value::Array(list)) => list,
        Some(other) => return Err(format!("\"messages\" must be an array of messages, got {}", kind(other))),
        None => return Err("\"messages\" is missing".into()),
    };
    let tools = match object.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) => {
            if let Some((j, bad)) = tools.iter().enumerate().find(|(_, t)| !t.is_object()) {
                return Err(format!("tools[{j}] must be an object, got {}", kind(bad)));
            }
            Some(Value::Array(tools.clone()))
        }
        Some(other) => return Err(format!("\"tools\" must be an array, got {}", kind(other))),
    };
    match object.get("parallel_tool_calls") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(other) => return Err(format!("\"parallel_tool_calls\" must be true or false, got {}", kind(other))),
    }
    if object.contains_key("functions") {
        return Err("\"functions\" (deprecated by OpenAI) is not supported; describe them in \"tools\"".into());
    }

    let normalised = prepare_messages(messages).map_err(|e| e.message)?;
    let Value::Array(mut messages) = normalised else {
        return Err("\"messages\" must be an array of messages".into());
    };
    let mut assistants = 0;
    let mut trained = Vec::new();
    for (i, message) in messages.iter_mut().enumerate() {
        let Some(m) = message.as_object_mut() else {
            return Err(format!("messages[{i}] must be an object"));
        };
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default().to_owned();
        let weight = m.remove("weight");
        if role != "assistant" {
            if weight.is_some() {
                return Err(format!("messages[{i}].weight is only allowed on assistant messages (this is {role})"));
            }
            if m.get("content").is_none_or(Value::is_null) {
                return Err(format!("messages[{i}].content is missing; a {role} message needs content"));
            }
            continue;
        }
        assistants += 1;
        let trains = match &weight {
            None => true,
            Some(w) => match w.as_u64() {
                Some(0) => false,
                Some(1) => true,
                _ => return Err(format!("messages[{i}].weight must be 0 or 1, got {w}")),
            },
        };
        let has_text = matches!(m.get("content"), Some(Value::String(s)) if !s.is_empty());
        let has_calls = matches!(m.get("tool_calls"), Some(Value::Array(c)) if !c.is_empty());
        if !has_text && !has_calls {
            let what = match m.get("content") {
                None => "has no content",
                Some(Value::Null) => "has null content",
                Some(_) => "has empty content",
            };
            return Err(format!(
                "messages[{i}] (assistant) {what} and no tool_calls; an assistant message needs one or the other"
            ));
        }
        if trains {
            trained.push(i);
        }
    }
    if assistants == 0 {
        return Err("no assistant message; only assistant messages are trained on".into());
    }
    if trained.is_empty() {
        return Err("every assistant message has weight 0; nothing to train on".into());
    }
    Ok(Conversation { messages, tools, trained })
}

/// "a number", "an array", ... for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
