//! The CPU backend: the reference implementation of [`Backend`], multithreaded
//! with rayon and SIMD chosen at run time (AVX-512, AVX2+FMA, or portable code).
//! Weights stay in their stored format (a Q4_K_M model is never expanded to f32);
//! matmuls dequantise small tiles on the fly (`matmul.rs`).

mod attention;
mod attention_grad;
mod buffers;
mod dequant;
mod gemm;
pub mod int8;
mod lora;
mod math;
mod matmul;
mod matmul_grad;
mod ops;
mod train_ops;

use std::sync::Arc;

use super::{
    AdamWStep, AttentionMeta, Backend, BackendError, BackendResult, CrossEntropySums, HostWeight, KvCacheSpec, KvDtype,
    LoraMatrix, LoraSegment, MatmulJob, RopeTable, WeightBytes,
};
use crate::quant::ggml::WeightKind;

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

/// `x` with its columns reordered: column j of the result is column `perm[j]`.
fn gather_columns(x: &CpuTensor, perm: &[u32]) -> CpuTensor {
    let mut data = buffers::take(x.data.len()).unwrap_or_default();
    for row in x.data.chunks_exact(x.cols) {
        data.extend(perm.iter().map(|&k| row[k as usize]));
    }
    CpuTensor { data, rows: x.rows, cols: x.cols }
}

/// A weight as the CPU keeps it: the loaded bytes, untouched; vectors (norms,
/// biases) are expanded to f32 once since they are tiny and read every step.
pub struct CpuWeight {
    pub name: String,
    pub kind: WeightKind,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub bytes: WeightBytes,
    pub vector: Option<Vec<f32>>,
    /// Element j of a row multiplies input `input_perm[j]` (GPTQ act-order).
    pub input_perm: Option<std::sync::Arc<[u32]>>,
}

/// f32 activations, row-major. Its buffer goes back to the thread's free
/// list when it is dropped (`buffers.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.data));
    }
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
    /// The integer kernels of int8 activations (from `isa` and the CPU's VNNI).
    int8: int8::Kernel,
    activations: Activations,
}

thread_local! {
    /// Set by `exact_matmuls` on the calling thread: f32 activations for its
    /// matmuls whatever `CpuBackend::activations` says.
    static EXACT_MATMULS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How matmuls against quantised weights treat their activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// f32 activations against weights dequantised on the fly: within rounding
    /// of transformers on the dequantised weights (the goldens' mode, and what
    /// a bare `CpuBackend::new` uses).
    F32,
    /// Each activation row quantised to 8 bits once per matmul, integer dot
    /// products per block (`int8/`); F16/BF16/F32 weights keep the f32 path.
    /// The server's default.
    #[default]
    Int8,
}

