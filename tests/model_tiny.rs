//! Logits of the tiny fixture models (tests/fixtures/tiny, made by
//! scripts/make-fixtures with transformers) match transformers in f32, for HF
//! f32/bf16/sharded safetensors and for GGUF (f32 and quantised) files.

mod common;

use common::*;
use tandem::backend::cpu::CpuBackend;
use tandem::engine::generate::GenerateRequest;
use tandem::engine::{Generator, SamplingParams};
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
        let mut r = runner(model);
        let mut g = Generator { runner: &mut r, max_batch_tokens: 64 };
        let req =
            GenerateRequest { prompt, max_tokens: want.len(), sampling: SamplingParams::default(), stop_ids: vec![] };
        let out = g.run(&[req], |_, _| {}).unwrap();
        assert_eq!(out[0].tokens, want, "{name}: greedy tokens differ from transformers");
        assert_eq!(r.pool.num_used(), 0, "blocks returned after generation");
    }
}

#[test]
fn chunked_prefill_and_batching_do_not_change_results() {
    let be = CpuBackend::new(2).unwrap();
    let dir = fixture("tiny/qwen2");
    let golden = read_json(&dir.join("golden.json"));
    let prompt = ids(&golden["greedy"]["prompt"]);
    let model = load_hf_dir(&be, &dir.join("hf-f32")).unwrap().model;
    let mut r = runner(model);
    let req = |p: &[u32]| GenerateRequest {
        prompt: p.to_vec(),
        max_tokens: 10,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
    };
    let solo = Generator { runner: &mut r, max_batch_tokens: 512 }.run(&[req(&prompt)], |_, _| {}).unwrap();
    // Same prompt among others of different lengths, with a tiny token budget so
    // prefill is chunked and mixed with other sequences' decodes.
    let others: Vec<Vec<u32>> =
        (0..5).map(|i| (0..(3 + 7 * i)).map(|j| ((j * 13 + i) % 200) as u32).collect()).collect();
    let mut reqs: Vec<GenerateRequest> = others.iter().map(|p| req(p)).collect();
    reqs.insert(2, req(&prompt));
    let batched = Generator { runner: &mut r, max_batch_tokens: 5 }.run(&reqs, |_, _| {}).unwrap();
    assert_eq!(batched[2].tokens, solo[0].tokens);
    assert_eq!(r.pool.num_used(), 0);
}

#[test]
fn an_empty_prompt_is_an_error_not_a_hang_or_panic() {
    let be = CpuBackend::new(2).unwrap();
    let model = load_hf_dir(&be, &fixture("tiny/qwen2/hf-f32")).unwrap().model;
    let mut r = runner(model);
    let req = |p: Vec<u32>| GenerateRequest {
        prompt: p,
        max_tokens: 3,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
    };
    let err =
        Generator { runner: &mut r, max_batch_tokens: 64 }.run(&[req(vec![5, 6]), req(vec![])], |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("request 1 has an empty prompt"), "{err}");
    assert_eq!(r.pool.num_used(), 0);
}
