//! Fine-tuning jobs: the OpenAI job life cycle over the store and the engine.
//!
//! ```text
//! create ─ validating_files ─(files parse)─ queued ─(engine starts it)─ running ─ succeeded
//!                │                             │  ▲                        │  ▲   └ failed
//!                └ failed (line N: ...)         │  └── resume ── paused ◄──┘  │
//!                                               └──────── cancel ─────────────┴─► cancelled
//! ```
//!
//! The manager owns the job records (one writer: every change goes through
//! [`JobManager::update`] under one lock) and turns the engine's training
//! events into job states, events, checkpoints and served adapters. It runs
//! no training itself: the engine thread does (`engine::training`). Files are
//! parsed on a thread of their own, never on the async runtime. After a
//! restart, [`JobManager::recover`] serves every published adapter again and
//! restarts unfinished jobs from their newest complete checkpoint.

pub mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::engine::training::{checkpoint_step, JobSetup, TrainCommand, TrainEvent};
use crate::engine::EngineHandle;
use crate::lora::LoraRegistry;
use crate::store::{new_id, unix_now, CheckpointRecord, EventRecord, FileRecord, Page, Store, StoreError};
use crate::tokenizer::Tokenizer;
use crate::train::data::{parse_jsonl, DataOptions, Dataset};
use crate::train::run::{FileRecord as LineageFile, Lineage};
use crate::train::trainer::total_steps;

pub use spec::{JobRequest, JobSettings};

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// 400, naming the field.
    #[error("{message}")]
    Invalid { param: String, message: String },
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 400: the job is not in a state that allows this.
    #[error("{0}")]
    State(String),
    /// 503.
    #[error("the engine has stopped")]
    EngineStopped,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// OpenAI's job error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

/// tandem's part of a job: its settings and progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobProgress {
    #[schema(value_type = Object)]
    pub settings: Value,
    pub step: usize,
    pub total_steps: Option<usize>,
    /// Memory the job reserved on the device (adapter, optimiser, activations).
    pub memory_bytes: Option<u64>,
    pub examples: Option<usize>,
    /// When it last started running (for the finish estimate).
    pub running_since: Option<u64>,
    pub step_at_start: usize,
}

/// A job as `GET /v1/fine_tuning/jobs/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    pub error: Option<JobError>,
    pub fine_tuned_model: Option<String>,
    pub finished_at: Option<u64>,
    #[schema(value_type = Object)]
    pub hyperparameters: Value,
    pub model: String,
    pub organization_id: String,
    pub result_files: Vec<String>,
    pub seed: u64,
    pub status: String,
    pub trained_tokens: Option<u64>,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub estimated_finish: Option<u64>,
    pub metadata: Option<BTreeMap<String, String>>,
    #[schema(value_type = Object)]
    pub method: Value,
    #[schema(value_type = Vec<Object>)]
    pub integrations: Vec<Value>,
    pub user_provided_suffix: Option<String>,
    pub tandem: JobProgress,
}

impl Job {
    fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// What the manager needs of the server.
pub struct JobsConfig {
    /// The base model's served name (jobs must name it) and its other names.
    pub base_names: Vec<String>,
    pub organization: String,
    pub max_rank: usize,
    pub max_model_len: usize,
    pub memory_budget: Option<usize>,
    pub logits_chunk_bytes: usize,
    /// The base model as given (path or hub id), for lineage.
    pub base_spec: String,
    pub device: String,
}

pub struct JobManager {
    store: Arc<Store>,
    engine: EngineHandle,
    registry: Arc<LoraRegistry>,
    tokenizer: Arc<Tokenizer>,
    cfg: JobsConfig,
    /// Serialises read-modify-write of job records.
    lock: Mutex<()>,
    /// Job states that could not be saved because the data directory was
    /// full or read-only: the truth the API shows (a job must not look
    /// "running" forever because its failure could not be written) until a
    /// save succeeds. Retried every few seconds; lost on a restart, which
    /// then recovers the job from what is on disk.
    unsaved: Mutex<BTreeMap<String, Job>>,
    /// The base model's files and hashes, computed once (for lineage).
    base_files: std::sync::OnceLock<Vec<LineageFile>>,
}

/// Whether a job change that the data directory cannot take may stand in memory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Saving {
    Required,
    KeepIfUnsaved,
}

