//! Co-serving: fine-tuning jobs trained on the engine thread, in turns between
//! serving steps, with the backend and model the engine already owns.
//!
//! A job's trainer runs in slices (one layer's forward or backward of a
//! micro-batch, a loss head, an optimiser update: see `Trainer::advance`). A
//! turn runs slices until the policy's time cap would be passed, predicting
//! the next slice's time from the last ones; so a serving step waits at most
//! the cap (or one slice, when a single slice is longer than the cap). While
//! serving has work, turns are spaced so training's share of engine time stays
//! near `busy_share`, and at least `min_steps_between_turns` serving steps
//! apart (so most tokens never wait for one); while serving is idle, training
//! runs back to back.
//!
//! Jobs run one at a time, in the order they were started; the others wait,
//! holding no device memory. Training memory is its own allocation sized by
//! the job's memory plan (checked against the budget before the first step);
//! it never takes KV blocks from serving. A failing job fails alone: its
//! error goes back as an event and the engine goes on serving.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::metrics::Metrics;
use crate::model::LlamaModel;
use crate::train::data::Dataset;
use crate::train::lora::TrainableLora;
use crate::train::run::{self, Lineage};
use crate::train::trainer::{EvalReport, Progress, StepReport, TrainConfig, TrainError, Trainer};

pub type JobId = String;

/// When training runs beside serving (`[train]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoServingPolicy {
    /// Longest a training turn may hold up a serving step.
    pub max_turn: Duration,
    /// Training's share of engine time while serving has work (0..1).
    pub busy_share: f64,
    /// Turn length while serving is idle (commands are read between turns).
    pub idle_turn: Duration,
    /// While serving, at least this many serving steps between two turns: most
    /// tokens then see no turn at all (p50 inter-token latency unchanged), the
    /// others wait one turn.
    pub min_steps_between_turns: u32,
}

impl Default for CoServingPolicy {
    fn default() -> Self {
        Self {
            max_turn: Duration::from_millis(400),
            busy_share: 0.5,
            idle_turn: Duration::from_millis(200),
            min_steps_between_turns: 3,
        }
    }
}

/// Everything a job needs to train, prepared off the engine thread.
pub struct JobSetup {
    pub job: JobId,
    pub config: TrainConfig,
    pub train: Dataset,
    pub valid: Option<Dataset>,
    /// Checkpoints go under `out_dir/checkpoints/`, the published adapter to `out_dir/adapter`.
    pub out_dir: PathBuf,
    /// A checkpoint to continue from (after a pause or a restart).
    pub resume_from: Option<PathBuf>,
    pub lineage: Lineage,
}

pub enum TrainCommand {
    Start(Box<JobSetup>),
    /// Stop and drop the job (nothing more is written).
    Cancel(JobId),
    /// Write a checkpoint of where the job is and drop it; `Start` with that
    /// checkpoint resumes it.
    Pause(JobId),
}

/// What the engine tells the job manager, in order, per job.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Started {
        job: JobId,
        step: usize,
        tokens: u64,
        total_steps: usize,
        memory_bytes: usize,
        saved_layers: usize,
    },
    /// The evaluation before the first step.
    Eval {
        job: JobId,
        eval: EvalReport,
    },
    Step {
        job: JobId,
        report: StepReport,
    },
    /// A resumable checkpoint, complete on disk (servable as an adapter).
    Checkpoint {
        job: JobId,
        step: usize,
        dir: PathBuf,
        report: Option<StepReport>,
    },
    Succeeded {
        job: JobId,
        adapter_dir: PathBuf,
        steps: usize,
        stopped_early: bool,
        tokens: u64,
    },
    Paused {
        job: JobId,
        checkpoint: Option<(usize, PathBuf)>,
    },
    Cancelled {
        job: JobId,
    },
    Failed {
        job: JobId,
        error: String,
    },
}

