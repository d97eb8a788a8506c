//! The CUDA backend: weights, KV blocks and adapter slots in device memory, and
//! every op run by kernels of ours (`kernels/*.cu`, compiled with NVRTC at
//! start-up) or by cuBLAS for dense GEMMs.
//!
//! cudarc loads libcuda, cuBLAS and NVRTC at run time, so this module builds and
//! its host-side tests run on machines without CUDA; [`CudaBackend::new`] is
//! where a missing driver or GPU becomes an error. The CPU backend is the
//! reference: `tandem selftest --device cuda` runs every op on both.
//!
//! One context and one stream per backend (so per engine); every op is queued
//! on that stream in order, and only downloads wait for the device.

pub mod errors;
mod gemm;
pub mod launch;
pub mod libs;
pub mod nvrtc;
mod ops;
pub mod plan;
mod step_meta;
mod train_ops;

use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use super::{
    AdamWStep, AttentionMeta, Backend, BackendError, BackendResult, CrossEntropySums, HostWeight, KvCacheSpec,
    LoraSegment, MatmulJob, RopeTable,
};
use crate::backend::{LoraMatrix, LoraValues};
use crate::quant::ggml::WeightKind;
use launch::Kernels;

/// A weight in device memory: its bytes as loaded (quantised kinds stay
/// quantised); vectors (norms, biases) are expanded to f32 at load.
pub struct CudaWeight {
    pub name: String,
    pub kind: WeightKind,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    data: CudaSlice<u8>,
    vector: Option<CudaSlice<f32>>,
    /// GPTQ act-order: element j of a row multiplies input `input_perm[j]`
    /// (inputs are gathered into that order before the product).
    input_perm: Option<CudaSlice<u32>>,
}

/// f32 activations `[rows, cols]`, row-major, in device memory.
pub struct CudaTensor {
    data: CudaSlice<f32>,
    rows: usize,
    cols: usize,
}

/// Per layer, keys and values for every slot: `[slots, kv_heads * head_dim]`
/// of `spec.dtype` (f32, or bf16 as u16 bits).
pub struct CudaKvCache {
    spec: KvCacheSpec,
    k: Vec<CudaSlice<u8>>,
    v: Vec<CudaSlice<u8>>,
}

/// One adapted projection in device memory (`a` `[rank, in]`, `bt` `[rank, out]`,
/// f32 or bf16 as the adapter was stored).
pub struct CudaLora {
    rank: usize,
    in_features: usize,
    out_features: usize,
    bf16: bool,
    a: CudaSlice<u8>,
    bt: CudaSlice<u8>,
}

/// Device scratch reused across ops, grown on demand (the engine thread is the
/// only caller, so the lock is never contended).
#[derive(Default)]
struct Scratch {
    act16: Option<CudaSlice<u16>>,
    weight16: Option<CudaSlice<u16>>,
    weight32: Option<CudaSlice<f32>>,
    /// 0, 1, 2, ... (row ids for expanding a whole weight with dequant_rows).
    iota: Option<CudaSlice<u32>>,
    lora_t: Option<CudaSlice<f32>>,
    attn_acc: Option<CudaSlice<f32>>,
    attn_ml: Option<CudaSlice<f32>>,
}

/// Choices made when opening a device.
#[derive(Debug, Clone, Copy, Default)]
pub struct CudaOptions {
    /// Every GEMM in f32 (quantised and 16-bit weights expanded to f32), as the
    /// CPU computes: slower, for checking tokens against the CPU exactly.
    pub f32_gemm: bool,
}

pub struct CudaBackend {
    ordinal: usize,
    options: CudaOptions,
    device_name: String,
    arch: String,
    /// bf16 `mma.sync` (sm_80 and later): the `mmq` kernels run.
    tensor_cores: bool,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Mutex<CudaBlas>,
    kernels: Kernels,
    scratch: Mutex<Scratch>,
    /// This step's metadata on the device (see `step_meta.rs`).
    meta: Mutex<step_meta::StepMeta>,
    /// The rope table last uploaded (models use one table for their lifetime).
    rope_freq: Mutex<Option<(Vec<f32>, CudaSlice<f32>)>>,
}

