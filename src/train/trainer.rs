//! A training run as a state machine: epochs of micro-batch plans, gradient
//! accumulation, the optimiser step, evaluation, early stopping, checkpoints
//! and resuming from one. [`Trainer::step`] is one optimiser step, so the
//! caller (the CLI, or the engine between serving steps) decides when each
//! runs; files are written by `run.rs`.
//!
//! Determinism: the micro-batch plans are a function of (seed, epoch), the
//! dropout masks of (seed, step, micro-batch), and every kernel sums in a
//! fixed order, so a run repeats bit for bit, resumed or not, on every ISA.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::backend::{Backend, BackendError, CrossEntropySums};
use crate::model::LlamaModel;

use super::batch::{plan_epoch, Batching};
use super::data::Dataset;
use super::lora::{HostFactor, LoraSpec, TrainableLora};
use super::memory::MemoryPlan;
use super::optim::{optimizer_step, OptimConfig};
use super::output::{self, OutputError};
use super::step::{MicroBatch, MicroBatchRun, TrainKv};

/// Everything that decides what a run computes.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub lora: LoraSpec,
    pub optim: OptimConfig,
    pub epochs: usize,
    pub batching: Batching,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Stop after this many optimiser steps (before the epochs end).
    pub max_steps: Option<usize>,
    pub seed: u64,
    /// Evaluate every this many steps (`None`: at the end of each epoch).
    pub eval_every: Option<usize>,
    /// Write a checkpoint every this many steps (`None`: none before the end).
    pub save_every: Option<usize>,
    /// Stop when the validation loss has not improved for this many evaluations.
    pub early_stopping_patience: Option<usize>,
    /// Bytes training may hold besides the model (activations beyond it are recomputed).
    pub memory_budget: Option<usize>,
    pub logits_chunk_bytes: usize,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.lora.validate()?;
        self.optim.validate()?;
        if self.epochs == 0 {
            return Err("epochs must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return Err("gradient accumulation must be at least 1".into());
        }
        match self.batching {
            Batching::Sequential { batch_size: 0 } | Batching::LengthGrouped { batch_size: 0 } => {
                return Err("batch size must be at least 1".into());
            }
            Batching::Packed { max_tokens: 0 } => return Err("the packing budget must be at least 1 token".into()),
            _ => {}
        }
        if self.eval_every == Some(0) || self.save_every == Some(0) || self.max_steps == Some(0) {
            return Err("eval_every, save_every and max_steps must be at least 1 when set".into());
        }
        Ok(())
    }

    /// The settings as recorded in checkpoints and `training_metadata.json`.
    pub fn to_json(&self) -> Value {
        let batching = match self.batching {
            Batching::Sequential { batch_size } => json!({"kind": "sequential", "batch_size": batch_size}),
            Batching::LengthGrouped { batch_size } => json!({"kind": "length_grouped", "batch_size": batch_size}),
            Batching::Packed { max_tokens } => json!({"kind": "packed", "max_tokens": max_tokens}),
        };
        let l = &self.lora;
        json!({
            "lora": {"rank": l.rank, "alpha": l.alpha, "use_rslora": l.use_rslora, "dropout": l.dropout,
                     "targets": l.targets.iter().map(|t| t.module()).collect::<Vec<_>>(), "scaling": l.scaling()},
            "optimizer": {"name": "adamw", "lr": self.optim.lr, "betas": [self.optim.beta1, self.optim.beta2],
                          "eps": self.optim.eps, "weight_decay": self.optim.weight_decay,
                          "max_grad_norm": self.optim.max_grad_norm, "schedule": self.optim.schedule,
                          "warmup_steps": self.optim.warmup_steps},
            "epochs": self.epochs,
            "batching": batching,
            "grad_accum": self.grad_accum,
            "max_steps": self.max_steps,
            "seed": self.seed,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
            "early_stopping_patience": self.early_stopping_patience,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Memory(String),
    #[error("the training step failed on the device: {0}")]
    Backend(#[from] BackendError),
    #[error("writing training output: {0}")]
    Output(#[from] OutputError),
    #[error("cannot resume from {path}: {reason}")]
    Resume { path: String, reason: String },
    /// The optimiser update failed part-way, so the adapter is half updated:
    /// this run cannot go on; resume it from its last checkpoint.
    #[error("training stopped: the optimiser update failed part-way ({0}); resume from the last checkpoint")]
    Broken(String),
}

impl TrainError {
    /// Whether the device is lost (nothing more can run on it).
    pub fn is_device_lost(&self) -> bool {
        matches!(self, TrainError::Backend(b) if b.is_device_lost())
    }
}

/// Where the run is, saved in checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps taken.
    pub step: usize,
    /// The epoch the next micro-batch belongs to (0-based).
    pub epoch: usize,
    /// Index of the next micro-batch in that epoch's plan.
    pub next_batch: usize,
    pub tokens_seen: u64,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_without_improvement: usize,
    pub stopped_early: bool,
}

/// One evaluation over the validation set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalReport {
    pub step: usize,
    pub loss: f64,
    pub token_accuracy: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// What one optimiser step did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// 1-based.
    pub step: usize,
    pub total_steps: usize,
    /// Epochs completed, fractional.
    pub epoch: f64,
    pub loss: f64,
    pub token_accuracy: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub clipped: bool,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub seconds: f64,
    pub eval: Option<EvalReport>,
    /// This evaluation was the best so far.
    pub best: bool,
}

/// The run's state. It holds no reference to the backend or the model: each
/// call takes them, so whoever owns them (the engine thread, when training
/// beside serving) can lend them for one step at a time.
pub struct Trainer<B: Backend> {
    cfg: TrainConfig,
    train: Dataset,
    valid: Option<Dataset>,
    pub lora: TrainableLora<B>,
    plan: MemoryPlan,
    kv: TrainKv<B>,
    /// The current epoch's micro-batches (epoch, plan).
    epoch_plan: Option<(usize, Vec<super::batch::MicroBatch>)>,
    total_steps: usize,
    state: TrainState,
    /// The weights at the best evaluation so far (when early stopping is on).
    best: Option<Vec<HostFactor>>,
    /// A hash of the configuration and the data, checked on resume.
    fingerprint: String,
    /// Set when an optimiser update failed part-way (see [`TrainError::Broken`]).
    broken: Option<String>,
    /// Work begun by [`Trainer::advance`] and not yet finished.
    pending: Option<Pending<B>>,
}

/// What [`Trainer::advance`] finished, if anything.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Slices ran; nothing finished yet.
    Working,
    /// An optimiser step (and the evaluation it was due) finished.
    Step(StepReport),
    /// The evaluation queued by [`Trainer::start_initial_eval`] finished.
    InitialEval(EvalReport),
    /// The run is over.
    Done,
}

enum Pending<B: Backend> {
    Step(PendingStep<B>),
    Eval(PendingEval<B>),
}

struct PendingStep<B: Backend> {
    mbs: Vec<MicroBatch>,
    /// The next micro-batch to start.
    next: usize,
    run: Option<MicroBatchRun<B>>,
    /// Target tokens of the whole step (the loss is their mean).
    items: usize,
    tokens: usize,
    sums: CrossEntropySums,
    /// Where the epoch's plan stands after this step, and its length.
    to: usize,
    plan_len: usize,
    /// Compute time so far (not the wall time between slices).
    seconds: f64,
}

impl<B: Backend> PendingEval<B> {
    fn done(&self) -> bool {
        self.next >= self.groups.len() && self.run.is_none()
    }
}

struct PendingEval<B: Backend> {
    groups: Vec<Vec<usize>>,
    next: usize,
    run: Option<MicroBatchRun<B>>,
    items: usize,
    sums: CrossEntropySums,
    /// The step this evaluation completes (`None`: the initial evaluation).
    after_step: Option<StepReport>,
    seconds: f64,
}

/// Optimiser steps of a run over examples of these lengths: per epoch, its
/// micro-batches in groups of `grad_accum` (a partial group at the end of an
/// epoch is a step), capped by `max_steps`.
pub fn total_steps(cfg: &TrainConfig, lengths: &[usize]) -> usize {
    let steps: usize = (0..cfg.epochs)
        .map(|e| plan_epoch(lengths, &cfg.batching, cfg.seed, e).len().div_ceil(cfg.grad_accum.max(1)))
        .sum();
    cfg.max_steps.map_or(steps, |m| steps.min(m))
}

impl<B: Backend> Trainer<B> {
    /// A run from `lora` (fresh or loaded) over `train`, evaluated on `valid`.
    pub fn new(
        model: &LlamaModel<B>,
        cfg: TrainConfig,
        train: Dataset,
        valid: Option<Dataset>,
        lora: TrainableLora<B>,
    ) -> Result<Self, TrainError> {
        cfg.validate().map_err(TrainError::Config)?;
        if cfg.early_stopping_patience.is_some() && valid.is_none() {
            return Err(TrainError::Config("early stopping needs a validation file".into()));
        }
        let lengths = train.lengths();
        let total_steps = total_steps(&cfg, &lengths);
        let (max_tokens, max_seqs) = micro_batch_bounds(&lengths, &cfg.batching, valid.as_ref());
        let plan = MemoryPlan::new(
            &model.config,
            max_tokens,
            max_seqs,
            lora.num_params(),
            cfg.memory_budget,
            cfg.logits_chunk_bytes,
        )
        .map_err(TrainError::Memory)?;
        let fingerprint = fingerprint(&cfg, &train, valid.as_ref());
        Ok(Self {
            cfg,
            train,
            valid,
            lora,
            plan,
            kv: TrainKv::default(),
            epoch_plan: None,
            total_steps,
            state: TrainState::default(),
            best: None,
            fingerprint,
            broken: None,
            pending: None,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.plan
    }
    pub fn state(&self) -> &TrainState {
        &self.state
    }
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }
    pub fn train_data(&self) -> &Dataset {
        &self.train
    }
    pub fn valid_data(&self) -> Option<&Dataset> {
        self.valid.as_ref()
    }
    pub fn has_validation(&self) -> bool {
        self.valid.is_some()
    }

    pub fn is_done(&self) -> bool {
        self.state.stopped_early || self.state.step >= self.total_steps
    }

    /// One optimiser step over the next `grad_accum` micro-batches (with the
    /// evaluation it is due, if any); `None` once the run is over. When the
    /// forward or backward fails, the step's gradients are dropped and the same
    /// step can be taken again; when the optimiser update fails, the run is
    /// [`TrainError::Broken`].
    pub fn step(&mut self, be: &B, model: &LlamaModel<B>) -> Result<Option<StepReport>, TrainError> {
        loop {
            match self.advance(be, model, None)? {
                Progress::Step(r) => return Ok(Some(r)),
                Progress::Done => return Ok(None),
                Progress::Working | Progress::InitialEval(_) => {}
            }
        }
    }

    /// Runs slices of work (one layer's forward or backward of a micro-batch,
    /// a loss head, an optimiser update) until something finishes or
    /// `deadline` has passed; at least one slice runs. A caller that serves
    /// between calls (the engine) is therefore held up by at most one slice
    /// past its deadline. The slices and their order are the same however the
    /// run is cut, so results are bit-identical to [`Trainer::step`]'s.
    pub fn advance(
        &mut self,
        be: &B,
        model: &LlamaModel<B>,
        deadline: Option<Instant>,
    ) -> Result<Progress, TrainError> {
        loop {
            if let Some(why) = &self.broken {
                return Err(TrainError::Broken(why.clone()));
            }
            let t0 = Instant::now();
            match self.pending.take() {
                None => {
                    if self.is_done() {
                        return Ok(Progress::Done);
                    }
                    self.pending = Some(Pending::Step(self.begin_step()));
                    continue;
                }
                Some(Pending::Step(mut s)) => {
                    if let Err(e) = self.step_slice(be, model, &mut s) {
                        let _ = self.lora.zero_grads(be);
                        return Err(e.into());
                    }
                    s.seconds += t0.elapsed().as_secs_f64();
                    if s.next < s.mbs.len() || s.run.is_some() {
                        self.pending = Some(Pending::Step(s));
                    } else {
                        let report = self.finish_step(be, s)?;
                        let eval_due = match self.cfg.eval_every {
                            Some(n) => report.step.is_multiple_of(n),
                            None => self.state.next_batch == 0,
                        };
                        if self.valid.is_some() && (eval_due || self.is_done()) {
                            self.pending = Some(Pending::Eval(self.begin_eval(Some(report))));
                        } else {
                            return Ok(Progress::Step(report));
                        }
                    }
                }
                Some(Pending::Eval(mut e)) => {
                    self.eval_slice(be, model, &mut e)?;
                    if !e.done() {
                        self.pending = Some(Pending::Eval(e));
                    } else {
                        let eval = self.eval_report(&e);
                        match e.after_step {
                            Some(mut report) => {
                                report.seconds += e.seconds + t0.elapsed().as_secs_f64();
                                report.best = self.note_eval(be, &eval)?;
                                report.eval = Some(eval);
                                return Ok(Progress::Step(report));
                            }
                            None => {
                                if self.state.step == 0 {
                                    self.note_eval(be, &eval)?;
                                }
                                return Ok(Progress::InitialEval(eval));
                            }
                        }
                    }
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Progress::Working);
            }
        }
    }

    /// The micro-batches of the next optimiser step.
    fn begin_step(&mut self) -> PendingStep<B> {
        let epoch = self.state.epoch;
        if self.epoch_plan.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let plan = plan_epoch(&self.train.lengths(), &self.cfg.batching, self.cfg.seed, epoch);
            self.epoch_plan = Some((epoch, plan));
        }
        let plan = &self.epoch_plan.as_ref().expect("just set").1;
        let from = self.state.next_batch;
        let to = (from + self.cfg.grad_accum).min(plan.len());
        let mbs: Vec<MicroBatch> = plan[from..to].iter().map(|b| micro_batch(&self.train, &b.examples)).collect();
        let items = mbs.iter().map(MicroBatch::num_targets).sum();
        let tokens = mbs.iter().map(|m| m.tokens.len()).sum();
        PendingStep {
            tokens,
            mbs,
            next: 0,
            run: None,
            items,
            sums: CrossEntropySums::default(),
            to,
            plan_len: plan.len(),
            seconds: 0.0,
        }
    }

    fn step_slice(&mut self, be: &B, model: &LlamaModel<B>, s: &mut PendingStep<B>) -> Result<(), BackendError> {
        if s.run.is_none() {
            // Micro-batches with nothing to learn from are skipped.
            while s.next < s.mbs.len() && s.mbs[s.next].num_targets() == 0 {
                s.next += 1;
            }
            if s.next == s.mbs.len() {
                return Ok(());
            }
            let seed = mix(self.cfg.seed, self.state.step as u64, s.next as u64);
            let scale = 1.0 / s.items.max(1) as f32;
            s.run = Some(MicroBatchRun::new(std::mem::take(&mut s.mbs[s.next]), Some(scale), seed));
            s.next += 1;
        }
        let run = s.run.as_mut().expect("just set");
        if let Some(sums) = run.advance(be, model, &mut self.lora, &self.plan, &mut self.kv)? {
            s.sums.loss += sums.loss;
            s.sums.correct += sums.correct;
            s.run = None;
        }
        Ok(())
    }

    /// The optimiser update closing a step, and the step's report.
    fn finish_step(&mut self, be: &B, s: PendingStep<B>) -> Result<StepReport, TrainError> {
        let t0 = Instant::now();
        let stats = match optimizer_step(be, &mut self.lora, &self.cfg.optim, self.state.step, self.total_steps) {
            Ok(st) => st,
            Err(e) => {
                self.broken = Some(e.to_string());
                return Err(TrainError::Broken(e.to_string()));
            }
        };
        self.state.step += 1;
        self.state.tokens_seen += s.tokens as u64;
        self.state.next_batch = s.to;
        let epoch_done = s.to == s.plan_len;
        let epoch_progress = self.state.epoch as f64 + s.to as f64 / s.plan_len.max(1) as f64;
        if epoch_done {
            self.state.epoch += 1;
            self.state.next_batch = 0;
        }
        Ok(StepReport {
            step: self.state.step,
            total_steps: self.total_steps,
            epoch: epoch_progress,
            loss: s.sums.loss / s.items.max(1) as f64,
            token_accuracy: s.sums.correct as f64 / s.items.max(1) as f64,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            clipped: stats.clipped,
            tokens: s.tokens,
            trained_tokens: s.items,
            seconds: s.seconds + t0.elapsed().as_secs_f64(),
            eval: None,
            best: false,
        })
    }

    fn begin_eval(&self, after_step: Option<StepReport>) -> PendingEval<B> {
        let lengths = self.valid.as_ref().map(|v| v.lengths()).unwrap_or_default();
        PendingEval {
            groups: eval_groups(&lengths, &self.cfg.batching),
            next: 0,
            run: None,
            items: 0,
            sums: CrossEntropySums::default(),
            after_step,
            seconds: 0.0,
        }
    }

    fn eval_slice(&mut self, be: &B, model: &LlamaModel<B>, e: &mut PendingEval<B>) -> Result<(), TrainError> {
        let t0 = Instant::now();
        let Some(valid) = &self.valid else {
            return Err(TrainError::Config("there is no validation data".into()));
        };
        if e.run.is_none() {
            while e.next < e.groups.len() {
                let mb = micro_batch(valid, &e.groups[e.next]);
                e.next += 1;
                if mb.num_targets() > 0 {
                    e.items += mb.num_targets();
                    e.run = Some(MicroBatchRun::new(mb, None, 0));
                    break;
                }
            }
        }
        if let Some(run) = e.run.as_mut() {
            if let Some(sums) = run.advance(be, model, &mut self.lora, &self.plan, &mut self.kv)? {
                e.sums.loss += sums.loss;
                e.sums.correct += sums.correct;
                e.run = None;
            }
        }
        e.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Loss, token accuracy and perplexity over the whole validation set
    /// (no dropout, no gradients).
    pub fn evaluate(&mut self, be: &B, model: &LlamaModel<B>) -> Result<EvalReport, TrainError> {
        if self.valid.is_none() {
            return Err(TrainError::Config("there is no validation data".into()));
        }
        let mut e = self.begin_eval(None);
        while !e.done() {
            self.eval_slice(be, model, &mut e)?;
        }
        Ok(self.eval_report(&e))
    }

    /// The report of a finished evaluation.
    fn eval_report(&self, e: &PendingEval<B>) -> EvalReport {
        let loss = e.sums.loss / e.items.max(1) as f64;
        EvalReport {
            step: self.state.step,
            loss,
            token_accuracy: e.sums.correct as f64 / e.items.max(1) as f64,
            perplexity: loss.exp(),
            tokens: e.items,
        }
    }

    /// Queues the evaluation before the first step (the baseline early stopping
    /// and the best-weights choice compare against): the next
    /// [`Trainer::advance`] calls run it and end with [`Progress::InitialEval`].
    pub fn start_initial_eval(&mut self) -> Result<(), TrainError> {
        if self.valid.is_none() {
            return Err(TrainError::Config("there is no validation data".into()));
        }
        if self.pending.is_none() {
            self.pending = Some(Pending::Eval(self.begin_eval(None)));
        }
        Ok(())
    }

    /// The evaluation before the first step, run to the end.
    pub fn initial_eval(&mut self, be: &B, model: &LlamaModel<B>) -> Result<EvalReport, TrainError> {
        self.start_initial_eval()?;
        loop {
            if let Progress::InitialEval(e) = self.advance(be, model, None)? {
                return Ok(e);
            }
        }
    }

    /// Records an evaluation for early stopping; true when it is the best yet.
    fn note_eval(&mut self, be: &B, e: &EvalReport) -> Result<bool, TrainError> {
        let better = self.state.best_eval_loss.is_none_or(|b| e.loss < b);
        if better {
            self.state.best_eval_loss = Some(e.loss);
            self.state.best_step = Some(e.step);
            self.state.evals_without_improvement = 0;
            if self.cfg.early_stopping_patience.is_some() {
                self.best = Some(self.lora.download(be)?);
            }
        } else {
            self.state.evals_without_improvement += 1;
            if self.cfg.early_stopping_patience.is_some_and(|p| self.state.evals_without_improvement >= p) {
                self.state.stopped_early = true;
            }
        }
        Ok(better)
    }

    /// The adapter to publish: the best evaluation's weights when early
    /// stopping is on, else the current ones.
    pub fn final_weights(&self, be: &B) -> Result<Vec<HostFactor>, TrainError> {
        match &self.best {
            Some(b) if self.cfg.early_stopping_patience.is_some() => Ok(b.clone()),
            _ => Ok(self.lora.download(be)?),
        }
    }

    /// Writes a checkpoint that [`Trainer::resume`] continues from.
    pub fn save_checkpoint(&self, be: &B, dir: &Path, base_model: &str) -> Result<(), TrainError> {
        let weights = self.lora.download(be)?;
        let mut moments = Vec::new();
        for (layer, target, f) in self.lora.factors() {
            for (is_b, p) in [(false, &f.a), (true, &f.bt)] {
                let key = output::peft_key(layer, target, is_b);
                let (r, c) = be.shape(&p.m);
                moments.push((format!("{key}.exp_avg"), vec![r, c], be.download(&p.m)?));
                moments.push((format!("{key}.exp_avg_sq"), vec![r, c], be.download(&p.v)?));
            }
        }
        let state = json!({"state": self.state, "fingerprint": self.fingerprint, "config": self.cfg.to_json()});
        let best = self.best.as_ref().map(|b| output::adapter_weights(b));
        output::write_dir_atomic(dir, |tmp| {
            output::write_adapter(tmp, &self.lora.spec, base_model, &weights)?;
            output::write_atomic(&tmp.join(OPTIMIZER_FILE), &output::tensors_file(&moments))?;
            output::write_atomic(&tmp.join(STATE_FILE), &serde_json::to_vec_pretty(&state).expect("JSON"))?;
            if let Some(b) = &best {
                output::write_atomic(&tmp.join(BEST_FILE), b)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Continues the run saved in checkpoint `dir`: the same configuration and
    /// data (checked), the adapter, optimiser moments and position restored.
    pub fn resume(
        be: &B,
        model: &LlamaModel<B>,
        cfg: TrainConfig,
        train: Dataset,
        valid: Option<Dataset>,
        dir: &Path,
    ) -> Result<Self, TrainError> {
        let err = |reason: String| TrainError::Resume { path: dir.display().to_string(), reason };
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).map_err(|e| err(format!("{STATE_FILE}: {e}")))?;
        let saved: Value = serde_json::from_str(&text).map_err(|e| err(format!("{STATE_FILE}: {e}")))?;
        let state: TrainState =
            serde_json::from_value(saved["state"].clone()).map_err(|e| err(format!("{STATE_FILE}: {e}")))?;
        let lora =
            TrainableLora::from_peft_dir(be, &model.config, dir, cfg.lora.dropout).map_err(|e| err(e.to_string()))?;
        let mut t = Self::new(model, cfg, train, valid, lora)?;
        if saved["fingerprint"].as_str() != Some(t.fingerprint.as_str()) {
            return Err(err(
                "the checkpoint was made with other settings or other data; resume with the same ones".into()
            ));
        }
        let moments = output::read_tensors(&dir.join(OPTIMIZER_FILE)).map_err(err)?;
        let keys: Vec<(String, bool)> = t
            .lora
            .factors()
            .flat_map(|(l, tg, _)| [(output::peft_key(l, tg, false), false), (output::peft_key(l, tg, true), true)])
            .collect();
        for (p, (key, _)) in t.lora.params_mut().zip(&keys) {
            let (r, c) = be.shape(&p.m);
            for (suffix, slot) in [("exp_avg", &mut p.m), ("exp_avg_sq", &mut p.v)] {
                let name = format!("{key}.{suffix}");
                let v = moments.get(&name).ok_or_else(|| err(format!("{OPTIMIZER_FILE} has no {name}")))?;
                if v.len() != r * c {
                    return Err(err(format!("{name} has {} values, expected {}", v.len(), r * c)));
                }
                *slot = be.upload(v, r, c)?;
            }
        }
        if dir.join(BEST_FILE).exists() {
            let best = output::read_tensors(&dir.join(BEST_FILE)).map_err(err)?;
            let mut factors = t.lora.download(be)?;
            for f in &mut factors {
                let get = |b: bool| {
                    let k = output::peft_key(f.layer, f.target, b);
                    best.get(&k).cloned().ok_or_else(|| err(format!("{BEST_FILE} has no {k}")))
                };
                f.a = get(false)?;
                f.b = get(true)?;
            }
            t.best = Some(factors);
        }
        if state.step > t.total_steps || state.epoch > t.cfg.epochs {
            return Err(err(format!("the checkpoint is at step {}, past this run's end", state.step)));
        }
        t.state = state;
        Ok(t)
    }
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const BEST_FILE: &str = "best_adapter_model.safetensors";

/// The flattened micro-batch of examples `idx` of `data`.
fn micro_batch(data: &Dataset, idx: &[usize]) -> MicroBatch {
    MicroBatch::new(idx.iter().map(|&i| (data.examples[i].tokens.as_slice(), data.examples[i].targets.as_slice())))
}

/// Upper bounds of one micro-batch's tokens and sequences (training and evaluation).
fn micro_batch_bounds(lengths: &[usize], batching: &Batching, valid: Option<&Dataset>) -> (usize, usize) {
    let mut all: Vec<usize> = lengths.to_vec();
    if let Some(v) = valid {
        all.extend(v.lengths());
    }
    all.sort_unstable_by(|a, b| b.cmp(a));
    let longest = all.first().copied().unwrap_or(1);
    match *batching {
        Batching::Sequential { batch_size } | Batching::LengthGrouped { batch_size } => {
            let n = batch_size.max(1).min(all.len().max(1));
            (all.iter().take(n).sum::<usize>().max(1), n)
        }
        Batching::Packed { max_tokens } => {
            let shortest = all.last().copied().unwrap_or(1).max(1);
            (max_tokens.max(longest), (max_tokens / shortest).max(1))
        }
    }
}

/// Validation micro-batches: file order, cut as training cuts them (no shuffle).
fn eval_groups(lengths: &[usize], batching: &Batching) -> Vec<Vec<usize>> {
    match *batching {
        Batching::Sequential { batch_size } | Batching::LengthGrouped { batch_size } => {
            (0..lengths.len()).collect::<Vec<_>>().chunks(batch_size.max(1)).map(|c| c.to_vec()).collect()
        }
        Batching::Packed { max_tokens } => {
            let mut groups: Vec<Vec<usize>> = Vec::new();
            let mut used = 0;
            for (i, &len) in lengths.iter().enumerate() {
                match groups.last_mut() {
                    Some(g) if used + len <= max_tokens => {
                        g.push(i);
                        used += len;
                    }
                    _ => {
                        groups.push(vec![i]);
                        used = len;
                    }
                }
            }
            groups
        }
    }
}

/// A hash of what decides the run's arithmetic: the configuration and every
/// example's tokens and targets.
fn fingerprint(cfg: &TrainConfig, train: &Dataset, valid: Option<&Dataset>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(cfg.to_json().to_string().as_bytes());
    for d in std::iter::once(train).chain(valid) {
        h.update((d.examples.len() as u64).to_le_bytes());
        for e in &d.examples {
            h.update((e.tokens.len() as u64).to_le_bytes());
            for (&t, &m) in e.tokens.iter().zip(&e.targets) {
                h.update(t.to_le_bytes());
                h.update([m as u8]);
            }
        }
    }
    format!("{:x}", h.finalize())
}

/// The dropout seed of micro-batch `micro` of step `step`.
fn mix(seed: u64, step: u64, micro: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
