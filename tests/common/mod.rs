//! Helpers shared by integration tests.
#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};

use tandem::backend::cpu::CpuBackend;
use tandem::backend::{Backend, SeqAttention};
use tandem::engine::{EngineConfig, EngineCore, EngineRequest, SamplingParams, StoppingParams, TokenOut};
use tandem::model::{LlamaModel, StepInput};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(p: &str) -> PathBuf {
    repo().join("tests/fixtures").join(p)
}

pub const DEFAULT_MODEL: &str = "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// The default model's path, or None (with a printed reason) when it was not fetched.
pub fn default_model() -> Option<PathBuf> {
    let p = repo().join(DEFAULT_MODEL);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {DEFAULT_MODEL} is missing (run scripts/get-default-model.sh; CI does)");
        None
    }
}

pub fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// Logits at every position of `ids`, computed as one prefill over a fresh cache.
pub fn all_logits(be: &CpuBackend, model: &LlamaModel<CpuBackend>, ids: &[u32]) -> Vec<Vec<f32>> {
    all_logits_with(be, model, ids, None)
}

/// `all_logits` with every row running `adapter` (when given).
pub fn all_logits_with(
    be: &CpuBackend,
    model: &LlamaModel<CpuBackend>,
    ids: &[u32],
    adapter: Option<&tandem::lora::LoraAdapter>,
) -> Vec<Vec<f32>> {
    let c = &model.config;
    let bs = 16;
    let nblocks = ids.len().div_ceil(bs) + 1;
    let mut kv = be
        .alloc_kv(tandem::backend::KvCacheSpec {
            num_layers: c.num_layers,
            num_blocks: nblocks,
            block_size: bs,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            dtype: Default::default(),
        })
        .unwrap();
    // Blocks 1.. in reverse order, so a block table that is not the identity is exercised.
    let table: Vec<tandem::kv::BlockId> = (1..nblocks as u32).rev().map(tandem::kv::BlockId).collect();
    let positions: Vec<u32> = (0..ids.len() as u32).collect();
    let slots: Vec<u32> = (0..ids.len()).map(|p| tandem::kv::slot(&table, p, bs).unwrap()).collect();
    let rows: Vec<usize> = (0..ids.len()).collect();
    let input = StepInput {
        token_ids: ids,
        positions: &positions,
        slot_mapping: &slots,
        seqs: vec![SeqAttention { rows: 0..ids.len(), context_len: ids.len(), block_table: &table }],
        logits_rows: &rows,
    };
    let slots_dev: Vec<Option<tandem::model::DeviceAdapter<CpuBackend>>> =
        vec![adapter.map(|a| tandem::model::DeviceAdapter::load(be, a, c).unwrap())];
    let segments = if adapter.is_some() { vec![(0..ids.len(), 0usize)] } else { vec![] };
    let mut lora = tandem::model::LoraStep { segments: &segments, slots: &slots_dev };
    let out = be.download(&model.forward(be, &mut kv, &input, &mut lora).unwrap()).unwrap();
    out.chunks(c.vocab_size).map(|r| r.to_vec()).collect()
}

/// Max over rows of max|got - want| / max|want| (the row's largest logit sets the scale).
pub fn max_rel_err(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len(), "row count");
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len(), "vocab size");
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err.is_finite(), "non-finite logits");
        worst = worst.max(err / scale);
    }
    worst
}

/// Engine settings for tests: no end-of-sequence ids (random-weight models
/// would stop at random), prefix caching on.
pub fn engine_config(block_size: usize, num_blocks: usize, max_num_batched_tokens: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        num_blocks,
        enable_prefix_caching: true,
        kv_dtype: Default::default(),
        max_num_batched_tokens,
        max_num_seqs: 64,
        max_waiting: 1024,
        eos_token_ids: vec![],
        max_model_len: 0,
        max_loras: 4,
        co_serving: Default::default(),
    }
}

pub fn engine(model: LlamaModel<CpuBackend>, cfg: &EngineConfig) -> EngineCore<CpuBackend> {
    EngineCore::new(CpuBackend::new(2).unwrap(), model, cfg).unwrap()
}

/// A greedy request for `max_tokens` tokens.
pub fn greedy(prompt: &[u32], max_tokens: usize) -> EngineRequest {
    EngineRequest {
        prompt: prompt.to_vec(),
        sampling: SamplingParams::default(),
        stopping: StoppingParams { max_tokens, min_tokens: 0, stop_token_ids: vec![], ignore_eos: false },
        logprobs: None,
        prompt_logprobs: None,
        adapter: None,
    }
}

/// Each request's tokens when it runs alone, on a fresh engine over `model()`
/// (16-token blocks, a 512-token budget): the reference batched runs must equal.
pub fn solo_outputs(model: impl Fn() -> LlamaModel<CpuBackend>, reqs: &[EngineRequest]) -> Vec<Vec<u32>> {
    reqs.iter()
        .map(|r| token_ids(&engine(model(), &engine_config(16, 256, 512)).generate(vec![r.clone()])[0].0))
        .collect()
}

pub fn token_ids(out: &[TokenOut]) -> Vec<u32> {
    out.iter().map(|t| t.id).collect()
}