/// A failed driver call as a backend error naming what failed (a lost
/// context, out of memory, or a device error: see [`errors::driver_error`]).
fn ck<T>(r: Result<T, cudarc::driver::DriverError>, what: &str) -> Result<T, BackendError> {
    r.map_err(|e| errors::driver_error(e, what))
}

/// A lock whose holder panicked: the device state it guarded is unknown.
fn poisoned() -> BackendError {
    BackendError::Device("a previous device op panicked while holding the backend's scratch".into())
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles (or reads cached) kernels for its
    /// architecture and sets up cuBLAS.
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        Self::with_options(ordinal, CudaOptions::default())
    }

    pub fn with_options(ordinal: usize, options: CudaOptions) -> Result<Self, BackendError> {
        let err = |what: &str, e: &dyn std::fmt::Debug| BackendError::Invalid(format!("cuda:{ordinal}: {what}: {e:?}"));
        if !libs::driver_present() {
            return Err(BackendError::Invalid(
                "no CUDA driver (libcuda.so.1) on this machine; use --device cpu".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| err("counting devices", &e))?;
        if ordinal >= count.max(0) as usize {
            return Err(BackendError::Invalid(format!("cuda:{ordinal}: this machine has {count} CUDA device(s)")));
        }
        if !libs::cublas_present() {
            return Err(BackendError::Invalid(
                "cuBLAS (libcublas.so.13) not found; set TANDEM_CUDA_LIB_DIRS to its directory".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err("creating a context", &e))?;
        // One stream per backend and everything queued on it in order: cudarc's
        // per-allocation events would only add overhead.
        // SAFETY: no other stream ever touches this context's allocations.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(|e| err("compute capability", &e))?;
        let arch = format!("sm_{major}{minor}");
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let stream = ctx.new_stream().map_err(|e| err("creating a stream", &e))?;
        if ctx.has_async_alloc() {
            // Only a cost if it fails: freed memory goes back to the driver.
            if let Err(e) = keep_freed_memory_pooled(&ctx) {
                tracing::warn!("cuda:{ordinal}: the memory pool's release threshold stays 0: {e:?}");
            }
        }
        match nvrtc::version() {
            Ok((maj, min)) => tracing::info!(
                "cuda:{ordinal}: {device_name} ({arch}); kernels compiled by NVRTC {maj}.{min} from {}",
                libs::nvrtc().map_or_else(|| "the loader's path".to_string(), |p| p.display().to_string())
            ),
            Err(e) => tracing::warn!("cuda:{ordinal}: NVRTC: {e}"),
        }
        let kernels = Kernels::load(&ctx, &arch)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err("cuBLAS", &e))?;
        Ok(Self {
            ordinal,
            options,
            device_name,
            arch,
            tensor_cores: major >= 8,
            ctx,
            stream,
            blas: Mutex::new(blas),
            kernels,
            scratch: Mutex::new(Scratch::default()),
            meta: Mutex::new(step_meta::StepMeta::default()),
            rope_freq: Mutex::new(None),
        })
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// (free, total) device memory in bytes. Free counts what this process's
    /// memory pool holds unused: the pool keeps freed blocks (see
    /// [`keep_freed_memory_pooled`]) and the driver counts them as used.
    pub fn memory_info(&self) -> Result<(usize, usize), BackendError> {
        let (free, total) = self.ctx.mem_get_info().map_err(|e| errors::driver_error(e, "cuMemGetInfo"))?;
        Ok((free + pool_idle_bytes(&self.ctx).unwrap_or(0), total))
    }

    /// How many KV blocks of `spec`'s shape fit once `utilization` of the
    /// device's memory is in use, keeping `reserve` bytes for activations:
    /// weights and adapter slots are already resident, so what is free now is
    /// what the cache may take (vLLM's `gpu_memory_utilization`).
    pub fn kv_blocks_that_fit(
        &self,
        spec: KvCacheSpec,
        utilization: f64,
        reserve: usize,
    ) -> Result<usize, BackendError> {
        let (free, total) = self.memory_info()?;
        let used = total - free;
        let budget = (total as f64 * utilization) as usize;
        let left = budget.saturating_sub(used).saturating_sub(reserve);
        Ok(left / spec.block_bytes().max(1))
    }

    /// Waits until every queued op has finished.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        ck(self.stream.synchronize(), "synchronize")
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    fn upload_vec<T: DeviceRepr + ValidAsZeroBits>(&self, v: &[T]) -> Result<CudaSlice<T>, BackendError> {
        // cuMemAlloc of 0 bytes fails; an empty upload never gets read.
        if v.is_empty() {
            return self.alloc_zeros(1);
        }
        ck(self.stream.clone_htod(v), "upload")
    }

    fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>, BackendError> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| errors::driver_error(e, &format!("allocating {} bytes", n * size_of::<T>())))
    }

    /// Greedy sampling and log-probability normaliser on the device: per row of
    /// `logits`, (argmax, max, logsumexp). Only 12 bytes per row cross PCIe.
    pub fn argmax_logsumexp(&self, logits: &CudaTensor) -> Result<Vec<(u32, f32, f32)>, BackendError> {
        ops::argmax_logsumexp(self, logits)
    }
}

/// cudarc allocates with `cuMemAllocAsync` from the device's default pool,
/// whose release threshold is 0: every synchronize would hand freed blocks
/// back to the driver, and the next step's temporaries would map them again.
/// With no threshold the pool keeps what it has (freed blocks are reused by
/// later allocations of this process; `cuMemGetInfo` counts them as used).
fn keep_freed_memory_pooled(ctx: &CudaContext) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    let pool = default_pool(ctx)?;
    let mut threshold = u64::MAX;
    // SAFETY: the attribute takes a pointer to a u64.
    unsafe {
        cudarc::driver::sys::cuMemPoolSetAttribute(
            pool,
            CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
    }
}

/// Bytes the device's default pool has reserved but not handed out.
fn pool_idle_bytes(ctx: &CudaContext) -> Result<usize, cudarc::driver::DriverError> {
    use cudarc::driver::sys::{self, CUmemPool_attribute::*};
    let pool = default_pool(ctx)?;
    let (mut reserved, mut used) = (0u64, 0u64);
    // SAFETY: both attributes are u64.
    unsafe {
        sys::cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, (&mut reserved as *mut u64).cast())
            .result()?;
        sys::cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, (&mut used as *mut u64).cast()).result()?;
    }
    Ok(reserved.saturating_sub(used) as usize)
}

