//! Training data: JSONL -> tokens + targets (src/train/data). The tiny fixture
//! tokenizer (ChatML template, `<|im_end|>` eos) runs everywhere; the Qwen2.5
//! tests read the default model's tokenizer and template and skip (with a reason
//! on stderr) when it has not been fetched.

mod common;

use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{json, Value};
use tandem::loader::gguf::GgufFile;
use tandem::tokenizer::{ChatTemplate, GgufVocab, Tokenizer};
use tandem::train::data::{
    load_jsonl, parse_jsonl, DataError, DataFormat, DataIssue, DataOptions, Dataset, Example, Overflow,
};

fn tiny() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_file(&common::fixture("tiny/qwen2/hf-f32/tokenizer.json")).unwrap())
}

/// The tiny tokenizer with another chat template.
fn tiny_with(template: &str) -> Tokenizer {
    let mut tok = tiny().clone();
    tok.set_chat_template(ChatTemplate::new(template, None, None).unwrap());
    tok
}

/// The default model's tokenizer (Qwen2.5-Coder-0.5B-Instruct), built once; None
/// (with the reason printed by each test that skips) when it was not fetched.
fn qwen() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let tok = TOK
        .get_or_init(|| {
            let path = common::repo().join(common::DEFAULT_MODEL);
            path.exists().then(|| {
                let file = GgufFile::open(&path).unwrap();
                Tokenizer::from_gguf_vocab(&GgufVocab::from_gguf(&file).unwrap()).unwrap()
            })
        })
        .as_ref();
    if tok.is_none() {
        eprintln!("skipping: {} is missing (run scripts/get-default-model.sh; CI does)", common::DEFAULT_MODEL);
    }
    tok
}

fn opts() -> DataOptions {
    DataOptions::new(4096)
}

fn parse(tok: &Tokenizer, text: &str) -> Dataset {
    parse_jsonl(text.as_bytes(), tok, &opts()).unwrap_or_else(|e| panic!("{e}\n--- input:\n{text}"))
}

fn issues_with(tok: &Tokenizer, bytes: &[u8], opts: &DataOptions) -> (Vec<DataIssue>, usize) {
    match parse_jsonl(bytes, tok, opts) {
        Err(DataError::Invalid { issues, more }) => (issues, more),
        other => panic!("expected DataError::Invalid, got {other:?}\n--- input:\n{}", String::from_utf8_lossy(bytes)),
    }
}

/// The single problem `text` has: (line, message).
fn issue(tok: &Tokenizer, text: &str) -> (usize, String) {
    let (issues, more) = issues_with(tok, text.as_bytes(), &opts());
    assert_eq!((issues.len(), more), (1, 0), "{issues:?}");
    (issues[0].line, issues[0].message.clone())
}

/// The trained text: each run of consecutive targets, decoded.
fn runs(tok: &Tokenizer, ex: &Example) -> Vec<String> {
    assert_eq!(ex.tokens.len(), ex.targets.len());
    assert!(!ex.targets[0]);
    let mut out = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    for (&id, &trained) in ex.tokens.iter().zip(&ex.targets) {
        if trained {
            current.push(id);
        } else if !current.is_empty() {
            out.push(tok.decode(&std::mem::take(&mut current), false).unwrap());
        }
    }
    if !current.is_empty() {
        out.push(tok.decode(&current, false).unwrap());
    }
    out
}

/// What inference would feed the model for these messages (no generation prompt).
fn rendered_ids(tok: &Tokenizer, messages: &Value, tools: Option<&Value>) -> Vec<u32> {
    let text = tok.chat_template().unwrap().render(messages, tools, false, None).unwrap();
    tok.encode(&text, false).unwrap()
}

fn line(v: Value) -> String {
    serde_json::to_string(&v).unwrap()
}

