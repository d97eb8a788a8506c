//! The default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M) against transformers
//! loading the same GGUF (tests/fixtures/default-model-golden.json, made by
//! scripts/fixtures/default_model.py): identical prompt tokens, identical 48-token
//! greedy continuations, and last-prompt-position top-20 logits within 1e-2.

mod common;

use common::*;
use tandem::backend::cpu::CpuBackend;
use tandem::model::load_gguf;

#[test]
fn default_model_matches_transformers() {
    let Some(path) = default_model() else { return };
    let golden = read_json(&fixture("default-model-golden.json"));
    let be = CpuBackend::new(0).unwrap();
    let loaded = load_gguf(&be, &path).unwrap();
    let tok = loaded.tokenizer.expect("the default model carries its tokenizer");
    let prompts = golden["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 6);

    let mut reqs = Vec::new();
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let text = p["prompt"].as_str().unwrap();
        if p["kind"] == "chat" {
            let rendered = tok.chat_template().unwrap().render(&p["messages"], None, true, None).unwrap();
            assert_eq!(rendered, text, "{name}: chat template render differs from apply_chat_template");
        }
        let want_ids = ids(&p["prompt_ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want_ids, "{name}: prompt tokens differ");
        reqs.push(greedy(&want_ids, 48));
    }

    // Last-prompt-position logits, one prompt at a time.
    for (p, r) in prompts.iter().zip(&reqs) {
        let logits = all_logits(&be, &loaded.model, &r.prompt).pop().unwrap();
        let top = &p["last_prompt_top20"];
        let mut worst = 0f32;
        for (id, want) in ids(&top["ids"]).iter().zip(floats(&top["logits"])) {
            worst = worst.max((logits[*id as usize] - want).abs());
        }
        eprintln!("{}: top-20 logits max abs diff {worst:.2e}", p["name"]);
        assert!(worst <= 1e-2, "{}: top-20 logits differ by {worst}", p["name"]);
    }

    // All prompts in one batch: each continuation equals transformers' solo run.
    let mut e = engine(loaded.model, &engine_config(16, 1024, 256));
    let outs = e.generate(reqs);
    for (p, out) in prompts.iter().zip(&outs) {
        let want = ids(&p["new_tokens"]);
        let got = token_ids(&out.0);
        assert_eq!(got, want, "{}: greedy tokens differ from transformers", p["name"]);
        let text = tok.decode(&got, false).unwrap();
        assert_eq!(text, p["text"].as_str().unwrap(), "{}: decoded text differs", p["name"]);
    }
    assert_eq!(e.scheduler().kv().pool().num_used(), 0);
}
