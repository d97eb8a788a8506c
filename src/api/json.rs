//! Request bodies: UTF-8 check, then JSON with the path of whatever field failed,
//! so a client sees `messages[1].content: invalid type ...` and `param` names it.

use serde::de::DeserializeOwned;

use super::error::ApiError;

pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid(format!("the request body is not valid UTF-8 (invalid byte at offset {})", e.valid_up_to()))
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid("the request body is empty; expected a JSON object"));
    }
    // serde would also read a struct from a JSON array, positionally; OpenAI
    // bodies are objects.
    if !text.trim_start().starts_with('{') {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        describe(&path, &inner)
    })?;
    de.end().map_err(|e| ApiError::invalid(format!("malformed JSON: {e}")))?;
    Ok(value)
}

fn describe(path: &str, e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::invalid(format!("malformed JSON: {e}")),
        Category::Data => {
            let msg = e.to_string();
            // serde reports a missing field at the parent's path; name the field itself.
            if let Some(field) = msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
                let param = if path == "." { field.to_string() } else { format!("{path}.{field}") };
                return ApiError::invalid_param(param.clone(), format!("{param}: field required"));
            }
            if path == "." {
                ApiError::invalid(format!("the request body must be a JSON object: {msg}"))
            } else {
                ApiError::invalid_param(path, format!("{path}: {msg}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct R {
        model: String,
        #[serde(default)]
        max_tokens: Option<i64>,
        #[serde(default)]
        items: Vec<Item>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Item {
        x: u32,
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse::<R>(br#"{"model": "m", "max_tokens": "ten"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.starts_with("max_tokens: invalid type"), "{}", e.message);
        let e = parse::<R>(br#"{"model": "m", "items": [{"x": 1}, {"x": -1}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("items[1].x"));
    }

    #[test]
    fn missing_field_is_named() {
        let e = parse::<R>(br#"{"max_tokens": 3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = parse::<R>(br#"{"model": "m", "items": [{}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("items[0].x"));
    }

    #[test]
    fn malformed_and_non_utf8_bodies() {
        for body in [&b"{\"model\": "[..], b"", b"   ", b"{\"model\": \"m\"} {}", b"\xff\xfe{}"] {
            let e = parse::<R>(body).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(e.param, None, "{}", e.message);
        }
        assert!(parse::<R>(b"\xff").unwrap_err().message.contains("UTF-8"));
        assert!(parse::<R>(b"[1]").unwrap_err().message.contains("JSON object"));
        assert!(parse::<R>(br#"["m"]"#).unwrap_err().message.contains("JSON object"));
        // Unknown fields are ignored.
        assert!(parse::<R>(br#"{"model": "m", "frobnicate": {"a": 1}}"#).is_ok());
    }
}
