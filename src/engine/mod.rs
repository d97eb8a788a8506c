//! Running sequences through a model. `runner` turns a set of per-sequence token
//! chunks into one flattened varlen step over the paged KV cache; `generate`
//! drives prompts to completion with chunked prefill mixed with decodes;
//! `sampler` turns logits into token ids; `handle` is the async façade over the
//! engine thread. Nothing here knows HTTP or text.

pub mod core;
mod engine_loop;
pub mod generate;
pub mod handle;
pub mod request;
pub mod runner;
pub mod sampler;
pub mod scheduler;

pub use core::{EngineCore, StepEvent};
pub use generate::{GenerateOutput, Generator};
pub use handle::{
    spawn_engine, EngineConfig, EngineEvent, EngineHandle, EngineInfo, EngineRequest, FinishInfo, FinishReason,
    RequestId, RequestStream, StoppingParams, SubmitError, TokenOut,
};
pub use runner::{ModelRunner, RunChunk, RunnerConfig, SeqState, StepError};
pub use sampler::{Sampler, SamplingParams};