struct ActiveJob<B: Backend> {
    setup: Box<JobSetup>,
    /// Built when the job reaches the head of the queue.
    trainer: Option<Trainer<B>>,
    last: Option<StepReport>,
    compute_s: f64,
}

pub struct CoServing<B: Backend> {
    policy: CoServingPolicy,
    jobs: VecDeque<ActiveJob<B>>,
    events: Sender<TrainEvent>,
    metrics: Arc<Metrics>,
    /// Engine time recently spent serving and training (decaying sums), for the share.
    serve_s: f64,
    train_s: f64,
    /// Recent slice duration, to stop a turn before it passes the cap.
    slice_s: f64,
    /// Serving steps since the last turn.
    steps_since_turn: u32,
    /// Set when a training step found the device lost (the engine must stop).
    device_lost: Option<String>,
}

impl<B: Backend> CoServing<B> {
    pub fn new(policy: CoServingPolicy, events: Sender<TrainEvent>, metrics: Arc<Metrics>) -> Self {
        Self {
            policy,
            jobs: VecDeque::new(),
            events,
            metrics,
            serve_s: 0.0,
            train_s: 0.0,
            slice_s: 0.0,
            steps_since_turn: 0,
            device_lost: None,
        }
    }

    pub fn has_work(&self) -> bool {
        !self.jobs.is_empty()
    }

    fn send(&self, e: TrainEvent) {
        // The manager gone means the server is shutting down.
        let _ = self.events.send(e);
    }

    pub fn command(&mut self, be: &B, c: TrainCommand) {
        match c {
            TrainCommand::Start(setup) => {
                if self.jobs.iter().any(|j| j.setup.job == setup.job) {
                    return;
                }
                self.jobs.push_back(ActiveJob { setup, trainer: None, last: None, compute_s: 0.0 });
            }
            TrainCommand::Cancel(id) => {
                if let Some(i) = self.position(&id) {
                    self.jobs.remove(i);
                    self.send(TrainEvent::Cancelled { job: id });
                }
            }
            TrainCommand::Pause(id) => {
                let Some(i) = self.position(&id) else { return };
                let j = self.jobs.remove(i).expect("found");
                let checkpoint = match checkpoint_now(be, &j) {
                    Ok(Some((step, dir, _))) => Some((step, dir)),
                    // Not started, or no step taken: resuming starts over.
                    Ok(None) => j.setup.resume_from.as_ref().and_then(|p| checkpoint_step(p).map(|s| (s, p.clone()))),
                    Err(e) => {
                        self.send(TrainEvent::Failed { job: id, error: format!("pausing: {e}") });
                        return;
                    }
                };
                self.send(TrainEvent::Paused { job: id, checkpoint });
            }
        }
    }

    /// At shutdown: a checkpoint of every started job's last step (so the
    /// next start resumes from there), reported as `Checkpoint` events.
    pub fn checkpoint_all(&mut self, be: &B) {
        for j in std::mem::take(&mut self.jobs) {
            if let Ok(Some((step, dir, true))) = checkpoint_now(be, &j) {
                self.send(TrainEvent::Checkpoint { job: j.setup.job, step, dir, report: j.last });
            }
        }
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.jobs.iter().position(|j| j.setup.job == id)
    }

    /// Called once per engine iteration, after the serving step (if any),
    /// which took `served`. Runs a training turn if the policy allows one;
    /// returns how long it ran.
    pub fn turn(&mut self, be: &B, model: &LlamaModel<B>, serving_busy: bool, served: Duration) -> Duration {
        // Decaying sums: the share looks at roughly the last few seconds.
        self.serve_s = self.serve_s * 0.9 + served.as_secs_f64();
        self.train_s *= 0.9;
        if served > Duration::ZERO {
            self.steps_since_turn = self.steps_since_turn.saturating_add(1);
        }
        if self.jobs.is_empty() {
            return Duration::ZERO;
        }
        let budget = if serving_busy {
            let total = self.serve_s + self.train_s;
            if total > 0.0 && self.train_s / total >= self.policy.busy_share {
                return Duration::ZERO;
            }
            if self.steps_since_turn < self.policy.min_steps_between_turns {
                return Duration::ZERO;
            }
            self.policy.max_turn
        } else {
            self.policy.idle_turn
        };
        self.steps_since_turn = 0;
        let t0 = Instant::now();
        self.run_head(be, model, t0 + budget);
        let took = t0.elapsed();
        self.train_s += took.as_secs_f64();
        self.metrics.train.turn_seconds.observe(took.as_secs_f64());
        self.metrics.train.training_seconds.add(took.as_secs_f64());
        if serving_busy {
            self.metrics.train.serving_steps_delayed.add(1.0);
        }
        took
    }

