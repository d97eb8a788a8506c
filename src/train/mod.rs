//! Training LoRA adapters through the frozen (possibly quantised) base model,
//! on the same backend that serves it. Nothing here knows HTTP.
//!
//! - `lora`: the adapter being trained (f32 master weights, gradients, AdamW
//!   moments on the backend) and the hooks the model's shared forward and
//!   backward call at each adapted projection;
//! - `step`: one micro-batch forward, loss and backward;
//! - `memory`: what a run holds, decided before it starts (checkpointing);
//! - `optim`: clipping, AdamW and the learning-rate schedules.

pub mod lora;
pub mod memory;
pub mod optim;
pub mod step;
