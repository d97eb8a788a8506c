//! Running requests through a model. `scheduler` decides what each step runs
//! (chunked prefill mixed with decodes, preemption, prefix reuse through
//! `kv::KvCacheManager`); `runner` turns that into one flattened varlen step over
//! the paged KV cache; `sampler` turns logits into token ids; `core` ties them
//! into one synchronous step; `engine_loop` runs it on the engine thread and
//! `handle` is the async façade the HTTP side holds. Nothing here knows HTTP or text.

pub mod core;
pub mod device;
mod engine_loop;
pub mod handle;
pub mod request;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod training;

pub use core::{EngineCore, StepEvent};
pub use handle::{
    spawn_engine, EngineConfig, EngineEvent, EngineHandle, EngineInfo, EngineRequest, FinishInfo, FinishReason,
    RequestId, RequestStream, StartInfo, StoppingParams, SubmitError, TokenLogprob, TokenOut,
};
pub use runner::{ChunkLogits, ModelRunner, RunChunk, RunnerConfig, SeqState, StepError};
pub use sampler::{Sampler, SamplingParams};