    /// Slices of the first job until `deadline` (at least one slice).
    fn run_head(&mut self, be: &B, model: &LlamaModel<B>, deadline: Instant) {
        let (events, metrics) = (self.events.clone(), self.metrics.clone());
        let send = |e: TrainEvent| {
            let _ = events.send(e);
        };
        let mut ran_one = false;
        while let Some(j) = self.jobs.front_mut() {
            let now = Instant::now();
            if ran_one && now + Duration::from_secs_f64(self.slice_s) > deadline {
                return;
            }
            ran_one = true;
            if j.trainer.is_none() {
                match start(be, model, &j.setup) {
                    Ok(t) => {
                        let plan = t.memory_plan();
                        metrics.train.memory_bytes.set(plan.peak_bytes as f64);
                        let e = TrainEvent::Started {
                            job: j.setup.job.clone(),
                            step: t.state().step,
                            tokens: t.state().tokens_seen,
                            total_steps: t.total_steps(),
                            memory_bytes: plan.peak_bytes,
                            saved_layers: plan.saved_layers,
                        };
                        j.trainer = Some(t);
                        send(e);
                    }
                    Err(e) => {
                        if let Some(why) = device_lost_reason(be, e.is_device_lost(), &e) {
                            self.device_lost = Some(why);
                            return;
                        }
                        let job = j.setup.job.clone();
                        self.jobs.pop_front();
                        send(TrainEvent::Failed { job, error: e.to_string() });
                    }
                }
                continue;
            }
            let t0 = Instant::now();
            let trainer = j.trainer.as_mut().expect("started above");
            let result = trainer.advance(be, model, Some(t0));
            let took = t0.elapsed().as_secs_f64();
            j.compute_s += took;
            self.slice_s = if self.slice_s == 0.0 { took } else { 0.7 * self.slice_s + 0.3 * took };
            let job = j.setup.job.clone();
            match result {
                Ok(Progress::Working) => {}
                Ok(Progress::InitialEval(eval)) => send(TrainEvent::Eval { job, eval }),
                Ok(Progress::Step(report)) => {
                    let m = &metrics.train;
                    m.steps.add(1.0);
                    m.tokens.add(report.tokens as f64);
                    m.loss.set(report.loss);
                    if report.seconds > 0.0 {
                        m.tokens_per_second.set(report.tokens as f64 / report.seconds);
                    }
                    let done = trainer.is_done();
                    let save = trainer.config().save_every.is_some_and(|n| report.step.is_multiple_of(n));
                    j.last = Some(report.clone());
                    send(TrainEvent::Step { job: job.clone(), report: report.clone() });
                    if save && !done {
                        let dir = run::checkpoint_dir(&j.setup.out_dir, report.step);
                        match trainer.save_checkpoint(be, &dir, &j.setup.lineage.base_model) {
                            Ok(()) => {
                                send(TrainEvent::Checkpoint { job, step: report.step, dir, report: Some(report) })
                            }
                            Err(e) => {
                                if let Some(why) = device_lost_reason(be, e.is_device_lost(), &e) {
                                    self.device_lost = Some(why);
                                    return;
                                }
                                self.fail_head(format!("writing the step-{} checkpoint: {e}", report.step))
                            }
                        }
                    }
                }
                Ok(Progress::Done) => self.finish_head(be),
                Err(e) => {
                    // A broken optimiser step hides the device's error in
                    // its message: the backend's own flag tells.
                    if let Some(why) = device_lost_reason(be, e.is_device_lost(), &e) {
                        self.device_lost = Some(why);
                        return;
                    }
                    self.fail_head(e.to_string());
                }
            }
        }
    }

