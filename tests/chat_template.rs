//! Chat template rendering parity with transformers' `apply_chat_template`
//! (goldens from scripts/fixtures/tokenizer.py; the templates are in the fixture,
//! so nothing here needs the model), plus robustness: errors, never panics.

use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::{json, Value};
use tandem::tokenizer::{ChatTemplate, TokenizerError};

fn golden() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/chat_golden.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

#[test]
fn renders_match_transformers() {
    let golden = golden();
    let cases = golden["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let source = golden["templates"][case["template"].as_str().unwrap()].as_str().unwrap();
        let template = ChatTemplate::new(source, opt_str(&case["bos_token"]), opt_str(&case["eos_token"]))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let tools = Some(&case["tools"]).filter(|t| !t.is_null());
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let extra = Some(&case["extra"]).filter(|e| !e.is_null());
        let got = template.render(&case["messages"], tools, gen, extra);
        match (&case["rendered"], &case["error"], got) {
            (Value::String(want), _, Ok(got)) if *want == got => {}
            (_, Value::String(want), Err(TokenizerError::TemplateRaised(got))) if *want == got => {}
            (want, want_err, got) => {
                failures.push(format!("{name}:\n  got  {got:?}\n  want {want:?} / error {want_err:?}"))
            }
        }
    }
    assert!(cases.len() >= 20);
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn raise_exception_surfaces_its_message() {
    let t = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user, got ' ~ messages[0].role) }}{% endif %}ok",
        None,
        None,
    )
    .unwrap();
    let err = t.render(&json!([{"role": "assistant", "content": "x"}]), None, false, None).unwrap_err();
    match err {
        TokenizerError::TemplateRaised(m) => assert_eq!(m, "Conversation must start with user, got assistant"),
        other => panic!("expected TemplateRaised, got {other:?}"),
    }
    assert_eq!(t.render(&json!([{"role": "user", "content": "x"}]), None, false, None).unwrap(), "ok");
}

#[test]
fn errors_are_typed() {
    assert!(matches!(ChatTemplate::new("{% for %}", None, None), Err(TokenizerError::TemplateSyntax(_))));
    assert!(matches!(ChatTemplate::new("{{ x", None, None), Err(TokenizerError::TemplateSyntax(_))));
    let t = ChatTemplate::new("{{ messages[0].content.nope() }}", None, None).unwrap();
    let err = t.render(&json!([{"role": "user", "content": "x"}]), None, false, None).unwrap_err();
    assert!(matches!(err, TokenizerError::TemplateRender(_)), "{err:?}");
    let t = ChatTemplate::new("{{ messages }}", None, None).unwrap();
    assert!(matches!(t.render(&json!({"a": 1}), None, false, None), Err(TokenizerError::InvalidInput(_))));
    assert!(matches!(t.render(&json!([1]), None, false, None), Err(TokenizerError::InvalidInput(_))));
    assert!(matches!(t.render(&json!([]), None, false, Some(&json!([1]))), Err(TokenizerError::InvalidInput(_))));
}

#[test]
fn long_conversations_fit_the_fuel_budget() {
    let g = golden();
    let t = ChatTemplate::new(g["templates"]["qwen2"].as_str().unwrap(), None, None).unwrap();
    let tools = &g["cases"].as_array().unwrap().iter().find(|c| c["tools"].is_array()).unwrap()["tools"];
    let turns: Vec<Value> = (0..2000)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("turn {i}")}))
        .collect();
    let out = t.render(&Value::Array(turns), Some(tools), true, None).unwrap();
    assert!(out.ends_with("turn 1999<|im_end|>\n<|im_start|>assistant\n"));
}

#[test]
fn templates_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<ChatTemplate>();
    assert_send_sync::<tandem::tokenizer::Tokenizer>();
    assert_send_sync::<tandem::tokenizer::DecodeStream>();
}

