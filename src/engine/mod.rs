//! Running sequences through a model. `runner` turns a set of per-sequence token
//! chunks into one flattened varlen step over the paged KV cache; `generate`
//! drives prompts to completion with chunked prefill mixed with decodes;
//! `sampler` turns logits into token ids. Nothing here knows HTTP or text.

pub mod generate;
pub mod runner;
pub mod sampler;

pub use generate::{FinishReason, GenerateOutput, Generator};
pub use runner::{ModelRunner, RunnerConfig, SeqState, StepError};
pub use sampler::{Sampler, SamplingParams};