/// The device's default memory pool (owned by the driver, never freed by us).
fn default_pool(ctx: &CudaContext) -> Result<cudarc::driver::sys::CUmemoryPool, cudarc::driver::DriverError> {
    let mut pool: cudarc::driver::sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer for the handle.
    unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()? };
    Ok(pool)
}

/// Grows `slot` to hold at least `n` elements and returns it.
fn grow<'a, T: DeviceRepr + ValidAsZeroBits>(
    be: &CudaBackend,
    slot: &'a mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'a mut CudaSlice<T>, BackendError> {
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        // Free the old buffer first, so growing needs only the new size.
        *slot = None;
        *slot = Some(be.alloc_zeros::<T>(n.next_power_of_two())?);
    }
    Ok(slot.as_mut().expect("just set"))
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Tensor = CudaTensor;
    type KvCache = CudaKvCache;
    type LoraWeight = CudaLora;

    fn name(&self) -> String {
        format!("cuda:{} ({}, {})", self.ordinal, self.device_name, self.arch)
    }

    fn load_weight(&self, w: HostWeight) -> BackendResult<CudaWeight> {
        w.validate()?;
        let input_perm = w.input_perm.as_deref().map(|p| self.upload_vec(p)).transpose()?;
        let row_bytes = w.kind.row_bytes(w.cols).unwrap_or(0);
        let vector = if w.rows == 1 {
            let mut v = vec![0f32; w.cols];
            crate::quant::ggml::dequantize(w.kind, w.bytes.as_slice(), &mut v)
                .map_err(|e| BackendError::BadWeight { name: w.name.clone(), reason: e.to_string() })?;
            Some(self.upload_vec(&v)?)
        } else {
            None
        };
        let data = self
            .stream
            .clone_htod(w.bytes.as_slice())
            .map_err(|e| errors::driver_error(e, &format!("uploading weight '{}'", w.name)))?;
        Ok(CudaWeight { name: w.name, kind: w.kind, rows: w.rows, cols: w.cols, row_bytes, data, vector, input_perm })
    }

    fn device_lost(&self) -> bool {
        errors::context_lost_seen()
    }

    fn weight_shape(&self, w: &CudaWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }
    fn zeros(&self, rows: usize, cols: usize) -> BackendResult<CudaTensor> {
        Ok(CudaTensor { data: self.alloc_zeros(rows * cols)?, rows, cols })
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> BackendResult<CudaTensor> {
        assert_eq!(data.len(), rows * cols);
        Ok(CudaTensor { data: self.upload_vec(data)?, rows, cols })
    }
    fn download(&self, t: &CudaTensor) -> BackendResult<Vec<f32>> {
        let mut v = ck(self.stream.clone_dtoh(&t.data), "download")?;
        v.truncate(t.rows * t.cols);
        Ok(v)
    }
    fn shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaTensor) -> BackendResult<()> {
        ops::embedding(self, table, ids, out)
    }
    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32, out: &mut CudaTensor) -> BackendResult<()> {
        ops::rms_norm(self, x, w, eps, out)
    }
    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> BackendResult<()> {
        ops::add_assign(self, x, y)
    }
    fn matmul_many(&self, x: &CudaTensor, jobs: &mut [MatmulJob<'_, Self>]) -> BackendResult<()> {
        gemm::matmul_many(self, x, jobs)
    }
    fn rope(
        &self,
        x: &mut CudaTensor,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> BackendResult<()> {
        ops::rope(self, x, heads, head_dim, positions, table, 1.0)
    }
    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor, out: &mut CudaTensor) -> BackendResult<()> {
        ops::silu_mul(self, gate, up, out)
    }
    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> BackendResult<CudaTensor> {
        ops::gather_rows(self, x, rows)
    }

    fn load_lora(&self, m: &Arc<LoraMatrix>) -> BackendResult<CudaLora> {
        let bytes = |v: &LoraValues| -> Result<CudaSlice<u8>, BackendError> {
            let host: Vec<u8> = match v {
                LoraValues::F32(x) => x.iter().flat_map(|f| f.to_le_bytes()).collect(),
                LoraValues::Bf16(x) => x.iter().flat_map(|h| h.to_bits().to_le_bytes()).collect(),
            };
            self.stream.clone_htod(&host).map_err(|e| errors::driver_error(e, "uploading a LoRA slot"))
        };
        Ok(CudaLora {
            rank: m.rank,
            in_features: m.in_features,
            out_features: m.out_features,
            bf16: matches!(m.a, LoraValues::Bf16(_)),
            a: bytes(&m.a)?,
            bt: bytes(&m.bt)?,
        })
    }

    fn lora_add(&self, x: &CudaTensor, segments: &[LoraSegment<'_, Self>], out: &mut CudaTensor) -> BackendResult<()> {
        ops::lora_add(self, x, segments, out)
    }

    fn alloc_kv(&self, spec: KvCacheSpec) -> BackendResult<CudaKvCache> {
        let per_layer = spec
            .num_blocks
            .checked_mul(spec.block_size)
            .and_then(|s| s.checked_mul(spec.kv_heads * spec.head_dim))
            .ok_or_else(|| BackendError::OutOfMemory("KV cache size overflows".into()))?;
        let layer_bytes = per_layer * spec.dtype.bytes();
        let need = layer_bytes as u128 * 2 * spec.num_layers as u128;
        let (free, _) = self.memory_info()?;
        if need > free as u128 {
            return Err(BackendError::OutOfMemory(format!(
                "the KV cache needs {} MiB and the device has {} MiB free; lower cache.num_blocks or \
                 cache.gpu_memory_utilization",
                need >> 20,
                free >> 20
            )));
        }
        let alloc = || {
            self.stream
                .alloc_zeros::<u8>(layer_bytes.max(4))
                .map_err(|e| errors::driver_error(e, "allocating the KV cache"))
        };
        let mut k = Vec::with_capacity(spec.num_layers);
        let mut v = Vec::with_capacity(spec.num_layers);
        for _ in 0..spec.num_layers {
            k.push(alloc()?);
            v.push(alloc()?);
        }
        Ok(CudaKvCache { spec, k, v })
    }

    fn write_kv(
        &self,
        cache: &mut CudaKvCache,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
        slots: &[u32],
    ) -> BackendResult<()> {
        ops::write_kv(self, cache, layer, k, v, slots)
    }

    fn paged_attention(
        &self,
        cache: &CudaKvCache,
        layer: usize,
        q: &CudaTensor,
        meta: &AttentionMeta<'_>,
        out: &mut CudaTensor,
    ) -> BackendResult<()> {
        ops::paged_attention(self, cache, layer, q, meta, out)
    }

    fn matmul_input_grad(
        &self,
        jobs: &[(&CudaTensor, &CudaWeight)],
        dx: &mut CudaTensor,
        accumulate: bool,
    ) -> BackendResult<()> {
        gemm::matmul_input_grad(self, jobs, dx, accumulate)
    }
    fn gemm(
        &self,
        a: &CudaTensor,
        trans_a: bool,
        b: &CudaTensor,
        trans_b: bool,
        alpha: f32,
        beta: f32,
        c: &mut CudaTensor,
    ) -> BackendResult<()> {
        gemm::gemm(self, a, trans_a, b, trans_b, alpha, beta, c)
    }
    fn rms_norm_backward(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
        dy: &CudaTensor,
        dx: &mut CudaTensor,
    ) -> BackendResult<()> {
        train_ops::rms_norm_backward(self, x, w, eps, dy, dx)
    }
    fn rope_backward(
        &self,
        dx: &mut CudaTensor,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> BackendResult<()> {
        ops::rope(self, dx, heads, head_dim, positions, table, -1.0)
    }
    fn silu_mul_backward(
        &self,
        gate: &CudaTensor,
        up: &CudaTensor,
        dout: &CudaTensor,
        dgate: &mut CudaTensor,
        dup: &mut CudaTensor,
    ) -> BackendResult<()> {
        train_ops::silu_mul_backward(self, gate, up, dout, dgate, dup)
    }
    fn attention_backward(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        out: &CudaTensor,
        dout: &CudaTensor,
        meta: &AttentionMeta<'_>,
        dq: &mut CudaTensor,
        dk: &mut CudaTensor,
        dv: &mut CudaTensor,
    ) -> BackendResult<()> {
        train_ops::attention_backward(self, q, k, v, out, dout, meta, dq, dk, dv)
    }
    fn cross_entropy(
        &self,
        logits: &mut CudaTensor,
        labels: &[u32],
        grad_scale: Option<f32>,
    ) -> BackendResult<CrossEntropySums> {
        train_ops::cross_entropy(self, logits, labels, grad_scale)
    }
    fn add_rows(&self, src: &CudaTensor, rows: &[usize], dst: &mut CudaTensor) -> BackendResult<()> {
        train_ops::add_rows(self, src, rows, dst)
    }
    fn dropout(&self, x: &CudaTensor, p: f32, seed: u64, out: &mut CudaTensor) -> BackendResult<()> {
        train_ops::dropout(self, x, p, seed, out)
    }
    fn copy(&self, x: &CudaTensor) -> BackendResult<CudaTensor> {
        train_ops::copy(self, x)
    }
    fn fill(&self, x: &mut CudaTensor, value: f32) -> BackendResult<()> {
        train_ops::fill(self, x, value)
    }
    fn scale(&self, x: &mut CudaTensor, s: f32) -> BackendResult<()> {
        train_ops::scale(self, x, s)
    }
    fn sum_squares(&self, x: &CudaTensor) -> BackendResult<f64> {
        train_ops::sum_squares(self, x)
    }
    fn adamw(
        &self,
        param: &mut CudaTensor,
        grad: &CudaTensor,
        m: &mut CudaTensor,
        v: &mut CudaTensor,
        hp: &AdamWStep,
    ) -> BackendResult<()> {
        train_ops::adamw(self, param, grad, m, v, hp)
    }
}
