//! A backend that fails on purpose: any backend, with op number N (counting
//! every compute op from now) failing as a device error or as a lost device.
//! The fault drills (tests/backend_faults.rs) run it over the CPU backend, and
//! `tandem selftest --device cuda` over the GPU, to show that a failed step
//! fails only its requests while a lost device stops the engine.
//!
//! Loading (weights, adapters, the KV cache) is never failed: what is drilled
//! is a device going wrong under traffic, not a model that does not fit.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;

/// What the injected op reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// [`BackendError::Device`]: that step fails, the next ones run.
    Failed,
    /// [`BackendError::DeviceLost`]: nothing runs after it.
    Lost,
    /// A panic in the op (a bug, not a device error).
    Panic,
}

/// The counter and the armed fault, shared between a [`FaultInjecting`]
/// backend and whoever drills it (the backend itself moves into an engine).
#[derive(Clone, Default)]
pub struct FaultTrigger {
    ops: Arc<AtomicUsize>,
    armed: Arc<std::sync::Mutex<Option<(usize, InjectedFault)>>>,
    lost: Arc<AtomicBool>,
}

impl FaultTrigger {
    /// Arms `fault` for the `n`-th op from now (1 = the next op).
    pub fn arm(&self, n: usize, fault: InjectedFault) {
        let at = self.ops.load(Ordering::SeqCst) + n.max(1) - 1;
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some((at, fault));
    }
    /// Compute ops run so far.
    pub fn ops(&self) -> usize {
        self.ops.load(Ordering::SeqCst)
    }
    /// Whether an armed fault is still waiting for its op.
    pub fn pending(&self) -> bool {
        self.armed.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn tick(&self) -> BackendResult<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(BackendError::DeviceLost("injected: the device was lost earlier".into()));
        }
        let i = self.ops.fetch_add(1, Ordering::SeqCst);
        let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        match *armed {
            Some((at, fault)) if at == i => {
                *armed = None;
                drop(armed);
                match fault {
                    InjectedFault::Failed => Err(BackendError::Device(format!("injected failure at op {i}"))),
                    InjectedFault::Lost => {
                        // A lost context stays lost: every later op fails too.
                        self.lost.store(true, Ordering::SeqCst);
                        Err(BackendError::DeviceLost(format!("injected at op {i}")))
                    }
                    InjectedFault::Panic => panic!("injected panic at op {i}"),
                }
            }
            _ => Ok(()),
        }
    }
}

/// `inner`, with the fault its [`FaultTrigger`] arms.
pub struct FaultInjecting<B> {
    inner: B,
    trigger: FaultTrigger,
}

impl<B: Backend> FaultInjecting<B> {
    pub fn new(inner: B) -> Self {
        Self { inner, trigger: FaultTrigger::default() }
    }
    /// A handle that outlives handing the backend to an engine.
    pub fn trigger(&self) -> FaultTrigger {
        self.trigger.clone()
    }
}

impl<B: Backend> Backend for FaultInjecting<B> {
    type Weight = B::Weight;
    type Tensor = B::Tensor;
    type KvCache = B::KvCache;
    type LoraWeight = B::LoraWeight;