const STATUSES: [&str; 7] = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];

impl JobManager {
    /// The manager, with a thread that applies the engine's training events.
    pub fn start(
        store: Arc<Store>,
        engine: EngineHandle,
        registry: Arc<LoraRegistry>,
        tokenizer: Arc<Tokenizer>,
        cfg: JobsConfig,
    ) -> Arc<Self> {
        let events = engine.take_train_events();
        let m = Arc::new(Self {
            store,
            engine,
            registry,
            tokenizer,
            cfg,
            lock: Mutex::new(()),
            unsaved: Mutex::new(BTreeMap::new()),
            base_files: std::sync::OnceLock::new(),
        });
        if let Some(rx) = events {
            let weak = Arc::downgrade(&m);
            let _ = std::thread::Builder::new().name("tandem-jobs".into()).spawn(move || loop {
                use std::sync::mpsc::RecvTimeoutError;
                let event = match rx.recv_timeout(std::time::Duration::from_secs(2)) {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                let Some(m) = weak.upgrade() else { return };
                m.save_unsaved();
                if let Some(e) = event {
                    if let Err(err) = m.on_event(e) {
                        tracing::warn!("recording a training event failed: {err}");
                    }
                }
            });
        }
        m
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn base_files(&self) -> Vec<LineageFile> {
        self.base_files.get_or_init(|| crate::train::run::base_files(&self.cfg.base_spec).unwrap_or_default()).clone()
    }

    /// The name a job's adapter is served under.
    fn model_name(&self, job: &Job) -> String {
        format!(
            "ft:{}:{}:{}:{}",
            job.model,
            self.cfg.organization,
            job.user_provided_suffix.as_deref().unwrap_or(""),
            job.id
        )
    }

    pub fn job(&self, id: &str) -> Result<Job, JobsError> {
        if let Some(j) = self.unsaved_state(id) {
            return Ok(j);
        }
        let v = self.store.job(id)?.ok_or_else(|| JobsError::NotFound(format!("fine-tuning job '{id}' not found")))?;
        serde_json::from_value(v).map_err(|e| StoreError::Corrupt { id: id.into(), reason: e.to_string() }.into())
    }

    pub fn list(
        &self,
        after: Option<&str>,
        limit: usize,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Page<Job>, JobsError> {
        // Metadata filters are applied over pages of the store's order.
        let mut out = Vec::new();
        let mut cursor = after.map(str::to_string);
        loop {
            let page = self.store.jobs(cursor.as_deref(), limit.max(1))?;
            let n = page.data.len();
            for v in page.data {
                let j: Job = serde_json::from_value(v)
                    .map_err(|e| StoreError::Corrupt { id: "job".into(), reason: e.to_string() })?;
                let j = self.unsaved_state(&j.id).unwrap_or(j);
                cursor = Some(j.id.clone());
                let md = j.metadata.clone().unwrap_or_default();
                if metadata.iter().all(|(k, v)| md.get(k) == Some(v)) {
                    if out.len() == limit {
                        return Ok(Page { data: out, has_more: true });
                    }
                    out.push(j);
                }
            }
            if !page.has_more || n == 0 {
                return Ok(Page { data: out, has_more: false });
            }
        }
    }

    /// Applies `f` to job `id` and saves it (one writer at a time). For a
    /// client's action: if it cannot be saved it does not happen (a cancel
    /// that a restart would undo must not be acknowledged).
    fn update(&self, id: &str, f: impl FnOnce(&mut Job) -> Result<(), JobsError>) -> Result<Job, JobsError> {
        self.apply(id, f, || {}, Saving::Required)
    }

    /// [`JobManager::update`] for what has already happened (the engine's
    /// events, a failed validation): if the data directory cannot take it,
    /// it is kept in memory and retried (see `unsaved`).
    fn record(&self, id: &str, f: impl FnOnce(&mut Job) -> Result<(), JobsError>) -> Result<Job, JobsError> {
        self.apply(id, f, || {}, Saving::KeepIfUnsaved)
    }

    /// [`JobManager::update`], then `then` while still holding the lock: engine
    /// commands sent there reach the engine in the order of the state changes
    /// (a cancel can never overtake the start it cancels).
    fn update_then(
        &self,
        id: &str,
        f: impl FnOnce(&mut Job) -> Result<(), JobsError>,
        then: impl FnOnce(),
    ) -> Result<Job, JobsError> {
        self.apply(id, f, then, Saving::Required)
    }

    fn apply(
        &self,
        id: &str,
        f: impl FnOnce(&mut Job) -> Result<(), JobsError>,
        then: impl FnOnce(),
        saving: Saving,
    ) -> Result<Job, JobsError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut job = self.job(id)?;
        f(&mut job)?;
        self.save(&job, saving)?;
        then();
        Ok(job)
    }

    fn save(&self, job: &Job, saving: Saving) -> Result<(), JobsError> {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
        match self.put(job) {
            Ok(()) => {
                unsaved.remove(&job.id);
            }
            Err(e) if saving == Saving::KeepIfUnsaved && e.fault().is_some() => {
                tracing::error!(
                    "job {} is {} but could not be saved ({e}); kept in memory, retried",
                    job.id,
                    job.status
                );
                unsaved.insert(job.id.clone(), job.clone());
            }
            Err(e) => return Err(e.into()),
        }
        drop(unsaved);
        self.count_states();
        Ok(())
    }

    fn put(&self, job: &Job) -> Result<(), StoreError> {
        self.store.put_job(&job.id, &job.status, &serde_json::to_value(job).expect("a job serialises"))
    }

    fn unsaved_state(&self, id: &str) -> Option<Job> {
        self.unsaved.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Retries saving what `save` had to keep in memory (called on every
    /// training event: nothing to do, no lock taken, when all was saved).
    fn save_unsaved(&self) {
        if self.unsaved.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            return;
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let pending: Vec<Job> = self.unsaved.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for job in pending {
            if self.put(&job).is_ok() {
                self.unsaved.lock().unwrap_or_else(|e| e.into_inner()).remove(&job.id);
                tracing::info!("job {} saved ({}) now that the data directory takes writes", job.id, job.status);
                self.count_states();
            }
        }
    }

    fn count_states(&self) {
        let Ok(stored) = self.store.job_counts() else { return };
        let mut counts: BTreeMap<&'static str, u64> = STATUSES.iter().map(|s| (*s, 0)).collect();
        for (status, n) in stored {
            if let Some(c) = STATUSES.iter().find(|s| **s == status).and_then(|s| counts.get_mut(*s)) {
                *c = n;
            }
        }
        *self.engine.metrics().train.jobs.lock().unwrap_or_else(|e| e.into_inner()) = counts;
    }

    fn event(&self, job: &str, level: &str, kind: &str, message: impl Into<String>, data: Value) {
        let e = EventRecord {
            id: new_id("ftevent-"),
            created_at: unix_now(),
            level: level.into(),
            message: message.into(),
            kind: kind.into(),
            data,
        };
        if let Err(err) = self.store.add_event(job, &e) {
            tracing::warn!("recording an event of job {job}: {err}");
        }
    }

    fn fine_tune_file(&self, id: &str, param: &str) -> Result<FileRecord, JobsError> {
        let f = self.store.file(id)?.ok_or_else(|| JobsError::Invalid {
            param: param.into(),
            message: format!("file '{id}' does not exist"),
        })?;
        if f.purpose != "fine-tune" {
            return Err(JobsError::Invalid {
                param: param.into(),
                message: format!("file '{id}' has purpose '{}'; training files need purpose 'fine-tune'", f.purpose),
            });
        }
        Ok(f)
    }

    /// Creates a job (status `validating_files`) and checks its files on a
    /// thread of their own; the job then queues for the engine or fails.
    pub fn create(self: &Arc<Self>, req: JobRequest) -> Result<Job, JobsError> {
        if !self.cfg.base_names.contains(&req.model) {
            return Err(JobsError::Invalid {
                param: "model".into(),
                message: format!(
                    "model '{}' cannot be fine-tuned here; this server trains adapters for '{}'",
                    req.model, self.cfg.base_names[0]
                ),
            });
        }
        let settings = req.check(self.cfg.max_rank, self.cfg.max_model_len)?;
        self.fine_tune_file(&req.training_file, "training_file")?;
        if let Some(v) = &req.validation_file {
            self.fine_tune_file(v, "validation_file")?;
        }
        let job = Job {
            id: new_id("ftjob-"),
            object: "fine_tuning.job".into(),
            created_at: unix_now(),
            error: None,
            fine_tuned_model: None,
            finished_at: None,
            hyperparameters: settings.hyperparameters_json(),
            model: self.cfg.base_names[0].clone(),
            organization_id: self.cfg.organization.clone(),
            result_files: vec![],
            seed: settings.seed,
            status: "validating_files".into(),
            trained_tokens: None,
            training_file: req.training_file.clone(),
            validation_file: req.validation_file.clone(),
            estimated_finish: None,
            metadata: req.metadata.clone(),
            method: req.method_json(&settings),
            integrations: vec![],
            user_provided_suffix: req.suffix.clone(),
            tandem: JobProgress {
                settings: serde_json::to_value(&settings).expect("settings serialise"),
                step: 0,
                total_steps: None,
                memory_bytes: None,
                examples: None,
                running_since: None,
                step_at_start: 0,
            },
        };
        {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.save(&job, Saving::Required)?;
        }
        self.event(&job.id, "info", "message", format!("Created fine-tuning job: {}", job.id), Value::Null);
        self.event(&job.id, "info", "message", format!("Validating training file: {}", job.training_file), Value::Null);
        self.spawn_prepare(job.id.clone(), None);
        Ok(job)
    }

    /// Parses the job's files and starts it on the engine (from `resume_from`
    /// when given), on a thread of its own.
    fn spawn_prepare(self: &Arc<Self>, id: String, resume_from: Option<PathBuf>) {
        let m = self.clone();
        let _ = std::thread::Builder::new().name("tandem-job-files".into()).spawn(move || {
            if let Err(e) = m.prepare(&id, resume_from) {
                tracing::warn!("starting job {id}: {e}");
            }
        });
    }

    fn prepare(&self, id: &str, resume_from: Option<PathBuf>) -> Result<(), JobsError> {
        let job = self.job(id)?;
        let mut settings: JobSettings = serde_json::from_value(job.tandem.settings.clone())
            .map_err(|e| StoreError::Corrupt { id: id.into(), reason: e.to_string() })?;
        let opts = DataOptions::new(settings.max_seq_len);
        let read = |file: &str, param: &str| -> Result<(Dataset, LineageFile), JobError> {
            let fail = |code: &str, message: String| JobError { code: code.into(), message, param: Some(param.into()) };
            let rec = self
                .store
                .file(file)
                .map_err(|e| fail("file_unreadable", e.to_string()))?
                .ok_or_else(|| fail("file_not_found", format!("file '{file}' was deleted")))?;
            let path = self.store.file_path(file);
            let bytes = std::fs::read(&path).map_err(|e| fail("file_unreadable", format!("{file}: {e}")))?;
            let data = parse_jsonl(&bytes, &self.tokenizer, &opts)
                .map_err(|e| fail(&format!("invalid_{param}"), format!("{file}: {e}")))?;
            Ok((data, LineageFile { path: file.to_string(), sha256: rec.sha256, bytes: rec.bytes }))
        };
        let parsed = read(&job.training_file, "training_file").and_then(|t| match &job.validation_file {
            Some(v) => read(v, "validation_file").map(|v| (t, Some(v))),
            None => Ok((t, None)),
        });
        let ((train, train_file), valid) = match parsed {
            Ok(p) => p,
            Err(err) => {
                self.event(id, "error", "message", err.message.clone(), Value::Null);
                self.record(id, |j| {
                    if !j.is_final() {
                        j.status = "failed".into();
                        j.finished_at = Some(unix_now());
                        j.error = Some(err);
                    }
                    Ok(())
                })?;
                return Ok(());
            }
        };
        let (valid, valid_file) = match valid {
            Some((d, f)) => (Some(d), Some(f)),
            None => (None, None),
        };
        settings.resolve(train.examples.len());
        let config = settings.train_config(train.examples.len(), self.cfg.memory_budget, self.cfg.logits_chunk_bytes);
        if let Err(e) = config.validate() {
            return self.fail(id, "invalid_hyperparameters", e);
        }
        let steps = total_steps(&config, &train.lengths());
        let out_dir = self.store.job_dir(id);
        let lineage = Lineage {
            base_model: self.cfg.base_spec.clone(),
            base_files: self.base_files(),
            train_file: Some(train_file),
            validation_file: valid_file,
            init_adapter: None,
            device: self.cfg.device.clone(),
            job: Some(id.to_string()),
        };
        let examples = train.examples.len();
        let fresh = resume_from.is_none();
        let setup = JobSetup { job: id.into(), config, train, valid, out_dir, resume_from, lineage };
        let mut sent = true;
        let job = self.apply(
            id,
            |j| {
                if j.status != "validating_files" && j.status != "queued" {
                    return Err(JobsError::State(format!("job {id} is {}", j.status)));
                }
                j.status = "queued".into();
                j.hyperparameters = settings.hyperparameters_json();
                j.method = json!({"type": "supervised", "supervised": {"hyperparameters": j.hyperparameters}});
                j.tandem.settings = serde_json::to_value(&settings).expect("settings serialise");
                j.tandem.total_steps = Some(steps);
                j.tandem.examples = Some(examples);
                Ok(())
            },
            || sent = self.engine.train(TrainCommand::Start(Box::new(setup))),
            // Validated: queue it even if the directory cannot record that now.
            Saving::KeepIfUnsaved,
        );
        if job.is_err() {
            return Ok(()); // cancelled or paused meanwhile
        }
        if !sent {
            return self.fail(id, "engine_stopped", "the engine stopped".into());
        }
        if fresh {
            self.event(id, "info", "message", "Files validated, moving job to queued state", Value::Null);
        }
        Ok(())
    }

    fn fail(&self, id: &str, code: &str, message: String) -> Result<(), JobsError> {
        self.event(id, "error", "message", message.clone(), Value::Null);
        self.record(id, |j| {
            if !j.is_final() {
                j.status = "failed".into();
                j.finished_at = Some(unix_now());
                j.error = Some(JobError { code: code.into(), message, param: None });
            }
            Ok(())
        })?;
        Ok(())
    }

    pub fn cancel(&self, id: &str) -> Result<Job, JobsError> {
        let job = self.update_then(
            id,
            |j| {
                if j.is_final() {
                    return Err(JobsError::State(format!("job {id} has already {}; it cannot be cancelled", j.status)));
                }
                j.status = "cancelled".into();
                j.finished_at = Some(unix_now());
                j.estimated_finish = None;
                Ok(())
            },
            || {
                self.engine.train(TrainCommand::Cancel(id.into()));
            },
        )?;
        self.event(id, "info", "message", "Job cancelled", Value::Null);
        Ok(job)
    }

    pub fn pause(&self, id: &str) -> Result<Job, JobsError> {
        let job = self.update_then(
            id,
            |j| {
                if !matches!(j.status.as_str(), "queued" | "running") {
                    return Err(JobsError::State(format!(
                        "job {id} is {}; only a queued or running job can be paused",
                        j.status
                    )));
                }
                j.status = "paused".into();
                j.estimated_finish = None;
                Ok(())
            },
            || {
                self.engine.train(TrainCommand::Pause(id.into()));
            },
        )?;
        self.event(id, "info", "message", "Job paused", Value::Null);
        Ok(job)
    }

    pub fn resume(self: &Arc<Self>, id: &str) -> Result<Job, JobsError> {
        let job = self.update(id, |j| {
            if j.status != "paused" {
                return Err(JobsError::State(format!("job {id} is {}; only a paused job can be resumed", j.status)));
            }
            j.status = "queued".into();
            Ok(())
        })?;
        let from = latest_checkpoint(&self.store.job_dir(id));
        self.event(
            id,
            "info",
            "message",
            match &from {
                Some((s, _)) => format!("Job resumed from its step-{s} checkpoint"),
                None => "Job resumed from the start".into(),
            },
            Value::Null,
        );
        self.spawn_prepare(id.into(), from.map(|(_, d)| d));
        Ok(job)
    }

    /// After a start: serves every published adapter again and restarts the
    /// jobs that were not finished from their newest complete checkpoint.
    pub fn recover(self: &Arc<Self>) -> Result<(), JobsError> {
        for c in self.store.all_checkpoints()? {
            self.serve(&c.model, Path::new(&c.dir));
        }
        for v in self.store.jobs_with_status(&["succeeded"])? {
            let j: Job = serde_json::from_value(v)
                .map_err(|e| StoreError::Corrupt { id: "job".into(), reason: e.to_string() })?;
            if let Some(name) = &j.fine_tuned_model {
                self.serve(name, &self.store.job_dir(&j.id).join("adapter"));
            }
        }
        for v in self.store.jobs_with_status(&["validating_files", "queued", "running"])? {
            let Some(id) = v["id"].as_str().map(str::to_string) else { continue };
            let from = latest_checkpoint(&self.store.job_dir(&id));
            let _ = self.update(&id, |j| {
                j.status = "queued".into();
                Ok(())
            });
            self.event(
                &id,
                "info",
                "message",
                match &from {
                    Some((s, _)) => format!("Server restarted: resuming from the step-{s} checkpoint"),
                    None => "Server restarted: starting the job again".into(),
                },
                Value::Null,
            );
            self.spawn_prepare(id, from.map(|(_, d)| d));
        }
        self.count_states();
        Ok(())
    }

    fn serve(&self, name: &str, dir: &Path) {
        if let Err(e) = self.registry.load(name, dir, true, true) {
            tracing::warn!("serving {name} from {}: {e}", dir.display());
        }
    }

    fn on_event(&self, e: TrainEvent) -> Result<(), JobsError> {
        match e {
            TrainEvent::Started { job, step, tokens, total_steps, memory_bytes, saved_layers } => {
                self.record(&job, |j| {
                    j.trained_tokens = Some(tokens);
                    if j.status == "queued" {
                        j.status = "running".into();
                    }
                    j.tandem.total_steps = Some(total_steps);
                    j.tandem.memory_bytes = Some(memory_bytes as u64);
                    j.tandem.running_since = Some(unix_now());
                    j.tandem.step_at_start = step;
                    j.tandem.step = step;
                    Ok(())
                })?;
                self.event(
                    &job,
                    "info",
                    "message",
                    format!(
                        "Fine-tuning job started at step {step} of {total_steps}: {:.1} MiB reserved for training \
                         ({saved_layers} layers keep activations, the rest are recomputed)",
                        memory_bytes as f64 / (1 << 20) as f64
                    ),
                    Value::Null,
                );
            }
            TrainEvent::Eval { job, eval } => {
                self.event(
                    &job,
                    "info",
                    "metrics",
                    format!("Step {}: validation loss={:.4}", eval.step, eval.loss),
                    json!({"step": eval.step, "valid_loss": eval.loss, "valid_mean_token_accuracy": eval.token_accuracy}),
                );
            }
            TrainEvent::Step { job, report: r } => {
                let tokens_per_second = if r.seconds > 0.0 { r.tokens as f64 / r.seconds } else { 0.0 };
                self.record(&job, |j| {
                    j.tandem.step = r.step;
                    j.trained_tokens = Some(j.trained_tokens.unwrap_or(0) + r.tokens as u64);
                    if let Some(since) = j.tandem.running_since {
                        let done = r.step.saturating_sub(j.tandem.step_at_start).max(1) as f64;
                        let per_step = unix_now().saturating_sub(since) as f64 / done;
                        let left = r.total_steps.saturating_sub(r.step) as f64;
                        j.estimated_finish = Some(unix_now() + (per_step * left).ceil() as u64);
                    }
                    Ok(())
                })?;
                let mut data = json!({
                    "step": r.step, "total_steps": r.total_steps, "train_loss": r.loss,
                    "train_mean_token_accuracy": r.token_accuracy, "learning_rate": r.lr,
                    "grad_norm": r.grad_norm, "tokens": r.tokens, "tokens_per_second": tokens_per_second,
                });
                let mut msg = format!("Step {}/{}: training loss={:.4}", r.step, r.total_steps, r.loss);
                if let Some(e) = &r.eval {
                    data["valid_loss"] = json!(e.loss);
                    data["valid_mean_token_accuracy"] = json!(e.token_accuracy);
                    msg.push_str(&format!(", validation loss={:.4}", e.loss));
                }
                self.event(&job, "info", "metrics", msg, data);
            }
            TrainEvent::Checkpoint { job, step, dir, report } => {
                let j = self.job(&job)?;
                let model = format!("{}:ckpt-step-{step}", self.model_name(&j));
                let mut metrics = json!({"step": step});
                if let Some(r) = &report {
                    metrics["train_loss"] = json!(r.loss);
                    metrics["train_mean_token_accuracy"] = json!(r.token_accuracy);
                    if let Some(e) = &r.eval {
                        metrics["valid_loss"] = json!(e.loss);
                        metrics["valid_mean_token_accuracy"] = json!(e.token_accuracy);
                    }
                }
                self.serve(&model, &dir);
                self.store.add_checkpoint(&CheckpointRecord {
                    id: new_id("ftckpt-"),
                    job_id: job.clone(),
                    created_at: unix_now(),
                    step: step as u64,
                    model: model.clone(),
                    metrics,
                    dir: dir.display().to_string(),
                })?;
                self.event(&job, "info", "message", format!("Checkpoint created at step {step}: {model}"), Value::Null);
            }
            TrainEvent::Succeeded { job, adapter_dir, steps, stopped_early, tokens } => {
                let j = self.job(&job)?;
                let name = self.model_name(&j);
                self.serve(&name, &adapter_dir);
                let results = self.write_results(&job)?;
                self.record(&job, |j| {
                    if j.status == "cancelled" {
                        return Ok(());
                    }
                    j.status = "succeeded".into();
                    j.fine_tuned_model = Some(name.clone());
                    j.finished_at = Some(unix_now());
                    j.estimated_finish = None;
                    j.trained_tokens = Some(tokens);
                    j.tandem.step = steps;
                    j.result_files = results.into_iter().collect();
                    Ok(())
                })?;
                let how = if stopped_early { " (stopped early: the validation loss stopped improving)" } else { "" };
                self.event(&job, "info", "message", format!("New fine-tuned model created: {name}{how}"), Value::Null);
                self.event(&job, "info", "message", "The job has successfully completed", Value::Null);
            }
            TrainEvent::Paused { job, checkpoint } => {
                if let Some((step, dir)) = checkpoint {
                    let known = self.store.checkpoints(&job, None, 1000)?.data.iter().any(|c| c.step == step as u64);
                    if !known {
                        self.on_event(TrainEvent::Checkpoint { job: job.clone(), step, dir, report: None })?;
                    }
                }
            }
            TrainEvent::Cancelled { .. } => {}
            TrainEvent::Failed { job, error } => self.fail(&job, "training_failed", error)?,
        }
        Ok(())
    }

    /// The metrics CSV OpenAI returns as a result file (purpose `fine-tune-results`).
    fn write_results(&self, job: &str) -> Result<Option<String>, JobsError> {
        let mut csv = String::from(
            "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,learning_rate,tokens_per_second\n",
        );
        // A step retaken after a restart is logged twice: its last record wins.
        let mut rows = BTreeMap::new();
        for e in self.store.all_events(job)? {
            if e.kind != "metrics" || e.data.get("train_loss").is_none() {
                continue;
            }
            let f = |k: &str| e.data.get(k).and_then(Value::as_f64).map(|v| v.to_string()).unwrap_or_default();
            let step = e.data.get("step").and_then(Value::as_u64).unwrap_or(0);
            rows.insert(
                step,
                format!(
                    "{},{},{},{},{},{},{}\n",
                    f("step"),
                    f("train_loss"),
                    f("train_mean_token_accuracy"),
                    f("valid_loss"),
                    f("valid_mean_token_accuracy"),
                    f("learning_rate"),
                    f("tokens_per_second")
                ),
            );
        }
        for row in rows.values() {
            csv.push_str(row);
        }
        let id = new_id("file-");
        let part = self.store.partial_upload_path();
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&part)?;
            f.write_all(csv.as_bytes())?;
            f.sync_all()
        };
        if let Err(source) = write() {
            let _ = std::fs::remove_file(&part);
            return Err(StoreError::Io { path: part, source }.into());
        }
        use sha2::{Digest, Sha256};
        let rec = FileRecord {
            id: id.clone(),
            bytes: csv.len() as u64,
            created_at: unix_now(),
            filename: "step_metrics.csv".into(),
            purpose: "fine-tune-results".into(),
            status: "processed".into(),
            sha256: format!("{:x}", Sha256::digest(csv.as_bytes())),
        };
        self.store.commit_file(&part, &rec)?;
        Ok(Some(id))
    }
}

/// The newest complete checkpoint under a job directory (directories are
/// renamed into place whole, so any that exists is complete).
pub fn latest_checkpoint(job_dir: &Path) -> Option<(usize, PathBuf)> {
    let dir = job_dir.join("checkpoints");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_none())
        .filter_map(|p| checkpoint_step(&p).map(|s| (s, p)))
        .max_by_key(|(s, _)| *s)
}
