//! Any template source and any messages: `ChatTemplate::new` and `render` return
//! (errors are fine), never panic, and stop (fuel) on runaway templates.
//! Input: template source, a NUL byte, then messages as JSON (when that part is
//! not JSON, a fixed small conversation is used). Seed corpus: the templates in
//! tests/fixtures/tokenizer/chat_golden.json.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use tandem::tokenizer::ChatTemplate;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (source, rest) = text.split_once('\0').unwrap_or((&text, ""));
    let messages = serde_json::from_str::<Value>(rest).unwrap_or_else(|_| {
        json!([
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi", "extra": [1, 2.5, null]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
            ]},
            {"role": "tool", "content": "42"}
        ])
    });
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let Ok(template) = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())) else {
        return;
    };
    for add_generation_prompt in [false, true] {
        let _ = template.render(&messages, None, add_generation_prompt, None);
        let _ = template.render(&messages, Some(&tools), add_generation_prompt, Some(&json!({"x": 1})));
    }
});
