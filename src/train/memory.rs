//! What a training run will hold in memory, decided before the first step:
//! the adapter's state, one residual checkpoint per layer, the backward's
//! scratch, a chunk of logits, the training KV cache, and as many layers' saved
//! activations as the budget allows; the other layers are recomputed from
//! their checkpoint during the backward (gradient checkpointing).
//!
//! The model's weights are not counted: they are resident for serving anyway.

use crate::model::{
    derived_activations_bytes, layer_activations_bytes, layer_grads_bytes, layer_saved_bytes, ModelConfig,
};

use super::step::train_kv_bytes;

/// Bytes of logits computed at once (rows × vocabulary × 4).
pub const DEFAULT_LOGITS_CHUNK_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Layers (the last ones) whose activations the forward keeps.
    pub saved_layers: usize,
    /// Rows of logits computed at once.
    pub head_rows: usize,
    /// Bytes the plan expects at its peak (everything but the model weights).
    pub peak_bytes: usize,
    /// What the plan needs whatever it saves.
    pub fixed_bytes: usize,
    /// One layer's saved activations.
    pub layer_bytes: usize,
}

impl MemoryPlan {
    /// Whether layer `i` of `n` keeps its activations.
    pub fn keeps(&self, i: usize, n: usize) -> bool {
        i + self.saved_layers >= n
    }

    /// A plan for micro-batches of at most `tokens` tokens in `seqs` sequences
    /// and an adapter of `adapter_params` values, within `budget` bytes
    /// (`None`: keep every layer). Errors when even the minimum does not fit.
    pub fn new(
        cfg: &ModelConfig,
        tokens: usize,
        seqs: usize,
        adapter_params: usize,
        budget: Option<usize>,
        logits_chunk_bytes: usize,
    ) -> Result<Self, String> {
        let n = cfg.num_layers;
        let head_rows = (logits_chunk_bytes / (4 * cfg.vocab_size)).clamp(1, tokens.max(1));
        let h = cfg.hidden_size;
        // Value, gradient and two moments per trained value.
        let adapter = 16 * adapter_params;
        let checkpoints = n * 4 * tokens * h;
        // The residual stream, its gradient, the head's chunk (logits, normed rows).
        let stream = 2 * 4 * tokens * h + head_rows * 4 * (cfg.vocab_size + 3 * h);
        // LoRA temporaries: a dropped-out input and its gradient at the widest projection.
        let lora_tmp = 2 * 4 * tokens * h.max(cfg.intermediate_size);
        let fixed = adapter
            + checkpoints
            + stream
            + lora_tmp
            + layer_grads_bytes(cfg, tokens)
            + train_kv_bytes(cfg, tokens, seqs);
        // A kept layer holds its saved activations; all kept layers share one
        // derived set, and recomputed layers one full set.
        let layer = layer_saved_bytes(cfg, tokens);
        let derived = derived_activations_bytes(cfg, tokens);
        let full = layer_activations_bytes(cfg, tokens);
        let need =
            |kept: usize| fixed + kept * layer + if kept > 0 { derived } else { 0 } + if kept < n { full } else { 0 };
        let saved_layers = match budget {
            None => n,
            Some(b) => {
                if b < need(0) {
                    return Err(format!(
                        "a micro-batch of {tokens} tokens needs at least {} MiB for training (adapter state, \
                         per-layer checkpoints, backward scratch); the memory budget is {} MiB: lower the \
                         batch size or max_seq_len, or raise the budget",
                        need(0).div_ceil(1 << 20),
                        b >> 20
                    ));
                }
                (0..=n).rev().find(|&k| need(k) <= b).unwrap_or(0)
            }
        };
        Ok(Self { saved_layers, head_rows, peak_bytes: need(saved_layers), fixed_bytes: fixed, layer_bytes: layer })
    }

    /// Layers recomputed in the backward.
    pub fn recomputed_layers(&self, n: usize) -> usize {
        n - self.saved_layers.min(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Arch, RopeScaling};

    fn qwen05() -> ModelConfig {
        ModelConfig {
            arch: Arch::Qwen2,
            vocab_size: 151_936,
            hidden_size: 896,
            intermediate_size: 4864,
            num_layers: 24,
            num_heads: 14,
            num_kv_heads: 2,
            head_dim: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            rope_scaling: RopeScaling::None,
            max_position: 32768,
            tie_word_embeddings: true,
            qkv_bias: true,
            sliding_window: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn the_budget_decides_how_many_layers_are_kept() {
        let c = qwen05();
        let all = MemoryPlan::new(&c, 1024, 4, 4_400_000, None, DEFAULT_LOGITS_CHUNK_BYTES).unwrap();
        assert_eq!(all.saved_layers, 24);
        assert_eq!(all.recomputed_layers(24), 0);
        let mid = MemoryPlan::new(&c, 1024, 4, 4_400_000, Some(1 << 30), DEFAULT_LOGITS_CHUNK_BYTES).unwrap();
        assert!(mid.saved_layers > 0 && mid.saved_layers < 24, "{mid:?}");
        assert!(mid.peak_bytes <= 1 << 30, "{mid:?}");
        assert!(mid.keeps(23, 24) && !mid.keeps(0, 24));
        // The head's logits chunk stays near its byte budget.
        assert!(mid.head_rows * c.vocab_size * 4 <= DEFAULT_LOGITS_CHUNK_BYTES);
        let err = MemoryPlan::new(&c, 1024, 4, 4_400_000, Some(100 << 20), DEFAULT_LOGITS_CHUNK_BYTES).unwrap_err();
        assert!(err.contains("needs at least") && err.contains("100 MiB"), "{err}");
    }
}
