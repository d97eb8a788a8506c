//! Training LoRA adapters on the served base model. `data` turns a JSONL training
//! file (OpenAI's chat format, prompt/completion or Alpaca) into token ids with a
//! per-token loss mask, rendered through the model's own chat template exactly as
//! inference renders it; `batch` plans each epoch's micro-batches (deterministic
//! shuffles, length grouping, token-budget packing) as lists of example indices.
//! Nothing here knows HTTP or the device: the trainer and the fine-tuning API
//! build on these pieces.

pub mod batch;
pub mod data;