#[test]
fn chat_targets_are_each_assistant_reply_and_its_end_of_turn() {
    let tok = tiny();
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there!"},
    ]);
    let ds = parse(tok, &line(json!({"messages": messages})));
    assert_eq!(ds.format, DataFormat::Chat);
    let ex = &ds.examples[0];
    assert_eq!(ex.line, 1);
    assert_eq!(ex.tokens, rendered_ids(tok, &messages, None), "the same ids inference gives");
    assert_eq!(runs(tok, ex), ["Hello there!<|im_end|>"]);
    // The role header is prompt; the newline after <|im_end|> too.
    let first = ex.targets.iter().position(|t| *t).unwrap();
    assert_eq!(
        tok.decode(&ex.tokens[..first], false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(tok.decode(&ex.tokens[ex.tokens.len() - 1..], false).unwrap(), "\n");
    assert!(!ex.targets[ex.tokens.len() - 1]);
    // HF labels: ids where trained, -100 elsewhere.
    let labels = ex.labels();
    assert_eq!(labels[0], -100);
    assert_eq!(labels[first], i64::from(ex.tokens[first]));
    assert_eq!(labels.iter().filter(|l| **l != -100).count(), ex.trained_tokens());
    assert_eq!(ds.stats.examples, 1);
    assert_eq!(ds.stats.tokens, ex.len());
    assert_eq!(ds.stats.trained_tokens, ex.trained_tokens());
}

#[test]
fn weights_choose_the_trained_turns() {
    let tok = tiny();
    let messages = json!([
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "A", "weight": 0},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": "C", "weight": 1},
    ]);
    let ds = parse(tok, &line(json!({"messages": messages})));
    assert_eq!(runs(tok, &ds.examples[0]), ["B<|im_end|>", "C<|im_end|>"]);
    // `weight` is stripped and content parts joined before rendering: the same
    // ids as the plain conversation.
    let plain = json!([
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "three\nparts"},
        {"role": "assistant", "content": "C"},
    ]);
    assert_eq!(ds.examples[0].tokens, rendered_ids(tok, &plain, None));
}

#[test]
fn prompt_completion_and_alpaca_are_a_user_then_an_assistant_turn() {
    let tok = tiny();
    let chat = |user: &str, assistant: &str| {
        parse(
            tok,
            &line(
                json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}),
            ),
        )
        .examples
        .remove(0)
    };
    let ds = parse(tok, &line(json!({"prompt": "Add 2 and 2.", "completion": "4"})));
    assert_eq!(ds.format, DataFormat::PromptCompletion);
    assert_eq!(ds.examples[0].tokens, chat("Add 2 and 2.", "4").tokens);
    assert_eq!(ds.examples[0].targets, chat("Add 2 and 2.", "4").targets);
    assert_eq!(runs(tok, &ds.examples[0]), ["4<|im_end|>"]);

    let file = [
        line(json!({"instruction": "Sum these", "input": "2 2", "output": "4"})),
        line(json!({"instruction": "Say hi", "input": "", "output": "hi"})),
        line(json!({"instruction": "Say yo", "output": "yo"})),
        line(json!({"instruction": "Say ok", "input": null, "output": "ok"})),
    ]
    .join("\n");
    let ds = parse(tok, &file);
    assert_eq!(ds.format, DataFormat::Alpaca);
    assert_eq!(ds.examples[0].tokens, chat("Sum these\n\n2 2", "4").tokens);
    assert_eq!(ds.examples[1].tokens, chat("Say hi", "hi").tokens);
    assert_eq!(ds.examples[2].tokens, chat("Say yo", "yo").tokens);
    assert_eq!(ds.examples[3].tokens, chat("Say ok", "ok").tokens);
    assert_eq!(runs(tok, &ds.examples[0]), ["4<|im_end|>"]);
}

#[test]
fn blank_lines_line_endings_and_byte_order_mark() {
    let tok = tiny();
    let a = line(json!({"prompt": "a", "completion": "b"}));
    let text = format!("\u{feff}{a}\r\n\r\n   \n\t\n{a}\n\n{a}");
    let ds = parse(tok, &text);
    assert_eq!(ds.examples.iter().map(|e| e.line).collect::<Vec<_>>(), [1, 5, 7]);
    assert_eq!(ds.stats.blank_lines, 4);
    assert_eq!(ds.stats.examples, 3);
    assert!(ds.examples.iter().all(|e| e.tokens == ds.examples[0].tokens));
    assert_eq!(ds.lengths(), vec![ds.examples[0].len(); 3]);
    // A final newline ends the last line; it starts no blank one.
    assert_eq!(parse(tok, &format!("{a}\n")).stats.blank_lines, 0);
}

#[test]
fn empty_files_are_an_error() {
    let tok = tiny();
    for text in ["", "\n", "  \n\r\n\t", "\u{feff}"] {
        assert!(matches!(parse_jsonl(text.as_bytes(), tok, &opts()), Err(DataError::Empty)), "{text:?}");
    }
    assert!(DataError::Empty.to_string().contains("no examples"));
}

