//! A training run's directory: the loop over [`Trainer::step`] with what it
//! writes as it goes (`metrics.jsonl`, checkpoints, the loss curve) and at the
//! end (the PEFT adapter and `training_metadata.json`).
//!
//! ```text
//! OUT/adapter_config.json, adapter_model.safetensors   the adapter (peft loads it, tandem serves it)
//! OUT/training_metadata.json                           lineage: base, data, settings, results
//! OUT/metrics.jsonl                                    one line per step and per evaluation
//! OUT/loss.png                                         train and validation loss per step
//! OUT/checkpoints/checkpoint-000100/                   resumable state (every --save-every steps)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::backend::Backend;
use crate::model::LlamaModel;

use super::output::{self, CurvePoint, OutputError};
use super::trainer::{EvalReport, StepReport, TrainError, Trainer};

/// Where the base model and the data came from, for `training_metadata.json`.
#[derive(Debug, Clone, Default)]
pub struct Lineage {
    /// The model as given (path or hub id) and what it resolved to.
    pub base_model: String,
    pub base_files: Vec<FileRecord>,
    pub train_file: Option<FileRecord>,
    pub validation_file: Option<FileRecord>,
    /// Where the adapter started from (a PEFT directory), if not fresh.
    pub init_adapter: Option<String>,
    pub device: String,
    /// The fine-tuning job that trained it (jobs API).
    pub job: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FileRecord {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

impl FileRecord {
    pub fn of(path: &Path) -> Result<Self, OutputError> {
        let bytes = std::fs::metadata(path).map_err(|source| OutputError { path: path.to_owned(), source })?.len();
        Ok(Self { path: path.display().to_string(), sha256: output::sha256_file(path)?, bytes })
    }
}

/// The files of a base model for lineage: a GGUF file, or an HF directory's
/// config and weights (a hub id is recorded as given, with no files).
pub fn base_files(spec: &str) -> Result<Vec<FileRecord>, OutputError> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(vec![FileRecord::of(p)?]);
    }
    if p.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|source| OutputError { path: p.to_owned(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                let n = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n == "config.json" || n.ends_with(".safetensors")
            })
            .collect();
        files.sort();
        return files.iter().map(|f| FileRecord::of(f)).collect();
    }
    Ok(vec![])
}

/// What happened, for a progress display.
#[derive(Debug, Clone)]
pub enum RunEvent<'a> {
    /// The evaluation before the first step.
    Eval(&'a EvalReport),
    Step(&'a StepReport),
    Checkpoint {
        step: usize,
        path: &'a Path,
    },
}

/// The result of a finished run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: usize,
    pub stopped_early: bool,
    pub last: Option<StepReport>,
    pub adapter_dir: PathBuf,
    pub seconds: f64,
}

pub fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join("checkpoints").join(format!("checkpoint-{step:06}"))
}

