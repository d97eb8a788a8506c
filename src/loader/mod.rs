//! Reading models from disk: GGUF files, HF safetensors directories, the HF hub cache.

pub mod gguf;
pub mod hub;
pub mod safetensors;