#[test]
fn runaway_templates_stop() {
    let t = ChatTemplate::new(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let started = std::time::Instant::now();
    assert!(t.render(&json!([]), None, false, None).is_err());
    assert!(started.elapsed().as_secs() < 30);
    let t = ChatTemplate::new("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", None, None).unwrap();
    assert!(t.render(&json!([]), None, false, None).is_err());
}

#[test]
fn extra_variables_special_tokens_and_reasoning_aliases() {
    let t = ChatTemplate::new(
        "{{ bos_token }}{% if enable_thinking is defined and not enable_thinking %}no-think{% endif %}\
         {% for m in messages %}[{{ m.thinking }}|{{ m.reasoning_content }}|{{ m | tojson }}]{% endfor %}{{ eos_token }}",
        Some("<s>".into()),
        Some("</s>".into()),
    )
    .unwrap();
    let messages = json!([{"role": "assistant", "content": "a", "reasoning": "why"}]);
    let out = t.render(&messages, None, false, Some(&json!({"enable_thinking": false, "eos_token": "<E>"}))).unwrap();
    assert_eq!(
        out,
        "<s>no-think[why|why|{\"thinking\": \"why\", \"role\": \"assistant\", \"content\": \"a\", \
         \"reasoning\": \"why\", \"reasoning_content\": \"why\"}]<E>"
    );
}

#[test]
fn strftime_now_and_python_printing() {
    let t = ChatTemplate::new(
        "{{ strftime_now('%Y') | length }} {{ strftime_now('%d %b %Y') }}|{{ none }}|{{ [1, 'a', none, true] }}|{{ {'k': 1.0} }}",
        None,
        None,
    )
    .unwrap();
    let out = t.render(&json!([]), None, false, None).unwrap();
    let (year_len, rest) = out.split_once(' ').unwrap();
    assert_eq!(year_len, "4");
    let (date, printed) = rest.split_once('|').unwrap();
    assert_eq!(date.len(), 11, "{date}");
    assert_eq!(printed, "None|[1, 'a', None, True]|{'k': 1.0}");
}

#[test]
fn tojson_keeps_key_order_and_unicode() {
    let t = ChatTemplate::new("{{ tools | tojson }}", None, None).unwrap();
    let tools = json!([{"z": 1, "a": "é<&>", "m": [1.5, 2, -3, 1e100, null, false]}]);
    assert_eq!(
        t.render(&json!([]), Some(&tools), false, None).unwrap(),
        r#"[{"z": 1, "a": "é<&>", "m": [1.5, 2, -3, 1e+100, null, false]}]"#
    );
    let t = ChatTemplate::new("{{ tools | tojson(ensure_ascii=true, indent=1) }}", None, None).unwrap();
    assert_eq!(
        t.render(&json!([]), Some(&json!({"a": ["é😀"]})), false, None).unwrap(),
        "{\n \"a\": [\n  \"\\u00e9\\ud83d\\ude00\"\n ]\n}"
    );
    let t = ChatTemplate::new("{{ tools | tojson(bogus=1) }}", None, None).unwrap();
    assert!(t.render(&json!([]), Some(&json!(1)), false, None).is_err());
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof![Just("role"), Just("content"), Just("user"), Just("tool_calls"), Just("")]
            .prop_map(|s| Value::String(s.into())),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (prop_oneof![Just("role".to_owned()), Just("content".to_owned()), "[a-z_]{0,8}"], inner),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn template_source() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        Just("{{ ".to_owned()),
        Just(" }}".to_owned()),
        Just("{% ".to_owned()),
        Just(" %}".to_owned()),
        Just("{%- ".to_owned()),
        Just(" -%}".to_owned()),
        Just("for m in messages".to_owned()),
        Just("endfor".to_owned()),
        Just("if ".to_owned()),
        Just("endif".to_owned()),
        Just("else".to_owned()),
        Just("set ns = namespace(x=1)".to_owned()),
        Just("ns.x".to_owned()),
        Just("m.content".to_owned()),
        Just("m['role']".to_owned()),
        Just("messages[0]".to_owned()),
        Just("messages[1:]".to_owned()),
        Just(" | tojson".to_owned()),
        Just(" | tojson(indent=2)".to_owned()),
        Just(" | trim".to_owned()),
        Just(".strip()".to_owned()),
        Just(".split(',')".to_owned()),
        Just(".startswith('a')".to_owned()),
        Just("raise_exception('boom')".to_owned()),
        Just("strftime_now('%Y')".to_owned()),
        Just("loop.index".to_owned()),
        Just("tools".to_owned()),
        Just("add_generation_prompt".to_owned()),
        Just("{% generation %}".to_owned()),
        Just("{% endgeneration %}".to_owned()),
        Just("{%}".to_owned()),
        Just("break".to_owned()),
        Just(" ~ ".to_owned()),
        Just(" + ".to_owned()),
        Just("\n".to_owned()),
        "[ -~]{0,6}",
    ];
    prop::collection::vec(fragment, 0..24).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_templates_and_messages_never_panic(
        source in template_source(),
        messages in json_value(),
        tools in proptest::option::of(json_value()),
        gen in any::<bool>(),
    ) {
        if let Ok(t) = ChatTemplate::new(&source, Some("<s>".into()), None) {
            let _ = t.render(&messages, tools.as_ref(), gen, None);
            let _ = t.render(&json!([messages]), tools.as_ref(), gen, None);
        }
    }

    #[test]
    fn qwen_template_never_panics_on_random_messages(
        messages in prop::collection::vec(json_value(), 0..5),
        tools in proptest::option::of(json_value()),
    ) {
        let g = golden();
        let t = ChatTemplate::new(g["templates"]["qwen2"].as_str().unwrap(), None, None).unwrap();
        let _ = t.render(&Value::Array(messages), tools.as_ref(), true, None);
    }
}

#[test]
fn overlapping_block_delimiters_are_a_syntax_error_not_a_panic() {
    for source in ["{%}", "a{%}b", "{%}{% generation %}x{% endgeneration %}", "{%-}"] {
        match ChatTemplate::new(source, None, None) {
            Err(TokenizerError::TemplateSyntax(_)) => {}
            other => panic!("{source:?}: expected a syntax error, got {other:?}"),
        }
    }
}
