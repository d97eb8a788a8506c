//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tandem::backend::cpu::CpuBackend;
use tandem::backend::{Backend, SeqAttention};
use tandem::engine::{ModelRunner, RunnerConfig, SeqState};
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
        })
        .unwrap();
    // Blocks 1.. in reverse order, so a block table that is not the identity is exercised.
    let table: Vec<tandem::kv::BlockId> = (1..nblocks as u32).rev().map(tandem::kv::BlockId).collect();
    let positions: Vec<u32> = (0..ids.len() as u32).collect();
    let slots: Vec<u32> = (0..ids.len()).map(|p| (table[p / bs].0 as usize * bs + p % bs) as u32).collect();
    let rows: Vec<usize> = (0..ids.len()).collect();
    let input = StepInput {
        token_ids: ids,
        positions: &positions,
        slot_mapping: &slots,
        seqs: vec![SeqAttention { rows: 0..ids.len(), context_len: ids.len(), block_table: &table }],
        logits_rows: &rows,
    };
    let out = be.download(&model.forward(be, &mut kv, &input));
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

pub fn runner(model: LlamaModel<CpuBackend>) -> ModelRunner<CpuBackend> {
    ModelRunner::new(CpuBackend::new(2).unwrap(), model, RunnerConfig { block_size: 16, num_blocks: 256 }).unwrap()
}

pub fn new_seq(ids: &[u32]) -> SeqState {
    SeqState::new(ids.to_vec())
}
