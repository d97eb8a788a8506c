//! A request as the engine holds it: its tokens (prompt, then generated), how
//! many of them are in the KV cache, the blocks that hold them, and the state
//! its sampler and stop conditions need. Owned by the scheduler.

use crate::kv::{BlockHash, BlockTable};

use super::handle::{EngineRequest, FinishReason, RequestId, StoppingParams};
use super::sampler::Sampler;

pub struct Request {
    pub id: RequestId,
    /// Prompt, then generated tokens (a stop token is never appended).
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub blocks: BlockTable,
    /// Chained prefix-cache hashes of every full block of `tokens`.
    pub block_hashes: Vec<BlockHash>,
    /// Leading blocks of `blocks` already registered in the prefix cache.
    pub num_registered_blocks: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_prompt_tokens: Option<usize>,
    /// The adapter the request runs with, if any.
    pub adapter: Option<std::sync::Arc<crate::lora::LoraAdapter>>,
    /// The adapter slot pinned for it while it runs.
    pub lora_slot: Option<usize>,
    /// Admission passes that skipped it because every slot was pinned.
    pub slot_waits: u32,
    pub sampler: Sampler,
    pub stopping: StoppingParams,
    pub logprobs: Option<usize>,
    pub prompt_logprobs: Option<usize>,
    /// Logprobs of prompt tokens 1.. gathered so far (when `prompt_logprobs`).
    pub prompt_logprobs_got: Vec<super::handle::TokenLogprob>,
    /// Tokens generated, the stop token included (what usage counts).
    pub num_generated: usize,
}

impl Request {
    pub fn new(id: RequestId, req: EngineRequest) -> Self {
        let sampler = Sampler::with_prompt(req.sampling, &req.prompt);
        Self {
            id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            num_computed: 0,
            blocks: BlockTable::default(),
            block_hashes: Vec::new(),
            num_registered_blocks: 0,
            cached_prompt_tokens: None,
            adapter: req.adapter,
            lora_slot: None,
            slot_waits: 0,
            sampler,
            stopping: req.stopping,
            logprobs: req.logprobs,
            prompt_logprobs: req.prompt_logprobs,
            prompt_logprobs_got: Vec::new(),
            num_generated: 0,
        }
    }

    /// The adapter's content version (0 = base model): part of every prefix-cache key.
    pub fn adapter_version(&self) -> u64 {
        self.adapter.as_ref().map_or(0, |a| a.version)
    }

    /// Tokens not yet in the cache (1 for a running decode).
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Token ids the sampler must not pick now (end-of-sequence and stop ids
    /// before `min_tokens`).
    pub fn banned_tokens(&self, eos: &[u32]) -> Vec<u32> {
        if self.num_generated >= self.stopping.min_tokens {
            return Vec::new();
        }
        let mut b = self.stopping.stop_token_ids.clone();
        if !self.stopping.ignore_eos {
            b.extend_from_slice(eos);
        }
        b
    }

    /// Whether `token`, just sampled, ends the request (and how), given the
    /// model's end-of-sequence ids and context length.
    pub fn check_stop(&self, token: u32, eos: &[u32], max_model_len: usize) -> Option<FinishReason> {
        let past_min = self.num_generated >= self.stopping.min_tokens;
        let is_stop =
            self.stopping.stop_token_ids.contains(&token) || (!self.stopping.ignore_eos && eos.contains(&token));
        if is_stop && past_min {
            return Some(FinishReason::Stop);
        }
        if self.num_generated + 1 >= self.stopping.max_tokens || self.tokens.len() + 1 >= max_model_len {
            return Some(FinishReason::Length);
        }
        None
    }
}
