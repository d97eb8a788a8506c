//! `tandem perplexity`: the perplexity of a model on a text, with
//! llama.cpp's `llama-perplexity` semantics so the two can be compared on the
//! same file: the text's tokens are cut into non-overlapping windows of `ctx`
//! tokens (the first replaced by BOS when the vocabulary adds one), each
//! window is evaluated from scratch, and the tokens of its second half are
//! scored (`−log p(t_{j+1} | t_0..=t_j)` for `j` in `ctx/2 .. ctx−1`).

use std::fmt;

use crate::backend::Backend;
use crate::engine::runner::{ChunkLogits, ModelRunner, RunChunk, SeqState, StepError};

pub struct PerplexityOptions {
    /// Tokens per window.
    pub ctx: usize,
    /// At most this many windows (`None`: every whole window in the text).
    pub chunks: Option<usize>,
    /// Rows of logits computed per step: bounds the logits' memory
    /// (rows × vocabulary × 4 bytes) without changing the result.
    pub logits_rows: usize,
}

pub struct PerplexityReport {
    pub ctx: usize,
    pub tokens_in_text: usize,
    /// The running estimate after each window, as llama-perplexity prints it.
    pub running: Vec<f64>,
    /// Σ −log p over every scored token, and how many were scored.
    pub nll_sum: f64,
    pub scored: usize,
    /// The standard error of the estimate (from the per-token −log p spread).
    pub std_err: f64,
}

impl PerplexityReport {
    pub fn perplexity(&self) -> f64 {
        (self.nll_sum / self.scored as f64).exp()
    }
}

impl fmt::Display for PerplexityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} tokens, {} windows of {}, {} tokens scored",
            self.tokens_in_text,
            self.running.len(),
            self.ctx,
            self.scored
        )?;
        let running: Vec<String> = self.running.iter().enumerate().map(|(i, p)| format!("[{}]{p:.4}", i + 1)).collect();
        writeln!(f, "{}", running.join(","))?;
        writeln!(f, "estimate: {:.4} +/- {:.4}", self.perplexity(), self.std_err)?;
        writeln!(f, "perplexity: {:.4}", self.perplexity())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("--ctx must be at least 4 tokens, got {0}")]
    CtxTooSmall(usize),
    #[error("--ctx {ctx} exceeds the model's context of {max} tokens")]
    CtxTooLarge { ctx: usize, max: usize },
    #[error(
        "the text has {tokens} tokens: at least 2 × ctx = {need} are needed (use a smaller --ctx or a longer text)"
    )]
    TextTooShort { tokens: usize, need: usize },
    #[error(transparent)]
    Step(#[from] StepError),
}

/// The numerically stable `log Σ exp` of a logits row minus the target's logit.
fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

/// Scores `tokens` (the whole text, tokenised) window by window.
pub fn run<B: Backend>(
    runner: &mut ModelRunner<B>,
    tokens: &[u32],
    bos: Option<u32>,
    o: &PerplexityOptions,
) -> Result<PerplexityReport, PerplexityError> {
    let ctx = o.ctx;
    if ctx < 4 {
        return Err(PerplexityError::CtxTooSmall(ctx));
    }
    let max = runner.model.config.max_position;
    if ctx > max {
        return Err(PerplexityError::CtxTooLarge { ctx, max });
    }
    // llama-perplexity's rule: the text must hold at least two windows.
    if tokens.len() < 2 * ctx {
        return Err(PerplexityError::TextTooShort { tokens: tokens.len(), need: 2 * ctx });
    }
    let windows = (tokens.len() / ctx).min(o.chunks.unwrap_or(usize::MAX)).max(1);
    let vocab = runner.model.config.vocab_size;
    let rc = runner.config();
    let mut pool = crate::kv::BlockPool::new(rc.num_blocks, rc.block_size);
    let first = ctx / 2;
    let step_rows = o.logits_rows.max(1);
    let (mut nll_sum, mut nll_sq, mut scored) = (0f64, 0f64, 0usize);
    let mut running = Vec::with_capacity(windows);
    for w in 0..windows {
        let mut window = tokens[w * ctx..(w + 1) * ctx].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        let mut seq = SeqState::new(window);
        seq.blocks.reserve(&mut pool, ctx).map_err(StepError::from)?;
        // The unscored first half in one step, then the scored rows a few at a time.
        let mut spans = vec![(0, first, ChunkLogits::None)];
        spans.extend((first..ctx - 1).step_by(step_rows).map(|s| (s, step_rows.min(ctx - 1 - s), ChunkLogits::All)));
        let result = (|| -> Result<(), StepError> {
            for &(start, len, logits) in &spans {
                let chunk =
                    RunChunk { tokens: &seq.tokens, start, len, blocks: &seq.blocks.blocks, logits, lora_slot: None };
                let out = runner.execute(&[chunk])?;
                if logits == ChunkLogits::All {
                    for (i, row) in out.chunks_exact(vocab).enumerate() {
                        let v = nll(row, seq.tokens[start + i + 1]);
                        nll_sum += v;
                        nll_sq += v * v;
                        scored += 1;
                    }
                }
            }
            Ok(())
        })();
        seq.release(&mut pool);
        result?;
        running.push((nll_sum / scored as f64).exp());
    }
    // As llama-perplexity: the error of the mean −log p, carried through exp.
    let mean = nll_sum / scored as f64;
    let var = (nll_sq / scored as f64 - mean * mean).max(0.0);
    let std_err = if scored > 1 { mean.exp() * (var / (scored - 1) as f64).sqrt() } else { 0.0 };
    Ok(PerplexityReport { ctx, tokens_in_text: tokens.len(), running, nll_sum, scored, std_err })
}

#[cfg(test)]
mod tests {
    use super::nll;

    #[test]
    fn nll_is_the_negative_log_softmax() {
        let row = [1.0f32, 2.0, 3.0, 1000.0];
        let want = -(2f64.exp() / [1f64, 2.0, 3.0].iter().map(|v| v.exp()).sum::<f64>()).ln();
        let small = [1.0f32, 2.0, 3.0];
        assert!((nll(&small, 1) - want).abs() < 1e-12);
        // Large logits do not overflow.
        assert!(nll(&row, 3).abs() < 1e-12);
        assert!((nll(&row, 0) - 999.0).abs() < 1e-9);
    }
}
