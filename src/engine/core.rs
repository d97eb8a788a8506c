//! The engine core: one scheduler, one model runner, one step at a time. It is
//! synchronous and knows no channels, so tests and `tandem generate` drive it
//! directly; the engine thread (`engine_loop`) wraps it for serving.

use crate::backend::Backend;
use crate::kv::KvCacheManager;

use super::handle::{
    EngineConfig, EngineInfo, EngineRequest, FinishInfo, RequestId, StartInfo, TokenLogprob, TokenOut,
};
use super::request::Request;
use super::runner::{ChunkLogits, ModelRunner, RunChunk, RunnerConfig};
use super::sampler;
use super::scheduler::{RequestUpdate, Scheduler, SchedulerConfig, SchedulerOutput};

/// What one step produced, in order, per request.
#[derive(Debug, Clone, PartialEq)]
pub enum StepEvent {
    Started(RequestId, StartInfo),
    Token(RequestId, TokenOut),
    Finished(RequestId, FinishInfo),
    /// The request could not run (its adapter failed to load, or the device
    /// failed the step) and is gone.
    Failed(RequestId, String),
}

pub struct EngineCore<B: Backend> {
    runner: ModelRunner<B>,
    scheduler: Scheduler,
    info: EngineInfo,
    /// Set when the device reported itself lost: nothing more can run, and
    /// the owner of this core must stop (the engine thread exits, `/health`
    /// turns 503).
    device_lost: Option<String>,
}

