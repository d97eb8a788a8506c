//! Training LoRA adapters on the served base model. `batch` plans each epoch's
//! micro-batches (deterministic shuffles, length grouping, token-budget packing)
//! as lists of example indices. Nothing here knows HTTP or the device: the
//! trainer and the fine-tuning API build on these pieces.

pub mod batch;
