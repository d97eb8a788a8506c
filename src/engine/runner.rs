//! The model runner: owns the backend, the model, the KV cache and its block
//! pool, and runs one flattened varlen step for a set of sequence chunks.

use crate::backend::{Backend, KvCacheSpec, SeqAttention};
use crate::kv::{BlockPool, BlockPoolError, BlockTable};
use crate::model::{LlamaModel, StepInput};

#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache (one is the reserved null block).
    pub num_blocks: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self { block_size: 16, num_blocks: 4096 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Blocks(#[from] BlockPoolError),
    #[error("sequence would exceed the model's context of {max} tokens")]
    ContextLimit { max: usize },
    #[error("request {index} has an empty prompt: there is nothing to compute logits from")]
    EmptyPrompt { index: usize },
}

/// One sequence as the runner sees it: its tokens and how many are in the cache.
#[derive(Debug, Default, Clone)]
pub struct SeqState {
    pub tokens: Vec<u32>,
    /// Tokens whose K/V are already in the cache.
    pub num_computed: usize,
    pub blocks: BlockTable,
}

impl SeqState {
    pub fn new(tokens: Vec<u32>) -> Self {
        Self { tokens, ..Default::default() }
    }
}

pub struct ModelRunner<B: Backend> {
    pub backend: B,
    pub model: LlamaModel<B>,
    kv: B::KvCache,
    pub pool: BlockPool,
}

impl<B: Backend> ModelRunner<B> {
    pub fn new(backend: B, model: LlamaModel<B>, cfg: RunnerConfig) -> Result<Self, crate::backend::BackendError> {
        let c = &model.config;
        let spec = KvCacheSpec {
            num_layers: c.num_layers,
            num_blocks: cfg.num_blocks,
            block_size: cfg.block_size,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let kv = backend.alloc_kv(spec)?;
        Ok(Self { backend, model, kv, pool: BlockPool::new(cfg.num_blocks, cfg.block_size) })
    }

    /// Runs `chunks` = (sequence, number of its next uncomputed tokens) as one
    /// step. Returns logits (row-major, one row per entry of the returned index
    /// list) for every chunk that reaches the end of its sequence's tokens.
    /// On error nothing was computed (blocks reserved so far stay with their sequences).
    pub fn step(
        &mut self,
        seqs: &mut [SeqState],
        chunks: &[(usize, usize)],
    ) -> Result<(Vec<usize>, Vec<f32>), StepError> {
        let bs = self.pool.block_size();
        for &(s, n) in chunks {
            let seq = &mut seqs[s];
            let end = seq.num_computed + n;
            if end > self.model.config.max_position {
                return Err(StepError::ContextLimit { max: self.model.config.max_position });
            }
            seq.blocks.reserve(&mut self.pool, end)?;
        }
        let total: usize = chunks.iter().map(|c| c.1).sum();
        let mut token_ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut logits_rows = Vec::new();
        let mut logits_seqs = Vec::new();
        let mut ranges = Vec::with_capacity(chunks.len());
        for &(s, n) in chunks {
            let seq = &seqs[s];
            let start = token_ids.len();
            for p in seq.num_computed..seq.num_computed + n {
                token_ids.push(seq.tokens[p]);
                positions.push(p as u32);
                slots.push(seq.blocks.slot(p, bs).expect("blocks reserved above"));
            }
            ranges.push(start..token_ids.len());
            if seq.num_computed + n == seq.tokens.len() {
                logits_rows.push(token_ids.len() - 1);
                logits_seqs.push(s);
            }
        }
        let input = StepInput {
            token_ids: &token_ids,
            positions: &positions,
            slot_mapping: &slots,
            seqs: chunks
                .iter()
                .zip(&ranges)
                .map(|(&(s, n), r)| SeqAttention {
                    rows: r.clone(),
                    context_len: seqs[s].num_computed + n,
                    block_table: &seqs[s].blocks.blocks,
                })
                .collect(),
            logits_rows: &logits_rows,
        };
        let logits = self.model.forward(&self.backend, &mut self.kv, &input);
        let logits = self.backend.download(&logits);
        for &(s, n) in chunks {
            seqs[s].num_computed += n;
        }
        Ok((logits_seqs, logits))
    }

    /// Returns a finished sequence's blocks to the pool.
    pub fn release(&mut self, seq: &mut SeqState) {
        seq.blocks.release(&mut self.pool);
        seq.num_computed = 0;
    }
}