/// Every kind of bad line: (file, line reported, words the message must hold).
#[test]
fn each_problem_is_reported_with_its_line() {
    let tok = tiny();
    let ok = line(json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}));
    let chat = |messages: Value| format!("{ok}\n{}", line(json!({"messages": messages})));
    let user = json!({"role": "user", "content": "q"});
    let cases: Vec<(&str, String, usize, &[&str])> = vec![
        ("invalid JSON", format!("{ok}\n{{\"messages\": [}}"), 2, &["invalid JSON"]),
        ("truncated JSON", format!("{ok}\n{ok}\n{{\"prompt\": \"a\""), 3, &["invalid JSON", "EOF"]),
        ("not an object", format!("{ok}\n[1, 2]"), 2, &["expected a JSON object", "an array"]),
        ("a bare string", format!("\"hello\"\n{ok}"), 1, &["expected a JSON object", "a string"]),
        (
            "unknown format",
            format!("{ok}\n{{\"text\": \"hi\", \"label\": 1}}"),
            2,
            &["unknown format", "\"text\"", "\"messages\""],
        ),
        ("empty object", format!("{ok}\n{{}}"), 2, &["unknown format", "keys: none"]),
        (
            "keys of two formats",
            line(json!({"messages": [], "prompt": "p", "completion": "c"})),
            1,
            &["several formats", "chat and prompt/completion"],
        ),
        (
            "mixed formats",
            format!("{ok}\n{}", line(json!({"prompt": "p", "completion": "c"}))),
            2,
            &["in the prompt/completion format", "(line 1) is chat", "one format"],
        ),
        (
            "messages not an array",
            line(json!({"messages": {"role": "user"}})),
            1,
            &["\"messages\" must be an array", "an object"],
        ),
        ("messages empty", chat(json!([])), 2, &["\"messages\" is empty"]),
        ("message not an object", chat(json!([user, "hi"])), 2, &["messages[1] must be an object"]),
        ("missing role", chat(json!([{"content": "x"}])), 2, &["messages[0].role must be a string"]),
        (
            "unknown role",
            chat(json!([{"role": "wizard", "content": "x"}])),
            2,
            &["messages[0].role 'wizard' is not one of"],
        ),
        (
            "content a number",
            chat(json!([user, {"role": "assistant", "content": 5}])),
            2,
            &["messages[1].content must be a string or an array of content parts"],
        ),
        (
            "image content part",
            chat(json!([{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "a"}])),
            2,
            &["messages[0].content[0]", "'image_url' are not supported"],
        ),
        (
            "user content missing",
            chat(json!([{"role": "user"}, {"role": "assistant", "content": "a"}])),
            2,
            &["messages[0].content is missing", "user message"],
        ),
        (
            "bad tool-call arguments",
            chat(
                json!([user, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]),
            ),
            2,
            &["messages[1].tool_calls[0].function.arguments is not valid JSON"],
        ),
        ("no assistant", chat(json!([user])), 2, &["no assistant message"]),
        (
            "all weight 0",
            chat(json!([user, {"role": "assistant", "content": "a", "weight": 0}])),
            2,
            &["every assistant message has weight 0"],
        ),
        (
            "weight 2",
            chat(json!([user, {"role": "assistant", "content": "a", "weight": 2}])),
            2,
            &["messages[1].weight must be 0 or 1, got 2"],
        ),
        (
            "weight a string",
            chat(json!([user, {"role": "assistant", "content": "a", "weight": "1"}])),
            2,
            &["messages[1].weight must be 0 or 1, got \"1\""],
        ),
        (
            "weight a fraction",
            chat(json!([user, {"role": "assistant", "content": "a", "weight": 0.5}])),
            2,
            &["weight must be 0 or 1, got 0.5"],
        ),
        (
            "weight on a user message",
            chat(json!([{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}])),
            2,
            &["messages[0].weight is only allowed on assistant messages"],
        ),
        (
            "empty assistant content",
            chat(json!([user, {"role": "assistant", "content": ""}])),
            2,
            &["messages[1] (assistant) has empty content and no tool_calls"],
        ),
        (
            "null assistant content",
            chat(json!([user, {"role": "assistant", "content": null}])),
            2,
            &["has null content and no tool_calls"],
        ),
        (
            "no assistant content",
            chat(json!([user, {"role": "assistant", "tool_calls": []}])),
            2,
            &["has no content and no tool_calls"],
        ),
        (
            "tools not an array",
            line(json!({"messages": [user, {"role": "assistant", "content": "a"}], "tools": {"type": "function"}})),
            1,
            &["\"tools\" must be an array, got an object"],
        ),
        (
            "a tool not an object",
            line(json!({"messages": [user, {"role": "assistant", "content": "a"}], "tools": ["f"]})),
            1,
            &["tools[0] must be an object"],
        ),
        (
            "parallel_tool_calls not a bool",
            line(json!({"messages": [user, {"role": "assistant", "content": "a"}], "parallel_tool_calls": "yes"})),
            1,
            &["parallel_tool_calls\" must be true or false"],
        ),
        (
            "functions",
            line(json!({"messages": [user, {"role": "assistant", "content": "a"}], "functions": []})),
            1,
            &["\"functions\"", "not supported"],
        ),
        ("prompt empty", line(json!({"prompt": "", "completion": "c"})), 1, &["\"prompt\" is empty"]),
        (
            "completion not a string",
            line(json!({"prompt": "p", "completion": ["c"]})),
            1,
            &["\"completion\" must be a string, got an array"],
        ),
        ("completion missing", line(json!({"prompt": "p"})), 1, &["\"completion\" is missing"]),
        ("alpaca output missing", line(json!({"instruction": "i"})), 1, &["\"output\" is missing"]),
        ("alpaca output empty", line(json!({"instruction": "i", "output": ""})), 1, &["\"output\" is empty"]),
        ("alpaca instruction empty", line(json!({"instruction": "", "output": "o"})), 1, &["\"instruction\" is empty"]),
        ("alpaca instruction missing", line(json!({"input": "x", "output": "o"})), 1, &["\"instruction\" is missing"]),
        (
            "alpaca input a number",
            line(json!({"instruction": "i", "input": 3, "output": "o"})),
            1,
            &["\"input\" must be a string, got a number"],
        ),
    ];
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (name, text, want_line, words) in &cases {
        let (issues, more) = issues_with(tok, text.as_bytes(), &opts());
        let ok = issues.len() == 1
            && more == 0
            && issues[0].line == *want_line
            && words.iter().all(|w| issues[0].message.contains(w));
        if !ok {
            failures.push(format!("{name}: got {issues:?} (+{more}), want line {want_line} with {words:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_utf8_names_the_line_and_column() {
    let tok = tiny();
    let ok = line(json!({"prompt": "a", "completion": "b"}));
    let mut bytes = format!("{ok}\n{ok}\n").into_bytes();
    bytes.extend_from_slice(b"{\"prompt\": \"a\xff\xfe\", \"completion\": \"b\"}\n");
    bytes.extend_from_slice(ok.as_bytes());
    let (issues, more) = issues_with(tok, &bytes, &opts());
    assert_eq!(more, 0);
    assert_eq!(issues, [DataIssue { line: 3, message: "not valid UTF-8 (bad byte at column 14)".into() }]);
}

#[test]
fn every_bad_line_is_reported_in_order_up_to_the_cap() {
    let tok = tiny();
    let ok = line(json!({"prompt": "a", "completion": "b"}));
    let mut lines = Vec::new();
    for i in 0..30 {
        lines.push(if i % 3 == 1 { format!("{{\"prompt\": {i}, \"completion\": \"b\"}}") } else { ok.clone() });
    }
    lines.insert(4, "not json".into());
    let text = lines.join("\n");
    let (issues, more) = issues_with(tok, text.as_bytes(), &opts());
    assert_eq!(more, 0);
    let got: Vec<usize> = issues.iter().map(|i| i.line).collect();
    let mut want: Vec<usize> = (0..30).filter(|i| i % 3 == 1).map(|i| if i < 4 { i + 1 } else { i + 2 }).collect();
    want.push(5);
    want.sort_unstable();
    assert_eq!(got, want);
    assert!(issues.iter().filter(|i| i.line != 5).all(|i| i.message == "\"prompt\" must be a string, got a number"));

    let capped = DataOptions { max_issues: 3, ..opts() };
    let (issues, more) = issues_with(tok, text.as_bytes(), &capped);
    assert_eq!(issues.iter().map(|i| i.line).collect::<Vec<_>>(), &want[..3]);
    assert_eq!(more, want.len() - 3);
    let shown = DataError::Invalid { issues, more }.to_string();
    let shown: Vec<&str> = shown.lines().collect();
    assert_eq!(shown[0], format!("{} problems in the training file:", want.len()));
    assert_eq!(shown[1], "line 2: \"prompt\" must be a string, got a number");
    assert!(shown[2].starts_with("line 5: invalid JSON"), "{}", shown[2]);
    assert_eq!(shown[3], "line 6: \"prompt\" must be a string, got a number");
    assert_eq!(shown[4], format!("... and {} more", want.len() - 3));
    assert_eq!(shown.len(), 5);
    // A cap of 0 still lists one.
    let (issues, _) = issues_with(tok, text.as_bytes(), &DataOptions { max_issues: 0, ..opts() });
    assert_eq!(issues.len(), 1);
}

#[test]
fn only_the_first_line_of_another_format_is_reported_as_mixing() {
    let tok = tiny();
    let pc = line(json!({"prompt": "a", "completion": "b"}));
    let alpaca = line(json!({"instruction": "a", "output": "b"}));
    let bad_alpaca = line(json!({"instruction": "a"}));
    let text = [pc.clone(), alpaca.clone(), pc, alpaca, bad_alpaca].join("\n");
    let (issues, _) = issues_with(tok, text.as_bytes(), &opts());
    assert_eq!(issues.len(), 2, "{issues:?}");
    assert_eq!(issues[0].line, 2);
    assert!(issues[0]
        .message
        .contains("in the alpaca format, but the file's first example (line 1) is prompt/completion"));
    assert_eq!(issues[1], DataIssue { line: 5, message: "\"output\" is missing".into() });
}

#[test]
fn overflow_truncates_or_refuses() {
    let tok = tiny();
    let long = "word ".repeat(40);
    let text = line(json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long}]}));
    let full = parse(tok, &text).examples.remove(0);
    let n = full.len();
    assert!(n > 40);

    let limit = n - 10;
    let ds = parse_jsonl(
        text.as_bytes(),
        tok,
        &DataOptions { max_seq_len: limit, overflow: Overflow::Truncate, max_issues: 10 },
    )
    .unwrap();
    assert_eq!(ds.stats.truncated, 1);
    assert_eq!(ds.examples[0].tokens, full.tokens[..limit]);
    assert_eq!(ds.examples[0].targets, full.targets[..limit]);
    assert_eq!(ds.stats.tokens, limit);
    // Exactly at the limit: nothing to cut.
    let ds =
        parse_jsonl(text.as_bytes(), tok, &DataOptions { max_seq_len: n, overflow: Overflow::Refuse, max_issues: 10 })
            .unwrap();
    assert_eq!(ds.stats.truncated, 0);

    let refuse = DataOptions { max_seq_len: limit, overflow: Overflow::Refuse, max_issues: 10 };
    let (issues, _) = issues_with(tok, format!("{text}\n{text}").as_bytes(), &refuse);
    assert_eq!(issues.iter().map(|i| i.line).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(issues[0].message, format!("the example is {n} tokens, longer than max_seq_len ({limit} tokens)"));

    // Cut before the first trained token: nothing left to train.
    let first = full.targets.iter().position(|t| *t).unwrap();
    let early = DataOptions { max_seq_len: first, overflow: Overflow::Truncate, max_issues: 10 };
    let ok = line(json!({"messages": [{"role": "assistant", "content": "x"}]}));
    let (issues, _) = issues_with(tok, format!("{ok}\n{text}").as_bytes(), &early);
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0].line, 2);
    assert!(
        issues[0].message.contains(&format!(
            "no trained token is left after truncating the example from {n} to max_seq_len ({first})"
        )),
        "{}",
        issues[0].message
    );
    // One token more keeps one trained token.
    let ds = parse_jsonl(text.as_bytes(), tok, &DataOptions { max_seq_len: first + 1, ..early }).unwrap();
    assert_eq!(ds.examples[0].trained_tokens(), 1);
    assert_eq!(ds.stats.trained_tokens, 1);
}

