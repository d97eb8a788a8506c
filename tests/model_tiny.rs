//! Logits of the tiny fixture models (tests/fixtures/tiny, made by
//! scripts/make-fixtures with transformers) match transformers in f32, for HF
//! f32/bf16/sharded safetensors and for GGUF (f32 and quantised) files.

mod common;

use common::*;
use tandem::backend::cpu::CpuBackend;
use tandem::model::{load_gguf, load_hf_dir, LlamaModel};

const MODELS: [&str; 5] = ["llama", "llama2", "qwen2", "mistral", "mistral-swa"];
const TOL: f32 = 1e-4;

fn cases(golden: &serde_json::Value, key: &str) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (ids(&c["input_ids"]), c[key].as_array().unwrap().iter().map(floats).collect()))
        .collect()
}

fn check(be: &CpuBackend, model: &LlamaModel<CpuBackend>, cases: &[(Vec<u32>, Vec<Vec<f32>>)], what: &str) {
    for (ids, want) in cases {
        let got = all_logits(be, model, ids);
        let err = max_rel_err(&got, want);
        assert!(err <= TOL, "{what}: max relative error {err:e} > {TOL:e}");
        eprintln!("{what}: {} tokens, max relative error {err:.2e}", ids.len());
    }
}

#[test]
fn hf_safetensors_logits_match_transformers() {
    let be = CpuBackend::new(2).unwrap();
    for name in MODELS {
        let dir = fixture(&format!("tiny/{name}"));
        let golden = read_json(&dir.join("golden.json"));
        let m = load_hf_dir(&be, &dir.join("hf-f32")).unwrap().model;
        check(&be, &m, &cases(&golden, "logits"), &format!("{name} hf-f32"));
        let m = load_hf_dir(&be, &dir.join("hf-bf16")).unwrap().model;
        check(&be, &m, &cases(&golden, "logits_bf16_weights"), &format!("{name} hf-bf16"));
        let sharded = dir.join("hf-f32-sharded");
        if sharded.exists() {
            let m = load_hf_dir(&be, &sharded).unwrap().model;
            check(&be, &m, &cases(&golden, "logits"), &format!("{name} hf-f32-sharded"));
        }
    }
}

#[test]
fn gguf_logits_match_transformers() {
    let be = CpuBackend::new(2).unwrap();
    let mut seen = 0;
    for name in MODELS {
        let dir = fixture(&format!("tiny/{name}"));
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let fname = path.file_name().unwrap().to_string_lossy().to_string();
            let Some(ty) = fname.strip_prefix("model-").and_then(|s| s.strip_suffix(".gguf")) else { continue };
            let golden = read_json(&dir.join(format!("golden-gguf-{ty}.json")));
            let m = load_gguf(&be, &path).unwrap().model;
            check(&be, &m, &cases(&golden, "logits"), &format!("{name} gguf {ty}"));
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected GGUF fixtures for at least three models, found {seen}");
}

#[test]
fn greedy_generation_matches_transformers() {
    let be = CpuBackend::new(2).unwrap();
    for name in MODELS {
        let dir = fixture(&format!("tiny/{name}"));
        let golden = read_json(&dir.join("golden.json"));
        let prompt = ids(&golden["greedy"]["prompt"]);
        let want = ids(&golden["greedy"]["new_tokens"]);
        let model = load_hf_dir(&be, &dir.join("hf-f32")).unwrap().model;
        let mut e = engine(model, &engine_config(16, 256, 64));
        let out = e.generate(vec![greedy(&prompt, want.len())]);
        assert_eq!(token_ids(&out[0].0), want, "{name}: greedy tokens differ from transformers");
        assert_eq!(e.scheduler().kv().pool().num_used(), 0, "blocks returned after generation");
    }
}
