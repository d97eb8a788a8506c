//! `tandem train`: a LoRA adapter trained on the serving backend from a JSONL
//! file, with a progress bar, into a directory peft loads and tandem serves.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tandem::model::load_model_quantized;

use tandem::backend::Backend;
use tandem::config::Config;
use tandem::engine::device::OpenBackend;
use tandem::lora::LoraTarget;
use tandem::train::batch::Batching;
use tandem::train::data::{load_jsonl, DataOptions, Overflow};
use tandem::train::lora::{LoraSpec, TrainableLora};
use tandem::train::optim::{OptimConfig, Schedule};
use tandem::train::run::{self, FileRecord, Lineage, RunEvent};
use tandem::train::trainer::{total_steps, TrainConfig, Trainer};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The base model: a .gguf file, an HF directory or a hub id (default: the config's model.path).
    #[arg(long)]
    model: Option<String>,
    /// Training data, JSONL: OpenAI chat ({"messages": [...]}), prompt/completion, or Alpaca.
    #[arg(long)]
    data: PathBuf,
    /// Validation data (same formats): loss, token accuracy and perplexity per evaluation.
    #[arg(long)]
    validation: Option<PathBuf>,
    /// Output directory: the adapter, metrics.jsonl, loss.png, training_metadata.json, checkpoints/.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run saved in this checkpoint directory (same data and settings).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start from this PEFT adapter instead of a fresh one (its rank, alpha and targets).
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (default: 2 × rank).
    #[arg(long)]
    alpha: Option<f64>,
    /// Scale by alpha/√r instead of alpha/r.
    #[arg(long)]
    rslora: bool,
    /// Projections to adapt.
    #[arg(long, value_delimiter = ',', default_values_t = ["q", "k", "v", "o", "gate", "up", "down"].map(String::from))]
    targets: Vec<String>,
    /// Dropout on the input of LoRA A.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// linear, cosine or constant (after the warmup).
    #[arg(long, default_value = "linear")]
    schedule: Schedule,
    /// Warmup: a number of steps, or a fraction of all steps when below 1.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Fill micro-batches up to this many tokens instead of --batch-size examples.
    #[arg(long)]
    pack_tokens: Option<usize>,
    /// Group examples of similar length into micro-batches (less work on short ones).
    #[arg(long)]
    group_by_length: bool,
    /// Longest example in tokens.
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// Refuse (instead of truncating) examples longer than --max-seq-len.
    #[arg(long)]
    refuse_long: bool,
    /// Fixes the adapter's initialisation, the example order and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate every this many steps (default: at the end of each epoch).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Write a resumable checkpoint every this many steps.
    #[arg(long)]
    save_every: Option<usize>,
    /// Stop after this many optimiser steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Stop when the validation loss has not improved for this many evaluations
    /// (and publish the best evaluation's weights).
    #[arg(long)]
    early_stopping_patience: Option<usize>,
    /// Memory training may use besides the model, in MiB (default: the config's train.memory_budget_mib).
    #[arg(long)]
    memory_budget_mib: Option<usize>,
}