    fn name(&self) -> String {
        format!("{} (fault injection)", self.inner.name())
    }
    fn exact_matmuls<R>(&self, f: impl FnOnce() -> R) -> R {
        self.inner.exact_matmuls(f)
    }
    fn device_lost(&self) -> bool {
        self.trigger.lost.load(Ordering::SeqCst) || self.inner.device_lost()
    }
    fn load_weight(&self, w: HostWeight) -> BackendResult<B::Weight> {
        self.inner.load_weight(w)
    }
    fn weight_shape(&self, w: &B::Weight) -> (usize, usize) {
        self.inner.weight_shape(w)
    }
    fn zeros(&self, rows: usize, cols: usize) -> BackendResult<B::Tensor> {
        self.trigger.tick()?;
        self.inner.zeros(rows, cols)
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> BackendResult<B::Tensor> {
        self.trigger.tick()?;
        self.inner.upload(data, rows, cols)
    }
    fn download(&self, t: &B::Tensor) -> BackendResult<Vec<f32>> {
        self.trigger.tick()?;
        self.inner.download(t)
    }
    fn shape(&self, t: &B::Tensor) -> (usize, usize) {
        self.inner.shape(t)
    }
    fn embedding(&self, table: &B::Weight, ids: &[u32], out: &mut B::Tensor) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.embedding(table, ids, out)
    }
    fn rms_norm(&self, x: &B::Tensor, w: &B::Weight, eps: f32, out: &mut B::Tensor) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.rms_norm(x, w, eps, out)
    }
    fn add_assign(&self, x: &mut B::Tensor, y: &B::Tensor) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.add_assign(x, y)
    }
    fn matmul_many(&self, x: &B::Tensor, jobs: &mut [MatmulJob<'_, Self>]) -> BackendResult<()> {
        self.trigger.tick()?;
        let mut inner: Vec<MatmulJob<'_, B>> =
            jobs.iter_mut().map(|j| MatmulJob { w: j.w, bias: j.bias, out: &mut *j.out }).collect();
        self.inner.matmul_many(x, &mut inner)
    }
    fn rope(&self, x: &mut B::Tensor, heads: usize, d: usize, pos: &[u32], t: &RopeTable) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.rope(x, heads, d, pos, t)
    }
    fn silu_mul(&self, gate: &B::Tensor, up: &B::Tensor, out: &mut B::Tensor) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.silu_mul(gate, up, out)
    }
    fn gather_rows(&self, x: &B::Tensor, rows: &[usize]) -> BackendResult<B::Tensor> {
        self.trigger.tick()?;
        self.inner.gather_rows(x, rows)
    }
    fn load_lora(&self, m: &Arc<LoraMatrix>) -> BackendResult<B::LoraWeight> {
        self.inner.load_lora(m)
    }
    fn lora_add(&self, x: &B::Tensor, segments: &[LoraSegment<'_, Self>], out: &mut B::Tensor) -> BackendResult<()> {
        self.trigger.tick()?;
        let inner: Vec<LoraSegment<'_, B>> =
            segments.iter().map(|s| LoraSegment { rows: s.rows.clone(), w: s.w }).collect();
        self.inner.lora_add(x, &inner, out)
    }
    fn alloc_kv(&self, spec: KvCacheSpec) -> BackendResult<B::KvCache> {
        self.inner.alloc_kv(spec)
    }
    fn write_kv(&self, c: &mut B::KvCache, l: usize, k: &B::Tensor, v: &B::Tensor, s: &[u32]) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.write_kv(c, l, k, v, s)
    }
    fn paged_attention(
        &self,
        c: &B::KvCache,
        l: usize,
        q: &B::Tensor,
        m: &AttentionMeta<'_>,
        out: &mut B::Tensor,
    ) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.paged_attention(c, l, q, m, out)
    }
    fn matmul_input_grad(&self, jobs: &[(&B::Tensor, &B::Weight)], dx: &mut B::Tensor, acc: bool) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.matmul_input_grad(jobs, dx, acc)
    }
    fn gemm(
        &self,
        a: &B::Tensor,
        ta: bool,
        b: &B::Tensor,
        tb: bool,
        alpha: f32,
        beta: f32,
        c: &mut B::Tensor,
    ) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.gemm(a, ta, b, tb, alpha, beta, c)
    }
    fn rms_norm_backward(
        &self,
        x: &B::Tensor,
        w: &B::Weight,
        eps: f32,
        dy: &B::Tensor,
        dx: &mut B::Tensor,
    ) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.rms_norm_backward(x, w, eps, dy, dx)
    }
    fn rope_backward(&self, x: &mut B::Tensor, h: usize, d: usize, p: &[u32], t: &RopeTable) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.rope_backward(x, h, d, p, t)
    }
    fn silu_mul_backward(
        &self,
        g: &B::Tensor,
        u: &B::Tensor,
        d: &B::Tensor,
        dg: &mut B::Tensor,
        du: &mut B::Tensor,
    ) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.silu_mul_backward(g, u, d, dg, du)
    }
    fn attention_backward(
        &self,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
        out: &B::Tensor,
        dout: &B::Tensor,
        meta: &AttentionMeta<'_>,
        dq: &mut B::Tensor,
        dk: &mut B::Tensor,
        dv: &mut B::Tensor,
    ) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.attention_backward(q, k, v, out, dout, meta, dq, dk, dv)
    }
    fn cross_entropy(&self, l: &mut B::Tensor, labels: &[u32], s: Option<f32>) -> BackendResult<CrossEntropySums> {
        self.trigger.tick()?;
        self.inner.cross_entropy(l, labels, s)
    }
    fn add_rows(&self, src: &B::Tensor, rows: &[usize], dst: &mut B::Tensor) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.add_rows(src, rows, dst)
    }
    fn dropout(&self, x: &B::Tensor, p: f32, seed: u64, out: &mut B::Tensor) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.dropout(x, p, seed, out)
    }
    fn copy(&self, x: &B::Tensor) -> BackendResult<B::Tensor> {
        self.trigger.tick()?;
        self.inner.copy(x)
    }
    fn fill(&self, x: &mut B::Tensor, v: f32) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.fill(x, v)
    }
    fn scale(&self, x: &mut B::Tensor, s: f32) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.scale(x, s)
    }
    fn sum_squares(&self, x: &B::Tensor) -> BackendResult<f64> {
        self.trigger.tick()?;
        self.inner.sum_squares(x)
    }
    fn adamw(
        &self,
        p: &mut B::Tensor,
        g: &B::Tensor,
        m: &mut B::Tensor,
        v: &mut B::Tensor,
        hp: &AdamWStep,
    ) -> BackendResult<()> {
        self.trigger.tick()?;
        self.inner.adamw(p, g, m, v, hp)
    }
}