/// Runs `trainer` to the end, writing into `out`. A resumed trainer keeps the
/// metrics of the steps before its checkpoint and drops any logged after it.
pub fn run<B: Backend>(
    be: &B,
    model: &LlamaModel<B>,
    trainer: &mut Trainer<B>,
    out: &Path,
    lineage: &Lineage,
    mut on_event: impl FnMut(RunEvent<'_>),
) -> Result<RunSummary, TrainError> {
    let t0 = Instant::now();
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| OutputError { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let metrics_path = out.join(output::METRICS);
    let start_step = trainer.state().step;
    let (mut train_curve, mut valid_curve) = (Vec::new(), Vec::new());
    let kept = keep_metrics_before(&metrics_path, start_step, &mut train_curve, &mut valid_curve)?;
    output::write_atomic(&metrics_path, kept.as_bytes())?;
    let mut metrics = std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(io(&metrics_path))?;
    if start_step == 0 && trainer.has_validation() {
        // The base point of the curve: the adapter before any step.
        let e = trainer.initial_eval(be, model)?;
        let mut line = json!({"type": "eval"});
        merge(&mut line, serde_json::to_value(e).expect("an eval serialises"));
        writeln!(metrics, "{line}").map_err(io(&metrics_path))?;
        valid_curve.push(CurvePoint { step: 0, loss: e.loss });
        on_event(RunEvent::Eval(&e));
    }
    let mut last = None;
    while let Some(report) = trainer.step(be, model)? {
        let mut line = json!({"type": "train"});
        merge(&mut line, serde_json::to_value(&report).expect("a report serialises"));
        line.as_object_mut().expect("object").remove("eval");
        writeln!(metrics, "{line}").map_err(io(&metrics_path))?;
        train_curve.push(CurvePoint { step: report.step, loss: report.loss });
        if let Some(e) = &report.eval {
            let mut line = json!({"type": "eval"});
            merge(&mut line, serde_json::to_value(e).expect("an eval serialises"));
            writeln!(metrics, "{line}").map_err(io(&metrics_path))?;
            valid_curve.push(CurvePoint { step: e.step, loss: e.loss });
        }
        metrics.flush().map_err(io(&metrics_path))?;
        on_event(RunEvent::Step(&report));
        let due = trainer.config().save_every.is_some_and(|n| report.step.is_multiple_of(n));
        if due && !trainer.is_done() {
            let dir = checkpoint_dir(out, report.step);
            trainer.save_checkpoint(be, &dir, &lineage.base_model)?;
            on_event(RunEvent::Checkpoint { step: report.step, path: &dir });
        }
        if report.eval.is_some() {
            let _ = output::plot_loss(&out.join(output::LOSS_PLOT), &train_curve, &valid_curve, "LoRA training loss");
        }
        last = Some(report);
    }
    metrics.sync_all().map_err(io(&metrics_path))?;
    let weights = trainer.final_weights(be)?;
    output::write_adapter(out, &trainer.lora.spec, &lineage.base_model, &weights)?;
    output::plot_loss(&out.join(output::LOSS_PLOT), &train_curve, &valid_curve, "LoRA training loss")
        .map_err(|e| OutputError { path: out.join(output::LOSS_PLOT), source: std::io::Error::other(e) })?;
    let seconds = t0.elapsed().as_secs_f64();
    let meta = metadata(trainer, lineage, last.as_ref(), seconds);
    output::write_atomic(&out.join(output::METADATA), &serde_json::to_vec_pretty(&meta).expect("JSON"))?;
    Ok(RunSummary {
        steps: trainer.state().step,
        stopped_early: trainer.state().stopped_early,
        last,
        adapter_dir: out.to_owned(),
        seconds,
    })
}

/// Writes the adapter to publish (with `training_metadata.json`) as a whole
/// directory at `dir`: it appears complete or not at all.
pub fn publish<B: Backend>(
    be: &B,
    trainer: &Trainer<B>,
    dir: &Path,
    lineage: &Lineage,
    last: Option<&StepReport>,
    seconds: f64,
) -> Result<(), TrainError> {
    let weights = trainer.final_weights(be)?;
    let meta = metadata(trainer, lineage, last, seconds);
    output::write_dir_atomic(dir, |tmp| {
        output::write_adapter(tmp, &trainer.lora.spec, &lineage.base_model, &weights)?;
        output::write_atomic(&tmp.join(output::METADATA), &serde_json::to_vec_pretty(&meta).expect("JSON"))
    })?;
    Ok(())
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// The lines of an earlier `metrics.jsonl` up to `step` (all of them for a
/// fresh run: none), with their points; a torn last line is dropped.
fn keep_metrics_before(
    path: &Path,
    step: usize,
    train: &mut Vec<CurvePoint>,
    valid: &mut Vec<CurvePoint>,
) -> Result<String, OutputError> {
    if step == 0 || !path.exists() {
        return Ok(String::new());
    }
    let text = std::fs::read_to_string(path).map_err(|source| OutputError { path: path.to_owned(), source })?;
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let Some(s) = v["step"].as_u64() else { continue };
        if s as usize > step {
            continue;
        }
        let point = CurvePoint { step: s as usize, loss: v["loss"].as_f64().unwrap_or(f64::NAN) };
        match v["type"].as_str() {
            Some("train") => train.push(point),
            Some("eval") => valid.push(point),
            _ => continue,
        }
        kept.push_str(line);
        kept.push('\n');
    }
    Ok(kept)
}

fn metadata<B: Backend>(t: &Trainer<B>, lineage: &Lineage, last: Option<&StepReport>, seconds: f64) -> Value {
    let s = t.state();
    let data = |d: Option<&super::data::Dataset>, file: &Option<FileRecord>| {
        d.map(|d| {
            json!({
                "file": file,
                "format": d.format.to_string(),
                "examples": d.stats.examples,
                "tokens": d.stats.tokens,
                "trained_tokens": d.stats.trained_tokens,
                "truncated": d.stats.truncated,
            })
        })
    };
    let eval = last.and_then(|r| r.eval);
    let plan = t.memory_plan();
    json!({
        "tandem_version": env!("CARGO_PKG_VERSION"),
        "created_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "base_model": {"spec": lineage.base_model, "files": lineage.base_files},
        "init_adapter": lineage.init_adapter,
        "job": lineage.job,
        "data": {
            "train": data(Some(t.train_data()), &lineage.train_file),
            "validation": data(t.valid_data(), &lineage.validation_file),
        },
        "hyperparameters": t.config().to_json(),
        "adapter_parameters": t.lora.num_params(),
        "device": lineage.device,
        "memory_plan": {"saved_layers": plan.saved_layers, "head_rows": plan.head_rows,
                        "peak_bytes": plan.peak_bytes},
        "steps": s.step,
        "total_steps": t.total_steps(),
        "tokens_seen": s.tokens_seen,
        "stopped_early": s.stopped_early,
        "best_step": s.best_step,
        "published": if t.config().early_stopping_patience.is_some() && s.best_step.is_some() { "best validation loss" } else { "last step" },
        "seconds": seconds,
        "final_metrics": {
            "train_loss": last.map(|r| r.loss),
            "train_token_accuracy": last.map(|r| r.token_accuracy),
            "valid_loss": eval.map(|e| e.loss),
            "valid_token_accuracy": eval.map(|e| e.token_accuracy),
            "valid_perplexity": eval.map(|e| e.perplexity),
            "best_valid_loss": s.best_eval_loss,
        },
    })
}
