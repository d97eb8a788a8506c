//! The model runner: owns the backend, the model and the KV tensors, and runs
//! one flattened varlen step for a set of sequence chunks. Which blocks a
//! sequence holds is decided by whoever drives it (the scheduler's KV-cache
//! manager when serving).

use crate::backend::{Backend, KvCacheSpec, SeqAttention};
use crate::kv::{BlockId, BlockPool, BlockPoolError, BlockTable};
use crate::lora::LoraAdapter;
use crate::model::{DeviceAdapter, LlamaModel, LoraStep, StepInput};

#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache (one is the reserved null block).
    pub num_blocks: usize,
    /// LoRA adapter slots.
    pub max_loras: usize,
    pub kv_dtype: crate::backend::KvDtype,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self { block_size: 16, num_blocks: 4096, max_loras: 0, kv_dtype: crate::backend::KvDtype::F32 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Blocks(#[from] BlockPoolError),
    #[error("sequence would exceed the model's context of {max} tokens")]
    ContextLimit { max: usize },
    #[error("sequence {index} is empty: there is nothing to compute logits from")]
    EmptyPrompt { index: usize },
    #[error("the step failed on the device")]
    Backend(#[from] crate::backend::BackendError),
}

/// One sequence as the runner sees it: its tokens and how many are in the cache.
#[derive(Debug, Default, Clone)]
pub struct SeqState {
    pub tokens: Vec<u32>,
    /// Tokens whose K/V are already in the cache.
    pub num_computed: usize,
    pub blocks: BlockTable,
    /// Adapter slot (loaded with `ModelRunner::load_adapter`), if any.
    pub lora_slot: Option<usize>,
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
    cfg: RunnerConfig,
    /// Mirrors the scheduler's `SlotTable`: what it says to load, when.
    lora_slots: Vec<Option<DeviceAdapter<B>>>,
}

/// One sequence's share of a step: run `tokens[start..start + len]` at positions
/// `start..`, its K/V written into `blocks` (which already hold everything before
/// `start` and have room for the chunk).
#[derive(Debug, Clone, Copy)]
pub struct RunChunk<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub len: usize,
    pub blocks: &'a [BlockId],
    pub logits: ChunkLogits,
    /// The adapter slot the chunk runs with (`None`: the base model).
    pub lora_slot: Option<usize>,
}

/// Which of a chunk's rows return logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkLogits {
    None,
    /// The last row (to sample the next token).
    Last,
    /// Every row (prompt logprobs).
    All,
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
            dtype: cfg.kv_dtype,
        };
        let kv = backend.alloc_kv(spec)?;
        let lora_slots = (0..cfg.max_loras).map(|_| None).collect();
        Ok(Self { backend, model, kv, cfg, lora_slots })
    }

    /// Puts `adapter` into `slot` (replacing whatever was there).
    pub fn load_adapter(&mut self, slot: usize, adapter: &LoraAdapter) -> Result<(), crate::backend::BackendError> {
        let place = self.lora_slots.get_mut(slot).ok_or_else(|| {
            crate::backend::BackendError::Invalid(format!(
                "adapter slot {slot} does not exist (max_loras {})",
                self.cfg.max_loras
            ))
        })?;
        // Whatever was there is stale either way.
        *place = None;
        *place = Some(DeviceAdapter::load(&self.backend, adapter, &self.model.config)?);
        Ok(())
    }

    pub fn config(&self) -> RunnerConfig {
        self.cfg
    }

    /// Runs every chunk as one flattened varlen step. Returns logits, row-major,
    /// for the rows each chunk's `logits` asks for, in chunk and row order.
    /// On error the step's K/V writes may be partial: the caller fails the
    /// step's sequences.
    pub fn execute(&mut self, chunks: &[RunChunk<'_>]) -> Result<Vec<f32>, crate::backend::BackendError> {
        let bs = self.cfg.block_size;
        let total: usize = chunks.iter().map(|c| c.len).sum();
        let mut token_ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut logits_rows = Vec::new();
        let mut seqs = Vec::with_capacity(chunks.len());
        let mut lora_segments: Vec<(std::ops::Range<usize>, usize)> = Vec::new();
        for c in chunks {
            let start = token_ids.len();
            if let Some(slot) = c.lora_slot {
                match lora_segments.last_mut() {
                    Some((rows, s)) if *s == slot && rows.end == start => rows.end = start + c.len,
                    _ => lora_segments.push((start..start + c.len, slot)),
                }
            }
            for p in c.start..c.start + c.len {
                token_ids.push(c.tokens[p]);
                positions.push(p as u32);
                slots.push(crate::kv::slot(c.blocks, p, bs).expect("the caller reserved blocks for the chunk"));
            }
            match c.logits {
                ChunkLogits::None => {}
                ChunkLogits::Last => logits_rows.push(token_ids.len() - 1),
                ChunkLogits::All => logits_rows.extend(start..token_ids.len()),
            }
            seqs.push(SeqAttention {
                rows: start..token_ids.len(),
                context_len: c.start + c.len,
                block_table: c.blocks,
            });
        }
        let input = StepInput {
            token_ids: &token_ids,
            positions: &positions,
            slot_mapping: &slots,
            seqs,
            logits_rows: &logits_rows,
        };
        let mut lora = LoraStep { segments: &lora_segments, slots: &self.lora_slots };
        let logits = self.model.forward(&self.backend, &mut self.kv, &input, &mut lora)?;
        self.backend.download(&logits)
    }

    /// For benches and tests that drive the runner directly: reserves blocks in
    /// `pool` for `chunks` = (sequence, number of its next uncomputed tokens),
    /// runs them, and returns the logits of every chunk that reaches the end of
    /// its sequence's tokens (with the sequence indices, in order).
    /// On error nothing was computed.
    pub fn step(
        &mut self,
        pool: &mut BlockPool,
        seqs: &mut [SeqState],
        chunks: &[(usize, usize)],
    ) -> Result<(Vec<usize>, Vec<f32>), StepError> {
        for &(s, n) in chunks {
            let seq = &mut seqs[s];
            let end = seq.num_computed + n;
            if end > self.model.config.max_position {
                return Err(StepError::ContextLimit { max: self.model.config.max_position });
            }
            if seq.tokens.is_empty() {
                return Err(StepError::EmptyPrompt { index: s });
            }
            seq.blocks.reserve(pool, end)?;
        }
        let run: Vec<RunChunk> = chunks
            .iter()
            .map(|&(s, n)| {
                let q = &seqs[s];
                RunChunk {
                    tokens: &q.tokens,
                    start: q.num_computed,
                    len: n,
                    blocks: &q.blocks.blocks,
                    logits: if q.num_computed + n == q.tokens.len() { ChunkLogits::Last } else { ChunkLogits::None },
                    lora_slot: q.lora_slot,
                }
            })
            .collect();
        let which =
            chunks.iter().filter(|&&(s, n)| seqs[s].num_computed + n == seqs[s].tokens.len()).map(|c| c.0).collect();
        let logits = self.execute(&run)?;
        for &(s, n) in chunks {
            seqs[s].num_computed += n;
        }
        Ok((which, logits))
    }
}

impl SeqState {
    /// Returns the sequence's blocks to `pool`.
    pub fn release(&mut self, pool: &mut BlockPool) {
        self.blocks.release(pool);
        self.num_computed = 0;
    }
}