fn targets(names: &[String]) -> Result<Vec<LoraTarget>> {
    let mut out = Vec::new();
    for n in names {
        let short = n.trim().trim_end_matches("_proj");
        let t = LoraTarget::ALL
            .into_iter()
            .find(|t| t.module().trim_end_matches("_proj") == short)
            .with_context(|| format!("unknown target {n:?}: expected q, k, v, o, gate, up or down"))?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out.sort();
    Ok(out)
}

pub fn run<B: OpenBackend>(args: TrainArgs, mut cfg: Config) -> Result<()> {
    let spec = args.model.clone().unwrap_or_else(|| cfg.model.path.clone());
    cfg.model.path = spec.clone();
    let be = B::open(&cfg)?;
    // `--quantize` here is QLoRA: the adapter trains on the quantised base.
    let loaded = load_model_quantized(&be, &spec, cfg.model.quantize).with_context(|| format!("loading {spec}"))?;
    let tok = loaded.tokenizer.as_ref().context("this model has no tokenizer; training data needs one")?;
    let model = &loaded.model;
    let mut opts = DataOptions::new(args.max_seq_len);
    if args.refuse_long {
        opts.overflow = Overflow::Refuse;
    }
    let train = load_jsonl(&args.data, tok, &opts).with_context(|| format!("{}", args.data.display()))?;
    let valid = match &args.validation {
        Some(p) => Some(load_jsonl(p, tok, &opts).with_context(|| format!("{}", p.display()))?),
        None => None,
    };
    let batching = match (args.pack_tokens, args.group_by_length) {
        (Some(_), true) => bail!("--pack-tokens and --group-by-length are alternatives"),
        (Some(max_tokens), false) => Batching::Packed { max_tokens },
        (None, true) => Batching::LengthGrouped { batch_size: args.batch_size },
        (None, false) => Batching::Sequential { batch_size: args.batch_size },
    };
    let lora_spec = LoraSpec {
        rank: args.rank,
        alpha: args.alpha.unwrap_or(2.0 * args.rank as f64),
        use_rslora: args.rslora,
        targets: targets(&args.targets)?,
        dropout: args.dropout,
    };
    let mut tc = TrainConfig {
        lora: lora_spec,
        optim: OptimConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            max_grad_norm: args.max_grad_norm,
            schedule: args.schedule,
            warmup_steps: 0,
            ..OptimConfig::default()
        },
        epochs: args.epochs,
        batching,
        grad_accum: args.grad_accum,
        max_steps: args.max_steps,
        seed: args.seed,
        eval_every: args.eval_every,
        save_every: args.save_every,
        early_stopping_patience: args.early_stopping_patience,
        memory_budget: match args.memory_budget_mib.unwrap_or(cfg.train.memory_budget_mib) {
            0 => None,
            m => Some(m << 20),
        },
        logits_chunk_bytes: cfg.train.logits_chunk_mib.max(1) << 20,
    };
    let lora = match &args.init_adapter {
        Some(dir) => {
            let l = TrainableLora::from_peft_dir(&be, &model.config, dir, args.dropout)?;
            tc.lora = l.spec.clone();
            l
        }
        None => TrainableLora::init(&be, &model.config, &tc.lora, tc.seed)?,
    };
    tc.optim.warmup_steps = warmup_steps(args.warmup, total_steps(&tc, &train.lengths()))?;
    let mut trainer = match &args.resume {
        Some(dir) => Trainer::resume(&be, model, tc, train, valid, dir)?,
        None => Trainer::new(model, tc, train, valid, lora)?,
    };
    let lineage = Lineage {
        base_model: spec.clone(),
        base_files: tandem::train::run::base_files(&spec)?,
        train_file: Some(FileRecord::of(&args.data)?),
        validation_file: args.validation.as_deref().map(FileRecord::of).transpose()?,
        init_adapter: args.init_adapter.as_ref().map(|p| p.display().to_string()),
        device: be.name(),
        job: None,
    };
    describe(&trainer, &be);
    let bar = ProgressBar::new(trainer.total_steps() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
            .expect("a valid template"),
    );
    bar.set_position(trainer.state().step as u64);
    // Without a terminal (logs, CI) the bar is hidden: print a line per step instead.
    let lines = bar.is_hidden();
    let say = |line: String| if lines { eprintln!("{line}") } else { bar.println(line) };
    let summary = run::run(&be, model, &mut trainer, &args.out, &lineage, |ev| match ev {
        RunEvent::Eval(e) => {
            let line = format!(
                "step 0: validation loss {:.4}, token accuracy {:.3}, perplexity {:.2}",
                e.loss, e.token_accuracy, e.perplexity
            );
            say(line);
        }
        RunEvent::Step(r) => {
            let tok_s = r.tokens as f64 / r.seconds.max(1e-9);
            let mut msg = format!(
                "epoch {:.2} loss {:.4} acc {:.3} lr {:.2e} {tok_s:.1} tok/s",
                r.epoch, r.loss, r.token_accuracy, r.lr
            );
            if lines {
                eprintln!("step {}/{}: {msg}", r.step, r.total_steps);
            }
            if let Some(e) = &r.eval {
                msg.push_str(&format!(" | val loss {:.4} ppl {:.2}", e.loss, e.perplexity));
                let line = format!(
                    "step {}: validation loss {:.4}, token accuracy {:.3}, perplexity {:.2}{}",
                    r.step,
                    e.loss,
                    e.token_accuracy,
                    e.perplexity,
                    if r.best { " (best)" } else { "" }
                );
                say(line);
            }
            bar.set_message(msg);
            bar.set_position(r.step as u64);
        }
        RunEvent::Checkpoint { step, path } => {
            let line = format!("step {step}: checkpoint {}", path.display());
            say(line);
        }
    })?;
    bar.finish();
    let last = summary.last.as_ref();
    eprintln!(
        "trained {} steps in {:.0} s{}; final loss {}; adapter in {}",
        summary.steps,
        summary.seconds,
        if summary.stopped_early { " (stopped early: validation loss stopped improving)" } else { "" },
        last.map_or("-".into(), |r| format!("{:.4}", r.loss)),
        summary.adapter_dir.display()
    );
    Ok(())
}

fn warmup_steps(warmup: f64, total: usize) -> Result<usize> {
    if !(warmup.is_finite() && warmup >= 0.0) {
        bail!("--warmup must be a number of steps or a fraction in [0, 1)");
    }
    Ok(if warmup < 1.0 { (warmup * total as f64).ceil() as usize } else { warmup.round() as usize })
}

/// The files a model spec resolved to, hashed (a GGUF file, or an HF directory's config and shards).
fn describe<B: Backend>(t: &Trainer<B>, be: &B) {
    let d = t.train_data();
    let plan = t.memory_plan();
    let n = t.lora.layers.len();
    eprintln!(
        "training on {}: {} examples ({} tokens, {} trained, {} truncated), {} steps, adapter {} parameters",
        be.name(),
        d.stats.examples,
        d.stats.tokens,
        d.stats.trained_tokens,
        d.stats.truncated,
        t.total_steps(),
        t.lora.num_params()
    );
    eprintln!(
        "memory plan: {:.0} MiB besides the model; activations kept for {} of {} layers ({} recomputed)",
        plan.peak_bytes as f64 / (1 << 20) as f64,
        plan.saved_layers,
        n,
        plan.recomputed_layers(n)
    );
    if t.state().step > 0 {
        eprintln!("resuming at step {} (epoch {})", t.state().step, t.state().epoch + 1);
    }
}