#[test]
fn template_problems_are_line_errors() {
    // A template that refuses a system message after the first one.
    let tok = tiny_with(
        "{% for m in messages %}{% if m.role == 'system' and not loop.first %}\
         {{ raise_exception('System message must be at the beginning.') }}{% endif %}\
         <|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    );
    let ok = line(json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}));
    let late_system = line(json!({"messages": [
        {"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}));
    let (line_no, message) = issue(&tok, &format!("{ok}\n{late_system}"));
    assert_eq!(line_no, 2);
    assert_eq!(message, "the chat template refused the conversation: System message must be at the beginning.");
    assert_eq!(parse(&tok, &ok).examples.len(), 1);

    // A template that fails (not a raise): a line error, with the template's reason.
    let tok = tiny_with("{% for m in messages %}{{ m.content.upper() }}{{ m.content.nope() }}{% endfor %}");
    let (line_no, message) = issue(&tok, &ok);
    assert_eq!(line_no, 1);
    assert!(message.starts_with("the chat template could not render the conversation: "), "{message}");

    // A template whose output for a prefix is not a prefix of the whole (it
    // counts the messages first): the trained span cannot be found.
    let tok = tiny_with("{{ messages | length }}{% for m in messages %}[{{ m.content }}]{% endfor %}");
    let (line_no, message) = issue(&tok, &ok);
    assert_eq!(line_no, 1);
    assert!(
        message.contains("does not render this conversation incrementally: its render up to messages[1]"),
        "{message}"
    );
    // A template that rewrites earlier assistant turns once more follow (as
    // reasoning templates drop old thinking): the later render does not extend
    // the earlier one.
    let tok = tiny_with(
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and not loop.last %}\
         {{ m.content | replace('!', '') }}{% else %}{{ m.content }}{% endif %}</>{% endfor %}\
         {% if add_generation_prompt %}<assistant>{% endif %}",
    );
    let two_turns = line(json!({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a!"},
        {"role": "user", "content": "r"}, {"role": "assistant", "content": "b", "weight": 0}]}));
    let (_, message) = issue(&tok, &two_turns);
    assert!(
        message.contains("the whole conversation's render does not start with its render up to messages[1]"),
        "{message}"
    );

    // A template that prints nothing for assistant turns: nothing is trained.
    let tok = tiny_with("{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}");
    let (_, message) = issue(&tok, &ok);
    assert!(message.contains("no token is trained"), "{message}");
}

#[test]
fn a_turn_without_an_end_of_turn_token_owns_its_whole_render() {
    // Template with no end-of-turn marker: the turn owns everything it adds.
    let tok = tiny_with(
        "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    );
    let text = line(json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}]}));
    assert_eq!(runs(&tok, &parse(&tok, &text).examples[0]), ["a b\n"]);
}

