//! Drives a fixed set of prompts to completion: every step runs one decode token
//! for each sequence past its prompt and fills the rest of the token budget with
//! prompt chunks (chunked prefill mixed with decodes in one batch).

use crate::backend::Backend;
use crate::kv::BlockPool;

pub use super::handle::FinishReason;

use super::runner::{ModelRunner, SeqState, StepError};
use super::sampler::{Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the sequence (not included in the output).
    pub stop_ids: Vec<u32>,
}

pub struct Generator<'r, B: Backend> {
    pub runner: &'r mut ModelRunner<B>,
    /// Token budget of one step.
    pub max_batch_tokens: usize,
}

impl<B: Backend> Generator<'_, B> {
    /// Runs all requests to completion; `on_token(request, token)` sees each new token.
    pub fn run(
        &mut self,
        reqs: &[GenerateRequest],
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<GenerateOutput>, StepError> {
        if let Some(index) = reqs.iter().position(|r| r.prompt.is_empty()) {
            return Err(StepError::EmptyPrompt { index });
        }
        let rc = self.runner.config();
        let mut pool = BlockPool::new(rc.num_blocks, rc.block_size);
        let mut seqs: Vec<SeqState> = reqs.iter().map(|r| SeqState::new(r.prompt.clone())).collect();
        let mut samplers: Vec<Sampler> = reqs.iter().map(|r| Sampler::new(r.sampling.clone())).collect();
        let mut out: Vec<Option<GenerateOutput>> = reqs
            .iter()
            .map(|r| (r.max_tokens == 0).then(|| GenerateOutput { tokens: vec![], finish: FinishReason::Length }))
            .collect();
        let result = loop {
            let mut budget = self.max_batch_tokens.max(1);
            let mut chunks = Vec::new();
            // Decodes first: they are one token each and keep latency low.
            for (i, s) in seqs.iter().enumerate() {
                if out[i].is_none() && s.num_computed + 1 == s.tokens.len() && budget > 0 {
                    chunks.push((i, 1));
                    budget -= 1;
                }
            }
            for (i, s) in seqs.iter().enumerate() {
                let left = s.tokens.len() - s.num_computed;
                if out[i].is_none() && left > 1 && budget > 0 {
                    let n = left.min(budget);
                    chunks.push((i, n));
                    budget -= n;
                }
            }
            if chunks.is_empty() {
                break Ok(());
            }
            let (which, logits) = match self.runner.step(&mut pool, &mut seqs, &chunks) {
                Ok(x) => x,
                Err(e) => break Err(e),
            };
            let vocab = self.runner.model.config.vocab_size;
            for (row, &i) in which.iter().enumerate() {
                let tok = samplers[i].sample(&logits[row * vocab..(row + 1) * vocab], &[]);
                let r = &reqs[i];
                // The generated tokens are the sequence past its prompt.
                let generated = |s: &SeqState| s.tokens[r.prompt.len()..].to_vec();
                if r.stop_ids.contains(&tok) {
                    out[i] = Some(GenerateOutput { tokens: generated(&seqs[i]), finish: FinishReason::Stop });
                    continue;
                }
                seqs[i].tokens.push(tok);
                on_token(i, tok);
                if seqs[i].tokens.len() - r.prompt.len() >= r.max_tokens {
                    out[i] = Some(GenerateOutput { tokens: generated(&seqs[i]), finish: FinishReason::Length });
                }
            }
        };
        for s in seqs.iter_mut() {
            s.release(&mut pool);
        }
        result?;
        Ok(out.into_iter().map(|o| o.expect("every sequence finished")).collect())
    }
}
