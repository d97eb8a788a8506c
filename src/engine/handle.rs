//! The async façade over the engine thread. The HTTP side holds an
//! `EngineHandle` (cheap to clone), submits token-level requests and reads each
//! request's events from its own channel. Dropping a `RequestStream` aborts the
//! request and frees its KV blocks at the engine's next step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::engine::sampler::SamplingParams;
use crate::metrics::Metrics;

/// Engine-wide id of one request (one choice: `n > 1` is n requests).
pub type RequestId = u64;

/// When a request stops, other than by abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppingParams {
    /// Most tokens to generate (>= 1).
    pub max_tokens: usize,
    /// End-of-sequence and stop token ids are ignored before this many tokens.
    pub min_tokens: usize,
    /// Extra token ids that end the sequence (vLLM `stop_token_ids`); not part of the output.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// A request as the engine sees it: token ids only, no text.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stopping: StoppingParams,
    /// `Some(k)`: return each generated token's logprob and its `k` most likely
    /// alternatives (log-softmax of the raw logits, before penalties and temperature).
    pub logprobs: Option<usize>,
    /// `Some(k)`: also return each prompt token's logprob (from position 1 on)
    /// with `k` alternatives. Such a request computes its whole prompt (no
    /// prefix-cache reuse: cached positions have no logits).
    pub prompt_logprobs: Option<usize>,
    /// The LoRA adapter to run with (`None`: the base model). The request keeps
    /// this version to the end, whatever the registry does meanwhile.
    pub adapter: Option<Arc<crate::lora::LoraAdapter>>,
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Sent once, before the first token, when the prompt has been computed.
#[derive(Debug, Clone, PartialEq)]
pub struct StartInfo {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// One entry per prompt token after the first, when asked for.
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token (not included in the output).
    Stop,
    /// `max_tokens`, or the model's context is full.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FinishInfo {
    pub reason: FinishReason,
    /// The token that ended the request, for `FinishReason::Stop`.
    pub stop_token: Option<u32>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
    pub output_tokens: usize,
}

/// What a request's channel carries, in order: `Started`, tokens, then one
/// `Finished` or `Failed`, then the channel closes.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Started(StartInfo),
    Token(TokenOut),
    Finished(FinishInfo),
    /// This request failed (the engine goes on serving others).
    Failed(String),
}

/// Why a request was refused before it reached the engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the waiting queue is full ({waiting} requests); retry later")]
    QueueFull { waiting: usize, retry_after_s: u64 },
    #[error(
        "this model's maximum context length is {limit} tokens; the request has {prompt} prompt tokens \
         and asks for {max_tokens} more ({total} in all)",
        total = prompt + max_tokens
    )]
    ContextLength { prompt: usize, max_tokens: usize, limit: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{message}")]
    InvalidParam { param: &'static str, message: String },
    #[error("the engine has stopped")]
    EngineStopped,
}

/// Fixed facts about the running engine, for validation and `/v1/models`.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Prompt + generated tokens of one request, at most.
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Requests that may wait for admission before `submit` answers `QueueFull`.
    pub max_waiting: usize,
    /// LoRA adapter slots (0: LoRA disabled).
    pub max_loras: usize,
}

pub(crate) enum Command {
    Add {
        id: RequestId,
        req: EngineRequest,
        events: tokio::sync::mpsc::UnboundedSender<EngineEvent>,
    },
    Abort(RequestId),
    /// A fine-tuning job command (co-serving).
    Train(super::training::TrainCommand),
    /// Finish what is running and waiting, then exit.
    Shutdown,
}

/// Cheap to clone; all clones talk to the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) commands: std::sync::mpsc::Sender<Command>,
    pub(crate) info: Arc<EngineInfo>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) next_id: Arc<AtomicUsize>,
    /// Submitted but not yet admitted by the scheduler (the engine decrements it).
    pub(crate) waiting: Arc<AtomicUsize>,
    /// False once the engine thread has exited (or panicked).
    pub(crate) alive: Arc<std::sync::atomic::AtomicBool>,
    /// Training events, taken once by the job manager.
    pub(crate) train_events: Arc<std::sync::Mutex<Option<std::sync::mpsc::Receiver<super::training::TrainEvent>>>>,
}

impl EngineHandle {
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
    /// Whether the engine thread is still running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// `QueueFull` when a request submitted now would be refused, so the HTTP
    /// layer can shed load before reading a body or tokenising (under overload
    /// that work, for requests that will be refused anyway, is what delays
    /// the 429s). `submit` still decides.
    pub fn check_capacity(&self) -> Result<(), SubmitError> {
        let waiting = self.waiting.load(Ordering::SeqCst);
        if waiting >= self.info.max_waiting {
            return Err(SubmitError::QueueFull { waiting, retry_after_s: 1 });
        }
        Ok(())
    }

