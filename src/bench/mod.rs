//! `tandem bench`: prefill tok/s for one long prompt and decode tok/s at several
//! numbers of concurrent sequences, each the median of a few repetitions.

pub mod lora;
pub mod perplexity;
pub mod train;

use std::fmt;
use std::time::Instant;

use crate::backend::Backend;
use crate::engine::runner::{ModelRunner, SeqState, StepError};

pub struct BenchOptions {
    pub prompt_len: usize,
    pub decode_steps: usize,
    pub batches: Vec<usize>,
    pub reps: usize,
}

pub struct BenchReport {
    pub prefill_tok_s: f64,
    pub prompt_len: usize,
    /// (concurrent sequences, decode tok/s summed over sequences, ms per step)
    pub decode: Vec<(usize, f64, f64)>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| test | tok/s |")?;
        writeln!(f, "| --- | ---: |")?;
        writeln!(f, "| prefill pp{} | {:.1} |", self.prompt_len, self.prefill_tok_s)?;
        for (b, tps, ms) in &self.decode {
            writeln!(f, "| decode batch {b} | {tps:.1} ({ms:.1} ms/step) |")?;
        }
        Ok(())
    }
}

/// The middle value; the mean of the two middle ones for an even count.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// Deterministic pseudo-random prompt tokens (bench content does not matter).
fn prompt(len: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + seed * 104729 + 17) % vocab.min(32000)) as u32).collect()
}

pub fn run<B: Backend>(runner: &mut ModelRunner<B>, o: &BenchOptions) -> Result<BenchReport, StepError> {
    let vocab = runner.model.config.vocab_size;
    let rc = runner.config();
    let mut pool = crate::kv::BlockPool::new(rc.num_blocks, rc.block_size);
    let reps = o.reps.max(1);
    let mut pre = Vec::new();
    for r in 0..reps + 1 {
        let mut seqs = vec![SeqState::new(prompt(o.prompt_len, r, vocab))];
        let t = Instant::now();
        runner.step(&mut pool, &mut seqs, &[(0, o.prompt_len)])?;
        let dt = t.elapsed().as_secs_f64();
        seqs[0].release(&mut pool);
        if r > 0 {
            // The first run warms caches and page-faults the weights in.
            pre.push(o.prompt_len as f64 / dt);
        }
    }
    let mut decode = Vec::new();
    for &b in &o.batches {
        let mut runs = Vec::new();
        for r in 0..reps {
            let mut seqs: Vec<SeqState> = (0..b).map(|i| SeqState::new(prompt(32, i + r * 1000, vocab))).collect();
            let chunks: Vec<(usize, usize)> = (0..b).map(|i| (i, 32)).collect();
            runner.step(&mut pool, &mut seqs, &chunks)?;
            let one: Vec<(usize, usize)> = (0..b).map(|i| (i, 1)).collect();
            let t = Instant::now();
            for s in 0..o.decode_steps {
                for (i, seq) in seqs.iter_mut().enumerate() {
                    seq.tokens.push(((s * 31 + i) % vocab) as u32);
                }
                runner.step(&mut pool, &mut seqs, &one)?;
            }
            let dt = t.elapsed().as_secs_f64();
            for s in seqs.iter_mut() {
                s.release(&mut pool);
            }
            runs.push(dt);
        }
        let dt = median(runs);
        decode.push((b, (b * o.decode_steps) as f64 / dt, dt * 1000.0 / o.decode_steps as f64));
    }
    Ok(BenchReport { prefill_tok_s: median(pre), prompt_len: o.prompt_len, decode })
}
