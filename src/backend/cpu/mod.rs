//! The CPU backend: the reference implementation of [`Backend`], multithreaded
//! with rayon and SIMD chosen at run time (AVX-512, AVX2+FMA, or portable code).
//! Weights stay in their stored format (a Q4_K_M model is never expanded to f32);
//! matmuls dequantise small tiles on the fly (`matmul.rs`).

mod attention;
mod dequant;
mod lora;
mod matmul;
mod ops;

use std::sync::Arc;

use super::{
    AttentionMeta, Backend, BackendError, HostWeight, KvCacheSpec, LoraSegment, MatmulJob, RopeTable, WeightBytes,
};
use crate::lora::LoraMatrix;
use crate::quant::ggml::GgmlType;

pub use dequant::dequant_row_chunk;

/// The instruction set the kernels use, detected once at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var("TANDEM_CPU_ISA").as_deref() == Ok("scalar") {
                return Isa::Scalar;
            }
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if std::env::var("TANDEM_CPU_ISA").as_deref() == Ok("avx2") && avx2 {
                return Isa::Avx2;
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// A weight as the CPU keeps it: the loaded bytes, untouched; vectors (norms,
/// biases) are expanded to f32 once since they are tiny and read every step.
pub struct CpuWeight {
    pub name: String,
    pub kind: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub bytes: WeightBytes,
    pub vector: Option<Vec<f32>>,
}

/// f32 activations, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// Per layer, keys and values for every slot: `[slots, kv_heads * head_dim]`.
pub struct CpuKvCache {
    pub spec: KvCacheSpec,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    isa: Isa,
}

impl CpuBackend {
    /// A backend with `threads` worker threads (0 = one per core).
    pub fn new(threads: usize) -> Result<Self, BackendError> {
        let threads =
            if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tandem-cpu-{i}"))
            .build()
            .map_err(|e| BackendError::Invalid(format!("thread pool: {e}")))?;
        Ok(Self { pool, isa: Isa::detect() })
    }
    /// A backend forced to one instruction set (the self-test compares ISAs).
    pub fn with_isa(threads: usize, isa: Isa) -> Result<Self, BackendError> {
        Ok(Self { isa, ..Self::new(threads)? })
    }
    pub fn isa(&self) -> Isa {
        self.isa
    }
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
    /// Dequantises a whole weight row (tests, embedding lookups).
    pub fn weight_row(&self, w: &CpuWeight, row: usize, out: &mut [f32]) {
        let bytes = &w.bytes.as_slice()[row * w.row_bytes..(row + 1) * w.row_bytes];
        dequant_row_chunk(self.isa, w.kind, bytes, 0, out);
    }
}

impl Backend for CpuBackend {
    type Weight = CpuWeight;
    type Tensor = CpuTensor;
    type KvCache = CpuKvCache;
    /// Host memory is the CPU's device memory: a slot shares the parsed matrices.
    type LoraWeight = Arc<LoraMatrix>;

    fn name(&self) -> String {
        format!("cpu ({:?}, {} threads)", self.isa, self.threads())
    }

    fn load_weight(&self, w: HostWeight) -> Result<CpuWeight, BackendError> {
        w.validate()?;
        let row_bytes = w.kind.row_bytes(w.cols).unwrap_or(0);
        let vector = if w.rows == 1 {
            let mut v = vec![0f32; w.cols];
            dequant_row_chunk(Isa::Scalar, w.kind, w.bytes.as_slice(), 0, &mut v);
            Some(v)
        } else {
            if !w.cols.is_multiple_of(16) {
                return Err(BackendError::BadWeight {
                    name: w.name,
                    reason: format!("{} input features is not a multiple of 16", w.cols),
                });
            }
            None
        };
        Ok(CpuWeight { name: w.name, kind: w.kind, rows: w.rows, cols: w.cols, row_bytes, bytes: w.bytes, vector })
    }

    fn weight_shape(&self, w: &CpuWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }
    fn zeros(&self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor { data: vec![0.0; rows * cols], rows, cols }
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> CpuTensor {
        assert_eq!(data.len(), rows * cols);
        CpuTensor { data: data.to_vec(), rows, cols }
    }
    fn download(&self, t: &CpuTensor) -> Vec<f32> {
        t.data.clone()
    }
    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32], out: &mut CpuTensor) {
        assert_eq!(out.cols, table.cols);
        assert_eq!(out.rows, ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let row = (id as usize).min(table.rows - 1);
            self.weight_row(table, row, &mut out.data[i * table.cols..(i + 1) * table.cols]);
        }
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32, out: &mut CpuTensor) {
        ops::rms_norm(&self.pool, x, vector(w), eps, out);
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) {
        assert_eq!(x.data.len(), y.data.len());
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
    }

    fn matmul_many(&self, x: &CpuTensor, jobs: &mut [MatmulJob<'_, Self>]) {
        let mut mjobs: Vec<matmul::Job<'_>> = jobs
            .iter_mut()
            .map(|j| {
                assert_eq!((j.out.rows, j.out.cols), (x.rows, j.w.rows));
                matmul::Job { w: j.w, bias: j.bias.map(vector), out: &mut j.out.data }
            })
            .collect();
        matmul::matmul_many(&self.pool, self.isa, &x.data, x.rows, x.cols, &mut mjobs);
    }

    fn rope(&self, x: &mut CpuTensor, heads: usize, head_dim: usize, positions: &[u32], table: &RopeTable) {
        ops::rope(x, heads, head_dim, positions, table);
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor, out: &mut CpuTensor) {
        ops::silu_mul(gate, up, out);
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> CpuTensor {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        CpuTensor { data, rows: rows.len(), cols: x.cols }
    }

    fn load_lora(&self, m: &Arc<LoraMatrix>) -> Result<Arc<LoraMatrix>, BackendError> {
        Ok(Arc::clone(m))
    }

    fn lora_add(&self, x: &CpuTensor, segments: &[LoraSegment<'_, Self>], out: &mut CpuTensor) {
        if segments.is_empty() {
            return;
        }
        assert_eq!(x.rows, out.rows);
        let mut row_w: Vec<Option<&LoraMatrix>> = vec![None; x.rows];
        for s in segments {
            assert_eq!((s.w.in_features, s.w.out_features), (x.cols, out.cols), "LoRA matrix shape");
            for r in s.rows.clone() {
                row_w[r] = Some(s.w);
            }
        }
        lora::lora_add(&self.pool, self.isa, &x.data, x.cols, &row_w, &mut out.data, out.cols);
    }

    fn alloc_kv(&self, spec: KvCacheSpec) -> Result<CpuKvCache, BackendError> {
        let per_layer = spec
            .num_blocks
            .checked_mul(spec.block_size)
            .and_then(|s| s.checked_mul(spec.kv_heads * spec.head_dim))
            .ok_or_else(|| BackendError::OutOfMemory("KV cache size overflows".into()))?;
        // vec![0.0; n] is calloc: pages become resident only when a block is written.
        let k = (0..spec.num_layers).map(|_| vec![0f32; per_layer]).collect();
        let v = (0..spec.num_layers).map(|_| vec![0f32; per_layer]).collect();
        Ok(CpuKvCache { spec, k, v })
    }

    fn write_kv(&self, cache: &mut CpuKvCache, layer: usize, k: &CpuTensor, v: &CpuTensor, slots: &[u32]) {
        let w = cache.spec.kv_heads * cache.spec.head_dim;
        assert_eq!(k.cols, w);
        for (t, &s) in slots.iter().enumerate() {
            let s = s as usize;
            cache.k[layer][s * w..(s + 1) * w].copy_from_slice(&k.data[t * w..(t + 1) * w]);
            cache.v[layer][s * w..(s + 1) * w].copy_from_slice(&v.data[t * w..(t + 1) * w]);
        }
    }

    fn paged_attention(
        &self,
        cache: &CpuKvCache,
        layer: usize,
        q: &CpuTensor,
        meta: &AttentionMeta<'_>,
        out: &mut CpuTensor,
    ) {
        attention::paged_attention(&self.pool, cache, layer, q, meta, out);
    }
}

fn vector(w: &CpuWeight) -> &[f32] {
    w.vector.as_deref().unwrap_or_else(|| panic!("weight '{}' is a matrix, not a vector", w.name))
}

#[cfg(test)]
mod tests;
