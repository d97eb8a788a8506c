//! Weight formats as data: block layouts, parsing and the CPU reference dequantisers.
//! The kernels that compute with these formats live in `backend/`.

pub mod bnb;
pub mod ggml;
pub mod gguf_quantize;
pub mod gptq;
pub mod hf_config;
pub mod on_load;
pub mod random;