    /// Checks `req` against the engine's limits and queues it.
    pub fn submit(&self, req: EngineRequest) -> Result<RequestStream, SubmitError> {
        // A dead engine's command channel may outlive it for a moment: refuse
        // at once rather than queue work nothing will run.
        if !self.is_alive() {
            return Err(SubmitError::EngineStopped);
        }
        let info = &self.info;
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.stopping.max_tokens == 0 {
            return Err(SubmitError::InvalidParam {
                param: "max_tokens",
                message: "max_tokens must be at least 1".into(),
            });
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(SubmitError::InvalidParam {
                param: "prompt",
                message: format!("token id {t} is outside the vocabulary (size {})", info.vocab_size),
            });
        }
        if req.adapter.is_some() && info.max_loras == 0 {
            return Err(SubmitError::InvalidParam {
                param: "model",
                message: "LoRA adapters are disabled on this server (lora.max_loras = 0)".into(),
            });
        }
        if req.prompt.len().saturating_add(req.stopping.max_tokens) > info.max_model_len {
            return Err(SubmitError::ContextLength {
                prompt: req.prompt.len(),
                max_tokens: req.stopping.max_tokens,
                limit: info.max_model_len,
            });
        }
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= info.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull { waiting, retry_after_s: 1 });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as RequestId;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if self.commands.send(Command::Add { id, req, events: tx }).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::EngineStopped);
        }
        Ok(RequestStream { id, events: rx, commands: self.commands.clone(), done: false })
    }

    /// Sends a fine-tuning command to the engine thread; false when it has stopped.
    pub fn train(&self, c: super::training::TrainCommand) -> bool {
        self.commands.send(Command::Train(c)).is_ok()
    }

    /// The engine's training events (the first caller gets them; later ones `None`).
    pub fn take_train_events(&self) -> Option<std::sync::mpsc::Receiver<super::training::TrainEvent>> {
        self.train_events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Asks the engine to finish its work and exit; new submissions fail.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }

    /// `shutdown`, then waits up to `timeout` for the engine thread to exit.
    /// Returns whether it did.
    pub async fn shutdown_and_wait(&self, timeout: std::time::Duration) -> bool {
        self.shutdown();
        let start = std::time::Instant::now();
        while self.is_alive() && start.elapsed() < timeout {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        !self.is_alive()
    }
}

/// One request's events. Dropping it before `Finished` aborts the request.
pub struct RequestStream {
    id: RequestId,
    events: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>,
    commands: std::sync::mpsc::Sender<Command>,
    done: bool,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }
    /// The next event; `None` once the request has finished (or the engine died,
    /// which the stream reports as a `Failed` event first).
    pub async fn next(&mut self) -> Option<EngineEvent> {
        if self.done {
            return None;
        }
        let ev = self.events.recv().await.unwrap_or_else(|| EngineEvent::Failed("the engine stopped".into()));
        if matches!(ev, EngineEvent::Finished(_) | EngineEvent::Failed(_)) {
            self.done = true;
        }
        Some(ev)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.commands.send(Command::Abort(self.id));
        }
    }
}

/// Engine settings from `Config` plus what the tokenizer knows.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
    pub kv_dtype: crate::backend::KvDtype,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_waiting: usize,
    /// End-of-sequence ids (from the tokenizer / generation config).
    pub eos_token_ids: Vec<u32>,
    /// Cap on prompt + output tokens; 0 = the model's own context length.
    pub max_model_len: usize,
    /// LoRA adapter slots (0: requests with an adapter are refused).
    pub max_loras: usize,
    /// When fine-tuning jobs train between serving steps.
    pub co_serving: super::training::CoServingPolicy,
}

impl EngineConfig {
    pub fn from_config(cfg: &crate::config::Config, eos_token_ids: Vec<u32>) -> Self {
        Self {
            block_size: cfg.cache.block_size,
            num_blocks: cfg.cache.num_blocks,
            enable_prefix_caching: cfg.cache.enable_prefix_caching,
            kv_dtype: cfg.cache.kv_cache_dtype,
            max_num_batched_tokens: cfg.scheduler.max_num_batched_tokens,
            max_num_seqs: cfg.scheduler.max_num_seqs,
            max_waiting: cfg.scheduler.max_waiting,
            eos_token_ids,
            max_model_len: 0,
            max_loras: cfg.lora.max_loras,
            co_serving: super::training::CoServingPolicy {
                max_turn: std::time::Duration::from_millis(cfg.train.max_turn_ms),
                busy_share: cfg.train.busy_share,
                idle_turn: std::time::Duration::from_millis(cfg.train.idle_turn_ms),
                min_steps_between_turns: cfg.train.min_steps_between_turns,
            },
        }
    }
}

/// Starts the engine thread, which takes ownership of the backend and model.
pub fn spawn_engine<B: crate::backend::Backend + Send + 'static>(
    backend: B,
    model: crate::model::LlamaModel<B>,
    cfg: EngineConfig,
) -> Result<EngineHandle, crate::backend::BackendError>
where
    crate::model::LlamaModel<B>: Send,
{
    let core = super::core::EngineCore::new(backend, model, &cfg)?;
    let info = Arc::new(core.info().clone());
    let metrics = Arc::new(Metrics::new(cfg.block_size, cfg.num_blocks, cfg.enable_prefix_caching, cfg.max_loras));
    let (tx, rx) = std::sync::mpsc::channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (train_tx, train_rx) = std::sync::mpsc::channel();
    let engine_loop = super::engine_loop::EngineLoop {
        core,
        commands: rx,
        metrics: metrics.clone(),
        waiting: waiting.clone(),
        alive: alive.clone(),
        training: super::training::CoServing::new(cfg.co_serving, train_tx, metrics.clone()),
    };
    std::thread::Builder::new()
        .name("tandem-engine".into())
        .spawn(move || engine_loop.run())
        .map_err(|e| crate::backend::BackendError::OutOfMemory(format!("starting the engine thread: {e}")))?;
    Ok(EngineHandle {
        commands: tx,
        info,
        metrics,
        next_id: Arc::new(AtomicUsize::new(0)),
        waiting,
        alive,
        train_events: Arc::new(std::sync::Mutex::new(Some(train_rx))),
    })
}