#[test]
fn a_token_straddling_the_turn_start_is_prompt() {
    // The generation prompt ends in a space, which BPE joins to the reply's first
    // word (" a"): that token starts in the prompt, so it is not trained.
    let tok = tiny_with(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
    );
    let text = line(json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}]}));
    let ex = parse(&tok, &text).examples.remove(0);
    assert_eq!(runs(&tok, &ex), [" b\n"]);
    let first = ex.targets.iter().position(|t| *t).unwrap();
    assert_eq!(tok.decode(&ex.tokens[first - 1..first], false).unwrap(), " a");
}

#[test]
fn offsets_trimmed_by_a_post_processor_do_not_move_tokens_into_a_turn() {
    // The same vocabulary with a ByteLevel post-processor that trims offsets
    // (as RoBERTa-style tokenizer.json files do): " a" would report its start
    // after the space, inside the reply, and be trained by mistake.
    let dir = tempfile::tempdir().unwrap();
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("tiny/qwen2/hf-f32/tokenizer.json")).unwrap())
            .unwrap();
    json["post_processor"] =
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let mut tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";
    tok.set_chat_template(ChatTemplate::new(template, None, None).unwrap());
    let with_trim = tok.inner().encode("assistant: a b", false).unwrap();
    let a = with_trim.get_tokens().iter().position(|t| t == "\u{120}a").unwrap();
    assert_eq!(with_trim.get_offsets()[a], (11, 12), "the fixture trims: \" a\" reports (11, 12), not (10, 12)");

    let text = line(json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}]}));
    let ex = parse(&tok, &text).examples.remove(0);
    assert_eq!(runs(&tok, &ex), [" b\n"]);
    let plain = parse(&tiny_with(template), &text).examples.remove(0);
    assert_eq!((&ex.tokens, &ex.targets), (&plain.tokens, &plain.targets));
}

