//! Training LoRA adapters through the frozen (possibly quantised) base model,
//! on the same backend that serves it. Nothing here knows HTTP.
//!
//! - `lora`: the adapter being trained (f32 master weights, gradients, AdamW
//!   moments on the backend) and the hooks the model's shared forward and
//!   backward call at each adapted projection;
//! - `step`: one micro-batch forward, loss and backward;
//! - `memory`: what a run holds, decided before it starts (checkpointing);
//! - `optim`: clipping, AdamW and the learning-rate schedules;
//! - `data`: JSONL files (chat, prompt/completion, Alpaca) to tokens and the
//!   trained-token mask, through the model's chat template; `batch`: which
//!   examples go together in each epoch;
//! - `trainer`: the run as a state machine (one optimiser step per call),
//!   evaluation, early stopping, checkpoints and resume; `run`: the loop with
//!   its files; `output`: PEFT directories, metrics, the loss plot.

pub mod batch;
pub mod data;
pub mod jobs;
pub mod lora;
pub mod memory;
pub mod optim;
pub mod output;
pub mod run;
pub mod step;
pub mod trainer;
