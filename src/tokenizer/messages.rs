//! Chat messages as OpenAI clients send them, checked and put in the shape chat
//! templates expect. Serving (`api::chat`) and training (`train::data`) both go
//! through [`prepare_messages`], so a conversation renders the same way in both.

use serde_json::{Map, Value};

/// The roles OpenAI accepts (`function` is its deprecated form of `tool`).
pub const ROLES: [&str; 6] = ["system", "developer", "user", "assistant", "tool", "function"];

/// A message that cannot be rendered: `param` names the offending field the way
/// OpenAI's error bodies do (`messages[2].content[0].type`); `message` says why
/// and names the field too, so it reads on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MessageError {
    pub param: String,
    pub message: String,
}

impl MessageError {
    fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { param: param.into(), message: message.into() }
    }
}

/// Checks each message and puts it in the shape chat templates expect: text
/// parts joined into one string (vLLM's "string" content format, which every
/// HF template reads), tool-call arguments parsed from JSON strings to objects
/// (templates serialize them with `tojson`). Other fields pass through as they are.
pub fn prepare_messages(messages: &[Value]) -> Result<Value, MessageError> {
    if messages.is_empty() {
        return Err(MessageError::new("messages", "messages must contain at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Some(obj) = m.as_object() else {
            return Err(MessageError::new(at.clone(), format!("{at} must be an object")));
        };
        let mut obj: Map<String, Value> = obj.clone();
        match obj.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => {}
            Some(Value::String(r)) => {
                return Err(MessageError::new(
                    format!("{at}.role"),
                    format!("{at}.role '{r}' is not one of {}", ROLES.join(", ")),
                ))
            }
            _ => return Err(MessageError::new(format!("{at}.role"), format!("{at}.role must be a string"))),
        }
        if let Some(content) = obj.get("content") {
            let text = content_text(content, &format!("{at}.content"))?;
            if let Some(text) = text {
                obj.insert("content".into(), Value::String(text));
            }
        }
        if let Some(calls) = obj.get_mut("tool_calls") {
            parse_tool_call_arguments(calls, &format!("{at}.tool_calls"))?;
        }
        out.push(Value::Object(obj));
    }
    Ok(Value::Array(out))
}

/// A message's content as one string (`None` for null: an assistant turn with
/// tool calls). `at` names the field in errors.
pub fn content_text(content: &Value, at: &str) -> Result<Option<String>, MessageError> {
    match content {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let p = format!("{at}[{j}]");
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    (Some("text"), _) => {
                        return Err(MessageError::new(format!("{p}.text"), format!("{p}.text must be a string")))
                    }
                    (Some(other), _) => {
                        return Err(MessageError::new(
                            format!("{p}.type"),
                            format!("{p}: content parts of type '{other}' are not supported (text only)"),
                        ))
                    }
                    (None, _) => {
                        return Err(MessageError::new(
                            format!("{p}.type"),
                            format!("{p} must be an object with a string `type`"),
                        ))
                    }
                }
            }
            Ok(Some(texts.join("\n")))
        }
        _ => Err(MessageError::new(at, format!("{at} must be a string or an array of content parts"))),
    }
}

/// Parses every `function.arguments` string in `calls` (a message's `tool_calls`)
/// into the JSON value it holds, in place. `at` names the field in errors.
pub fn parse_tool_call_arguments(calls: &mut Value, at: &str) -> Result<(), MessageError> {
    let Some(list) = calls.as_array_mut() else {
        return Err(MessageError::new(at, format!("{at} must be an array")));
    };
    for (j, call) in list.iter_mut().enumerate() {
        let p = format!("{at}[{j}].function.arguments");
        if let Some(args) = call.get_mut("function").and_then(|f| f.get_mut("arguments")) {
            if let Value::String(s) = args {
                let parsed: Value = serde_json::from_str(s)
                    .map_err(|e| MessageError::new(p.clone(), format!("{p} is not valid JSON: {e}")))?;
                *args = parsed;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_are_checked_and_normalised() {
        let e = prepare_messages(&[]).unwrap_err();
        assert_eq!(e.param, "messages");
        let e = prepare_messages(&[json!("hi")]).unwrap_err();
        assert_eq!((e.param.as_str(), e.message.as_str()), ("messages[0]", "messages[0] must be an object"));
        let e = prepare_messages(&[json!({"content": "x"})]).unwrap_err();
        assert_eq!(e.param, "messages[0].role");
        let e = prepare_messages(&[json!({"role": "wizard", "content": "x"})]).unwrap_err();
        assert_eq!(e.param, "messages[0].role");
        assert!(e.message.contains("'wizard' is not one of"), "{}", e.message);
        assert_eq!(e.to_string(), e.message);
        let e = prepare_messages(&[json!({"role": "user", "content": 5})]).unwrap_err();
        assert_eq!(e.param, "messages[0].content");
        let e = prepare_messages(&[json!({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})])
            .unwrap_err();
        assert_eq!(e.param, "messages[0].content[0].type");
        let e = prepare_messages(&[json!({"role": "user", "content": [{"type": "text", "text": 1}]})]).unwrap_err();
        assert_eq!(e.param, "messages[0].content[0].text");
        let e = prepare_messages(&[json!({"role": "assistant", "content": null, "tool_calls": {}})]).unwrap_err();
        assert_eq!(e.param, "messages[0].tool_calls");
        let e = prepare_messages(&[json!({"role": "assistant", "content": null,
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{bad"}}]})])
        .unwrap_err();
        assert_eq!(e.param, "messages[0].tool_calls[0].function.arguments");

        let m = prepare_messages(&[
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null, "weight": 0,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}),
        ])
        .unwrap();
        assert_eq!(m[0]["content"], "a\nb");
        assert_eq!(m[1]["tool_calls"][0]["function"]["arguments"], json!({"x": 1}));
        assert_eq!(m[1]["content"], Value::Null);
        assert_eq!(m[1]["weight"], 0, "other fields pass through");
    }
}