#[test]
fn tools_reach_the_template() {
    let tok = tiny_with(
        "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n\
         {% if m.tool_calls %}{{ m.tool_calls[0].function.arguments | tojson }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n\
         {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    );
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let messages = json!([
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "done"},
    ]);
    let ds = parse(&tok, &line(json!({"messages": messages, "tools": tools, "parallel_tool_calls": false})));
    let ex = &ds.examples[0];
    assert_eq!(runs(&tok, ex), ["{\"x\": 1}<|im_end|>", "done<|im_end|>"]);
    let text = tok.decode(&ex.tokens, false).unwrap();
    assert!(text.starts_with("TOOLS [{\"type\": \"function\""), "{text}");
}

#[test]
fn no_chat_template_is_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(common::fixture("tiny/qwen2/hf-f32/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let text = line(json!({"prompt": "a", "completion": "b"}));
    match parse_jsonl(text.as_bytes(), &tok, &opts()) {
        Err(e @ DataError::NoChatTemplate(_)) => assert!(e.to_string().contains("the tokenizer has none"), "{e}"),
        other => panic!("{other:?}"),
    }
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "{% for %}"}"#).unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(tok.chat_template_error().is_some());
    match parse_jsonl(text.as_bytes(), &tok, &opts()) {
        Err(e @ DataError::NoChatTemplate(_)) => assert!(e.to_string().contains("failed to compile"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn load_jsonl_reads_files_and_names_missing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    std::fs::write(&path, format!("{}\n", line(json!({"prompt": "a", "completion": "b"})))).unwrap();
    let ds = load_jsonl(&path, tiny(), &opts()).unwrap();
    assert_eq!(ds.examples.len(), 1);
    let missing = dir.path().join("nope.jsonl");
    match load_jsonl(&missing, tiny(), &opts()) {
        Err(e @ DataError::Io { .. }) => assert!(e.to_string().contains("nope.jsonl"), "{e}"),
        other => panic!("{other:?}"),
    }
}

// ---- Qwen2.5 (the default model's own template and tokenizer) ----

#[test]
fn qwen_chat_targets_with_the_default_system_prompt() {
    let Some(tok) = qwen() else { return };
    let messages = json!([
        {"role": "user", "content": "Write hello in Rust"},
        {"role": "assistant", "content": "fn main() {\n    println!(\"héllo, 世界 🎉\");\n}"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "De rien — ça marche ✓"},
    ]);
    let ds = parse(tok, &line(json!({"messages": messages})));
    let ex = &ds.examples[0];
    assert_eq!(ex.tokens, rendered_ids(tok, &messages, None));
    // Qwen2.5's template writes its default system prompt when there is none: prompt.
    let first = ex.targets.iter().position(|t| *t).unwrap();
    let prompt = tok.decode(&ex.tokens[..first], false).unwrap();
    assert!(prompt.starts_with("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."), "{prompt}");
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    assert_eq!(
        runs(tok, ex),
        ["fn main() {\n    println!(\"héllo, 世界 🎉\");\n}<|im_end|>", "De rien — ça marche ✓<|im_end|>"]
    );
}

#[test]
fn qwen_tool_calls_and_tool_results() {
    let Some(tok) = qwen() else { return };
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "18C"},
        {"role": "tool", "tool_call_id": "b", "content": "9C"},
        {"role": "assistant", "content": "Paris 18C, Oslo 9C."},
    ]);
    let ds = parse(tok, &line(json!({"messages": messages, "tools": tools})));
    let ex = &ds.examples[0];
    let mut normalised = messages.clone();
    for call in normalised[2]["tool_calls"].as_array_mut().unwrap() {
        let args = call["function"]["arguments"].as_str().unwrap().to_owned();
        call["function"]["arguments"] = serde_json::from_str(&args).unwrap();
    }
    assert_eq!(ex.tokens, rendered_ids(tok, &normalised, Some(&tools)));
    let text = tok.decode(&ex.tokens, false).unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou are terse.\n\n# Tools"), "{text}");
    assert_eq!(
        runs(tok, ex),
        [
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
             <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>",
            "Paris 18C, Oslo 9C.<|im_end|>",
        ]
    );
}

