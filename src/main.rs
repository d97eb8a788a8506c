//! The `tandem` command line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use tandem::api::{AppState, ModelNames, Ready};
use tandem::backend::cpu::CpuBackend;
use tandem::backend::cuda::CudaBackend;
use tandem::config::Config;
use tandem::engine::device::{Device, OpenBackend};
use tandem::engine::{
    spawn_engine, EngineConfig, EngineCore, EngineRequest, ModelRunner, RunnerConfig, SamplingParams, StepEvent,
    StoppingParams,
};
use tandem::lora::{LoraRegistry, RegistryConfig};
use tandem::model::{load_model_quantized, LoadedModel};

mod selftest;
mod train_cli;

#[derive(Parser)]
#[command(name = "tandem", version, about = "Serve one base LLM and many LoRA adapters")]
struct Cli {
    /// TOML config file (overrides config/default.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// CPU worker threads (0 = one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Where the model runs: cpu or cuda:N (default: the config's `device.name`).
    #[arg(long, global = true)]
    device: Option<String>,
    /// CPU: activations of quantised matmuls, f32 or int8 (default: the config's `cpu.activations`).
    #[arg(long, global = true)]
    activations: Option<String>,
    /// Quantise an unquantised (f32/f16/bf16) model's projections while loading:
    /// none, nf4, fp4, int4, int8, q8_0 or q4_k (default: the config's `model.quantize`).
    /// `merge` takes only none (it writes an unquantised checkpoint).
    #[arg(long, global = true, value_name = "TYPE")]
    quantize: Option<String>,
    /// Log lines on stderr: human or json (default: the config's `server.log_format`);
    /// the level comes from RUST_LOG.
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// LoRA flags shared by `serve` and `generate`.
#[derive(clap::Args, Default)]
struct LoraArgs {
    /// A LoRA adapter to load at start, as name=directory (or name=org/repo);
    /// repeatable. Requests choose it with `model: "name"`.
    #[arg(long = "lora", value_name = "NAME=PATH")]
    lora: Vec<String>,
    /// A directory HTTP requests may load adapters from (load_lora_adapter,
    /// adapter_id); repeatable.
    #[arg(long = "lora-root", value_name = "DIR")]
    lora_root: Vec<String>,
    /// Adapter slots (distinct adapters in the running batch at once).
    #[arg(long)]
    max_loras: Option<usize>,
    /// Largest adapter rank accepted.
    #[arg(long)]
    max_lora_rank: Option<usize>,
    /// How adapter weights are stored: f32 or bf16.
    #[arg(long)]
    lora_dtype: Option<tandem::lora::LoraDtype>,
}

impl LoraArgs {
    fn apply(self, cfg: &mut Config) -> Result<()> {
        for spec in self.lora {
            let Some((name, path)) = spec.split_once('=') else {
                bail!("--lora {spec:?}: expected NAME=PATH");
            };
            if name.is_empty() || path.is_empty() {
                bail!("--lora {spec:?}: expected NAME=PATH");
            }
            cfg.lora.adapters.insert(name.to_string(), path.to_string());
        }
        cfg.lora.allowed_roots.extend(self.lora_root);
        if let Some(n) = self.max_loras {
            cfg.lora.max_loras = n;
        }
        if let Some(r) = self.max_lora_rank {
            cfg.lora.max_lora_rank = r;
        }
        if let Some(d) = self.lora_dtype {
            cfg.lora.dtype = d;
        }
        Ok(())
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a completion for one prompt and print only the generated text.
    Generate {
        /// A .gguf file, an HF model directory or a hub id (default: the config's model).
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// A system message (with --chat).
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Keep generating past end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long)]
        seed: Option<u64>,
        /// Run with this PEFT LoRA adapter directory.
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
    /// Serve the OpenAI-compatible HTTP API.
    Serve {
        /// A .gguf file, an HF model directory or a hub id (default: the config's model).
        #[arg(long)]
        model: Option<String>,
        /// Address to bind (default: the config's `server.host`).
        #[arg(long)]
        host: Option<String>,
        /// Port to bind; 0 picks a free one (default: the config's `server.port`).
        #[arg(long)]
        port: Option<u16>,
        /// Where uploaded files, fine-tuning jobs, checkpoints and trained
        /// adapters are kept (turns on /v1/files and /v1/fine_tuning/jobs;
        /// default: the config's `store.data_dir`, or TANDEM_DATA_DIR).
        #[arg(long)]
        data_dir: Option<String>,
        #[command(flatten)]
        lora: LoraArgs,
    },
    /// Measure serving throughput with many LoRA adapters against the base model alone.
    BenchLora {
        #[arg(long)]
        model: Option<String>,
        /// Running sequences at once.
        #[arg(long, value_delimiter = ',', default_values_t = vec![16, 32])]
        concurrency: Vec<usize>,
        /// Distinct adapters per run (0 = base only).
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 8, 32, 128])]
        adapters: Vec<usize>,
        /// Adapter ranks (all seven projections).
        #[arg(long, value_delimiter = ',', default_values_t = vec![16])]
        rank: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        prompt_len: usize,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// How adapter weights are stored: f32 or bf16 (default: the config's).
        #[arg(long)]
        lora_dtype: Option<tandem::lora::LoraDtype>,
        /// Interleaved (base only, with adapters) pairs per configuration.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Train a LoRA adapter on a JSONL file (chat, prompt/completion or Alpaca)
    /// through the frozen base model, on --device.
    Train(Box<train_cli::TrainArgs>),
    /// Training tok/s of a LoRA adapter (all seven projections) on synthetic
    /// micro-batches, against the forward-only prefill of the same tokens.
    BenchTrain {
        #[arg(long)]
        model: Option<String>,
        /// Sequences per micro-batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// Measured optimiser steps (after one warm-up step); the median is reported.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Fraction of each sequence (its tail) that carries loss.
        #[arg(long, default_value_t = 1.0)]
        loss_fraction: f64,
        /// Training memory budget in MiB (activations beyond it are recomputed); default: keep all.
        #[arg(long)]
        memory_budget_mib: Option<usize>,
    },
    /// Fold a PEFT LoRA adapter into the base model and write an HF checkpoint directory.
    ///
    /// The output (config.json, model.safetensors under HF names, tokenizer and
    /// generation files) loads in transformers, vLLM and tandem as a plain
    /// model. W' = W + (B·A)·scaling, as peft's merge_and_unload. Runs on the CPU.
    Merge {
        /// The base model: a .gguf file (quantised weights are dequantised), an HF
        /// directory or a hub id (default: the config's model).
        #[arg(long)]
        model: Option<String>,
        /// The PEFT LoRA adapter: a directory with adapter_config.json and
        /// adapter_model.safetensors, or a hub id (org/name).
        #[arg(long, value_name = "DIR")]
        lora: String,
        /// Output directory. It must not exist or be empty; it is filled under a
        /// temporary name beside it and renamed into place once complete.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Float dtype of the merged weights: f32, bf16 or f16 (default: the
        /// base's own float dtype; bf16 for quantised or mixed bases).
        #[arg(long, value_name = "DTYPE")]
        dtype: Option<tandem::merge::MergeDtype>,
    },
    /// Quantise a model and write it as a checkpoint in that format's standard layout.
    ///
    /// gptq (4-bit, asymmetric, group 128/64/32), nf4 and fp4 (bitsandbytes) write an HF
    /// directory that transformers loads; q8_0 and q4_k write a .gguf for
    /// llama.cpp, from a GGUF (re-quantised, metadata kept) or from an HF
    /// directory (laid out as convert_hf_to_gguf.py does, its byte-level BPE
    /// tokenizer.json as GGUF metadata; other tokenizers are refused).
    /// Round-to-nearest, no calibration: the same codes as --quantize computes
    /// on load. Runs on the CPU.
    Quantize {
        /// The model: a .gguf file, an HF directory or a hub id (default: the config's model).
        #[arg(long)]
        model: Option<String>,
        /// gptq, nf4, fp4, q8_0 or q4_k.
        #[arg(long, value_name = "FORMAT")]
        format: tandem::export::ExportFormat,
        /// Output: a new directory (gptq, nf4, fp4) or a new .gguf file (q8_0, q4_k).
        /// Written under a temporary name beside it and renamed into place once complete.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Check every op of --device against the CPU backend, then greedy decoding
    /// of a model end to end; exits non-zero on any failure.
    Selftest {
        /// Model for the end-to-end check (default: the config's model, when present).
        #[arg(long)]
        model: Option<String>,
        /// Greedy tokens compared end to end (0 skips the check).
        #[arg(long, default_value_t = 32)]
        e2e_tokens: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Perplexity of the model on a text file, with llama-perplexity's semantics
    /// (non-overlapping windows of --ctx tokens, the second half of each scored);
    /// the last line is `perplexity: <value>`.
    Perplexity {
        #[arg(long)]
        model: Option<String>,
        /// The text (UTF-8), tokenised whole.
        #[arg(long)]
        file: PathBuf,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Score at most this many windows (default: every whole window).
        #[arg(long)]
        chunks: Option<usize>,
    },
    /// Print the configuration in effect (defaults, then --config, then the
    /// environment) as TOML; with --reference, the table of every key, its
    /// default and its environment variable (docs/operations.md).
    Config {
        #[arg(long)]
        reference: bool,
    },
    /// Exit 0 if the server this configuration describes answers /health with
    /// 200 (the container health check), 1 otherwise.
    Health {
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Measure prefill and decode throughput.
    Bench {
        #[arg(long)]
        model: Option<String>,
        /// Prompt length for the prefill measurement.
        #[arg(long, default_value_t = 512)]
        prompt_len: usize,
        /// Decode steps per batch size.
        #[arg(long, default_value_t = 64)]
        decode_steps: usize,
        /// Concurrent sequences for the decode measurement.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 4, 16])]
        batch: Vec<usize>,
        /// Repetitions of each measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Cmd::Health { timeout } = cli.cmd {
        let cfg = Config::load(cli.config.as_deref())?;
        let t = std::time::Duration::from_secs(timeout.max(1));
        match tandem::api::health::probe(&cfg.server.host, cfg.server.port, t) {
            Ok(200) => return Ok(()),
            Ok(code) => bail!("/health answered {code}"),
            Err(e) => bail!("/health: {e}"),
        }
    }
    if let Cmd::Config { reference } = cli.cmd {
        if reference {
            print!("{}", tandem::config::keys::markdown(&Config::keys()));
        } else {
            let merged = Config::merged(cli.config.as_deref(), &|name| std::env::var(name).ok())?;
            Config::from_merged(merged.clone(), cli.config.as_deref())?; // the same checks serve makes
            print!("{}", toml::to_string(&merged)?);
        }
        return Ok(());
    }
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(f) = &cli.log_format {
        cfg.server.log_format = f.parse().map_err(anyhow::Error::msg)?;
    }
    tandem::logging::init(cfg.server.log_format);
    if let Some(t) = cli.threads {
        cfg.cpu.threads = t;
    }
    if let Some(d) = cli.device {
        cfg.device.name = d;
    }
    if let Some(a) = cli.activations {
        cfg.cpu.activations = a.parse().map_err(anyhow::Error::msg)?;
    }
    let device: Device = cfg.device.name.parse().map_err(anyhow::Error::msg)?;
    if let Cmd::Selftest { model, e2e_tokens, seed } = cli.cmd {
        return selftest::run(&cfg, device, model, e2e_tokens, seed);
    }
    if let Cmd::Merge { model, lora, out, dtype } = cli.cmd {
        return merge(&cfg, model, &lora, &out, dtype, cli.quantize.as_deref().unwrap_or("none"));
    }
    if let Cmd::Quantize { model, format, out } = cli.cmd {
        if cli.quantize.is_some() {
            bail!("tandem quantize takes its format from --format, not --quantize");
        }
        return export(&cfg, model, format, &out);
    }
    if let Some(q) = cli.quantize {
        cfg.model.quantize = q.parse().map_err(anyhow::Error::msg)?;
    }
    match device {
        Device::Cpu => run_on::<CpuBackend>(cli.cmd, cfg),
        Device::Cuda(_) => run_on::<CudaBackend>(cli.cmd, cfg),
    }
}

/// Runs a command with the model on backend `B`.
fn run_on<B: OpenBackend>(cmd: Cmd, mut cfg: Config) -> Result<()> {
    match cmd {
        Cmd::Generate {
            model,
            prompt,
            chat,
            system,
            max_tokens,
            ignore_eos,
            temperature,
            top_k,
            top_p,
            seed,
            adapter,
        } => {
            let (be, loaded) = load::<B>(&mut cfg, model)?;
            let adapter = match adapter {
                Some(dir) => {
                    let limits = tandem::lora::LoraOptions { max_rank: cfg.lora.max_lora_rank, dtype: cfg.lora.dtype };
                    let name = dir.display().to_string();
                    Some(Arc::new(tandem::lora::load_peft_dir(&name, &dir, &loaded.model.config, limits)?))
                }
                None => None,
            };
            let tok = loaded.tokenizer.context("this model has no tokenizer, so it cannot take text")?;
            let text = if chat {
                let tmpl = tok.chat_template().context("this model has no chat template")?;
                let mut msgs = vec![];
                if let Some(s) = system {
                    msgs.push(serde_json::json!({"role": "system", "content": s}));
                }
                msgs.push(serde_json::json!({"role": "user", "content": prompt}));
                tmpl.render(&serde_json::Value::Array(msgs), None, true, None)?
            } else {
                prompt
            };
            let ids = tok.encode(&text, !chat)?;
            if ids.is_empty() {
                bail!("the prompt is empty");
            }
            let engine_cfg = EngineConfig::from_config(&cfg, tok.eos_token_ids());
            let mut engine = EngineCore::new(be, loaded.model, &engine_cfg)?;
            let req = EngineRequest {
                prompt: ids,
                sampling: SamplingParams { temperature, top_k, top_p, seed, ..Default::default() },
                stopping: StoppingParams { max_tokens, min_tokens: 0, stop_token_ids: vec![], ignore_eos },
                logprobs: None,
                prompt_logprobs: None,
                adapter,
            };
            engine.add_request(0, req);
            let mut stream = tandem::tokenizer::DecodeStream::new(true);
            let mut stdout = std::io::stdout().lock();
            while engine.has_work() {
                for ev in engine.step().1 {
                    if let StepEvent::Token(_, t) = ev {
                        if let Some(piece) = stream.step(&tok, t.id)? {
                            stdout.write_all(piece.as_bytes())?;
                            stdout.flush()?;
                        }
                    }
                }
            }
            // Whatever the stream held back waiting for more bytes.
            stdout.write_all(stream.flush(&tok)?.as_bytes())?;
            writeln!(stdout)?;
        }
        Cmd::Serve { model, host, port, data_dir, lora } => {
            lora.apply(&mut cfg)?;
            if let Some(d) = data_dir {
                cfg.store.data_dir = d;
            }
            if let Some(h) = host {
                cfg.server.host = h;
            }
            if let Some(p) = port {
                cfg.server.port = p;
            }
            let spec = model.unwrap_or_else(|| cfg.model.path.clone());
            serve::<B>(cfg, spec)?;
        }
        Cmd::BenchLora { model, concurrency, adapters, rank, prompt_len, max_tokens, lora_dtype, reps } => {
            if let Some(d) = lora_dtype {
                cfg.lora.dtype = d;
            }
            let (be, loaded) = load::<B>(&mut cfg, model)?;
            let name = tandem::backend::Backend::name(&be);
            println!(
                "model: {}\nbackend: {name}\nmax_loras: {}\nlora dtype: {:?}",
                loaded.source, cfg.lora.max_loras, cfg.lora.dtype
            );
            let opts = tandem::bench::lora::LoraBenchOptions {
                concurrency,
                adapters,
                ranks: rank,
                prompt_len,
                max_tokens,
                max_loras: cfg.lora.max_loras,
                dtype: cfg.lora.dtype,
                reps,
            };
            let engine_cfg = EngineConfig::from_config(&cfg, vec![]);
            let scratch = tempfile_dir()?;
            let report = tandem::bench::lora::run(be, loaded.model, &engine_cfg, &opts, &scratch)?;
            let _ = std::fs::remove_dir_all(&scratch);
            print!("{report}");
        }
        Cmd::Perplexity { model, file, ctx, chunks } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let (be, loaded) = load::<B>(&mut cfg, model)?;
            let name = tandem::backend::Backend::name(&be);
            let tokenizer = loaded.tokenizer.context("the model has no tokenizer: perplexity needs one")?;
            let tokens = tokenizer.encode(&text, true)?;
            // The BOS a window starts with, when the vocabulary adds one.
            let bos = tokenizer.encode("", true)?.first().copied();
            let mut runner = ModelRunner::new(be, loaded.model, runner_config(&cfg))?;
            println!("model: {}\nbackend: {name}\nfile: {}", loaded.source, file.display());
            let opts = tandem::bench::perplexity::PerplexityOptions { ctx, chunks, logits_rows: 64 };
            let report = tandem::bench::perplexity::run(&mut runner, &tokens, bos, &opts)?;
            print!("{report}");
        }
        Cmd::Bench { model, prompt_len, decode_steps, batch, reps } => {
            let (be, loaded) = load::<B>(&mut cfg, model)?;
            let name = tandem::backend::Backend::name(&be);
            let mut runner = ModelRunner::new(be, loaded.model, runner_config(&cfg))?;
            let opts = tandem::bench::BenchOptions { prompt_len, decode_steps, batches: batch, reps };
            println!("model: {}\nbackend: {name}", loaded.source);
            let report = tandem::bench::run(&mut runner, &opts)?;
            print!("{report}");
        }
        Cmd::Train(args) => train_cli::run::<B>(*args, cfg)?,
        Cmd::BenchTrain { model, batch, seq_len, rank, steps, loss_fraction, memory_budget_mib } => {
            let (be, loaded) = load::<B>(&mut cfg, model)?;
            println!("model: {}\nbackend: {}", loaded.source, tandem::backend::Backend::name(&be));
            let opts = tandem::bench::train::TrainBenchOptions {
                batch,
                seq_len,
                rank,
                steps,
                loss_fraction,
                memory_budget: memory_budget_mib.map(|m| m << 20),
            };
            let report = tandem::bench::train::run(&be, &loaded.model, &opts)?;
            print!("{report}");
        }
        Cmd::Selftest { .. } | Cmd::Merge { .. } | Cmd::Quantize { .. } | Cmd::Config { .. } | Cmd::Health { .. } => {
            unreachable!("handled before choosing a backend")
        }
    }
    Ok(())
}

/// `tandem merge`: checks the flags, merges on a pool of `cpu.threads` threads
/// and prints what it wrote.
fn merge(
    cfg: &Config,
    model: Option<String>,
    lora: &str,
    out: &std::path::Path,
    dtype: Option<tandem::merge::MergeDtype>,
    quantize: &str,
) -> Result<()> {
    if quantize != "none" {
        bail!(
            "--quantize {quantize:?} is not supported: tandem merge writes an unquantised HF checkpoint \
             (supported: none; choose its float dtype with --dtype f32|bf16|f16). For a quantised checkpoint, run \
             `tandem quantize --format q8_0|q4_k|gptq|nf4|fp4` on the merged directory"
        );
    }
    let spec = model.unwrap_or_else(|| cfg.model.path.clone());
    // A path that exists, or anything but `org/name`, is a directory; `org/name` is a hub adapter.
    let local =
        std::path::Path::new(lora).exists() || lora.starts_with(['/', '.', '~']) || lora.matches('/').count() != 1;
    let adapter = if local {
        PathBuf::from(lora)
    } else {
        tandem::loader::hub::resolve_adapter(lora)
            .map_err(|reason| anyhow::anyhow!("adapter '{lora}': no such directory, and as a hub id: {reason}"))?
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(cfg.cpu.threads).build()?;
    let opts = tandem::merge::MergeOptions { dtype };
    tracing::info!("merging {} into {} ...", adapter.display(), spec);
    let report = pool
        .install(|| tandem::merge::merge(&spec, &adapter, out, &opts))
        .with_context(|| format!("merging {} into '{spec}'", adapter.display()))?;
    for note in &report.notes {
        tracing::warn!("note: {note}");
    }
    if let Some(b) = &report.adapter_base {
        println!("adapter trained on: {b}");
    }
    println!(
        "wrote {}: {} tensors ({} adapted) in {}, {:.1} MB of weights; files: {}",
        report.out.display(),
        report.tensors,
        report.adapted,
        report.dtype,
        report.weights_bytes as f64 / 1e6,
        report.files.join(", ")
    );
    Ok(())
}

/// `tandem quantize`: writes the quantised checkpoint on a pool of
/// `cpu.threads` threads and prints what it wrote.
fn export(
    cfg: &Config,
    model: Option<String>,
    format: tandem::export::ExportFormat,
    out: &std::path::Path,
) -> Result<()> {
    let spec = model.unwrap_or_else(|| cfg.model.path.clone());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(cfg.cpu.threads).build()?;
    tracing::info!("quantising {spec} to {format} ...");
    let report = pool
        .install(|| tandem::export::quantize_checkpoint(&spec, format, out))
        .with_context(|| format!("quantising '{spec}' to {format}"))?;
    for note in &report.notes {
        tracing::warn!("note: {note}");
    }
    println!(
        "wrote {}: {} tensors ({} projections quantised to {}), {:.1} MB of weights",
        report.out.display(),
        report.tensors,
        report.quantized,
        report.format,
        report.weights_bytes as f64 / 1e6
    );
    Ok(())
}

/// Routes from the config, then the stored ones (made over the admin API,
/// which win). Their targets are checked when requests use them: the
/// adapters they name may load after this.
fn load_routes(
    state: &AppState,
    configured: &std::collections::BTreeMap<String, tandem::routing::RouteSpec>,
    store: Option<&tandem::store::Store>,
) -> Result<()> {
    let mut specs: Vec<(String, tandem::routing::RouteSpec, &str)> =
        configured.iter().map(|(a, s)| (a.clone(), s.clone(), "config")).collect();
    if let Some(store) = store {
        for (alias, body) in store.routes().context("reading the stored routes")? {
            let spec = serde_json::from_value(body).with_context(|| format!("stored route '{alias}'"))?;
            specs.push((alias, spec, "data directory"));
        }
    }
    for (alias, spec, from) in specs {
        let route =
            tandem::routing::Route::new(&alias, spec).map_err(|e| anyhow::anyhow!("route '{alias}' ({from}): {e}"))?;
        state
            .routes
            .put(route, |_| Ok::<_, std::convert::Infallible>(()))
            .map_err(|e| anyhow::anyhow!("route '{alias}' ({from}): {e}"))?;
    }
    let n = state.routes.snapshot().len();
    if n > 0 {
        tracing::info!("{n} route(s) loaded");
    }
    Ok(())
}

/// Binds at once, then serves while the model loads on a blocking thread
/// (`/health` answers 503 until it is up); returns after a graceful shutdown.
fn serve<B: OpenBackend>(cfg: Config, spec: String) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        // Tests and scripts read the bound address (port 0 picks one) from this line.
        tracing::info!("listening on http://{}", listener.local_addr()?);
        let names = ModelNames::from_spec(&spec, &cfg.server.served_model_name);
        let reserved = names.all();
        let mut state = AppState::new(names.clone(), cfg.server.clone());
        let store = if cfg.store.data_dir.is_empty() {
            None
        } else {
            let dir = PathBuf::from(&cfg.store.data_dir);
            match tandem::store::Store::open(&dir) {
                Ok(store) => {
                    tracing::info!("data directory {} (files, fine-tuning jobs)", dir.display());
                    Some(Arc::new(store))
                }
                // Inference does not need it: serve, and let what does need it say why.
                Err(e) => {
                    tracing::error!(
                        "the data directory {} is unusable ({e}): serving without files, fine-tuning and route changes",
                        dir.display()
                    );
                    state = state.with_unusable_store(&dir, &e);
                    None
                }
            }
        };
        if let Some(s) = &store {
            state = state.with_store(s.clone(), cfg.store.max_upload_mib.saturating_mul(1 << 20));
        }
        load_routes(&state, &cfg.routes, store.as_deref())?;
        let keys = tandem::auth::Keys::new(
            &cfg.auth,
            std::env::var("TANDEM_API_KEYS").ok().as_deref(),
            std::env::var("TANDEM_ADMIN_KEYS").ok().as_deref(),
        )
        .map_err(anyhow::Error::msg)?;
        if keys.is_open() {
            tracing::warn!(
                "no API keys configured: the server is open to anyone who can reach it, admin routes included ([[auth.keys]], TANDEM_API_KEYS, TANDEM_ADMIN_KEYS)"
            );
        } else {
            tracing::info!("{} API key(s) configured", keys.len());
            state = state.with_keys(keys);
        }
        let loader = move || -> std::result::Result<Ready, String> {
            let mut cfg = cfg;
            let (be, loaded) = load::<B>(&mut cfg, Some(spec.clone())).map_err(|e| format!("{e:#}"))?;
            let weights = loaded.weights_info();
            let tok = loaded.tokenizer.ok_or("this model has no tokenizer; the HTTP API needs one")?;
            let engine_cfg = EngineConfig::from_config(&cfg, tok.eos_token_ids());
            let loras = Arc::new(LoraRegistry::new(registry_config(&cfg), loaded.model.config.clone(), reserved));
            for (name, path) in &cfg.lora.adapters {
                let a = loras.load_startup(name, path).map_err(|e| format!("LoRA adapter '{name}': {e}"))?;
                tracing::info!("LoRA adapter '{name}' loaded (rank {}, {} KiB)", a.max_rank, a.bytes() / 1024);
            }
            let engine = spawn_engine(be, loaded.model, engine_cfg).map_err(|e| format!("starting the engine: {e}"))?;
            let tokenizer = Arc::new(tok);
            let jobs = match store {
                None => None,
                Some(store) => {
                    let jobs_cfg = tandem::train::jobs::JobsConfig {
                        base_names: names.all(),
                        organization: cfg.store.organization.clone(),
                        max_rank: cfg.lora.max_lora_rank,
                        // Already capped by the model's context and the KV cache.
                        max_model_len: engine.info().max_model_len,
                        memory_budget: match cfg.train.memory_budget_mib {
                            0 => None,
                            m => Some(m << 20),
                        },
                        logits_chunk_bytes: cfg.train.logits_chunk_mib.max(1) << 20,
                        base_spec: spec.clone(),
                        device: cfg.device.name.clone(),
                    };
                    let m = tandem::train::jobs::JobManager::start(
                        store,
                        engine.clone(),
                        loras.clone(),
                        tokenizer.clone(),
                        jobs_cfg,
                    );
                    m.recover().map_err(|e| format!("recovering fine-tuning jobs: {e}"))?;
                    Some(m)
                }
            };
            Ok(Ready { engine, tokenizer, source: loaded.source, weights, loras, jobs })
        };
        tandem::api::serve(listener, state, loader).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// The backend and the model `spec` names (the config's model by default);
/// sets `cfg.cache.num_blocks` to what the device gives the KV cache.
fn load<B: OpenBackend>(cfg: &mut Config, spec: Option<String>) -> Result<(B, LoadedModel<B>)> {
    let spec = spec.unwrap_or_else(|| cfg.model.path.clone());
    let be = B::open(cfg).with_context(|| format!("opening device {}", cfg.device.name))?;
    let loaded =
        load_model_quantized(&be, &spec, cfg.model.quantize).with_context(|| format!("loading model '{spec}'"))?;
    tracing::info!(
        "{}: {}{}",
        loaded.source,
        tandem::model::describe_stored(&loaded.model.stored),
        loaded.quantization.as_deref().map(|q| format!(" ({q})")).unwrap_or_default()
    );
    cfg.cache.num_blocks = be.kv_blocks(&loaded.model.config, cfg)?;
    Ok((be, loaded))
}

/// A fresh scratch directory under the system temp dir.
fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("tandem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn runner_config(cfg: &Config) -> RunnerConfig {
    RunnerConfig {
        block_size: cfg.cache.block_size,
        num_blocks: cfg.cache.num_blocks,
        max_loras: cfg.lora.max_loras,
        kv_dtype: cfg.cache.kv_cache_dtype,
    }
}

fn registry_config(cfg: &Config) -> RegistryConfig {
    RegistryConfig {
        max_loras: cfg.lora.max_loras,
        limits: tandem::lora::LoraOptions { max_rank: cfg.lora.max_lora_rank, dtype: cfg.lora.dtype },
        max_host_bytes: cfg.lora.max_cpu_lora_mib.saturating_mul(1 << 20),
        allowed_roots: cfg.lora.allowed_roots.iter().map(PathBuf::from).collect(),
        allow_hub: cfg.lora.allow_hub,
    }
}
