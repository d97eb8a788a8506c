//! Weight formats as data: block layouts, parsing and the CPU reference dequantisers.
//! The kernels that compute with these formats live in `backend/`.

pub mod ggml;
pub mod random;