#[test]
fn qwen_all_formats_and_an_opening_assistant_turn() {
    let Some(tok) = qwen() else { return };
    let pc = parse(tok, &line(json!({"prompt": "2+2?", "completion": "4"})));
    assert_eq!(runs(tok, &pc.examples[0]), ["4<|im_end|>"]);
    let alpaca = parse(tok, &line(json!({"instruction": "Translate", "input": "chat", "output": "cat"})));
    assert_eq!(runs(tok, &alpaca.examples[0]), ["cat<|im_end|>"]);
    let text = tok.decode(&alpaca.examples[0].tokens, false).unwrap();
    assert!(text.contains("<|im_start|>user\nTranslate\n\nchat<|im_end|>\n"), "{text}");
    // Qwen2.5's template reads messages[0] unguarded, so it cannot render the
    // empty conversation before an opening assistant message: a trained opening
    // assistant turn is a line error naming it; one with weight 0 is prompt.
    let opening = line(json!({"messages": [{"role": "assistant", "content": "Hi, I am here."}]}));
    let ok = line(json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}));
    let (line_no, message) = issue(tok, &format!("{ok}\n{opening}"));
    assert_eq!(line_no, 2);
    assert!(
        message.starts_with(
            "the chat template could not render the conversation before messages[0] (with the generation prompt): "
        ),
        "{message}"
    );
    let ds = parse(
        tok,
        &line(json!({"messages": [
        {"role": "assistant", "content": "Hi, I am here.", "weight": 0},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "How can I help?"}]})),
    );
    assert_eq!(runs(tok, &ds.examples[0]), ["How can I help?<|im_end|>"]);
    // A tool call without a function: Qwen's template fails on its arguments.
    let (_, message) = issue(
        tok,
        &line(json!({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": null, "tool_calls": [{"type": "function"}]}]})),
    );
    assert!(message.starts_with("the chat template could not render the conversation: "), "{message}");
}

#[test]
fn qwen_offsets_match_the_inference_ids() {
    let Some(tok) = qwen() else { return };
    // Whitespace and newlines at the turn boundaries, CJK, emoji, combining marks
    // (NFC-normalised by Qwen's tokenizer) and a special token inside the content:
    // (content, the trained text).
    let cases = [
        // Qwen's pre-tokenizer keeps a run of newlines together: the header's
        // newline and the reply's two are one token, which starts in the prompt.
        ("\n\nleading newlines", "leading newlines<|im_end|>"),
        ("  two spaces", "  two spaces<|im_end|>"),
        ("tab\tand\r\nCRLF", "tab\tand\r\nCRLF<|im_end|>"),
        ("e\u{301}t\u{e9} 日本語 👍🏽", "\u{e9}t\u{e9} 日本語 👍🏽<|im_end|>"),
        ("x<|im_start|>y", "x<|im_start|>y<|im_end|>"),
    ];
    for (content, trained) in cases {
        let messages = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]);
        let ds = parse(tok, &line(json!({"messages": messages})));
        let ex = &ds.examples[0];
        assert_eq!(ex.tokens, rendered_ids(tok, &messages, None), "{content:?}");
        assert_eq!(runs(tok, ex), [trained], "{content:?}");
    }
    // An end-of-turn token inside the content ends the trained span: generation
    // would stop there.
    let messages = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "x<|im_end|>y"}]);
    let ds = parse(tok, &line(json!({"messages": messages})));
    assert_eq!(runs(tok, &ds.examples[0]), ["x<|im_end|>"]);
}

