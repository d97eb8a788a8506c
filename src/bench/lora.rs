//! `tandem bench-lora`: serving throughput with many LoRA adapters against the
//! base model alone, in one process and one run, plus the latency from reading
//! a new adapter off disk to its first token.
//!
//! Each configuration submits `max(concurrency, adapters)` requests (request i
//! runs adapter i mod `adapters`), and the same number without adapters, to an engine core
//! whose running batch holds at most `concurrency` sequences, and steps it to
//! completion: output tok/s = generated tokens / wall time, prefill included,
//! as a server would see it; base-only and adapter runs alternate `reps` times
//! and the ratio is the median of the pairs. Adapters have random weights on all seven
//! projections and live in memory (host cache); more adapters than
//! `max_loras` slots means the scheduler cycles them through the slots.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use super::{median, prompt};
use crate::backend::Backend;
use crate::engine::{EngineConfig, EngineCore, EngineRequest, SamplingParams, StoppingParams};
use crate::loader::safetensors::{serialize, StDtype};
use crate::lora::{LoraAdapter, LoraDtype, LoraMatrix, LoraOptions, LoraTarget, LoraValues};
use crate::model::{LlamaModel, ModelConfig};

pub struct LoraBenchOptions {
    pub concurrency: Vec<usize>,
    pub adapters: Vec<usize>,
    pub ranks: Vec<usize>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub max_loras: usize,
    pub dtype: LoraDtype,
    /// Interleaved (base, adapters) pairs per configuration.
    pub reps: usize,
}

pub struct LoraBenchRow {
    pub concurrency: usize,
    pub adapters: usize,
    pub rank: usize,
    pub requests: usize,
    /// Base only, the same requests without adapters (median).
    pub base_tok_s: f64,
    /// With the adapters (median).
    pub tok_s: f64,
    /// Median over repetitions of (with adapters / base only), runs interleaved.
    pub vs_base: f64,
}

pub struct ColdLoad {
    pub rank: usize,
    /// Reading and checking the PEFT directory.
    pub parse_ms: f64,
    /// From the start of the read to the first token of a request using it.
    pub first_token_ms: f64,
    /// The same request on the base model.
    pub base_first_token_ms: f64,
}

pub struct LoraBenchReport {
    pub rows: Vec<LoraBenchRow>,
    pub cold: Vec<ColdLoad>,
}

impl fmt::Display for LoraBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| concurrency | distinct adapters | rank | requests | base only tok/s | with adapters tok/s | ratio |"
        )?;
        writeln!(f, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.2}x |",
                r.concurrency, r.adapters, r.rank, r.requests, r.base_tok_s, r.tok_s, r.vs_base
            )?;
        }
        if !self.cold.is_empty() {
            writeln!(f, "\n| cold adapter (rank) | parse ms | read -> first token ms | base first token ms |")?;
            writeln!(f, "| ---: | ---: | ---: | ---: |")?;
            for c in &self.cold {
                writeln!(
                    f,
                    "| {} | {:.1} | {:.1} | {:.1} |",
                    c.rank, c.parse_ms, c.first_token_ms, c.base_first_token_ms
                )?;
            }
        }
        Ok(())
    }
}

/// An adapter of `rank` on every projection of every layer, random weights.
pub fn random_adapter(cfg: &ModelConfig, rank: usize, seed: u64, dtype: LoraDtype) -> LoraAdapter {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let layers = (0..cfg.num_layers)
        .map(|_| {
            LoraTarget::ALL.map(|t| {
                let (inf, outf) = t.shape(cfg);
                let mut v = |n: usize, s: f32| (0..n).map(|_| rng.gen_range(-s..s)).collect::<Vec<f32>>();
                let a = v(rank * inf, 0.05);
                let bt = v(rank * outf, 0.05);
                Some(Arc::new(LoraMatrix {
                    rank,
                    in_features: inf,
                    out_features: outf,
                    a: LoraValues::from_f32(a, dtype),
                    bt: LoraValues::from_f32(bt, dtype),
                }))
            })
        })
        .collect();
    LoraAdapter::new(format!("random-{seed}"), "memory".into(), layers, None)
}