impl std::str::FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "int8" => Ok(Self::Int8),
            o => Err(format!("unknown activations mode {o:?}: expected \"f32\" or \"int8\"")),
        }
    }
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
        let isa = Isa::detect();
        Ok(Self { pool, isa, int8: int8::Kernel::for_isa(isa), activations: Activations::F32 })
    }
    /// The same backend with `a` activations for quantised matmuls.
    pub fn with_activations(self, a: Activations) -> Self {
        Self { activations: a, ..self }
    }
    pub fn activations(&self) -> Activations {
        self.activations
    }
    /// A backend forced to one instruction set (the self-test compares ISAs).
    pub fn with_isa(threads: usize, isa: Isa) -> Result<Self, BackendError> {
        Ok(Self { isa, int8: int8::Kernel::for_isa(isa), ..Self::new(threads)? })
    }
    pub fn isa(&self) -> Isa {
        self.isa
    }
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
    /// The grouped product with each weight's elements in the order stored.
    fn matmul_in_stored_order(&self, x: &CpuTensor, jobs: &mut [MatmulJob<'_, Self>]) {
        let mut mjobs: Vec<matmul::Job<'_>> = jobs
            .iter_mut()
            .map(|j| {
                assert_eq!((j.out.rows, j.out.cols), (x.rows, j.w.rows));
                matmul::Job { w: j.w, bias: j.bias.map(vector), out: &mut j.out.data }
            })
            .collect();
        let int8 = self.activations == Activations::Int8 && !EXACT_MATMULS.get();
        if int8 && mjobs.iter().all(|j| int8::supported(j.w.kind)) {
            int8::matmul_many(&self.pool, self.int8, &x.data, x.rows, x.cols, &mut mjobs);
        } else {
            matmul::matmul_many(&self.pool, self.isa, &x.data, x.rows, x.cols, &mut mjobs);
        }
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
        let activations = match self.activations {
            Activations::F32 => "f32 activations".to_string(),
            Activations::Int8 => format!("int8 activations, {:?} kernels", self.int8),
        };
        format!("cpu ({:?}, {activations}, {} threads)", self.isa, self.threads())
    }

    fn exact_matmuls<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                EXACT_MATMULS.set(self.0);
            }
        }
        let _restore = Restore(EXACT_MATMULS.replace(true));
        f()
    }

    fn load_weight(&self, w: HostWeight) -> BackendResult<CpuWeight> {
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
        Ok(CpuWeight {
            name: w.name,
            kind: w.kind,
            rows: w.rows,
            cols: w.cols,
            row_bytes,
            bytes: w.bytes,
            vector,
            input_perm: w.input_perm,
        })
    }

    fn weight_shape(&self, w: &CpuWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }
    fn zeros(&self, rows: usize, cols: usize) -> BackendResult<CpuTensor> {
        Ok(CpuTensor { data: alloc_zeroed(rows, cols)?, rows, cols })
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> BackendResult<CpuTensor> {
        assert_eq!(data.len(), rows * cols);
        let mut v = buffers::take(data.len()).unwrap_or_default();
        v.extend_from_slice(data);
        Ok(CpuTensor { data: v, rows, cols })
    }
    fn download(&self, t: &CpuTensor) -> BackendResult<Vec<f32>> {
        Ok(t.data.clone())
    }
    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32], out: &mut CpuTensor) -> BackendResult<()> {
        assert_eq!(out.cols, table.cols);
        assert_eq!(out.rows, ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let row = (id as usize).min(table.rows - 1);
            self.weight_row(table, row, &mut out.data[i * table.cols..(i + 1) * table.cols]);
        }
        Ok(())
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32, out: &mut CpuTensor) -> BackendResult<()> {
        ops::rms_norm(&self.pool, x, vector(w), eps, out);
        Ok(())
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> BackendResult<()> {
        assert_eq!(x.data.len(), y.data.len());
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn matmul_many(&self, x: &CpuTensor, jobs: &mut [MatmulJob<'_, Self>]) -> BackendResult<()> {
        if jobs.iter().any(|j| j.w.input_perm.is_some()) {
            // Weights stored in another input order each get their own gathered
            // copy of the input; the rest still share one grouped call.
            let (permuted, natural): (Vec<_>, Vec<_>) = jobs.iter_mut().partition(|j| j.w.input_perm.is_some());
            for j in permuted {
                let perm = j.w.input_perm.as_deref().unwrap_or(&[]);
                let xp = gather_columns(x, perm);
                self.matmul_in_stored_order(&xp, &mut [MatmulJob { w: j.w, bias: j.bias, out: &mut *j.out }]);
            }
            let mut rest: Vec<MatmulJob<'_, Self>> =
                natural.into_iter().map(|j| MatmulJob { w: j.w, bias: j.bias, out: &mut *j.out }).collect();
            self.matmul_in_stored_order(x, &mut rest);
            return Ok(());
        }
        self.matmul_in_stored_order(x, jobs);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> BackendResult<()> {
        ops::rope(x, heads, head_dim, positions, table);
        Ok(())
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor, out: &mut CpuTensor) -> BackendResult<()> {
        ops::silu_mul(&self.pool, gate, up, out);
        Ok(())
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> BackendResult<CpuTensor> {
        let n = rows.len() * x.cols;
        let mut data = buffers::take(n).unwrap_or_else(|| Vec::with_capacity(n));
        for &r in rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor { data, rows: rows.len(), cols: x.cols })
    }

    fn load_lora(&self, m: &Arc<LoraMatrix>) -> BackendResult<Arc<LoraMatrix>> {
        Ok(Arc::clone(m))
    }

    fn lora_add(&self, x: &CpuTensor, segments: &[LoraSegment<'_, Self>], out: &mut CpuTensor) -> BackendResult<()> {
        if segments.is_empty() {
            return Ok(());
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
        Ok(())
    }

    fn alloc_kv(&self, spec: KvCacheSpec) -> BackendResult<CpuKvCache> {
        if spec.dtype != KvDtype::F32 {
            return Err(BackendError::Invalid(
                "cache.kv_cache_dtype = \"bf16\" is supported by the CUDA backend only; the CPU cache is f32 \
                 (use \"auto\")"
                    .into(),
            ));
        }
        let per_layer = spec
            .num_blocks
            .checked_mul(spec.block_size)
            .and_then(|s| s.checked_mul(spec.kv_heads * spec.head_dim))
            .ok_or_else(|| BackendError::OutOfMemory("KV cache size overflows".into()))?;
        // vec![0.0; n] is calloc, whose pages become resident only when first
        // written; the block pool hands out least-recently-used blocks, so under
        // traffic every block is soon written and RSS would creep up to the
        // whole cache. Touching one value per page now makes the footprint
        // known at start (as vLLM and llama.cpp do) and flat afterwards.
        let touched = || {
            let mut buf = vec![0f32; per_layer];
            for x in buf.iter_mut().step_by(1024) {
                // SAFETY: `x` is a valid, aligned element of `buf`; volatile so
                // the store of the value it already holds is not optimised away.
                unsafe { std::ptr::write_volatile(x, 0.0) };
            }
            buf
        };
        let k = (0..spec.num_layers).map(|_| touched()).collect();
        let v = (0..spec.num_layers).map(|_| touched()).collect();
        Ok(CpuKvCache { spec, k, v })
    }

    fn write_kv(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        slots: &[u32],
    ) -> BackendResult<()> {
        let w = cache.spec.kv_heads * cache.spec.head_dim;
        assert_eq!(k.cols, w);
        for (t, &s) in slots.iter().enumerate() {
            let s = s as usize;
            cache.k[layer][s * w..(s + 1) * w].copy_from_slice(&k.data[t * w..(t + 1) * w]);
            cache.v[layer][s * w..(s + 1) * w].copy_from_slice(&v.data[t * w..(t + 1) * w]);
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        cache: &CpuKvCache,
        layer: usize,
        q: &CpuTensor,
        meta: &AttentionMeta<'_>,
        out: &mut CpuTensor,
    ) -> BackendResult<()> {
        attention::paged_attention(&self.pool, cache, layer, q, meta, out);
        Ok(())
    }

    fn matmul_input_grad(
        &self,
        jobs: &[(&CpuTensor, &CpuWeight)],
        dx: &mut CpuTensor,
        accumulate: bool,
    ) -> BackendResult<()> {
        let mut natural: Vec<(&[f32], &CpuWeight)> = vec![];
        let mut permuted: Vec<(&[f32], &CpuWeight)> = vec![];
        for &(dy, w) in jobs {
            assert_eq!((dy.rows, dy.cols), (dx.rows, w.rows), "input grad through '{}'", w.name);
            let job = (dy.data.as_slice(), w);
            if w.input_perm.is_some() {
                permuted.push(job);
            } else {
                natural.push(job);
            }
        }
        let (rows, cols) = (dx.rows, dx.cols);
        if !natural.is_empty() || !accumulate {
            matmul_grad::matmul_input_grad(&self.pool, self.isa, &natural, &mut dx.data, rows, cols, accumulate);
        }
        // A weight stored in another input order gives its gradient in that
        // order; it is scattered back to the natural one.
        for job in permuted {
            let mut part = self.zeros(rows, cols)?;
            matmul_grad::matmul_input_grad(&self.pool, self.isa, &[job], &mut part.data, rows, cols, false);
            let perm = job.1.input_perm.as_deref().unwrap_or(&[]);
            for (drow, prow) in dx.data.chunks_exact_mut(cols).zip(part.data.chunks_exact(cols)) {
                for (j, &k) in perm.iter().enumerate() {
                    drow[k as usize] += prow[j];
                }
            }
        }
        Ok(())
    }

    fn gemm(
        &self,
        a: &CpuTensor,
        trans_a: bool,
        b: &CpuTensor,
        trans_b: bool,
        alpha: f32,
        beta: f32,
        c: &mut CpuTensor,
    ) -> BackendResult<()> {
        let (m, k) = if trans_a { (a.cols, a.rows) } else { (a.rows, a.cols) };
        let (kb, n) = if trans_b { (b.cols, b.rows) } else { (b.rows, b.cols) };
        assert_eq!(k, kb, "gemm inner dimensions");
        assert_eq!((c.rows, c.cols), (m, n), "gemm output shape");
        let g = gemm::Gemm { m, n, k, trans_a, trans_b, alpha, beta };
        gemm::gemm(&self.pool, self.isa, g, &a.data, &b.data, &mut c.data);
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        x: &CpuTensor,
        w: &CpuWeight,
        eps: f32,
        dy: &CpuTensor,
        dx: &mut CpuTensor,
    ) -> BackendResult<()> {
        train_ops::rms_norm_backward(&self.pool, x, vector(w), eps, dy, dx);
        Ok(())
    }

    fn rope_backward(
        &self,
        dx: &mut CpuTensor,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> BackendResult<()> {
        train_ops::rope_backward(dx, heads, head_dim, positions, table);
        Ok(())
    }

    fn silu_mul_backward(
        &self,
        gate: &CpuTensor,
        up: &CpuTensor,
        dout: &CpuTensor,
        dgate: &mut CpuTensor,
        dup: &mut CpuTensor,
    ) -> BackendResult<()> {
        train_ops::silu_mul_backward(&self.pool, gate, up, dout, dgate, dup);
        Ok(())
    }

    fn attention_backward(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        out: &CpuTensor,
        dout: &CpuTensor,
        meta: &AttentionMeta<'_>,
        dq: &mut CpuTensor,
        dk: &mut CpuTensor,
        dv: &mut CpuTensor,
    ) -> BackendResult<()> {
        attention_grad::attention_backward(&self.pool, q, k, v, out, dout, meta, dq, dk, dv);
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &mut CpuTensor,
        labels: &[u32],
        grad_scale: Option<f32>,
    ) -> BackendResult<CrossEntropySums> {
        Ok(train_ops::cross_entropy(&self.pool, logits, labels, grad_scale))
    }

    fn add_rows(&self, src: &CpuTensor, rows: &[usize], dst: &mut CpuTensor) -> BackendResult<()> {
        train_ops::add_rows(src, rows, dst);
        Ok(())
    }

    fn dropout(&self, x: &CpuTensor, p: f32, seed: u64, out: &mut CpuTensor) -> BackendResult<()> {
        train_ops::dropout(&self.pool, x, p, seed, out);
        Ok(())
    }

    fn copy(&self, x: &CpuTensor) -> BackendResult<CpuTensor> {
        let mut data = Vec::new();
        data.try_reserve_exact(x.data.len()).map_err(|e| BackendError::OutOfMemory(e.to_string()))?;
        data.extend_from_slice(&x.data);
        Ok(CpuTensor { data, rows: x.rows, cols: x.cols })
    }

    fn fill(&self, x: &mut CpuTensor, value: f32) -> BackendResult<()> {
        x.data.fill(value);
        Ok(())
    }

    fn scale(&self, x: &mut CpuTensor, s: f32) -> BackendResult<()> {
        x.data.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn sum_squares(&self, x: &CpuTensor) -> BackendResult<f64> {
        Ok(train_ops::sum_squares(x))
    }

    fn adamw(
        &self,
        param: &mut CpuTensor,
        grad: &CpuTensor,
        m: &mut CpuTensor,
        v: &mut CpuTensor,
        hp: &AdamWStep,
    ) -> BackendResult<()> {
        train_ops::adamw(param, grad, m, v, hp);
        Ok(())
    }
}

/// A zeroed `rows × cols` buffer, or an out-of-memory error instead of an abort.
fn alloc_zeroed(rows: usize, cols: usize) -> BackendResult<Vec<f32>> {
    let n = rows.checked_mul(cols).ok_or_else(|| BackendError::OutOfMemory(format!("[{rows}, {cols}] overflows")))?;
    if let Some(mut v) = buffers::take(n) {
        v.resize(n, 0.0);
        return Ok(v);
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| BackendError::OutOfMemory(format!("[{rows}, {cols}] f32: {e}")))?;
    v.resize(n, 0.0);
    Ok(v)
}

fn vector(w: &CpuWeight) -> &[f32] {
    w.vector.as_deref().unwrap_or_else(|| panic!("weight '{}' is a matrix, not a vector", w.name))
}

#[cfg(test)]
mod tests;