// ---- Properties ----

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#.to_owned()),
        Just(r#"{"messages": [{"role": "assistant", "content": "a", "weight": 0}]}"#.to_owned()),
        Just(r#"{"prompt": "p", "completion": "c"}"#.to_owned()),
        Just(r#"{"instruction": "i", "input": "x", "output": "o"}"#.to_owned()),
        Just(r#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}], "tools": []}"#.to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("\"".to_owned()),
        Just(",".to_owned()),
        Just("\n".to_owned()),
        Just("\r\n".to_owned()),
        Just("\"messages\":".to_owned()),
        Just("\"role\":".to_owned()),
        Just("\"weight\": 1".to_owned()),
        Just("<|im_end|>".to_owned()),
        Just("{%}".to_owned()),
        "[ -~]{0,8}",
        ".{0,4}",
    ]
}

fn jsonl_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(fragment(), 0..16).prop_map(|f| f.concat().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..200),
    ]
}

fn ascii_text() -> impl Strategy<Value = String> {
    // Printable ASCII and newlines (all the tiny tokenizer can encode), never empty.
    "[ -~\n]{1,24}".prop_filter("not blank", |s| !s.trim().is_empty())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_give_a_dataset_or_an_error(bytes in jsonl_bytes(), max_seq_len in 0usize..64, refuse in any::<bool>()) {
        let opts = DataOptions {
            max_seq_len,
            overflow: if refuse { Overflow::Refuse } else { Overflow::Truncate },
            max_issues: 5,
        };
        match parse_jsonl(&bytes, tiny(), &opts) {
            Ok(ds) => {
                prop_assert!(!ds.examples.is_empty());
                prop_assert_eq!(ds.stats.examples, ds.examples.len());
                prop_assert_eq!(ds.stats.tokens, ds.examples.iter().map(Example::len).sum::<usize>());
                for ex in &ds.examples {
                    prop_assert_eq!(ex.tokens.len(), ex.targets.len());
                    prop_assert!(ex.len() <= max_seq_len);
                    prop_assert!(!ex.targets[0]);
                    prop_assert!(ex.trained_tokens() > 0);
                }
                prop_assert!(ds.examples.windows(2).all(|w| w[0].line < w[1].line));
            }
            Err(DataError::Invalid { issues, .. }) => {
                prop_assert!(!issues.is_empty() && issues.len() <= 5);
                prop_assert!(issues.windows(2).all(|w| w[0].line < w[1].line));
                let lines = bytes.split(|b| *b == b'\n').count();
                prop_assert!(issues.iter().all(|i| i.line >= 1 && i.line <= lines));
            }
            Err(DataError::Empty) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    /// For any conversation, the trained text is exactly each trained assistant
    /// message's content followed by `<|im_end|>`, and the ids are inference's.
    #[test]
    fn trained_text_is_the_trained_assistant_content(
        turns in prop::collection::vec((ascii_text(), ascii_text(), prop::option::of(0u8..2)), 1..5),
        system in prop::option::of(ascii_text()),
    ) {
        prop_assume!(turns.iter().any(|(_, _, w)| *w != Some(0)));
        let mut messages = Vec::new();
        if let Some(s) = &system {
            messages.push(json!({"role": "system", "content": s}));
        }
        let mut want = Vec::new();
        for (user, assistant, weight) in &turns {
            messages.push(json!({"role": "user", "content": user}));
            let mut m = json!({"role": "assistant", "content": assistant});
            if let Some(w) = weight {
                m["weight"] = json!(w);
            }
            messages.push(m);
            if *weight != Some(0) {
                want.push(format!("{assistant}<|im_end|>"));
            }
        }
        let ds = parse(tiny(), &line(json!({"messages": messages})));
        let ex = &ds.examples[0];
        for m in &mut messages {
            m.as_object_mut().unwrap().remove("weight");
        }
        prop_assert_eq!(&ex.tokens, &rendered_ids(tiny(), &Value::Array(messages), None));
        // Whitespace opening an assistant text may merge with the header's
        // newline into one token that starts in the prompt; the rest is trained.
        let got = runs(tiny(), ex);
        prop_assert_eq!(got.len(), want.len(), "{:?} vs {:?}", got, want);
        for (got, want) in got.iter().zip(&want) {
            prop_assert!(want.ends_with(got.as_str()), "got {:?} want {:?}", got, want);
            prop_assert!(want[..want.len() - got.len()].trim().is_empty(), "got {:?} want {:?}", got, want);
        }
    }
}
