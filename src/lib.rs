//! tandem: serve one base LLM and many LoRA adapters; train adapters while serving.
//!
//! The map of the crate is `docs/architecture.md`. In short: `loader` reads bytes
//! from disk (GGUF, safetensors, HF cache), `quant` knows the block formats,
//! `tokenizer` turns text into ids and back, `model` holds architectures written
//! once against `backend::Backend`, `kv` owns the paged KV block bookkeeping and
//! `engine` runs batches of sequences through a model; `train` prepares training
//! data (JSONL -> tokens + loss mask, micro-batch plans); `merge` folds a LoRA
//! adapter into a base model and writes an HF checkpoint.

pub mod api;
pub mod auth;
pub mod backend;
pub mod bench;
pub mod config;
pub mod engine;
pub mod export;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod kv;
pub mod loader;
pub mod logging;
pub mod lora;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod quant;
pub mod routing;
pub mod store;
pub mod tokenizer;
pub mod train;