/// Writes `a` as a PEFT directory (config + f32 safetensors; the scaling is 1).
pub fn write_peft_dir(a: &LoraAdapter, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // (name, shape, data) per tensor, then one file.
    let mut tensors: Vec<(String, [usize; 2], Vec<u8>)> = Vec::new();
    for (l, targets) in a.layers.iter().enumerate() {
        for (t, m) in LoraTarget::ALL.iter().zip(targets) {
            let Some(m) = m else { continue };
            let key = format!("base_model.model.model.layers.{l}.{}.{}", t.parent(), t.module());
            tensors.push((format!("{key}.lora_A.weight"), [m.rank, m.in_features], f32_bytes(&m.a.to_f32())));
            // B = btᵀ, [out, r].
            let (r, n) = (m.rank, m.out_features);
            let bt = m.bt.to_f32();
            let b: Vec<f32> = (0..n * r).map(|i| bt[(i % r) * n + i / r]).collect();
            tensors.push((format!("{key}.lora_B.weight"), [n, r], f32_bytes(&b)));
        }
    }
    let views: Vec<(&str, StDtype, &[usize], &[u8])> =
        tensors.iter().map(|(name, shape, data)| (name.as_str(), StDtype::F32, &shape[..], &data[..])).collect();
    let file = serialize(&views);
    std::fs::write(dir.join("adapter_model.safetensors"), file)?;
    let config = serde_json::json!({
        "peft_type": "LORA", "r": a.max_rank, "lora_alpha": a.max_rank,
        "target_modules": LoraTarget::ALL.map(|t| t.module()),
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(&config)?)
}

fn request(
    o: &LoraBenchOptions,
    i: usize,
    vocab: usize,
    adapter: Option<Arc<LoraAdapter>>,
    max_tokens: usize,
) -> EngineRequest {
    EngineRequest {
        prompt: prompt(o.prompt_len, i, vocab),
        sampling: SamplingParams::default(),
        stopping: StoppingParams { max_tokens, min_tokens: 0, stop_token_ids: vec![], ignore_eos: true },
        logprobs: None,
        prompt_logprobs: None,
        adapter,
    }
}

/// Runs every configuration on one engine (rebuilt per configuration from the
/// same loaded model would need a reload, so one core serves them all, its
/// prefix cache emptied between runs by distinct prompts).
pub fn run<B: Backend>(
    backend: B,
    model: LlamaModel<B>,
    base_cfg: &EngineConfig,
    o: &LoraBenchOptions,
    scratch: &Path,
) -> Result<LoraBenchReport, crate::backend::BackendError> {
    let mc = model.config.clone();
    let vocab = mc.vocab_size;
    let max_c = o.concurrency.iter().copied().max().unwrap_or(1);
    let cfg = EngineConfig { max_num_seqs: max_c, max_loras: o.max_loras, ..base_cfg.clone() };
    let mut core = EngineCore::new(backend, model, &cfg)?;
    let max_adapters = o.adapters.iter().copied().max().unwrap_or(0);
    let mut seed = 0usize;
    let mut rows = Vec::new();
    for &rank in &o.ranks {
        eprintln!("bench-lora: making {max_adapters} random rank-{rank} adapters");
        let pool: Vec<Arc<LoraAdapter>> =
            (0..max_adapters).map(|i| Arc::new(random_adapter(&mc, rank, (rank * 1000 + i) as u64, o.dtype))).collect();
        for &c in &o.concurrency {
            core.set_max_num_seqs(c);
            for &n in o.adapters.iter().filter(|&&n| n > 0) {
                let requests = c.max(n);
                let mut run_one = |adapters: usize| -> f64 {
                    let reqs: Vec<EngineRequest> = (0..requests)
                        .map(|i| {
                            seed += 1;
                            let a = (adapters > 0).then(|| pool[i % adapters].clone());
                            request(o, seed, vocab, a, o.max_tokens)
                        })
                        .collect();
                    let t = Instant::now();
                    let out = core.generate(reqs);
                    let toks: usize = out.iter().map(|(t, _)| t.len()).sum();
                    toks as f64 / t.elapsed().as_secs_f64()
                };
                // Base-only and with-adapters runs interleaved, so drift on a
                // noisy machine hits both alike; the ratio is the median of pairs.
                let (mut base, mut lora, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
                for rep in 0..o.reps.max(1) {
                    let b = run_one(0);
                    let l = run_one(n);
                    eprintln!(
                        "bench-lora: concurrency {c}, {n} adapters of rank {rank}, {requests} requests, rep {rep}: \
                         base {b:.1} tok/s, adapters {l:.1} tok/s"
                    );
                    base.push(b);
                    lora.push(l);
                    ratio.push(l / b);
                }
                rows.push(LoraBenchRow {
                    concurrency: c,
                    adapters: n,
                    rank,
                    requests,
                    base_tok_s: median(base),
                    tok_s: median(lora),
                    vs_base: median(ratio),
                });
            }
        }
    }
    // Cold load: a new adapter read from disk, then one request's first token.
    let mut cold = Vec::new();
    core.set_max_num_seqs(max_c);
    for &rank in &o.ranks {
        let (mut parse, mut first, mut base_first) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..3 {
            let dir = scratch.join(format!("cold-r{rank}-{rep}"));
            write_peft_dir(&random_adapter(&mc, rank, 900_000 + (rank * 10 + rep) as u64, LoraDtype::F32), &dir)
                .map_err(|e| crate::backend::BackendError::Invalid(format!("writing {}: {e}", dir.display())))?;
            seed += 1;
            let t = Instant::now();
            core.generate(vec![request(o, seed, vocab, None, 1)]);
            base_first.push(t.elapsed().as_secs_f64() * 1e3);
            seed += 1;
            let t = Instant::now();
            let a =
                crate::lora::load_peft_dir("cold", &dir, &mc, LoraOptions { max_rank: rank.max(1), dtype: o.dtype })
                    .map_err(|e| crate::backend::BackendError::Invalid(e.to_string()))?;
            parse.push(t.elapsed().as_secs_f64() * 1e3);
            core.generate(vec![request(o, seed, vocab, Some(Arc::new(a)), 1)]);
            first.push(t.elapsed().as_secs_f64() * 1e3);
            let _ = std::fs::remove_dir_all(&dir);
        }
        cold.push(ColdLoad {
            rank,
            parse_ms: median(parse),
            first_token_ms: median(first),
            base_first_token_ms: median(base_first),
        });
    }
    Ok(LoraBenchReport { rows, cold })
}