impl<B: Backend> EngineCore<B> {
    pub fn new(
        backend: B,
        model: crate::model::LlamaModel<B>,
        cfg: &EngineConfig,
    ) -> Result<Self, crate::backend::BackendError> {
        // A request alone must always fit in the KV cache, or preemption could not
        // make room for it.
        let cache_tokens = cfg.num_blocks.saturating_sub(1) * cfg.block_size;
        let model_len = model.config.max_position.min(cache_tokens);
        let max_model_len = if cfg.max_model_len == 0 { model_len } else { cfg.max_model_len.min(model_len) };
        let info = EngineInfo {
            max_model_len,
            vocab_size: model.config.vocab_size,
            eos_token_ids: cfg.eos_token_ids.clone(),
            block_size: cfg.block_size,
            num_blocks: cfg.num_blocks,
            max_num_seqs: cfg.max_num_seqs.max(1),
            max_num_batched_tokens: cfg.max_num_batched_tokens.max(1),
            max_waiting: cfg.max_waiting,
            max_loras: cfg.max_loras,
        };
        let runner = ModelRunner::new(
            backend,
            model,
            RunnerConfig {
                block_size: cfg.block_size,
                num_blocks: cfg.num_blocks,
                max_loras: cfg.max_loras,
                kv_dtype: cfg.kv_dtype,
            },
        )?;
        let kv = KvCacheManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching);
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: info.max_num_batched_tokens,
                max_num_seqs: info.max_num_seqs,
                max_model_len,
            },
            kv,
            cfg.max_loras,
        );
        Ok(Self { runner, scheduler, info, device_lost: None })
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }
    /// Changes the cap on running sequences (benchmarks).
    pub fn set_max_num_seqs(&mut self, n: usize) {
        self.scheduler.set_max_num_seqs(n);
        self.info.max_num_seqs = n.max(1);
    }
    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }
    /// Why the device is lost, once a step found it so (see [`crate::backend::BackendError::DeviceLost`]).
    pub fn device_lost(&self) -> Option<&str> {
        self.device_lost.as_deref()
    }

    /// The device is lost: every request fails with `why`, and so does every
    /// later step.
    fn lose_device(&mut self, why: String) -> Vec<StepEvent> {
        let events = self.scheduler.abort_all().into_iter().map(|id| StepEvent::Failed(id, why.clone())).collect();
        self.device_lost = Some(why);
        events
    }

    /// The backend and model, lent to training between serving steps.
    pub fn device(&self) -> (&B, &crate::model::LlamaModel<B>) {
        (&self.runner.backend, &self.runner.model)
    }

    /// Queues a request (already validated by `EngineHandle::submit` or the caller).
    pub fn add_request(&mut self, id: RequestId, req: EngineRequest) {
        self.scheduler.add(Request::new(id, req));
    }

    /// Drops a request and frees its blocks; returns it if it existed.
    pub fn abort(&mut self, id: RequestId) -> Option<Request> {
        self.scheduler.abort(id)
    }

    /// Schedules, runs and samples one step.
    pub fn step(&mut self) -> (SchedulerOutput, Vec<StepEvent>) {
        if let Some(why) = self.device_lost.clone() {
            return (SchedulerOutput::default(), self.lose_device(why));
        }
        let mut out = self.scheduler.schedule();
        let mut failed = Vec::new();
        let mut bad_slots = Vec::new();
        for &slot in &out.lora_loads {
            let loaded = match self.scheduler.slots().adapter(slot) {
                Some(a) => self.runner.load_adapter(slot, a).map_err(|e| {
                    let why = format!("loading LoRA adapter '{}': {e}", a.name);
                    (e.is_device_lost(), why)
                }),
                None => Err((false, "the adapter slot is empty".into())),
            };
            // Parsing checked the adapter against this model, so the CPU cannot
            // fail here; a device backend can run out of memory.
            match loaded {
                Ok(()) => {}
                Err((lost, why)) if lost || self.runner.backend.device_lost() => return (out, self.lose_device(why)),
                Err((_, why)) => {
                    bad_slots.push(slot);
                    failed.push(why);
                }
            }
        }
        let mut failed_events = Vec::new();
        if !bad_slots.is_empty() {
            let why = failed.join("; ");
            for id in self.scheduler.fail_slots(&mut out, &bad_slots) {
                failed_events.push(StepEvent::Failed(id, why.clone()));
            }
        }
        if out.chunks.is_empty() {
            return (out, failed_events);
        }
        // Per chunk: (request, its logits mode, first position, rows).
        let mut plan = Vec::with_capacity(out.chunks.len());
        let chunks: Vec<RunChunk> = out
            .chunks
            .iter()
            .map(|&(id, n)| {
                let r = self.scheduler.get(id).expect("scheduled requests exist");
                let last = r.num_computed + n == r.tokens.len();
                let wants_prompt = r.prompt_logprobs.is_some() && r.prompt_logprobs_got.len() + 1 < r.prompt_len;
                let logits = match (wants_prompt, last) {
                    (true, _) => ChunkLogits::All,
                    (false, true) => ChunkLogits::Last,
                    (false, false) => ChunkLogits::None,
                };
                plan.push((id, logits, r.num_computed, n));
                RunChunk {
                    tokens: &r.tokens,
                    start: r.num_computed,
                    len: n,
                    blocks: &r.blocks.blocks,
                    logits,
                    lora_slot: r.lora_slot,
                }
            })
            .collect();
        let result = self.runner.execute(&chunks);
        drop(chunks);
        let logits = match result {
            Ok(logits) => logits,
            Err(e) if e.is_device_lost() || self.runner.backend.device_lost() => {
                let lost = self.lose_device(format!("the model step failed: {e}"));
                failed_events.extend(lost);
                return (out, failed_events);
            }
            Err(e) => {
                // The step's sequences may have half-written KV: they fail, the
                // engine goes on with the rest.
                let why = format!("the model step failed: {e}");
                for (id, ..) in plan {
                    if self.scheduler.abort(id).is_some() {
                        failed_events.push(StepEvent::Failed(id, why.clone()));
                    }
                }
                return (out, failed_events);
            }
        };
        let vocab = self.info.vocab_size;
        let eos = &self.info.eos_token_ids;
        let mut sampled: Vec<(RequestId, TokenOut)> = Vec::new();
        let mut started = Vec::new();
        let mut row = 0;
        for (id, mode, start, n) in plan {
            let r = self.scheduler.get_mut(id).expect("scheduled requests exist");
            let rows = match mode {
                ChunkLogits::None => continue,
                ChunkLogits::Last => row..row + 1,
                ChunkLogits::All => row..row + n,
            };
            row = rows.end;
            if mode == ChunkLogits::All {
                let k = r.prompt_logprobs.unwrap_or(0);
                for (i, p) in (start..start + n).enumerate() {
                    if p == r.prompt_logprobs_got.len() && p + 1 < r.prompt_len {
                        let l = &logits[(rows.start + i) * vocab..(rows.start + i + 1) * vocab];
                        let (logprob, top_logprobs) = sampler::logprobs(l, r.tokens[p + 1], k);
                        r.prompt_logprobs_got.push(TokenLogprob { logprob, top_logprobs });
                    }
                }
            }
            if start + n != r.tokens.len() {
                continue;
            }
            let last = &logits[(rows.end - 1) * vocab..rows.end * vocab];
            let banned = r.banned_tokens(eos);
            let tok = r.sampler.sample(last, &banned);
            let (logprob, top_logprobs) = match r.logprobs {
                Some(k) => {
                    let (lp, top) = sampler::logprobs(last, tok, k);
                    (Some(lp), top)
                }
                None => (None, Vec::new()),
            };
            if r.num_generated == 0 {
                let prompt_logprobs = r.prompt_logprobs.map(|_| std::mem::take(&mut r.prompt_logprobs_got));
                let info = StartInfo { cached_prompt_tokens: r.cached_prompt_tokens.unwrap_or(0), prompt_logprobs };
                started.push(StepEvent::Started(id, info));
            }
            sampled.push((id, TokenOut { id: tok, logprob, top_logprobs }));
        }
        let updates = self.scheduler.update_from_output(&out, sampled, eos);
        let events = failed_events
            .into_iter()
            .chain(started)
            .chain(updates.into_iter().map(|u| match u {
                RequestUpdate::Token(id, t) => StepEvent::Token(id, t),
                RequestUpdate::Finished { id, reason, stop_token } => {
                    let r = self.scheduler.take_finished(id).expect("finished requests exist until taken");
                    let info = FinishInfo {
                        reason,
                        stop_token,
                        prompt_tokens: r.prompt_len,
                        cached_prompt_tokens: r.cached_prompt_tokens.unwrap_or(0),
                        output_tokens: r.num_generated,
                    };
                    StepEvent::Finished(id, info)
                }
            }))
            .collect();
        (out, events)
    }

    /// Runs `reqs` to completion (ids 0..n) and returns each one's tokens and
    /// finish — for `tandem generate`, benches and tests.
    pub fn generate(&mut self, reqs: Vec<EngineRequest>) -> Vec<(Vec<TokenOut>, FinishInfo)> {
        let n = reqs.len();
        let base = 1 << 40;
        for (i, r) in reqs.into_iter().enumerate() {
            self.add_request(base + i as u64, r);
        }
        let mut toks: Vec<Vec<TokenOut>> = vec![Vec::new(); n];
        let mut done: Vec<Option<FinishInfo>> = vec![None; n];
        while self.has_work() {
            let (out, events) = self.step();
            assert!(
                !out.chunks.is_empty() || events.iter().any(|e| matches!(e, StepEvent::Failed(..))),
                "the scheduler made no progress with work queued"
            );
            for ev in events {
                match ev {
                    StepEvent::Token(id, t) => toks[(id - base) as usize].push(t),
                    StepEvent::Finished(id, f) => done[(id - base) as usize] = Some(f),
                    StepEvent::Failed(id, why) => panic!("request {} failed: {why}", id - base),
                    StepEvent::Started(..) => {}
                }
            }
        }
        toks.into_iter().zip(done).map(|(t, d)| (t, d.expect("every request finishes"))).collect()
    }
}
