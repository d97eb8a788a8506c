//! `tandem bench-train`: training tokens/s of a LoRA adapter on the model
//! (synthetic micro-batches of fixed shape, every token after the first of a
//! sequence trained, unless `--loss-fraction` says fewer), against the same
//! tokens' forward-only prefill: a training token costs a forward, a backward
//! and, for recomputed layers, a second forward.

use std::fmt;
use std::time::Instant;

use crate::backend::{Backend, BackendResult};
use crate::lora::LoraTarget;
use crate::model::{LlamaModel, NoLora};
use crate::train::lora::{LoraSpec, TrainableLora};
use crate::train::memory::{MemoryPlan, DEFAULT_LOGITS_CHUNK_BYTES};
use crate::train::optim::{optimizer_step, OptimConfig};
use crate::train::step::{run_micro_batch, MicroBatch, TrainKv};

pub struct TrainBenchOptions {
    pub batch: usize,
    pub seq_len: usize,
    pub rank: usize,
    pub steps: usize,
    /// Fraction of each sequence's tokens that carry loss (the tail).
    pub loss_fraction: f64,
    pub memory_budget: Option<usize>,
}

pub struct TrainBenchReport {
    pub tokens_per_step: usize,
    pub trained_tokens_per_step: usize,
    /// Median seconds per optimiser step (one micro-batch).
    pub step_s: f64,
    pub prefill_s: f64,
    pub plan: MemoryPlan,
    pub num_layers: usize,
    pub adapter_params: usize,
    pub peak_rss_mib: Option<f64>,
}

impl fmt::Display for TrainBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.tokens_per_step as f64;
        writeln!(f, "| figure | value |")?;
        writeln!(f, "| --- | ---: |")?;
        writeln!(f, "| tokens per step | {} ({} trained) |", self.tokens_per_step, self.trained_tokens_per_step)?;
        writeln!(f, "| adapter parameters | {} |", self.adapter_params)?;
        writeln!(
            f,
            "| layers kept / recomputed | {} / {} |",
            self.plan.saved_layers,
            self.plan.recomputed_layers(self.num_layers)
        )?;
        writeln!(f, "| planned training memory | {:.0} MiB |", self.plan.peak_bytes as f64 / (1 << 20) as f64)?;
        writeln!(f, "| training step (fwd + bwd + AdamW) | {:.2} s |", self.step_s)?;
        writeln!(f, "| training tok/s | {:.1} |", t / self.step_s)?;
        writeln!(f, "| prefill tok/s (same tokens, forward only) | {:.1} |", t / self.prefill_s)?;
        writeln!(f, "| training step / prefill | {:.2}x |", self.step_s / self.prefill_s)?;
        if let Some(rss) = self.peak_rss_mib {
            writeln!(f, "| peak RSS | {rss:.0} MiB |")?;
        }
        Ok(())
    }
}

/// Peak resident set size of this process (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run<B: Backend>(be: &B, model: &LlamaModel<B>, o: &TrainBenchOptions) -> BackendResult<TrainBenchReport> {
    let c = &model.config;
    let vocab = c.vocab_size.min(32000);
    let seqs: Vec<(Vec<u32>, Vec<bool>)> = (0..o.batch)
        .map(|s| {
            let toks = (0..o.seq_len).map(|i| ((i * 7919 + s * 104_729 + 17) % vocab) as u32).collect();
            let first = ((1.0 - o.loss_fraction) * o.seq_len as f64).round() as usize;
            let mask = (0..o.seq_len).map(|i| i >= first.max(1)).collect();
            (toks, mask)
        })
        .collect();
    let mb = MicroBatch::new(seqs.iter().map(|(t, m)| (t.as_slice(), m.as_slice())));
    let spec = LoraSpec {
        rank: o.rank,
        alpha: 2.0 * o.rank as f64,
        use_rslora: false,
        targets: LoraTarget::ALL.to_vec(),
        dropout: 0.0,
    };
    let mut lora = TrainableLora::init(be, c, &spec, 1)?;
    let plan =
        MemoryPlan::new(c, mb.tokens.len(), o.batch, lora.num_params(), o.memory_budget, DEFAULT_LOGITS_CHUNK_BYTES)
            .map_err(crate::backend::BackendError::Invalid)?;
    let optim = OptimConfig::default();
    let mut kv = TrainKv::default();
    let scale = 1.0 / mb.num_targets().max(1) as f32;
    let mut times = Vec::new();
    // One warm-up step (page faults, allocations), then the measured ones.
    for s in 0..o.steps.max(1) + 1 {
        let t = Instant::now();
        run_micro_batch(be, model, &mut lora, &mb, Some(scale), &plan, &mut kv, s as u64)?;
        optimizer_step(be, &mut lora, &optim, s, o.steps + 1)?;
        if s > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let prefill_s = prefill_time(be, model, &mb, &mut kv)?;
    Ok(TrainBenchReport {
        tokens_per_step: mb.tokens.len(),
        trained_tokens_per_step: mb.num_targets(),
        step_s: median(times),
        prefill_s,
        plan,
        num_layers: c.num_layers,
        adapter_params: lora.num_params(),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// The serving forward over the same sequences (logits of each last row), median of 3.
fn prefill_time<B: Backend>(be: &B, model: &LlamaModel<B>, mb: &MicroBatch, kv: &mut TrainKv<B>) -> BackendResult<f64> {
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let logits = kv.prefill(be, model, mb, &mut NoLora)?;
        be.download(&logits)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}