    /// Why the device is lost, once a training step found it so.
    pub fn device_lost(&self) -> Option<&str> {
        self.device_lost.as_deref()
    }

    fn fail_head(&mut self, error: String) {
        if let Some(j) = self.jobs.pop_front() {
            self.metrics.train.memory_bytes.set(0.0);
            self.send(TrainEvent::Failed { job: j.setup.job, error });
        }
    }

    /// Publishes the finished head job's adapter.
    fn finish_head(&mut self, be: &B) {
        let Some(j) = self.jobs.pop_front() else { return };
        self.metrics.train.memory_bytes.set(0.0);
        let t = j.trainer.as_ref().expect("a finished job has a trainer");
        let dir = j.setup.out_dir.join("adapter");
        match run::publish(be, t, &dir, &j.setup.lineage, j.last.as_ref(), j.compute_s) {
            Ok(()) => self.send(TrainEvent::Succeeded {
                job: j.setup.job,
                adapter_dir: dir,
                steps: t.state().step,
                stopped_early: t.state().stopped_early,
                tokens: t.state().tokens_seen,
            }),
            Err(e) => self.send(TrainEvent::Failed { job: j.setup.job, error: format!("writing the adapter: {e}") }),
        }
    }
}

/// A checkpoint of where a started job is: `(step, dir, written now)`; `None`
/// before its first step. A checkpoint of this step may exist already (a
/// `save_every` one): it holds the same state and is not written again.
fn checkpoint_now<B: Backend>(be: &B, j: &ActiveJob<B>) -> Result<Option<(usize, PathBuf, bool)>, TrainError> {
    let Some(t) = &j.trainer else { return Ok(None) };
    let step = t.state().step;
    if step == 0 {
        return Ok(None);
    }
    let dir = run::checkpoint_dir(&j.setup.out_dir, step);
    if dir.exists() {
        return Ok(Some((step, dir, false)));
    }
    t.save_checkpoint(be, &dir, &j.setup.lineage.base_model)?;
    Ok(Some((step, dir, true)))
}

/// The trainer for `s`: fresh, or resumed from its checkpoint (with the
/// evaluation before the first step queued when there is validation data).
/// Why training must stop, if the device is lost (`lost_error`: the error
/// says so; otherwise the backend is asked, since a broken optimiser step or
/// a failed checkpoint hides the device's error in its own). The job is then
/// not failed: as at shutdown, it resumes from its last checkpoint when the
/// server restarts.
fn device_lost_reason<B: Backend>(be: &B, lost_error: bool, e: &dyn std::fmt::Display) -> Option<String> {
    (lost_error || be.device_lost()).then(|| format!("the device is lost (a training step failed: {e})"))
}

fn start<B: Backend>(be: &B, model: &LlamaModel<B>, s: &JobSetup) -> Result<Trainer<B>, TrainError> {
    let (cfg, train, valid) = (s.config.clone(), s.train.clone(), s.valid.clone());
    let mut t = match &s.resume_from {
        Some(dir) => Trainer::resume(be, model, cfg, train, valid, dir)?,
        None => {
            let lora = TrainableLora::init(be, &model.config, &cfg.lora, cfg.seed)?;
            Trainer::new(model, cfg, train, valid, lora)?
        }
    };
    if t.state().step == 0 && t.has_validation() {
        t.start_initial_eval()?;
    }
    Ok(t)
}

/// The step of a checkpoint directory named by `run::checkpoint_dir`.
pub fn checkpoint_step(dir: &std::path::Path) -> Option<usize> {
    dir.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse().ok()
}
